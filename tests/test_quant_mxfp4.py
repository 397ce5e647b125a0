"""MXFP4: bit-exact against compressed-tensors 0.20's MX helpers and MXFP4 compressor; rules; special values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.quant_scheme import MXFP4 as CT_MXFP4
from compressed_tensors.quantization.utils.helpers import calculate_qparams

from megamoe_jax.quant import e2m1, mxfp4
from megamoe_jax.quant.mxfp4 import MXFP4Tensor

SCHEME = QuantizationScheme(targets=["Linear"], **CT_MXFP4)


def ct_mxfp4(w: torch.Tensor):
    n, k = w.shape
    wg = w.unflatten(-1, (k // 32, 32))
    scale, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), SCHEME.weights)
    sd = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, SCHEME)
    return sd["weight_packed"].numpy(), sd["weight_scale"].numpy()


def ct_mx_decompress(packed, scale) -> np.ndarray:
    sd = MXFP4PackedCompressor.decompress({"weight_packed": torch.from_numpy(packed),
                                           "weight_scale": torch.from_numpy(scale)}, SCHEME)
    return sd["weight"].float().numpy()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bit_exact_against_compressed_tensors(dtype):
    rng = np.random.default_rng(11)
    for mag in (1.0, 2e-3, 700.0, 1e-20):
        x = (rng.standard_normal((24, 128)) * np.exp(rng.standard_normal((24, 128))) * mag).astype(np.float32)
        x[0, :32] = 0.0
        # block maxima exactly at the rounding points of the scale rules (significands 1.5, 1.75)
        x[1, 0], x[1, 32], x[1, 64] = 1.5 * mag, 1.75 * mag, -1.7421875 * mag
        w = torch.from_numpy(x).to(getattr(torch, dtype))
        p_ct, s_ct = ct_mxfp4(w)
        t = mxfp4.quantize(jnp.asarray(w.float().numpy()).astype(dtype))
        np.testing.assert_array_equal(np.asarray(t.scale), s_ct, err_msg=f"scale bytes, mag {mag}")
        np.testing.assert_array_equal(np.asarray(t.packed), p_ct, err_msg=f"packed, mag {mag}")
        np.testing.assert_array_equal(np.asarray(t.dequantize(jnp.bfloat16).astype(jnp.float32)),
                                      ct_mx_decompress(p_ct, s_ct), err_msg=f"dequant, mag {mag}")


def test_scale_rules():
    amax = np.array([1.0, 1.5, 1.50001, 1.74, 1.75, 6.0, 6.5, 0.0], np.float32)
    x = np.zeros((8, 32), np.float32)
    x[:, 0] = amax
    xs = jnp.asarray(x)
    ct = np.asarray(mxfp4.quantize(xs).scale)[:, 0].astype(int) - 127
    ocp = np.asarray(mxfp4.quantize(xs, rule="ocp").scale)[:, 0].astype(int) - 127
    ceil = np.asarray(mxfp4.quantize(xs, rule="ceil").scale)[:, 0].astype(int) - 127
    assert ocp.tolist() == [-2, -2, -2, -2, -2, 0, 0, -127]
    assert ct.tolist() == [-2, -2, -2, -2, -1, 0, 0, -127]
    assert ceil.tolist() == [-2, -2, -1, -1, -1, 0, 1, -126]
    # "ceil" never clips: every block max dequantizes to itself or above
    t = mxfp4.quantize(xs, rule="ceil")
    assert (np.abs(np.asarray(t.dequantize())[:, 0]) >= 0.75 * amax).all()
    np.testing.assert_array_equal(2.0 ** ceil[:-1], 2.0 ** np.ceil(np.log2(amax[:-1] / 6)))


def test_codes_and_layout():
    # block scale 2^0 (amax 4 -> floor(log2 4) - 2 = 0): codes are the E2M1 rounding of x itself
    vals = np.array([0, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.2, -6.0, 4.0] + [0] * 18,
                    np.float32)
    t = mxfp4.quantize(jnp.asarray(vals[None]))
    assert np.asarray(t.scale).tolist() == [[127]]
    codes = np.asarray(e2m1.unpack(t.packed))[0][:14]
    assert codes.tolist() == [0, 0, 1, 2, 2, 4, 4, 6, 6, 7, 8, 8, 0xF, 6]
    assert t.shape == (1, 32) and np.asarray(t.packed).shape == (1, 16)


def test_special_values_and_jit():
    x = np.tile(np.linspace(-1, 1, 32, dtype=np.float32), (3, 2))
    x[0, 3] = np.inf
    x[1, 40] = np.nan
    t = mxfp4.quantize(jnp.asarray(x))
    s = np.asarray(t.scale)
    codes = np.asarray(e2m1.unpack(t.packed))
    assert s[0, 0] == 254 and codes[0, 3] == 7
    assert s[1, 1] == 0xFF and (codes[1, 32:] == 0).all()
    deq = np.asarray(t.dequantize())
    assert np.isnan(deq[1, 32:]).all() and np.isfinite(deq[1, :32]).all() and np.isfinite(deq[2]).all()
    j = jax.jit(lambda v: mxfp4.quantize(v))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(j.packed), np.asarray(t.packed))
    # a pytree usable under jit
    y = jax.jit(lambda tt: tt.dequantize())(t)
    np.testing.assert_array_equal(np.asarray(y), deq)
    with pytest.raises(ValueError, match="E8M0 NaN"):
        t.validate("w")


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(jnp.ones((2, 48)))
    with pytest.raises(ValueError, match="rule"):
        mxfp4.quantize(jnp.ones((2, 32)), rule="round")
    with pytest.raises(ValueError, match="scale shape"):
        MXFP4Tensor(jnp.zeros((2, 16), jnp.uint8), jnp.zeros((2, 2), jnp.uint8))
    with pytest.raises(ValueError, match="uint8 E8M0"):
        MXFP4Tensor(jnp.zeros((2, 16), jnp.uint8), jnp.zeros((2, 1), jnp.float32))
    with pytest.raises(ValueError, match="packed must be uint8"):
        MXFP4Tensor(jnp.zeros((2, 16), jnp.int8), jnp.zeros((2, 1), jnp.uint8))
