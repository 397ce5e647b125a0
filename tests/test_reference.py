"""pallas_kernels.reference with NVFP4 W4A4 weights against an independent numpy emulation in float64."""
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from megamoe_jax.quant import nvfp4
from pallas_kernels import reference


def np_nvfp4_qdq(x: np.ndarray, G: np.float32, bf16_stats: bool) -> np.ndarray:
    """NVFP4 quantize-dequantize of x [M, K] (f32 values of bf16 activations) written with numpy/ml_dtypes
    casts: compressed-tensors' op order (bf16 vecmax/6, clip to 448 before the E4M3 cast, eps 0.125 for a zero
    scale, y = x / (s / G), clip to +-6, E2M1 RNE). Returns the exact values code * s (float64)."""
    m, k = x.shape
    xb = x.reshape(m, k // 16, 16).astype(np.float32)
    vmax = np.abs(xb).max(-1)
    r = (vmax / np.float32(6)).astype(np.float32)
    if bf16_stats:                                # compressed-tensors divides in the activation dtype
        r = r.astype(ml_dtypes.bfloat16).astype(np.float32)
    s = np.minimum(G * r, np.float32(448)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    s = np.where(s == 0, np.float32(0.125), s)
    d = (s / G).astype(np.float32)
    y = np.clip(xb / d[..., None], -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
    return (y * s[..., None].astype(np.float64)).reshape(m, k)


def np_weight(t) -> np.ndarray:
    """code * s (exact, float64) of an NVFP4 weight, decoded with a plain lookup table."""
    p = np.asarray(t.packed)
    codes = np.stack([p & 0xF, p >> 4], -1).reshape(p.shape[:-1] + (p.shape[-1] * 2,))
    v = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])[codes]
    s = np.asarray(t.block_scale).astype(np.float64)
    return (v.reshape(v.shape[:-1] + (-1, 16)) * s[..., None]).reshape(v.shape)


def test_w4a4_linear_matches_float64_emulation():
    rng = np.random.default_rng(41)
    n, k, m = 24, 64, 12
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = (rng.standard_normal((m, k)) * 0.4).astype(np.float32)
    x[0] *= 8.0                                   # beyond the calibrated amax: saturates, never NaN
    x[1, :16] = 0.0
    xb = jnp.asarray(x).astype(jnp.bfloat16)
    amax_calib = np.float32(1.2)
    G_a = np.float32(2688) / amax_calib
    g_a = np.float32(1) / G_a
    t = nvfp4.quantize(jnp.asarray(w), input_scale=g_a)
    y = np.asarray(reference.linear(xb, t, out_dtype=jnp.float32))
    assert np.isfinite(y).all()
    G_used = np.float32(1) / g_a                  # the multiplier the W4A4 path derives from g_a
    xq = np_nvfp4_qdq(np.asarray(xb.astype(jnp.float32)), G_used, bf16_stats=True)
    wq = np_weight(t)
    want = (xq @ wq.T) * (np.float64(g_a) * np.float64(np.asarray(t.global_scale)))
    scale = np.abs(xq) @ np.abs(wq).T * (np.float64(g_a) * np.float64(np.asarray(t.global_scale)))
    np.testing.assert_array_less(np.abs(y - want), 1e-5 * scale + 1e-30)
    # W4A16: no input scale, activations used as given
    t16 = nvfp4.NVFP4Tensor(t.packed, t.block_scale, t.global_scale)
    y16 = np.asarray(reference.linear(xb, t16, out_dtype=jnp.float32))
    want16 = np.asarray(xb.astype(jnp.float32)).astype(np.float64) @ wq.T * np.float64(np.asarray(t.global_scale))
    np.testing.assert_allclose(y16, want16, rtol=1e-5, atol=1e-5 * np.abs(want16).max())
    assert np.abs(y - y16).max() > 1e-3           # the activation quantization really happened


def test_w4a4_grouped_linear_per_expert_input_scale():
    rng = np.random.default_rng(42)
    e, n, k = 3, 16, 32
    w = rng.standard_normal((e, n, k)).astype(np.float32)
    g_in = np.array([1 / 2688, 2 / 2688, 0.5 / 2688], np.float32)
    t = nvfp4.quantize(jnp.asarray(w), batch_dims=1, input_scale=g_in)
    group_sizes = np.array([3, 0, 4], np.int32)
    x = rng.standard_normal((9, k)).astype(np.float32)          # 2 rows past the end of the groups
    y = np.asarray(reference.grouped_linear(jnp.asarray(x), t, jnp.asarray(group_sizes), out_dtype=jnp.float32))
    wq = np_weight(t)
    gw = np.asarray(t.global_scale)[:, 0]
    gid = np.repeat(np.arange(e), group_sizes)
    for row in range(9):
        if row >= len(gid):
            assert (y[row] == 0).all()
            continue
        ex = gid[row]
        xq = np_nvfp4_qdq(x[row:row + 1], np.float32(1) / g_in[ex], bf16_stats=False)[0]
        want = wq[ex] @ xq * (np.float64(g_in[ex]) * np.float64(gw[ex]))
        scale = np.abs(wq[ex]) @ np.abs(xq) * (np.float64(g_in[ex]) * np.float64(gw[ex]))
        np.testing.assert_array_less(np.abs(y[row] - want), 1e-5 * scale + 1e-30)
