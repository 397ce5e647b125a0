"""RMS norms as DeepSeek-V4 computes them ([R] `RMSNorm`; the unweighted per-head q norm and the mHC input norm).

Always in fp32 with the weight multiplied in fp32 (DeepSeek keeps norm weights in fp32 at runtime) and one cast
back to the input dtype at the end.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis; fp32 inside, x.dtype out."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * y).astype(x.dtype)


def rms_scale(x: jax.Array, eps: float) -> jax.Array:
    """rsqrt(mean(x^2) + eps) over the last axis in fp32, keepdims (the unweighted norm's factor)."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def unweighted_rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) (no weight); fp32 inside, x.dtype out."""
    return (x.astype(jnp.float32) * rms_scale(x, eps)).astype(x.dtype)
