"""FP8 block (DeepSeek's native dense format): float8_e4m3fn weight + one scale per 128 x 128 block.

    W[..., n, k] = float(weight[..., n, k]) * scale[..., n // 128, k // 128]
`weight` float8_e4m3fn [..., N, K]; `scale` float32 [..., ceil(N/128), ceil(K/128)] (edge blocks are partial).
Checkpoints store the scale as E8M0 exponent bytes (DeepSeek V4: 2^(byte-127)) or as fp32/bf16 ("-Base"
checkpoints, compressed-tensors); `from_e8m0` / `from_float` build the tensor from either, `to_e8m0` goes back.

Quantization (`quantize`), per 128 x 128 block with amax = max(max|x|, 1e-4) (DeepSeek's floor):
    scale_fmt "ue8m0":   s = 2^ceil(log2(amax / 448))  (DeepSeek's power-of-two rule; x / s never exceeds 448)
    scale_fmt "float32": s = fl32(amax / 448)
    weight = E4M3_RNE(clip(fl32(x / s), -448, 448))    (saturating; signed zeros kept; NaN stays NaN)
Every rounding is done with integer ops or correctly rounded integer division (floatbits), so CPU and GPU agree
and results equal a plain numpy/ml_dtypes computation. Inf saturates to +-448.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from megamoe_jax.quant.floatbits import F32_INF_BITS, bits_f32, div_rn, f32_bits, pow2, round_to_e4m3

BLOCK = 128
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
SCALE_FMTS = ("ue8m0", "float32")


def _is_array_like(v) -> bool:
    # ndim too: jax's `Compiled` rebuilds its argument pytree from ArgInfo leaves, which have shape and dtype only
    return hasattr(v, "shape") and hasattr(v, "dtype") and hasattr(v, "ndim")


def scale_shape(shape) -> tuple[int, ...]:
    """Scale shape for a weight of shape [..., N, K]: [..., ceil(N/128), ceil(K/128)]."""
    *lead, n, k = shape
    return tuple(lead) + (-(-n // BLOCK), -(-k // BLOCK))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FP8BlockTensor:
    """FP8 weight [..., N, K] float8_e4m3fn with float32 scales [..., ceil(N/128), ceil(K/128)]."""
    weight: jax.Array
    scale: jax.Array

    def __post_init__(self):
        if not (_is_array_like(self.weight) and _is_array_like(self.scale)):
            return
        if self.weight.dtype != jnp.float8_e4m3fn:
            raise ValueError(f"FP8BlockTensor: weight must be float8_e4m3fn, got {self.weight.dtype}")
        if self.scale.dtype != jnp.float32:
            raise ValueError(f"FP8BlockTensor: scale must be float32 (use from_e8m0 / from_float), got "
                             f"{self.scale.dtype}")
        if self.weight.ndim < 2:
            raise ValueError(f"FP8BlockTensor: weight must be [..., N, K], got shape {tuple(self.weight.shape)}")
        want = scale_shape(self.weight.shape)
        if tuple(self.scale.shape) != want:
            raise ValueError(f"FP8BlockTensor: scale shape {tuple(self.scale.shape)} does not match weight shape "
                             f"{tuple(self.weight.shape)} (expected {want}: one per 128 x 128 block)")

    @classmethod
    def from_e8m0(cls, weight, scale_bytes) -> "FP8BlockTensor":
        """From E8M0 exponent bytes (uint8, or float8_e8m0fnu viewed as bytes): scale = 2^(byte - 127)."""
        b = np.asarray(scale_bytes)
        if b.dtype != np.uint8:
            if b.dtype.itemsize != 1:
                raise ValueError(f"FP8BlockTensor.from_e8m0: scale must be 1-byte E8M0, got {b.dtype}")
            b = b.view(np.uint8)
        if (b == 0xFF).any():
            raise ValueError(f"FP8BlockTensor.from_e8m0: {int((b == 0xFF).sum())} scale byte(s) are 0xFF "
                             "(E8M0 NaN)")
        return cls(weight, np.ldexp(np.float32(1), b.astype(np.int32) - 127).astype(np.float32))

    @classmethod
    def from_float(cls, weight, scale) -> "FP8BlockTensor":
        """From fp32/bf16/fp16 scales (converted exactly to float32); they must be finite and >= 0."""
        s = np.asarray(scale).astype(np.float32)
        if not np.isfinite(s).all() or (s < 0).any():
            raise ValueError("FP8BlockTensor.from_float: scales must be finite and non-negative "
                             f"({int((~np.isfinite(s)).sum())} non-finite, {int((s < 0).sum())} negative)")
        return cls(weight, s)

    def to_e8m0(self) -> np.ndarray:
        """Scales as E8M0 bytes; ValueError unless every scale is a power of two in [2^-127, 2^127]."""
        s = np.asarray(self.scale, np.float32)
        m, e = np.frexp(s)
        if not (np.isfinite(s).all() and (m == 0.5).all() and (e - 1 >= -127).all() and (e - 1 <= 127).all()):
            raise ValueError("FP8BlockTensor.to_e8m0: scales are not all powers of two in [2^-127, 2^127]")
        return (e - 1 + 127).astype(np.uint8)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def ndim(self) -> int:
        return self.weight.ndim

    def __repr__(self):
        return f"FP8BlockTensor(shape={self.shape})"

    def validate(self, name: str = "FP8 block tensor") -> "FP8BlockTensor":
        if isinstance(self.scale, jax.core.Tracer):
            return self
        s = np.asarray(self.scale)
        if not np.isfinite(s).all() or (s < 0).any():
            raise ValueError(f"{name}: scales must be finite and non-negative")
        return self

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


def _expand(scale, n, k):
    """[..., nb, kb] -> [..., N, K] (each scale over its 128 x 128 block, edge blocks cropped)."""
    s = jnp.repeat(jnp.repeat(scale, BLOCK, axis=-2), BLOCK, axis=-1)
    return s[..., :n, :k]


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(t: FP8BlockTensor, dtype=jnp.float32) -> jax.Array:
    n, k = t.weight.shape[-2:]
    return (t.weight.astype(jnp.float32) * _expand(t.scale, n, k)).astype(dtype)


def _block_amax_bits(mag, n, k):
    """Max of |x| bit patterns over 128 x 128 blocks (zero-padded), [..., nb, kb] uint32."""
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    pad = [(0, 0)] * (mag.ndim - 2) + [(0, nb * BLOCK - n), (0, kb * BLOCK - k)]
    m = jnp.pad(mag, pad)
    m = m.reshape(m.shape[:-2] + (nb, BLOCK, kb, BLOCK))
    return jnp.max(m, axis=(-3, -1))


def _pow2_exponent(amax_bits):
    """ceil(log2(amax / 448)) for amax >= 1e-4 given as bits: 448 = 1.75 * 2^8."""
    field = (amax_bits >> 23).astype(jnp.int32)
    frac = amax_bits & jnp.uint32(0x7FFFFF)
    return field - 127 - 8 + (frac > 0x600000).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="scale_fmt")
def quantize(x: jax.Array, *, scale_fmt: str = "ue8m0") -> FP8BlockTensor:
    """Quantize x [..., N, K] (float32/bfloat16/float16) to FP8 with 128 x 128 block scales."""
    x = jnp.asarray(x)
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"fp8_block.quantize: input must be float32, bfloat16 or float16, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"fp8_block.quantize: input must be [..., N, K], got shape {tuple(x.shape)}")
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"fp8_block.quantize: scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")
    n, k = x.shape[-2:]
    bits = f32_bits(x)
    mag = bits & jnp.uint32(0x7FFFFFFF)
    nan_el = mag > F32_INF_BITS
    amax_bits = _block_amax_bits(jnp.where(nan_el, jnp.uint32(0), mag), n, k)
    amax_bits = jnp.maximum(amax_bits, f32_bits(jnp.float32(AMAX_FLOOR)))
    amax_bits = jnp.minimum(amax_bits, f32_bits(jnp.float32(np.finfo(np.float32).max)))   # Inf: saturate
    if scale_fmt == "ue8m0":
        e = _pow2_exponent(amax_bits)                                            # [..., nb, kb]
        scale = pow2(e)
        e_full = _expand(e, n, k)
        x_field = (mag >> 23).astype(jnp.int32)
        # x / 2^e exactly, by moving the exponent; results below 2^-126 (and subnormal x) round to 0 in E4M3
        ok = (x_field >= 1) & (x_field - e_full >= 1)
        y_mag = jnp.where(ok, mag - (e_full << 23).astype(jnp.uint32), jnp.uint32(0))
        y_mag = jnp.where(mag >= F32_INF_BITS, mag, y_mag)                       # Inf / NaN pass through
        y = bits_f32(y_mag)
    else:
        scale = div_rn(bits_f32(amax_bits), jnp.float32(E4M3_MAX))
        s_full = _expand(scale, n, k)
        finite = mag < F32_INF_BITS
        y = div_rn(bits_f32(jnp.where(finite, mag, 0)), s_full)
        y = jnp.where(finite, y, bits_f32(mag))
    _, byte = round_to_e4m3(jnp.minimum(y, jnp.float32(E4M3_MAX)))              # NaN -> 0x7F
    byte = byte | ((bits >> 31).astype(jnp.uint8) << 7)
    weight = jax.lax.bitcast_convert_type(byte, jnp.float8_e4m3fn)
    return FP8BlockTensor(weight, scale)
