"""MXFP4 (DeepSeek's native expert format, OCP MX): E2M1 codes in blocks of 32 along K, one E8M0 scale per block.

    x_hat = e2m1(code) * 2^(scale_byte - 127)           (scale byte 0xFF is E8M0's NaN)
`packed` uint8 [..., K/2] (element 2j in the low nibble, as NVFP4); `scale` uint8 E8M0 exponent bytes [..., K/32].
There is no global scale.

Quantization (default rule "ct", bit-exact to compressed-tensors 0.20 `generate_mx_scales` + its MXFP4
compressor, which follow vLLM's reference_mxfp4): with amax the block's max |x| and E = floor(log2(amax)),
    rule "ct":   scale exponent = E - 2 + [amax's significand >= 1.75]   (amax rounded to a power of two at the
                                                                          element's 1-bit mantissa precision)
    rule "ocp":  E - 2                                      (OCP MX spec: floor(log2(amax)) - emax_elem)
    rule "ceil": E - 2 + [significand > 1.5] = ceil(log2(amax / 6))   (DeepSeek's `fp4` quantizer: never clips;
                                                                       amax floored at 6 * 2^-126)
    byte = clip(127 + exponent, 0, 254);  code = E2M1_RNE(clip(x / 2^(byte-127), -6, 6))
x / 2^k is exact, so codes are compares of |x| against the exact thresholds t_i * 2^k (on bit patterns).
Special inputs: a NaN gives its block the NaN scale byte 0xFF and zero codes (dequantizes to NaN); +-Inf
saturates the block scale to 254 (2^127) and the element to +-6; an all-zero block gets byte 0 (rule "ct"/"ocp",
as compressed-tensors) and zero codes. For amax >= 1.75 * 2^127 compressed-tensors' power of two overflows and
it writes 0xFF (NaN); the exponent it would have had (253) is written instead, so finite input never gives NaN.
K must be a multiple of 32.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from megamoe_jax.quant import e2m1
from megamoe_jax.quant.floatbits import F32_INF_BITS, ceil_to_f32, f32_bits, pow2

BLOCK = 32
NAN_BYTE = 0xFF
RULES = ("ct", "ocp", "ceil")
_FLOAT_INPUTS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# t_i = num * 2^(e_t - shift): as in nvfp4._T_PARTS
_T_PARTS = ((1, 0, -2), (3, 1, -1), (5, 2, 0), (7, 2, 0), (5, 2, 1), (7, 2, 1), (5, 2, 2))


def _is_array_like(v) -> bool:
    # ndim too: jax's `Compiled` rebuilds its argument pytree from ArgInfo leaves, which have shape and dtype only
    return hasattr(v, "shape") and hasattr(v, "dtype") and hasattr(v, "ndim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MXFP4Tensor:
    """MXFP4 weight [..., K]: packed uint8 [..., K/2], scale uint8 E8M0 exponent bytes [..., K/32]."""
    packed: jax.Array
    scale: jax.Array

    def __post_init__(self):
        if not (_is_array_like(self.packed) and _is_array_like(self.scale)):
            return
        if self.packed.dtype != jnp.uint8:
            raise ValueError(f"MXFP4Tensor: packed must be uint8 (two E2M1 codes per byte), got {self.packed.dtype}")
        if self.scale.dtype != jnp.uint8:
            raise ValueError(f"MXFP4Tensor: scale must be uint8 E8M0 exponent bytes, got {self.scale.dtype}")
        ps, ss = tuple(self.packed.shape), tuple(self.scale.shape)
        if len(ps) < 1 or ps[:-1] != ss[:-1] or ps[-1] * 2 != ss[-1] * BLOCK:
            raise ValueError(f"MXFP4Tensor: scale shape {ss} does not match packed shape {ps} "
                             f"(expected {ps[:-1] + (ps[-1] * 2 // BLOCK,) if ps else '?'}: one per 32 of K)")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.packed.shape[:-1]) + (2 * self.packed.shape[-1],)

    @property
    def ndim(self) -> int:
        return self.packed.ndim

    def __repr__(self):
        return f"MXFP4Tensor(shape={self.shape})"

    def validate(self, name: str = "MXFP4 tensor") -> "MXFP4Tensor":
        """Raise ValueError if a (concrete) scale byte is 0xFF, E8M0's NaN."""
        if isinstance(self.scale, jax.core.Tracer):
            return self
        s = np.asarray(self.scale)
        if (s == NAN_BYTE).any():
            raise ValueError(f"{name}: {int((s == NAN_BYTE).sum())} scale byte(s) are 0xFF (E8M0 NaN)")
        return self

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


def _check_input(x):
    x = jnp.asarray(x)
    if jnp.dtype(x.dtype) not in _FLOAT_INPUTS:
        raise ValueError(f"mxfp4.quantize: input must be float32, bfloat16 or float16, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] % BLOCK:
        raise ValueError(f"mxfp4.quantize: the last dimension K={x.shape[-1] if x.ndim else None} of shape "
                         f"{tuple(x.shape)} must be a multiple of {BLOCK} (MXFP4 blocks; no padding)")
    return x


def scale_bytes(mag_bits: jax.Array, rule: str = "ct") -> jax.Array:
    """E8M0 bytes from block maxima given as |x| bit patterns uint32 [...] (finite, not NaN)."""
    field = (mag_bits >> 23).astype(jnp.int32)
    frac = mag_bits & jnp.uint32(0x7FFFFF)
    if rule == "ct":            # compressed-tensors round_to_power_2: add 2^21 to the bits, keep the exponent
        field = ((mag_bits + jnp.uint32(1 << 21)) >> 23).astype(jnp.int32)
        exp = field - 2                                 # 127 + (field - 127) - 2
        exp = jnp.where(field == 0, 0, exp)             # a zero (or tiny) amax: log2(0) = -inf -> byte 0
    elif rule == "ocp":
        exp = jnp.where(field == 0, 0, field - 2)
    elif rule == "ceil":        # ceil(log2(max(amax, 6 * 2^-126) / 6))
        small = mag_bits < jnp.uint32((3 << 23) | 0x400000)                  # amax < 6 * 2^-126 = 1.5 * 2^-124
        exp = jnp.where(small, 1, field - 2 + (frac > 0x400000).astype(jnp.int32))
    else:
        raise ValueError(f"mxfp4.quantize: rule must be one of {RULES}, got {rule!r}")
    return jnp.clip(exp, 0, 254).astype(jnp.uint8)


def _thresholds(byte: jax.Array, in_dtype) -> list[jax.Array]:
    """Bit patterns of the 7 code thresholds t_i * 2^(byte-127) (strictness folded in) and of the sign one."""
    k = byte.astype(jnp.int32) - 127
    ones = jnp.full(byte.shape, 1 << 23, jnp.uint32)
    zero = jnp.zeros(byte.shape, jnp.int32)
    th = [f32_bits(ceil_to_f32(ones * num, 0, zero, e_t - shift - 23 + k, strict))
          for (num, shift, e_t), strict in zip(_T_PARTS, e2m1.STRICT)]
    # fl(x / 2^k) < 0 needs |x| / 2^k above half the smallest subnormal of the dtype the division runs in
    half_sub = -134 if jnp.dtype(in_dtype) == jnp.bfloat16 else -150
    th.append(f32_bits(ceil_to_f32(ones, 0, zero, half_sub - 23 + k, True)))
    return th


@functools.partial(jax.jit, static_argnames="rule")
def quantize(x: jax.Array, *, rule: str = "ct") -> MXFP4Tensor:
    """Quantize x [..., K] (float32/bfloat16/float16, K % 32 == 0) to MXFP4 (see the module docstring)."""
    x = _check_input(x)
    if rule not in RULES:
        raise ValueError(f"mxfp4.quantize: rule must be one of {RULES}, got {rule!r}")
    rows, k = x.shape[:-1], x.shape[-1]
    xbits = f32_bits(x).reshape(rows + (k // BLOCK, BLOCK))                      # [..., nb, 32]
    mag = xbits & jnp.uint32(0x7FFFFFFF)
    nan_el = mag > F32_INF_BITS
    nan = jnp.any(nan_el, axis=-1)
    mag = jnp.where(nan_el, jnp.uint32(0), mag)
    vmax = jnp.max(mag, axis=-1)                                                 # [..., nb]
    byte = jnp.where(vmax >= F32_INF_BITS, jnp.uint8(254), scale_bytes(vmax, rule))
    th = _thresholds(byte, x.dtype)
    code = e2m1.magnitude_code(mag, [t[..., None] for t in th[:7]])
    neg = ((xbits >> 31) == 1) & (mag >= th[7][..., None]) & ~nan_el
    code = jnp.where(nan[..., None], jnp.uint8(0), code | (neg.astype(jnp.uint8) << 3))
    byte = jnp.where(nan, jnp.uint8(NAN_BYTE), byte)
    return MXFP4Tensor(e2m1.pack(code.reshape(x.shape)), byte)


def e8m0_decode(byte: jax.Array) -> jax.Array:
    """E8M0 bytes -> f32 2^(b-127) (exact; 0 -> 2^-127 subnormal); 0xFF -> NaN."""
    b = jnp.asarray(byte).astype(jnp.int32)
    return jnp.where(b == NAN_BYTE, jnp.float32(jnp.nan), pow2(jnp.clip(b - 127, -149, 127)))


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(t: MXFP4Tensor, dtype=jnp.float32) -> jax.Array:
    vals = e2m1.e2m1_decode(e2m1.unpack(t.packed))                              # [..., K]
    k = vals.shape[-1]
    vals = vals.reshape(vals.shape[:-1] + (k // BLOCK, BLOCK)) * e8m0_decode(t.scale)[..., None]
    return vals.reshape(vals.shape[:-2] + (k,)).astype(dtype)


def nbytes(shape) -> int:
    n = math.prod(shape)
    return n // 2 + n // BLOCK
