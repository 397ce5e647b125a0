"""FP8 block (128 x 128 scales): quantize against a numpy/ml_dtypes reference, dequantize, constructors, errors."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from megamoe_jax.quant import fp8_block
from megamoe_jax.quant.fp8_block import FP8BlockTensor


def np_reference(x: np.ndarray, scale_fmt: str):
    """Plain numpy: per-block amax (floored at 1e-4), the scale rule, fp32 division, clip, ml_dtypes RNE cast."""
    *lead, n, k = x.shape
    nb, kb = -(-n // 128), -(-k // 128)
    xp = np.zeros(tuple(lead) + (nb * 128, kb * 128), np.float32)
    xp[..., :n, :k] = np.where(np.isnan(x), 0, np.abs(x))
    amax = xp.reshape(tuple(lead) + (nb, 128, kb, 128)).max(axis=(-3, -1))
    amax = np.minimum(np.maximum(amax, np.float32(1e-4)), np.finfo(np.float32).max)
    if scale_fmt == "ue8m0":
        s = (2.0 ** np.ceil(np.log2(amax.astype(np.float64) / 448))).astype(np.float32)
    else:
        s = (amax / np.float32(448)).astype(np.float32)
    sf = np.repeat(np.repeat(s, 128, -2), 128, -1)[..., :n, :k]
    with np.errstate(invalid="ignore"):
        q = np.clip(x / sf, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, s


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float32"])
def test_quantize_matches_numpy_reference(scale_fmt):
    rng = np.random.default_rng(21)
    x = (rng.standard_normal((2, 130, 260)) * np.exp(2 * rng.standard_normal((2, 130, 260)))).astype(np.float32)
    x[0, :128, :128] *= 1e-7                          # a block under the 1e-4 amax floor
    x[1, 128:, 256:] = 0.0                            # an all-zero partial edge block
    x[0, 5, 7] = -0.0
    x[1, 3, 3] = -1e-30                               # rounds to -0
    t = fp8_block.quantize(jnp.asarray(x), scale_fmt=scale_fmt)
    q, s = np_reference(x, scale_fmt)
    assert t.scale.shape == (2, 2, 3) and t.shape == (2, 130, 260)
    np.testing.assert_array_equal(np.asarray(t.scale), s)
    np.testing.assert_array_equal(np.asarray(t.weight).view(np.uint8), q.view(np.uint8))
    deq = np.asarray(t.dequantize())
    np.testing.assert_array_equal(deq, q.astype(np.float32) * np.repeat(np.repeat(s, 128, -2), 128, -1)[..., :130,
                                                                                                        :260])
    assert np.abs(deq - x).max() <= np.abs(x).max() * 2 ** -4
    # bf16 input: same bytes as quantizing its exact f32 value
    xb = jnp.asarray(x).astype(jnp.bfloat16)
    tb = fp8_block.quantize(xb, scale_fmt=scale_fmt)
    qb, _ = np_reference(np.asarray(xb.astype(jnp.float32)), scale_fmt)
    np.testing.assert_array_equal(np.asarray(tb.weight).view(np.uint8), qb.view(np.uint8))


def test_ue8m0_scales_are_powers_of_two_and_round_trip():
    rng = np.random.default_rng(22)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    x[0, 0] = 896.0                                    # amax = 448 * 2 exactly: scale 2, not rounded up
    t = fp8_block.quantize(jnp.asarray(x))
    b = t.to_e8m0()
    t2 = FP8BlockTensor.from_e8m0(np.asarray(t.weight), b)
    np.testing.assert_array_equal(np.asarray(t2.scale), np.asarray(t.scale))
    assert np.asarray(t.scale)[0, 0] == 2.0 and np.abs(np.asarray(t.weight.astype(jnp.float32))).max() == 448
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: a.dequantize())(t)), np.asarray(t.dequantize()))


def test_special_values():
    x = np.ones((128, 128), np.float32)
    x[0, 0], x[0, 1], x[0, 2] = np.inf, -np.inf, np.nan
    t = fp8_block.quantize(jnp.asarray(x))
    w = np.asarray(t.weight).view(np.uint8)
    assert w[0, 0] == 0x7E and w[0, 1] == 0xFE and (w[0, 2] & 0x7F) == 0x7F
    assert np.isfinite(np.asarray(t.scale)).all()


def test_constructors_and_errors():
    w = np.zeros((130, 260), ml_dtypes.float8_e4m3fn)
    t = FP8BlockTensor.from_float(w, np.ones((2, 3), ml_dtypes.bfloat16))
    assert t.scale.dtype == np.float32 and t.shape == (130, 260) and t.ndim == 2
    with pytest.raises(ValueError, match="scale shape"):
        FP8BlockTensor(w, np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        FP8BlockTensor(w.astype(np.float32), np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="must be float32"):
        FP8BlockTensor(w, np.ones((2, 3), np.float64))
    with pytest.raises(ValueError, match="E8M0 NaN"):
        FP8BlockTensor.from_e8m0(w, np.full((2, 3), 255, np.uint8))
    with pytest.raises(ValueError, match="finite"):
        FP8BlockTensor.from_float(w, np.full((2, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="powers of two"):
        FP8BlockTensor(w, np.full((2, 3), 3.0, np.float32)).to_e8m0()
    with pytest.raises(ValueError, match="scale_fmt"):
        fp8_block.quantize(jnp.ones((4, 4)), scale_fmt="e8m0")
    with pytest.raises(ValueError, match=r"\[\.\.\., N, K\]"):
        fp8_block.quantize(jnp.ones((4,)))
