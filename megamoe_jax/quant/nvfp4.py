"""NVFP4: E2M1 codes in blocks of 16 along K, one E4M3 scale per block, one f32 global scale per tensor.

Meaning of `NVFP4Tensor.global_scale` (and `input_scale`): the DEQUANT factor g (ModelOpt convention),
    g = amax / (6 * 448),         x_hat = e2m1(code) * block_scale * g.
compressed-tensors stores the multiplier G = 1/g = 2688/amax (`weight_global_scale`); NVIDIA ModelOpt stores g
(`weight_scale_2`, `input_scale`). `megamoe_jax.quant.conventions` converts both into this form and back.

Quantization uses the multiplier G: computed from the data (below), passed as `multiplier=` (a stored
compressed-tensors G, used exactly), or derived from a given g as G = fl32(1/g) (exact reciprocal; the f32
reciprocal is not an involution: fl32(1/fl32(1/448)) = 447.99997, so pass a stored G as `multiplier`).
It reproduces compressed-tensors 0.20 bit for bit:
    r_b  = vecmax_b / 6                 rounded to the input dtype (bf16 inputs: bf16; f32 and f16: f32)
    s_b  = E4M3_RNE(min(G * r_b, 448))  saturating: clip BEFORE the cast (the plain cast makes > 464 NaN)
    s_b  = 0.125 if s_b == 0            compressed-tensors' eps for zero/underflowing blocks (byte 0x20); the
                                        block's codes are all zero either way, so it dequantizes to 0
    d_b  = fl32(s_b / G)
    code = E2M1_RNE(clip(fl32(x / d_b), -6, 6)),  sign bit set iff fl32(x / d_b) < 0
This is compressed-tensors' op order (`x / (scale / global_scale)`, forward_helpers._quantize). The spec's
guarded-reciprocal form `clip(x * where(s > 0, G / s, 0))` differs from it by one code at rare exact ties, so
the division form is the one implemented. Its safety comes from the same places: the block scale is clipped
to 448 (activations beyond the calibrated amax saturate to +-6 instead of NaN), a zero scale is replaced
before the division, and no division is ever evaluated by the hardware: fl32(x / d_b) is never formed.
Instead, for each of the 127 possible scale bytes, the exact f32 thresholds X_i with fl32(x/d) >= t_i are
precomputed (`code_thresholds`), and each code is a count of compares |x| >= X_i. That is exact, identical
on CPU and GPU (XLA's GPU division is `div.full.f32`, ~2 ulp), and cheap enough for a kernel: 8 compares per
element plus an 8-entry table row per block. All compares and maxima run on f32 bit patterns (monotone for
non-negative floats), so XLA-CPU's flushing of subnormals cannot change a result either.

Dequantization: x_hat = fl32(fl32(e2m1 * s_b) * g); the first product is exact, so this is the correctly
rounded value of code * s_b * g. (compressed-tensors computes e2m1 * fl32(s_b / G): within an f32 ulp, and
identical after rounding to bf16, which is what its decompression returns.)

Global scale from data (`quantize(x)` without a scale): compressed-tensors' `generate_gparam`:
G = (1/amax) * 2688 evaluated in the input dtype (torch computes `2688 / t` as `t.reciprocal() * 2688`),
amax clamped to the smallest normal; a NaN/Inf/zero result falls back to G = 1. amax is taken over the finite
elements only, so a stray Inf/NaN does not wipe out the scale of the whole tensor (compressed-tensors would
get G = 0 for an Inf, G = 1 for a NaN). g = 1/G is stored.

Special inputs (documented results):
  * +-Inf: the block scale saturates (448) and the element gets +-6 (code 0x7/0xF).
  * NaN: its block gets the E4M3 NaN scale byte 0x7F and all-zero codes, so the whole block dequantizes to
    NaN: a NaN is never silently turned into a number. Finite inputs never give NaN.
  * -0.0 gives code 0x0 (compressed-tensors: torch.sign(-0.0) = +0); a negative value that rounds to zero
    gives 0x8 (-0.0).
  * A global scale that is zero, negative, NaN or Inf raises ValueError when concrete; under jit (where values
    cannot be checked) it is replaced by G = 1, compressed-tensors' fallback, so the result is never NaN.
K must be a multiple of 16 (no padding), as in compressed-tensors and vLLM.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from megamoe_jax.quant import e2m1
from megamoe_jax.quant.floatbits import (F32_INF_BITS, bits_f32, ceil_to_f32, div_rn, e4m3_decode, f32_bits,
                                         is_pos_finite, mul_nonneg, round_to_bf16, round_to_e4m3, unpack_f32)

BLOCK = 16
E4M3_MAX = 448.0
FP4_MAX = 6.0
AMAX_PER_G = E4M3_MAX * FP4_MAX           # 2688: G = 2688 / amax, g = amax / 2688
CT_ZERO_SCALE_BYTE = 0x20                  # 0.125, compressed-tensors' FP8 eps for zero block scales
NAN_SCALE_BYTE = 0x7F
_FLOAT_INPUTS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ----------------------------------------------------------------------------------------------------------
# The tensor
# ----------------------------------------------------------------------------------------------------------

def _is_array_like(v) -> bool:
    # ndim too: jax's `Compiled` rebuilds its argument pytree from ArgInfo leaves, which have shape and dtype only
    return hasattr(v, "shape") and hasattr(v, "dtype") and hasattr(v, "ndim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NVFP4Tensor:
    """NVFP4 weight [..., K]: packed uint8 [..., K/2], block_scale float8_e4m3fn [..., K/16],
    global_scale f32 g (dequant factor; shape () or packed.ndim-1 dims each 1 or equal to packed's),
    input_scale: optional f32 activation dequant factor g_a, shape () or [E] for stacked experts
    (None = W4A16; present = W4A4, activations quantized to NVFP4 before the matmul).
    input_multiplier: optional, only with input_scale: the activation multiplier G_a exactly as a
    compressed-tensors checkpoint stores it (`input_global_scale`), same shape as input_scale. The W4A4
    activation quantizer uses it instead of fl32(1/g_a), which differs from G_a for about 20% of values
    (448, 3584, ...) and then moves ~1% of the activation codes of bf16 inputs off compressed-tensors/vLLM's.

    Structure (dtypes, shapes) is checked at construction; values (a scale that is zero, negative, NaN or Inf)
    are checked by `validate()`, which the loaders and `quantize` call on concrete arrays (never inside jit).
    """
    packed: jax.Array
    block_scale: jax.Array
    global_scale: jax.Array
    input_scale: jax.Array | None = None
    input_multiplier: jax.Array | None = None

    def __post_init__(self):
        leaves = (self.packed, self.block_scale, self.global_scale)
        if not all(_is_array_like(v) for v in leaves):
            return  # pytree plumbing (vmap axis specs, tree_map placeholders): nothing to check
        _check_structure(self.packed, self.block_scale, self.global_scale, self.input_scale)
        if self.input_multiplier is not None and _is_array_like(self.input_multiplier):
            if self.input_scale is None:
                raise ValueError("NVFP4Tensor: input_multiplier needs input_scale (its dequant factor g_a)")
            if (self.input_multiplier.dtype != jnp.float32 or
                    tuple(self.input_multiplier.shape) != tuple(jnp.shape(self.input_scale))):
                raise ValueError(f"NVFP4Tensor: input_multiplier must be float32 of input_scale's shape "
                                 f"{tuple(jnp.shape(self.input_scale))}, got {self.input_multiplier.dtype}"
                                 f"{list(self.input_multiplier.shape)}")

    # -- shape ------------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.packed.shape[:-1]) + (2 * self.packed.shape[-1],)

    @property
    def ndim(self) -> int:
        return self.packed.ndim

    def __repr__(self):
        mode = "W4A16" if self.input_scale is None else "W4A4"
        return f"NVFP4Tensor(shape={self.shape}, {mode}, global_scale shape {tuple(self.global_scale.shape)})"

    # -- values -----------------------------------------------------------------------------------------------
    def validate(self, name: str = "NVFP4 tensor") -> "NVFP4Tensor":
        """Raise ValueError if a (concrete) global/input scale is zero, negative, NaN or Inf."""
        check_scale_values(self.global_scale, f"{name}: global_scale")
        if self.input_scale is not None:
            check_scale_values(self.input_scale, f"{name}: input_scale")
        if self.input_multiplier is not None:
            check_scale_values(self.input_multiplier, f"{name}: input_multiplier")
        return self

    def activation_multiplier(self) -> jax.Array:
        """The W4A4 activation multiplier G_a: input_multiplier if stored, else fl32(1/input_scale)."""
        if self.input_scale is None:
            raise ValueError("activation_multiplier: this NVFP4 weight has no input scale (W4A16)")
        if self.input_multiplier is not None:
            return jnp.asarray(self.input_multiplier, jnp.float32)
        return _multiplier_from_g(self.input_scale)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)

    # -- W4A4 hooks used by pallas_kernels/reference.py ------------------------------------------------------
    def prepare_activation(self, x: jax.Array) -> jax.Array:
        """W4A4: x [..., K] quantize-dequantized to NVFP4 with input_scale (f32 result); identity for W4A16."""
        if self.input_scale is None:
            return x
        if jnp.ndim(self.input_scale) != 0:
            raise ValueError(
                f"prepare_activation: input_scale has shape {tuple(jnp.shape(self.input_scale))}; per-expert "
                "input scales need prepare_grouped_activation(x, gid)")
        return fake_quantize(x, self.input_scale, self.activation_multiplier())

    def prepare_grouped_activation(self, x: jax.Array, gid: jax.Array) -> jax.Array:
        """W4A4 for stacked experts: row m of x [M, K] uses input_scale[gid[m]] (or the scalar scale)."""
        if self.input_scale is None:
            return x
        g = jnp.asarray(self.input_scale, jnp.float32)
        if g.ndim == 0:
            return fake_quantize(x, g, self.activation_multiplier())
        if g.ndim != 1 or x.ndim != 2:
            raise ValueError(f"prepare_grouped_activation: expected x [M, K] and input_scale [E], got "
                             f"{tuple(x.shape)} and {tuple(g.shape)}")
        return fake_quantize_grouped(x, g, gid, self.activation_multiplier())


def _check_structure(packed, block_scale, global_scale, input_scale):
    if packed.dtype != jnp.uint8:
        raise ValueError(f"NVFP4Tensor: packed must be uint8 (two E2M1 codes per byte), got {packed.dtype}")
    if block_scale.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"NVFP4Tensor: block_scale must be float8_e4m3fn, got {block_scale.dtype}")
    if global_scale.dtype != jnp.float32:
        raise ValueError(f"NVFP4Tensor: global_scale must be float32 (the dequant factor g), got "
                         f"{global_scale.dtype}")
    if packed.ndim < 1:
        raise ValueError("NVFP4Tensor: packed must have at least one dimension [..., K/2]")
    ps, bs = tuple(packed.shape), tuple(block_scale.shape)
    if ps[:-1] != bs[:-1] or ps[-1] * 2 != bs[-1] * BLOCK:
        raise ValueError(f"NVFP4Tensor: block_scale shape {bs} does not match packed shape {ps} "
                         f"(expected {ps[:-1] + (ps[-1] * 2 // BLOCK,)}: one scale per 16 elements of K)")
    _check_scale_shape(tuple(global_scale.shape), ps[:-1], "global_scale")
    if input_scale is not None:
        if not _is_array_like(input_scale):
            return
        if input_scale.dtype != jnp.float32:
            raise ValueError(f"NVFP4Tensor: input_scale must be float32, got {input_scale.dtype}")
        if input_scale.ndim > 1 or (input_scale.ndim == 1 and (packed.ndim < 3 or
                                                                input_scale.shape[0] != ps[0])):
            raise ValueError(f"NVFP4Tensor: input_scale shape {tuple(input_scale.shape)} must be () or [E] "
                             f"for stacked experts [E, N, K]; packed is {ps}")


def _check_scale_shape(gs: tuple, rows: tuple, what: str):
    if gs == ():
        return
    if len(gs) != len(rows) or any(g not in (1, r) for g, r in zip(gs, rows)):
        raise ValueError(f"NVFP4Tensor: {what} shape {gs} must be () or have {len(rows)} dims each 1 or equal "
                         f"to the weight's leading shape {rows}")


def check_scale_values(scale, what: str) -> None:
    """ValueError naming `what` if a concrete scale is zero, negative, NaN or Inf. Tracers are skipped."""
    if isinstance(scale, jax.core.Tracer):
        return
    v = np.asarray(scale, np.float32)
    bad = ~np.isfinite(v) | (v <= 0)
    if bad.any():
        first = v.reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]]
        kind = "NaN" if np.isnan(first) else "Inf" if np.isinf(first) else "zero" if first == 0 else "negative"
        raise ValueError(f"{what} is {kind} ({first!r}; {int(bad.sum())} of {v.size} values invalid): a global "
                         "scale must be finite and > 0")


# ----------------------------------------------------------------------------------------------------------
# Global scale
# ----------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames="dtype")
def multiplier_from_amax(amax: jax.Array, dtype=jnp.float32) -> jax.Array:
    """compressed-tensors `generate_gparam`: G = (1/max(amax, tiny)) * 2688 in `dtype` (bf16 or f32),
    non-finite or non-positive results -> 1.0. Returns f32 with amax's shape."""
    a = jnp.asarray(amax, jnp.float32)
    tiny = jnp.float32(np.finfo(np.float32).tiny)
    bad = jnp.isnan(a)
    a = jnp.where(bad | (a < tiny), tiny, a)
    a = jnp.where(jnp.isinf(a), jnp.float32(np.finfo(np.float32).max), a)
    bf16 = jnp.dtype(dtype) == jnp.bfloat16
    rnd = round_to_bf16 if bf16 else (lambda v: v)
    recip = rnd(div_rn(jnp.ones_like(a), a))
    g = rnd(recip * jnp.float32(AMAX_PER_G))           # exact IEEE multiply, then the dtype's rounding
    ok = jnp.isfinite(g) & (g > 0) & ~bad
    return jnp.where(ok, g, jnp.float32(1.0))


@jax.jit
def _multiplier_from_g(g: jax.Array) -> jax.Array:
    """G = fl32(1/g), exactly. An invalid g (only possible under jit, where values are not checked) maps to
    G = 1, the same safe fallback compressed-tensors uses for uncalibrated scales: never NaN."""
    g = jnp.asarray(g, jnp.float32)
    ok = is_pos_finite(g)
    G = div_rn(jnp.ones_like(g), jnp.where(ok, g, jnp.float32(1)))
    return jnp.where(ok & jnp.isfinite(G), G, jnp.float32(1.0))


multiplier_from_g = _multiplier_from_g


# ----------------------------------------------------------------------------------------------------------
# Exact code thresholds
# ----------------------------------------------------------------------------------------------------------

# t = num * 2^(e_t - shift) with num in {1,3,5,7}: (num, shift, e_t) for the 7 E2M1 decision points.
_T_PARTS = ((1, 0, -2), (3, 1, -1), (5, 2, 0), (7, 2, 0), (5, 2, 1), (7, 2, 1), (5, 2, 2))


@jax.jit
def code_thresholds(multiplier: jax.Array) -> jax.Array:
    """Exact per-scale-byte code thresholds for the multiplier G: f32 [..., 128, 8].

    Row b (an E4M3 scale byte 0..127; byte 0 is treated as 0.125 and 0x7F (NaN) gives a NaN row) holds
    X_0..X_6 and X_neg such that, with d = fl32(s_b / G) and y = fl32(|x| / d):
        magnitude code = #{i : |x| >= X_i}  (== E2M1 round-to-nearest-even of clip(y, 0, 6))
        sign bit       = x < 0 and |x| >= X_neg      (== fl32(x / d) < 0)
    Each X_i is the smallest f32 reaching the rounding midpoint next to t_i, computed in integer arithmetic
    from the exact product midpoint * d. Kernels can take this table (8 floats per scale byte) instead of
    dividing.
    """
    G = jnp.asarray(multiplier, jnp.float32)
    b = jnp.arange(128, dtype=jnp.int32)
    s = e4m3_decode(jnp.where(b == 0, CT_ZERO_SCALE_BYTE, jnp.where(b == NAN_SCALE_BYTE, 0x7E, b)))
    d = div_rn(s, G[..., None])                          # [..., 128]
    md, ed = unpack_f32(d)
    cols = []
    for (num, shift, e_t), strict in zip(_T_PARTS, e2m1.STRICT):
        lo = md.astype(jnp.int32) * (1 if strict else -1)  # midpoint = t +- 2^(e_t-24)
        cols.append(ceil_to_f32(md * num, 24 - shift, lo, e_t + ed - 47, strict))
    # fl32(a/d) > 0  <=>  a/d > 2^-150 (the tie rounds to the even 0)
    cols.append(ceil_to_f32(md, 0, jnp.zeros_like(ed), ed - 23 - 150, True))
    th = jnp.stack(cols, axis=-1)                        # [..., 128, 8]
    th = jnp.where(jnp.isinf(d)[..., None], jnp.float32(jnp.inf), th)
    return th.at[..., NAN_SCALE_BYTE, :].set(jnp.float32(jnp.nan))


# ----------------------------------------------------------------------------------------------------------
# Quantize / dequantize
# ----------------------------------------------------------------------------------------------------------

def _check_input(x, what="quantize"):
    x = jnp.asarray(x)
    if jnp.dtype(x.dtype) not in _FLOAT_INPUTS:
        raise ValueError(f"{what}: input must be float32, bfloat16 or float16, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] % BLOCK:
        raise ValueError(f"{what}: the last dimension K={x.shape[-1] if x.ndim else None} of shape "
                         f"{tuple(x.shape)} must be a multiple of {BLOCK} (NVFP4 blocks; no padding)")
    return x


def block_scale_bytes(mag: jax.Array, multiplier: jax.Array, in_dtype) -> jax.Array:
    """E4M3 block-scale bytes (uint8) for blocks given as |x| bit patterns mag uint32 [..., nb, 16], with G
    broadcastable to [..., nb]. Working on bit patterns keeps subnormal inputs exact on every backend."""
    nan_el = mag > F32_INF_BITS
    nan = jnp.any(nan_el, axis=-1)
    vmax_bits = jnp.max(jnp.where(nan_el, jnp.uint32(0), mag), axis=-1)         # may be +Inf
    finite = vmax_bits < F32_INF_BITS
    vmax = bits_f32(jnp.where(finite, vmax_bits, jnp.uint32(0)))
    r = div_rn(vmax, jnp.float32(FP4_MAX))
    if jnp.dtype(in_dtype) == jnp.bfloat16:
        r = round_to_bf16(r)                            # compressed-tensors divides in the input dtype
    s = jnp.minimum(mul_nonneg(jnp.asarray(multiplier, jnp.float32), r), jnp.float32(E4M3_MAX))
    s = jnp.where(finite, s, jnp.float32(E4M3_MAX))
    _, byte = round_to_e4m3(s)
    byte = jnp.where(byte == 0, jnp.uint8(CT_ZERO_SCALE_BYTE), byte)
    return jnp.where(nan, jnp.uint8(NAN_SCALE_BYTE), byte)


def encode_blocks(xbits: jax.Array, byte: jax.Array, table: jax.Array, table_index: jax.Array) -> jax.Array:
    """E2M1 codes (uint8) for blocks of f32 bit patterns xbits uint32 [..., nb, 16] with scale bytes [..., nb],
    using rows table[table_index * 128 + byte] of the flattened `code_thresholds` table.

    Compares are done on bit patterns (monotone for non-negative floats), so denormal flushing cannot change
    them. A NaN element gets code 0 (its block's scale is NaN)."""
    th = f32_bits(table).reshape(-1, 8)
    th = jnp.where(th > F32_INF_BITS, jnp.uint32(0xFFFFFFFF), th)              # NaN rows: unreachable
    th = th[table_index * 128 + byte.astype(jnp.int32)]                         # [..., nb, 8]
    mag = xbits & jnp.uint32(0x7FFFFFFF)
    mag = jnp.where(mag > F32_INF_BITS, jnp.uint32(0), mag)
    code = e2m1.magnitude_code(mag, [th[..., None, i] for i in range(7)])
    neg = ((xbits >> 31) == 1) & (mag >= th[..., None, 7]) & (mag > 0)
    return code | (neg.astype(jnp.uint8) << 3)


@jax.jit
def quantize_with_multiplier(x: jax.Array, multiplier: jax.Array):
    """Core: x [..., K] and G (shape () or x.ndim-1 dims, broadcast per row) -> (packed uint8 [..., K/2],
    scale bytes uint8 [..., K/16]). No validation of G's value."""
    x = _check_input(x)
    rows = x.shape[:-1]
    G = jnp.asarray(multiplier, jnp.float32)
    if G.ndim == 0:
        G = G.reshape((1,) * len(rows))
    xbits = f32_bits(x).reshape(rows + (x.shape[-1] // BLOCK, BLOCK))            # [..., nb, 16]
    byte = block_scale_bytes(xbits & jnp.uint32(0x7FFFFFFF), G[..., None], x.dtype)   # [..., nb]
    table = code_thresholds(G)                                                   # [*G.shape, 128, 8]
    gidx = jnp.broadcast_to(jnp.arange(G.size, dtype=jnp.int32).reshape(G.shape), rows)[..., None]
    codes = encode_blocks(xbits, byte, table, gidx)                              # [..., nb, 16]
    return e2m1.pack(codes.reshape(x.shape)), byte


@jax.jit
def quantize_grouped_with_multiplier(x: jax.Array, multiplier: jax.Array, gid: jax.Array):
    """Rows of x [M, K] quantized with the multiplier of their group: G [E], gid int [M] ->
    (packed uint8 [M, K/2], scale bytes uint8 [M, K/16]). One threshold table per group, not per row."""
    x = _check_input(x)
    if x.ndim != 2:
        raise ValueError(f"quantize_grouped_with_multiplier: x must be [M, K], got shape {tuple(x.shape)}")
    G = jnp.asarray(multiplier, jnp.float32).reshape(-1)                         # [E]
    gid = jnp.clip(jnp.asarray(gid, jnp.int32), 0, G.shape[0] - 1)
    m, k = x.shape
    xbits = f32_bits(x).reshape(m, k // BLOCK, BLOCK)
    byte = block_scale_bytes(xbits & jnp.uint32(0x7FFFFFFF), G[gid][:, None], x.dtype)
    codes = encode_blocks(xbits, byte, code_thresholds(G), gid[:, None])
    return e2m1.pack(codes.reshape(x.shape)), byte


def _finite_amax(x, axes):
    a = jnp.abs(x.astype(jnp.float32))
    return jnp.max(jnp.where(jnp.isfinite(a), a, 0), axis=axes, keepdims=True)


@functools.partial(jax.jit, static_argnames="batch_dims")
def _global_from_data(x, batch_dims):
    """(G, g) from the finite amax of each slice of the first `batch_dims` axes; shapes () or [*batch, 1..]."""
    amax = _finite_amax(x, tuple(range(batch_dims, x.ndim)))[..., 0]           # [*batch, 1, ..., 1]
    if batch_dims == 0:
        amax = amax.reshape(())
    G = multiplier_from_amax(amax, jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32)
    return G, div_rn(jnp.ones_like(G), G)


def data_multiplier(x: jax.Array, *, batch_dims: int = 0) -> jax.Array:
    """The multiplier G that `quantize(x, batch_dims=...)` computes from the data (compressed-tensors'
    generate_gparam on the finite amax). Write this, not 1/g, as `weight_global_scale` to get the exact file
    compressed-tensors would write (1/fl32(1/G) is not always G)."""
    x = _check_input(x)
    if not 0 <= batch_dims < x.ndim:
        raise ValueError(f"data_multiplier: batch_dims={batch_dims} must be in [0, {x.ndim - 1}]")
    return _global_from_data(x, batch_dims)[0]


def quantize(x: jax.Array, global_scale: jax.Array | None = None, *, batch_dims: int = 0,
             input_scale: jax.Array | None = None, multiplier: jax.Array | None = None) -> NVFP4Tensor:
    """Quantize x [..., K] (float32/bfloat16/float16, K % 16 == 0) to NVFP4, bit-exact to compressed-tensors.

    global_scale: the dequant factor g (shape () or x.ndim-1 dims each 1 or equal); None computes it from the
    data as compressed-tensors does (see module docstring), one scale per slice of the first `batch_dims`
    axes (batch_dims=1 on stacked experts [E, N, K] gives a per-expert scale of shape [E, 1]).
    input_scale: optional activation dequant factor, stored on the result (W4A4).
    multiplier: instead of global_scale, compressed-tensors' multiplier G itself (e.g. a checkpoint's
    `input_global_scale`), used exactly; g = fl32(1/G) is stored. A given g is turned into G = fl32(1/g), and
    that reciprocal does not always give back a G that g came from (fl32(1/fl32(1/448)) = 447.99997), so
    pass the multiplier when bit-exactness with compressed-tensors/vLLM for a stored G matters.
    """
    x = _check_input(x)
    if multiplier is not None:
        if global_scale is not None:
            raise ValueError("quantize: pass either global_scale (dequant factor g) or multiplier (G), not both")
        G = jnp.asarray(multiplier, jnp.float32)
        _check_scale_shape(tuple(G.shape), tuple(x.shape[:-1]), "multiplier")
        check_scale_values(G, "quantize: multiplier")
        g = div_rn(jnp.ones_like(G), G)
    elif global_scale is None:
        if not 0 <= batch_dims < x.ndim:
            raise ValueError(f"quantize: batch_dims={batch_dims} must be in [0, {x.ndim - 1}] for shape "
                             f"{tuple(x.shape)}")
        G, g = _global_from_data(x, batch_dims)
    else:
        g = jnp.asarray(global_scale, jnp.float32)
        _check_scale_shape(tuple(g.shape), tuple(x.shape[:-1]), "global_scale")
        check_scale_values(g, "quantize: global_scale")
        G = _multiplier_from_g(g)
    if input_scale is not None:
        input_scale = jnp.asarray(input_scale, jnp.float32)
        check_scale_values(input_scale, "quantize: input_scale")
    packed, byte = quantize_with_multiplier(x, G)
    scale = jax.lax.bitcast_convert_type(byte, jnp.float8_e4m3fn)
    return NVFP4Tensor(packed, scale, g, input_scale)


def row_amax(x: jax.Array) -> jax.Array:
    """max |x| over the last axis, f32 [...]; NaN propagates (calibration should see it)."""
    return jnp.max(jnp.abs(jnp.asarray(x).astype(jnp.float32)), axis=-1)


def quantize_with_amax(x: jax.Array, global_scale: jax.Array):
    """Activation path: (NVFP4Tensor of x [..., K] with the given g, per-row amax f32 [...])."""
    return quantize(x, global_scale), row_amax(x)


def block_scale_f32(t: NVFP4Tensor) -> jax.Array:
    """Block scales as exact f32 [..., K/16] (decoded from the bytes with integer ops)."""
    return e4m3_decode(jax.lax.bitcast_convert_type(t.block_scale, jnp.uint8))


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(t: NVFP4Tensor, dtype=jnp.float32) -> jax.Array:
    """x_hat = e2m1(code) * block_scale * g: the first product is exact, one f32 rounding for g, then `dtype`."""
    codes = e2m1.unpack(t.packed)                                                # [..., K]
    vals = e2m1.e2m1_decode(codes)
    k = vals.shape[-1]
    vals = vals.reshape(vals.shape[:-1] + (k // BLOCK, BLOCK)) * block_scale_f32(t)[..., None]
    g = jnp.asarray(t.global_scale, jnp.float32)
    g = g.reshape(g.shape + (1, 1)) if g.ndim else g
    return (vals * g).reshape(vals.shape[:-2] + (k,)).astype(dtype)


@jax.jit
def fake_quantize(x: jax.Array, global_scale: jax.Array, multiplier: jax.Array | None = None) -> jax.Array:
    """Quantize-dequantize x [..., K] to NVFP4 with dequant factor g (broadcast per row); f32 result.
    The quantizer uses `multiplier` (a stored G) when given, else G = fl32(1/g)."""
    g = jnp.asarray(global_scale, jnp.float32)
    G = _multiplier_from_g(g) if multiplier is None else jnp.asarray(multiplier, jnp.float32)
    packed, byte = quantize_with_multiplier(x, G)
    t = NVFP4Tensor(packed, jax.lax.bitcast_convert_type(byte, jnp.float8_e4m3fn),
                    jnp.broadcast_to(g, x.shape[:-1]) if g.ndim else g)
    return dequantize(t, jnp.float32)


@jax.jit
def fake_quantize_grouped(x: jax.Array, global_scale: jax.Array, gid: jax.Array,
                          multiplier: jax.Array | None = None) -> jax.Array:
    """Quantize-dequantize rows of x [M, K] with g [E] of their group gid [M]; f32 result.
    The quantizer uses `multiplier` [E] (stored G) when given, else G = fl32(1/g)."""
    g = jnp.asarray(global_scale, jnp.float32).reshape(-1)
    gid = jnp.clip(jnp.asarray(gid, jnp.int32), 0, g.shape[0] - 1)
    G = _multiplier_from_g(g) if multiplier is None else jnp.asarray(multiplier, jnp.float32).reshape(-1)
    packed, byte = quantize_grouped_with_multiplier(x, G, gid)
    t = NVFP4Tensor(packed, jax.lax.bitcast_convert_type(byte, jnp.float8_e4m3fn), g[gid])
    return dequantize(t, jnp.float32)


def nbytes(shape) -> int:
    """Storage of an NVFP4 weight of logical shape [..., K] (codes + block scales, global scale excluded)."""
    n = math.prod(shape)
    return n // 2 + n // BLOCK
