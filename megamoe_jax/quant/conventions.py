"""The two NVFP4 checkpoint conventions, converted into `NVFP4Tensor` (which stores the dequant factor g) and back.

| field            | compressed-tensors (CT)                  | NVIDIA ModelOpt (MO)              |
|------------------|------------------------------------------|-----------------------------------|
| codes            | `weight_packed` uint8 [N, K/2]           | `weight` uint8 [N, K/2]           |
| block scales     | `weight_scale` float8_e4m3fn [N, K/16]   | `weight_scale` float8_e4m3fn      |
| weight global    | `weight_global_scale` f32 [1] = G = 1/g  | `weight_scale_2` f32 [] = g       |
| activation global| `input_global_scale` f32 [1] = G_a       | `input_scale` f32 [] = g_a        |

A CT activation multiplier is also kept as is in `NVFP4Tensor.input_multiplier`, so W4A4 activations are
quantized with exactly the G that compressed-tensors and vLLM use (fl32(1/fl32(1/G)) != G for ~20% of values).

g = amax / 2688 (small), G = 2688 / amax (large). CT -> g is fl32(1/G); back is fl32(1/g), both correctly
rounded (floatbits.div_rn, the same as numpy/torch fp32 division; compressed-tensors' own ModelOpt converter
does the same reciprocal). The round trip G -> g -> G is exact for every bf16-representable G, which is what
compressed-tensors writes for bf16 models (it computes G in the weight's dtype); for an arbitrary fp32 G it can
move by one ulp (about 17% of random fp32 values), which changes no code of a weight already quantized.
Values are validated: a scale that is zero, negative, NaN or Inf raises ValueError naming the field.
Stacked experts: a global scale of E values becomes [E, 1] (broadcast over rows); an input scale of E values [E].
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from megamoe_jax.quant.floatbits import div_rn
from megamoe_jax.quant.nvfp4 import NVFP4Tensor, check_scale_values


def reciprocal(v) -> np.ndarray:
    """Correctly rounded fp32 1/v (the conversion between G and g), as a numpy array of v's shape."""
    v = jnp.asarray(v, jnp.float32)
    return np.asarray(div_rn(jnp.ones_like(v), v), np.float32)


def _global_shape(v: np.ndarray, weight_shape: tuple, what: str) -> np.ndarray:
    lead = tuple(weight_shape[:-2])
    if v.size == 1:
        return v.reshape(())
    if lead and v.size == lead[0] and len(lead) == 1:
        return v.reshape((lead[0], 1))
    raise ValueError(f"{what}: {v.size} values do not fit a weight of shape {tuple(weight_shape)} "
                     "(expected one value, or one per expert of a stacked [E, N, K/2] weight)")


def _input_shape(v: np.ndarray, weight_shape: tuple, what: str) -> np.ndarray:
    lead = tuple(weight_shape[:-2])
    if v.size == 1:
        return v.reshape(())
    if len(lead) == 1 and v.size == lead[0]:
        return v.reshape(lead)
    raise ValueError(f"{what}: {v.size} values do not fit a weight of shape {tuple(weight_shape)}")


def _codes(packed, block_scale, name):
    packed = np.asarray(packed)
    if packed.dtype == np.int8:
        packed = packed.view(np.uint8)
    block_scale = np.asarray(block_scale)
    if block_scale.dtype == np.uint8:
        block_scale = block_scale.view(jnp.float8_e4m3fn)
    if packed.ndim < 2:
        raise ValueError(f"{name}: packed NVFP4 weight must be [..., N, K/2], got shape {packed.shape}")
    return packed, block_scale


def from_compressed_tensors(weight_packed, weight_scale, weight_global_scale, input_global_scale=None, *,
                            name: str = "compressed-tensors NVFP4 weight") -> NVFP4Tensor:
    """CT fields -> NVFP4Tensor. weight_global_scale/input_global_scale are multipliers G (shape [1] or [E])."""
    packed, bs = _codes(weight_packed, weight_scale, name)
    G = np.asarray(weight_global_scale, np.float32)
    check_scale_values(G, f"{name}: weight_global_scale")
    g = _global_shape(reciprocal(G), packed.shape, f"{name}: weight_global_scale")
    ga = Ga = None
    if input_global_scale is not None:
        Ga = np.asarray(input_global_scale, np.float32)
        check_scale_values(Ga, f"{name}: input_global_scale")
        Ga = _input_shape(Ga, packed.shape, f"{name}: input_global_scale")
        ga = reciprocal(Ga)
    # the stored multiplier is kept (input_multiplier): fl32(1/g_a) does not always give it back
    return NVFP4Tensor(packed, bs, g, ga, Ga)


def from_modelopt(weight, weight_scale, weight_scale_2, input_scale=None, *,
                  name: str = "ModelOpt NVFP4 weight") -> NVFP4Tensor:
    """ModelOpt fields -> NVFP4Tensor. weight_scale_2/input_scale are dequant factors g (shape [] or [E])."""
    packed, bs = _codes(weight, weight_scale, name)
    g = np.asarray(weight_scale_2, np.float32)
    check_scale_values(g, f"{name}: weight_scale_2")
    g = _global_shape(g, packed.shape, f"{name}: weight_scale_2")
    ga = None
    if input_scale is not None:
        ga = np.asarray(input_scale, np.float32)
        check_scale_values(ga, f"{name}: input_scale")
        ga = _input_shape(ga, packed.shape, f"{name}: input_scale")
    return NVFP4Tensor(packed, bs, g, ga)


def _per_tensor_or_expert(v, t: NVFP4Tensor, what: str) -> np.ndarray:
    v = np.asarray(v, np.float32)
    if v.size == 1:
        return v.reshape(())
    lead = t.shape[:-2]
    flat = v.reshape(v.shape[0], -1)
    if len(lead) == 1 and v.shape[0] == lead[0] and np.all(flat == flat[:, :1]):
        return flat[:, 0]
    raise ValueError(f"{what}: a per-row global scale of shape {v.shape} has no checkpoint field "
                     "(checkpoints hold one global scale per tensor or per expert)")


def to_compressed_tensors(t: NVFP4Tensor) -> dict[str, np.ndarray]:
    """NVFP4Tensor -> CT fields (numpy). Scales: [1] per tensor, [E] per expert."""
    g = _per_tensor_or_expert(t.global_scale, t, "to_compressed_tensors")
    out = {"weight_packed": np.asarray(t.packed), "weight_scale": np.asarray(t.block_scale),
           "weight_global_scale": reciprocal(g).reshape(-1 if g.ndim else 1)}
    if t.input_scale is not None:
        ga = np.asarray(t.input_scale, np.float32)
        Ga = reciprocal(ga) if t.input_multiplier is None else np.asarray(t.input_multiplier, np.float32)
        out["input_global_scale"] = Ga.reshape(-1 if ga.ndim else 1)
    return out


def to_modelopt(t: NVFP4Tensor) -> dict[str, np.ndarray]:
    """NVFP4Tensor -> ModelOpt fields (numpy). Scales: [] per tensor, [E] per expert."""
    g = _per_tensor_or_expert(t.global_scale, t, "to_modelopt")
    out = {"weight": np.asarray(t.packed), "weight_scale": np.asarray(t.block_scale), "weight_scale_2": g}
    if t.input_scale is not None:
        out["input_scale"] = np.asarray(t.input_scale, np.float32)
    return out


def ct_multiplier_from_amax(amax) -> np.ndarray:
    """The CT activation/weight multiplier G for an fp32 amax (generate_gparam), as numpy f32."""
    from megamoe_jax.quant.nvfp4 import multiplier_from_amax
    return np.asarray(multiplier_from_amax(jnp.asarray(amax, jnp.float32)), np.float32)


def modelopt_scale_from_amax(amax) -> np.ndarray:
    """ModelOpt's dequant factor g = amax / (6 * 448) in fp32 (amax clamped to [tiny, max] as MO's export_amax)."""
    a = np.asarray(amax, np.float32)
    fi = np.finfo(np.float32)
    a = np.clip(np.nan_to_num(a, nan=fi.tiny), fi.tiny, fi.max)
    return np.asarray(div_rn(jnp.asarray(a), jnp.float32(2688.0)), np.float32)
