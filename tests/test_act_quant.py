"""The activation quantizer kernel's method, checked on the CPU.

The Mosaic GPU kernel (pallas_kernels/act_quant.py) never divides per element: it compares bf16 |x| against a
per-(multiplier, scale byte) table of thresholds rounded up to bf16 and counts. Here a numpy emulation of exactly
that method (NaN-propagating block max, IEEE scale byte, bf16 table compares, sign rule) must give the bytes of
the exact quantizer (megamoe_jax.quant.nvfp4, compressed-tensors bit for bit) on awkward inputs; and the kernel
itself must lower for CUDA (its MLIR is built here; the GPU run is tests/gpu/test_act_quant_gpu.py).
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from megamoe_jax.quant import nvfp4
from pallas_kernels import act_quant


def _inputs(seed, t, k):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k)) * np.exp(3 * rng.standard_normal((t, k)))
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, 30)] = rng.choice([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-39, -3e-40], 30)
    x[0, :16] = 0.0
    x[1, 16:32] *= 1e-35
    return x.astype(ml_dtypes.bfloat16)


def _emulate(x_bf16: np.ndarray, G: float):
    """The kernel's method in numpy: (codes uint8 [T, K], scale bytes uint8 [T, K/16])."""
    t, k = x_bf16.shape
    bits = x_bf16.view(np.uint16).reshape(t, k // 16, 16)
    mag = bits & 0x7FFF
    nan_block = (mag > 0x7F80).any(-1)
    vmax = np.where(nan_block, 0x7FC0, mag.max(-1)).astype(np.uint16)
    with np.errstate(all="ignore"):
        fv = (vmax.astype(np.uint32) << 16).view(np.float32)
        r = (fv / np.float32(6)).astype(ml_dtypes.bfloat16).astype(np.float32)
        s = np.minimum(np.float32(G) * r, np.float32(448))
    s = np.where(vmax == 0x7F80, np.float32(448), s)
    byte = np.nan_to_num(s).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    byte = np.where(byte == 0, 0x20, byte)
    byte = np.where(nan_block, 0x7F, byte).astype(np.uint8)
    table = np.asarray(act_quant.threshold_table(jnp.float32(G)))[0] & 0xFFFF    # [128, 8] bf16 bits
    th = table[byte].astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
    a = mag.view(ml_dtypes.bfloat16).astype(np.float32)                          # NaN compares false
    count = (a[..., None] >= th[:, :, None, :7]).sum(-1)
    neg = ((bits & 0x8000) != 0) & (a >= th[:, :, None, 7])
    codes = (count | (neg << 3)).astype(np.uint8).reshape(t, k)
    return codes, byte


@pytest.mark.parametrize("g", [0.004, 3.1e-6, 17.0, 1.0 / 448])
def test_kernel_method_matches_exact_quantizer(g):
    x = _inputs(int(g * 1e6) % 1000, 24, 512)
    G = nvfp4.multiplier_from_g(jnp.float32(g))
    codes, byte = _emulate(x, float(G))
    want_p, want_b = nvfp4.quantize_with_multiplier(jnp.asarray(x), jnp.broadcast_to(G, (24,)))
    unpacked = np.stack([np.asarray(want_p) & 0xF, np.asarray(want_p) >> 4], -1).reshape(24, 512)
    np.testing.assert_array_equal(byte, np.asarray(want_b))
    np.testing.assert_array_equal(codes, unpacked)


def test_threshold_table_layout():
    G = jnp.asarray([1.0, 2688.0 / 3.5], jnp.float32)
    tab = np.asarray(act_quant.threshold_table(G))                                # [2, 128, 8] u32
    assert tab.shape == (2, 128, 8)
    np.testing.assert_array_equal(tab >> 16, tab & 0xFFFF)                        # duplicated halves
    exact = np.asarray(nvfp4.code_thresholds(G)).view(np.uint32)
    lo = (tab & 0xFFFF).astype(np.uint32) << 16
    finite = exact < 0x7F800000
    assert (lo[finite] >= exact[finite]).all() and (lo[finite] - exact[finite] < 0x10000).all()   # bf16 ceiling
    assert ((tab[:, 0x7F] & 0xFFFF) == 0x7FC0).all()                              # NaN row: nothing passes


@pytest.mark.parametrize("mode,grouped", [("codes", False), ("values", True)])
def test_kernel_lowers_for_cuda(mode, grouped):
    x = jax.ShapeDtypeStruct((37, 2064), jnp.bfloat16)
    G = jnp.asarray([100.0, 3.0], jnp.float32) if grouped else jnp.asarray([100.0], jnp.float32)
    gid = jnp.zeros((37,), jnp.int32) if grouped else None
    f = jax.jit(lambda v: act_quant._quantize_mgpu(v, G, gid, mode, True, act_quant.Config()))
    text = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
