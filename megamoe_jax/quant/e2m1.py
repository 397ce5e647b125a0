"""FP4 E2M1 codes: the value table, round-to-nearest-even encoding, and nibble packing (pure jnp, no float4 dtype).

Code c (4 bits): sign = bit 3, magnitude = LUT[c & 7] with LUT = [0, .5, 1, 1.5, 2, 3, 4, 6]; 0x8 is -0.0.
Packing: two codes per byte along the last axis, element 2j in the LOW nibble: byte = c[2j] | c[2j+1] << 4
(compressed-tensors `pack_fp4_to_uint8`, ModelOpt, vLLM, DeepSeek all agree).

Codes are produced with compares and integer ops only: `astype(float4_e2m1fn)` round trips are dropped by XLA
on GPU inside jit (see floatbits.py), and comparisons against exact thresholds are identical everywhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

E2M1_MAX = 6.0
# Magnitudes of codes 0..7, and all 16 codes (8..15 negative; 8 is -0.0).
E2M1_LUT = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
E2M1_VALUES = np.concatenate([E2M1_LUT, -E2M1_LUT]).astype(np.float32)

# Round-to-nearest-even decision points on |y| (y already scaled): the magnitude code is the number of
# thresholds passed. Ties go to the even code: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0,
# 3.5 -> 4.0, 5.0 -> 4.0. STRICT[i] means the threshold must be exceeded (|y| > t), otherwise |y| >= t.
THRESHOLDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
STRICT = (True, False, True, False, True, False, True)


@jax.jit
def e2m1_decode(codes: jnp.ndarray) -> jnp.ndarray:
    """uint8 codes (low 4 bits used) -> float32 values; 0x8 decodes to -0.0."""
    return jnp.asarray(E2M1_VALUES)[jnp.asarray(codes).astype(jnp.int32) & 0xF]


def magnitude_code(a: jnp.ndarray, thresholds) -> jnp.ndarray:
    """Count of thresholds passed: `a >= th[i]` for each i (thresholds already encode strictness). -> uint8.

    `thresholds` is a sequence of 7 arrays broadcastable against `a`. NaN `a` gives 0.
    """
    code = jnp.zeros(jnp.shape(a), jnp.uint8)
    for th in thresholds:
        code = code + (a >= th).astype(jnp.uint8)
    return code


@jax.jit
def e2m1_encode(y: jnp.ndarray) -> jnp.ndarray:
    """Round already-scaled values to E2M1 codes (uint8 0..15): nearest, ties to even, saturating at +-6.

    Sign follows the sign bit (so -0.0 and -0.2 give 0x8). NaN gives 0x8 (-0.0), as PTX `cvt.rn.satfinite`
    and ml_dtypes do. Inputs: any float dtype; the comparison is done in float32 (exact for bf16/f16).
    """
    y = jnp.asarray(y).astype(jnp.float32)
    a = jnp.abs(y)
    code = jnp.zeros(y.shape, jnp.uint8)
    for t, strict in zip(THRESHOLDS, STRICT):
        code = code + ((a > t) if strict else (a >= t)).astype(jnp.uint8)
    sign = jnp.signbit(y) | jnp.isnan(y)
    return code | (sign.astype(jnp.uint8) << 3)


@jax.jit
def pack(codes: jnp.ndarray) -> jnp.ndarray:
    """uint8 codes [..., K] (K even) -> packed bytes [..., K/2], element 2j in the low nibble."""
    codes = jnp.asarray(codes)
    if codes.shape[-1] % 2:
        raise ValueError(f"pack: last dimension must be even, got shape {codes.shape}")
    c = codes.astype(jnp.uint8) & jnp.uint8(0xF)
    c = c.reshape(c.shape[:-1] + (c.shape[-1] // 2, 2))
    return c[..., 0] | (c[..., 1] << jnp.uint8(4))


@jax.jit
def unpack(packed: jnp.ndarray) -> jnp.ndarray:
    """packed bytes [..., K/2] -> uint8 codes [..., K] (low nibble first)."""
    p = jnp.asarray(packed)
    if p.dtype != jnp.uint8:
        raise ValueError(f"unpack: packed FP4 codes must be uint8, got {p.dtype}")
    lo = p & jnp.uint8(0xF)
    hi = p >> jnp.uint8(4)
    return jnp.stack([lo, hi], axis=-1).reshape(p.shape[:-1] + (p.shape[-1] * 2,))
