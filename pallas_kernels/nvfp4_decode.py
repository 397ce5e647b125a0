"""NVFP4 (e2m1 codes + E4M3 block scales) -> bf16 decode, shared by the Hopper kernels.

Hopper has no e2m1 conversion that Mosaic GPU will emit (its f4e2m1fn casts are Blackwell-only), so codes become
bf16 through integer ops on the int4 code held in a register. Two variants compute the same products:

- "subnormal" (fast, ~3 integer ops per element): the sign goes to bit 15 and the magnitude bits (e1 e0 m) to
  bits 8..6 of a bf16 word, which is then exactly value(code) * 2^-126; the codes with e = 0 (0 and 0.5) land on
  bf16 subnormals. The kernel multiplies by bf16(s_b * 2^118), giving value * s_b * 2^-8 exactly (value * s_b
  has at most 6 significant bits and lies in [2^-10, 2688]); the epilogue multiplies by 2^8 with the global scale.
  (2^118 rather than 2^126 because 448 * 2^126 overflows bf16.) Correct only where the bf16 multiply keeps
  subnormal inputs: true for sm90's `mul.bf16x2`, false on XLA:CPU (flush-to-zero), hence the next variant.
- "select" (exact everywhere, ~8 ops per element): normal codes get exponent field e + 126 directly, the codes 0
  and 0.5 are selected explicitly; no fold factors.

`decode_jnp` is the plain-jnp version used by GPU interpret mode and the tests; it produces the same bf16 values
(computed exactly in fp32).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclasses.dataclass(frozen=True)
class DecodeVariant:
    name: str
    scale_fold: float      # the kernel multiplies the E4M3 block scale by this before the bf16 multiply
    epilogue_fold: float   # ... and the fp32 accumulator by this (with the global scale)


SUBNORMAL = DecodeVariant("subnormal", 2.0 ** 118, 2.0 ** 8)
SELECT = DecodeVariant("select", 1.0, 1.0)
VARIANTS = {v.name: v for v in (SUBNORMAL, SELECT)}


def codes_to_bf16(codes_i16: jax.Array, variant: DecodeVariant) -> jax.Array:
    """Sign-extended int4 codes (int16 in [-8, 7]) -> bf16 value(code) * (2^-126 for "subnormal", 1 for "select").

    Written with elementwise integer ops only, so it lowers inside a Mosaic GPU kernel on register arrays.
    A sign-extended negative code has bit 15 set: that is the bf16 sign bit.
    """
    sign = codes_i16 & jnp.int16(-32768)
    mag = codes_i16 & jnp.int16(7)
    if variant.name == "subnormal":
        bits = sign | (mag << 6)
    else:
        normal = (mag << 6) + jnp.int16(0x3F00)                       # exponent field e + 126 for e >= 1
        small = jnp.where(mag == jnp.int16(1), jnp.int16(0x3F00), jnp.int16(0))   # 0.5 or 0
        bits = sign | jnp.where(mag >= jnp.int16(2), normal, small)
    return lax.bitcast_convert_type(bits, jnp.bfloat16)


def fold_scale(block_scale: jax.Array, variant: DecodeVariant) -> jax.Array:
    """E4M3 block scale -> bf16(s * scale_fold) (exact: a power-of-two shift of a 4-significant-bit value)."""
    return (block_scale.astype(jnp.float32) * variant.scale_fold).astype(jnp.bfloat16)


def unpack_codes(packed: jax.Array) -> jax.Array:
    """uint8 [..., K/2] -> int32 [..., K] codes 0..15 (element 2j from the low nibble)."""
    p = packed.astype(jnp.int32)
    codes = jnp.stack([p & 0xF, (p >> 4) & 0xF], axis=-1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def e2m1_value(codes: jax.Array) -> jax.Array:
    """int codes 0..15 -> fp32 e2m1 values (arithmetic, no table: usable inside a kernel body)."""
    mag = codes & 7
    e = mag >> 1
    half_m = (mag & 1).astype(jnp.float32) * 0.5
    v = jnp.where(e == 0, half_m, (1.0 + half_m) * ((1 << e) >> 1).astype(jnp.float32))
    return jnp.where(codes >= 8, -v, v)


def decode_jnp(packed: jax.Array, block_scale: jax.Array, variant: DecodeVariant) -> jax.Array:
    """uint8 [..., K/2], e4m3 [..., K/16] -> bf16 [..., K] = value * s_b / epilogue_fold, exactly.

    Same values as the in-kernel decode followed by the scale multiply, computed without subnormals (XLA:CPU
    flushes them) so that interpret mode and the tests see the GPU's numbers.
    """
    vals = e2m1_value(unpack_codes(packed))
    s = jnp.repeat(block_scale.astype(jnp.float32), 16, axis=-1)
    return (vals * s / variant.epilogue_fold).astype(jnp.bfloat16)
