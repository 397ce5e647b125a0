"""NVFP4 activation quantizer: x [T, K] -> packed e2m1 codes uint8 [T, K/2] + E4M3 block scales [T, K/16].

Numerics are `megamoe_jax.quant.nvfp4.quantize` with a given global scale (compressed-tensors bit for bit):
    r_b = vecmax_b / 6 (rounded to bf16 for bf16 input),  s_b = E4M3_RNE(min(G * r_b, 448)), 0 -> 0.125,
    code = E2M1_RNE(clip(fl32(x / fl32(s_b / G)), -6, 6)),  G = 1 / g (the global scale is the dequant factor g)
Saturating: anything beyond the calibrated amax becomes +-6, never NaN; a NaN input gives its block a NaN scale.

The W4A4 grouped matmul does not need the packed bytes, only the exact dequantized values value(code) * s_b
(<= 6 significant bits: exact in bf16); `quantize_dequantize_grouped` returns those, with the activation's
global scale left to the matmul's fp32 epilogue.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from megamoe_jax.quant import nvfp4
from pallas_kernels import reference as _reference


def _row_multiplier(global_scale, t: int) -> jax.Array:
    """Per-row quant multiplier G = fl32(1/g) [T] from g of shape () or [T] (invalid g -> 1, never NaN)."""
    g = jnp.asarray(global_scale, jnp.float32)
    return jnp.broadcast_to(nvfp4._multiplier_from_g(g), (t,))


def quantize(x: jax.Array, global_scale: jax.Array, *, with_amax: bool = False):
    """x [T, K] (bf16/f32), g () or [T] -> (packed uint8 [T, K/2], block_scale e4m3 [T, K/16][, amax [T]]).

    with_amax also returns the per-row amax of x (fp32; the per-tensor amax is its max) for calibration.
    """
    if x.ndim != 2:
        raise ValueError(f"act_quant.quantize: x must be [T, K], got shape {tuple(x.shape)}")
    packed, byte = nvfp4.quantize_with_multiplier(x, _row_multiplier(global_scale, x.shape[0]))
    scale = jax.lax.bitcast_convert_type(byte, jnp.float8_e4m3fn)
    if with_amax:
        return packed, scale, nvfp4.row_amax(x)
    return packed, scale


def quantize_dequantize_grouped(x: jax.Array, input_scale: jax.Array, group_sizes: jax.Array,
                                interpret: bool = False) -> jax.Array:
    """W4A4 activation for a grouped matmul: rows of x [M, K] quantized with g_a of their group ([E] or ()).

    Returns bf16 value(code) * s_b (exact), i.e. the dequantized activation divided by g_a; the matmul applies
    g_a in its epilogue. Rows past sum(group_sizes) use the last group's scale (their output is zero anyway).
    """
    del interpret  # the jnp path runs everywhere; the kernel is used through `quantize` on Hopper
    m = x.shape[0]
    g = jnp.asarray(input_scale, jnp.float32)
    if g.ndim == 1:
        e = group_sizes.shape[0]
        ends = jnp.cumsum(group_sizes)
        gid = jnp.minimum(jnp.searchsorted(ends, jnp.arange(m), side="right", method="compare_all"), e - 1)
        g = g[gid]
    packed, scale = quantize(x, g)
    from pallas_kernels import nvfp4_decode
    return nvfp4_decode.decode_jnp(packed, scale, nvfp4_decode.EXACT)


def reference(x: jax.Array, global_scale: jax.Array) -> jax.Array:
    """The activation a W4A4 matmul sees (fp32 x_hat = value * s_b * g), from pallas_kernels/reference.py."""
    return _reference.quantize_activation(x, global_scale)
