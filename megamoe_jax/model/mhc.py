"""Manifold-constrained hyper-connections (mHC), exactly as DeepSeek's reference ([R] `Block.hc_pre/hc_post`,
`ParallelHead.hc_head`, TileLang `hc_split_sinkhorn`).

The residual stream is X [..., n, D] (n = hc_mult copies). Around each sublayer:
  mix  = (flatten(X) @ fn^T) * rsqrt(mean(flatten(X)^2) + rms_eps)          fp32, [..., (2+n)n]
  pre  = sigmoid(mix[:n] * scale[0] + base[:n]) + hc_eps                     collapse weights
  post = 2 * sigmoid(mix[n:2n] * scale[1] + base[n:2n])                       expand weights
  comb = Sinkhorn(softmax_rows(mix[2n:] * scale[2] + base[2n:]) + hc_eps)     [..., n, n], ~doubly stochastic
  y    = sum_i pre_i X_i                                                      sublayer input
  X'_j = post_j F + sum_i comb[i, j] X_i                                      comb applied TRANSPOSED
All of it in fp32, cast back to the stream dtype once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from megamoe_jax.model.norms import rms_scale
from pallas_kernels import dispatch

_HI = jax.lax.Precision.HIGHEST   # tiny matmuls; keep them exact fp32 on GPUs too (no TF32)


def hc_mixes(x: jax.Array, fn: jax.Array, rms_eps: float) -> jax.Array:
    """x [..., n, D], fn [M, n*D] -> [..., M] fp32 ([R] applies the rsqrt after the projection)."""
    xf = x.reshape(*x.shape[:-2], -1).astype(jnp.float32)               # [..., n*D]
    mixes = jnp.einsum("...k,mk->...m", xf, fn.astype(jnp.float32), precision=_HI)
    return mixes * rms_scale(xf, rms_eps)


def sinkhorn_split(mixes: jax.Array, scale: jax.Array, base: jax.Array, n: int, iters: int, eps: float, *,
                   decode: bool = False):
    """[R] hc_split_sinkhorn: mixes [..., (2+n)n] -> pre [..., n], post [..., n], comb [..., n, n] (fp32).
    `decode` (one token per sequence) picks the Sinkhorn implementation (dispatch.sinkhorn) and materialises comb
    once; the values do not depend on it."""
    scale = scale.astype(jnp.float32)
    base = base.astype(jnp.float32)
    pre = jax.nn.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
    post = 2.0 * jax.nn.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
    logits = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(*mixes.shape[:-1], n, n)
    comb = dispatch.sinkhorn(logits, iters, eps, decode=decode)
    if decode:
        # Materialise comb once: otherwise XLA's GPU fusion recomputes the unrolled Sinkhorn inside each consumer
        # fusion (and spends minutes compiling it). pre and post are cheap and fuse into their consumers.
        comb = jax.lax.optimization_barrier(comb)
    return pre, post, comb


def hc_pre(x: jax.Array, fn: jax.Array, scale: jax.Array, base: jax.Array, *, hc_mult: int, iters: int,
           rms_eps: float, hc_eps: float):
    """x [..., T, n, D] -> (y [..., T, D] in x.dtype, post [..., T, n] fp32, comb [..., T, n, n] fp32)."""
    decode = x.ndim >= 3 and x.shape[-3] == 1                           # one token per sequence
    pre, post, comb = sinkhorn_split(hc_mixes(x, fn, rms_eps), scale, base, hc_mult, iters, hc_eps,
                                     decode=decode)
    y = jnp.sum(pre[..., None] * x.astype(jnp.float32), axis=-2)        # [..., D]
    return y.astype(x.dtype), post, comb


def hc_post(f: jax.Array, residual: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """f [..., D] sublayer output, residual [..., n, D] -> [..., n, D] in residual.dtype.

    X'[j] = post[j] * f + sum_i comb[i, j] * residual[i]   (comb^T @ residual: [R] sums over comb's FIRST axis).
    """
    n = residual.shape[-2]
    r = residual.astype(jnp.float32)
    # The n-term sum written out (n = 4): one elementwise fusion with the post term, where an einsum is a GEMM
    # launch plus a fusion for the rest (decode: ~1 launch per sublayer; the same fp32 products and sums).
    y = post[..., None] * f.astype(jnp.float32)[..., None, :]                        # [..., n, D]
    for i in range(n):
        y = y + comb[..., i, :, None] * r[..., i, None, :]
    return y.astype(residual.dtype)


def hc_head(x: jax.Array, fn: jax.Array, scale: jax.Array, base: jax.Array, *, rms_eps: float,
            hc_eps: float) -> jax.Array:
    """Final collapse of the n streams ([R] ParallelHead.hc_head): x [..., n, D] -> [..., D] in x.dtype."""
    mixes = hc_mixes(x, fn, rms_eps)                                     # [..., n]
    pre = jax.nn.sigmoid(mixes * scale.astype(jnp.float32) + base.astype(jnp.float32)) + hc_eps
    return jnp.sum(pre[..., None] * x.astype(jnp.float32), axis=-2).astype(x.dtype)
