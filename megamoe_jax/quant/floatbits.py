"""Exactly rounded float arithmetic written with integer ops, identical on CPU and GPU.

Why this file exists: XLA does not give bit-identical float results across backends for the operations a
quantizer needs.
  * On GPU, f32 division lowers to PTX `div.full.f32` (XLA sets `-nvptx-prec-divf32=1`), which is accurate
    to ~2 ulp, not correctly rounded. A quantizer that divides can pick a different code at near-ties.
  * With `--xla_allow_excess_precision` (default on), XLA drops `f32 -> bf16/f8/f4 -> f32` round trips inside
    a jit on GPU, so `x.astype(low).astype(f32)` silently stops rounding.
  * The algebraic simplifier rewrites `x / c` for a compile-time constant c into `x * (1/c)`, so jit and
    eager disagree for `x / 6`.
So every rounding step of the quantizers goes through the functions below: integer ops, compares, selects and
IEEE multiplications whose result is exact. Nothing here depends on a backend's division, FMA contraction or
excess precision. Inputs are float32; all functions are elementwise, jit- and vmap-friendly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_U32 = jnp.uint32
_I32 = jnp.int32
F32_INF_BITS = 0x7F800000


def f32_bits(x: jnp.ndarray) -> jnp.ndarray:
    """IEEE f32 bit pattern of x (f32, bf16 or f16). bf16 is widened with a shift, never through float
    arithmetic, so subnormals survive XLA's CPU denormal flushing."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bfloat16:
        return _shl(lax.bitcast_convert_type(x, jnp.uint16).astype(_U32), 16)
    return lax.bitcast_convert_type(x.astype(jnp.float32), _U32)


def bits_f32(b: jnp.ndarray) -> jnp.ndarray:
    return lax.bitcast_convert_type(b.astype(_U32), jnp.float32)


def _u(v) -> jnp.ndarray:
    return jnp.asarray(v, _U32)


def _shl(x, s):
    """Logical shift left of uint32 by a (possibly array) amount; XLA gives 0 for shifts >= 32."""
    return lax.shift_left(x.astype(_U32), jnp.asarray(s).astype(_U32))


def _shr(x, s):
    return lax.shift_right_logical(x.astype(_U32), jnp.asarray(s).astype(_U32))


def unpack_f32(x: jnp.ndarray):
    """Split a positive finite f32 into (significand uint32 in [2^23, 2^24), exponent int32): x = sig * 2^(exp-23).

    Subnormals are normalised (their exponent goes below -126). Zero gives sig 0 (callers special-case it).
    """
    bits = f32_bits(x) & _u(0x7FFFFFFF)
    field = _shr(bits, 23).astype(_I32)
    frac = bits & _u(0x7FFFFF)
    shift = lax.clz(frac).astype(_I32) - 8  # subnormal: move the leading one to bit 23
    is_sub = field == 0
    sig = jnp.where(is_sub, _shl(frac, jnp.maximum(shift, 0)), frac | _u(0x800000))
    exp = jnp.where(is_sub, -126 - shift, field - 127)
    return sig, exp


@jax.jit
def div_rn(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Correctly rounded (round-to-nearest-even) f32 division a / b for a >= 0 finite, b > 0 finite.

    Subnormal results and overflow to +Inf are exact IEEE-754. Implemented as a long division of the
    significands in integer arithmetic (see the module docstring for why the hardware division is not used).
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    a, b = jnp.broadcast_arrays(a, b)
    ma, ea = unpack_f32(a)
    mb, eb = unpack_f32(b)
    lt = ma < mb
    ma = jnp.where(lt, _shl(ma, 1), ma)               # quotient ma/mb now in [1, 2)
    e = ea - eb - lt.astype(_I32)                      # a/b = (ma/mb) * 2^e
    # q = floor(ma * 2^25 / mb) (26 bits) and its remainder by long division in base-2^8 digits: the partial
    # remainder stays below mb < 2^24, so each digit is one exact uint32 division. Integer division is exact
    # on every backend; five straight-line steps, no loop (a while loop costs one launch per step on the GPU,
    # and an unrolled bit-by-bit version makes XLA:CPU's compile time explode).
    mb = mb.astype(_U32)
    q = ma // mb                                       # 0 or 1 (ma / mb in [1, 2))
    r = ma - q * mb
    for bits in (8, 8, 8, 1):
        t = _shl(r, bits)
        digit = t // mb
        q = _shl(q, bits) | digit
        r = t - digit * mb
    sticky = r != 0
    # value = q * 2^(e-25); keep 24 bits (normal) or fewer (subnormal result)
    drop = 2 + jnp.clip(-126 - e, 0, 25)
    kept = _shr(q, drop)
    rem = q & (_shl(_u(1), drop) - _u(1))
    half = _shl(_u(1), drop - 1)
    up = (rem > half) | ((rem == half) & (sticky | ((kept & _u(1)) == 1)))
    kept = kept + up.astype(_U32)
    base = jnp.where(e >= -126, _shl((jnp.maximum(e, -126) + 126).astype(_U32), 23), _u(0))
    bits = base + kept                                 # kept's hidden bit lifts the exponent field by one
    bits = jnp.where(e > 128, _u(F32_INF_BITS), jnp.minimum(bits, _u(F32_INF_BITS)))
    a_zero = (f32_bits(a) & _u(0x7FFFFFFF)) == 0        # on bits: XLA-CPU would call a subnormal a zero
    return jnp.where(a_zero, jnp.float32(0), bits_f32(bits))


def is_pos_finite(x: jnp.ndarray) -> jnp.ndarray:
    """x > 0 and finite, decided on the bit pattern (subnormals count as positive on every backend)."""
    b = f32_bits(x)
    return (b > 0) & (b < _u(F32_INF_BITS))


@jax.jit
def mul_nonneg(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """a * b for finite a >= 0 (normal) and b >= 0, correctly rounded even when b is subnormal.

    XLA's CPU runtime flushes subnormal inputs to zero (DAZ) while the GPU does not; scaling b up by 2^64
    with integer ops (and a down by 2^-64, exact for a >= 2^-62) makes both compute the IEEE product.
    Results below 2^-126 may still flush; callers only use such results as "rounds to zero".
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    sig, e = unpack_f32(b)
    small = (e < -100) & ((f32_bits(b) & _u(0x7FFFFFFF)) != 0)
    b_up = bits_f32(_shl((jnp.maximum(e, -149) + 64 + 127).astype(_U32), 23) | (sig & _u(0x7FFFFF)))
    return jnp.where(small, (a * jnp.float32(2.0 ** -64)) * b_up, a * b)


@jax.jit
def round_to_bf16(x: jnp.ndarray) -> jnp.ndarray:
    """Round f32 to the nearest bfloat16 value (ties to even), returned as f32. Finite or Inf inputs; NaN stays NaN."""
    bits = f32_bits(x)
    lsb = _shr(bits, 16) & _u(1)
    rounded = (bits + _u(0x7FFF) + lsb) & _u(0xFFFF0000)
    return jnp.where(jnp.isnan(x), x.astype(jnp.float32), bits_f32(rounded))


@jax.jit
def round_to_e4m3(x: jnp.ndarray):
    """Round f32 in [0, 448] to float8_e4m3fn with ties to even. Returns (value f32, byte uint8).

    The caller clips to [0, 448] first (that is what makes the cast saturating); NaN inputs give (NaN, 0x7F).
    Values <= 2^-10 round to 0 (the tie at 2^-10 goes to the even code 0x00).
    """
    x = jnp.asarray(x, jnp.float32)
    nan = jnp.isnan(x)
    safe = jnp.where(nan, jnp.float32(0), x)
    bits = f32_bits(safe)
    field = _shr(bits, 23).astype(_I32)
    e = jnp.maximum(field, 1) - 127
    sig = (bits & _u(0x7FFFFF)) | jnp.where(field > 0, _u(0x800000), _u(0))
    drop = 20 + jnp.clip(-6 - e, 0, 5)                 # 3 mantissa bits; subnormal quantum 2^-9
    kept = _shr(sig, drop)
    rem = sig & (_shl(_u(1), drop) - _u(1))
    half = _shl(_u(1), drop - 1)
    up = (rem > half) | ((rem == half) & ((kept & _u(1)) == 1))
    kept = (kept + up.astype(_U32)).astype(_I32)       # number of quanta, <= 16
    qexp = jnp.maximum(e, -6) - 3
    value = kept.astype(jnp.float32) * pow2(qexp)      # exact: small integer times a power of two
    byte = jnp.where(e >= -6, ((e + 7) << 3) + kept - 8, kept)
    value = jnp.where(nan, jnp.float32(jnp.nan), value)
    byte = jnp.where(nan, 0x7F, byte).astype(jnp.uint8)
    return value, byte


def pow2(e: jnp.ndarray) -> jnp.ndarray:
    """2^e as f32 for integer e in [-149, 127] (exact, including subnormal results)."""
    e = jnp.asarray(e, _I32)
    normal = bits_f32(_shl((jnp.clip(e, -126, 127) + 127).astype(_U32), 23))
    sub = bits_f32(_shl(_u(1), jnp.clip(e + 149, 0, 22)))
    return jnp.where(e >= -126, normal, sub)


@jax.jit
def e4m3_decode(byte: jnp.ndarray) -> jnp.ndarray:
    """float8_e4m3fn bytes (uint8) -> f32, exactly; 0x7F/0xFF -> NaN, 0x80 -> -0.0."""
    b = jnp.asarray(byte).astype(_I32)
    exp = (b >> 3) & 0xF
    man = b & 7
    mag = jnp.where(exp == 0, man.astype(jnp.float32) * jnp.float32(2.0 ** -9),
                    (man + 8).astype(jnp.float32) * pow2(exp - 10))
    mag = jnp.where((b & 0x7F) == 0x7F, jnp.float32(jnp.nan), mag)
    return jnp.where((b & 0x80) != 0, -mag, mag)


@jax.jit
def ceil_to_f32(hi, shift, lo, exp, strict):
    """Smallest f32 above an exact dyadic value (strict) or at/above it (not strict).

    The value is (hi * 2^shift + lo) * 2^exp, with hi a uint32 in [2^23, 2^28), 0 <= shift <= 24,
    |lo| < 2^24 (int32) and the total positive. Used to turn "fl(a/d) > t" into the exact test "a >= X".
    Results below the smallest subnormal give it; above the largest finite give +Inf.
    """
    hi = jnp.asarray(hi).astype(_I32)
    lo = jnp.asarray(lo).astype(_I32)
    shift = jnp.asarray(shift).astype(_I32)
    carry = lo >> shift                                # arithmetic shift: floor(lo / 2^shift)
    hi = hi + carry
    lo = lo - (carry << shift)                         # now 0 <= lo < 2^shift
    hi = hi.astype(_U32)
    nbits = (32 - lax.clz(hi).astype(_I32)) + shift
    e_top = nbits - 1 + exp                            # value in [2^e_top, 2^(e_top+1))
    qexp = jnp.maximum(e_top - 23, -149)
    drop = qexp - exp - shift                          # bits of hi below the kept ones (>= 0)
    kept = _shr(hi, jnp.clip(drop, 0, 32))
    below = (hi & (_shl(_u(1), jnp.clip(drop, 0, 32)) - _u(1))) != 0
    below = below | (lo != 0)
    kept = kept + jnp.where(strict, _u(1), below.astype(_U32))
    base = jnp.where(e_top >= -126, _shl((jnp.clip(e_top, -126, 200) + 126).astype(_U32), 23), _u(0))
    bits = jnp.minimum(base + kept, _u(F32_INF_BITS))
    return bits_f32(bits)
