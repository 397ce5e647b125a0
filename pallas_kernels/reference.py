"""The one numerics reference for every kernel in this package (pure jnp, runs anywhere).

What each function computes is the contract: the Mosaic GPU kernels must match it (GPU tests compare them),
and the model runs it directly on machines without a Hopper GPU.

Weights are in PyTorch `[out, in]` layout (K contiguous), stacked experts `[E, N, K]`. A weight is either a
plain array (bf16/fp32) or a quantized pytree from `megamoe_jax.quant` (NVFP4Tensor, MXFP4Tensor,
FP8BlockTensor). Accumulation is fp32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def is_quantized(w) -> bool:
    return not isinstance(w, (jax.Array, jnp.ndarray)) and hasattr(w, "dequantize")


def weight_fp32(w) -> jax.Array:
    """Dequantized fp32 copy of a weight (reference only: the kernels never materialise this)."""
    return w.dequantize(jnp.float32) if is_quantized(w) else w.astype(jnp.float32)


def prepare_activation(x: jax.Array, w) -> jax.Array:
    """W4A4: an NVFP4 weight with an input scale quantize-dequantizes its input first (Blackwell numerics).

    Any other weight sees the activation unchanged (W4A16 / W8A16 / dense).
    """
    hook = getattr(w, "prepare_activation", None)
    return x if hook is None else hook(x)


def linear(x: jax.Array, w, *, out_dtype=None) -> jax.Array:
    """y[..., n] = sum_k x[..., k] * W[n, k]; x [..., K], w [N, K]; fp32 accumulation."""
    out_dtype = out_dtype or x.dtype
    xa = prepare_activation(x, w).astype(jnp.float32)
    y = jnp.einsum("...k,nk->...n", xa, weight_fp32(w), precision=jax.lax.Precision.HIGHEST)
    return y.astype(out_dtype)


def grouped_linear(x: jax.Array, w, group_sizes: jax.Array, *, out_dtype=None) -> jax.Array:
    """Rows of x [M, K] come sorted by group; rows of group e use w[e] ([E, N, K]). Returns [M, N].

    Rows past sum(group_sizes) are zero. Mirrors `jax.lax.ragged_dot(x, w.transpose(0, 2, 1), group_sizes)`.
    """
    out_dtype = out_dtype or x.dtype
    m = x.shape[0]
    e = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(m), side="right")  # [M]; == E for rows past the end
    valid = row_group < e
    gid = jnp.minimum(row_group, e - 1)
    wf = weight_fp32(w)                                               # [E, N, K]
    xa = _grouped_prepare(x, w, gid).astype(jnp.float32)
    y = _per_group_matmul(xa, wf, gid)
    return jnp.where(valid[:, None], y, 0).astype(out_dtype)


def _grouped_prepare(x, w, gid):
    hook = getattr(w, "prepare_grouped_activation", None)
    return x if hook is None else hook(x, gid)


def _per_group_matmul(xa, wf, gid):
    # Dense over experts then select: memory E*M*N, fine for a reference on small shapes.
    y_all = jnp.einsum("mk,enk->men", xa, wf, precision=jax.lax.Precision.HIGHEST)
    return jnp.take_along_axis(y_all, gid[:, None, None], axis=1)[:, 0]


def swiglu(gate: jax.Array, up: jax.Array, limit: float | None) -> jax.Array:
    """DeepSeek-V4 clamped SwiGLU in fp32: gate clamped from above only, up clamped to [-L, L]."""
    gate = gate.astype(jnp.float32)
    up = up.astype(jnp.float32)
    if limit is not None and limit > 0:
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
    return jax.nn.silu(gate) * up


def route_sort(topk_idx: jax.Array, num_experts: int):
    """Sort the T*k (token, slot) pairs by expert. Returns (order [T*k], group_sizes [E] int32).

    order[r] is the flat (token*k + slot) index of sorted row r; tokens of one expert keep their order.
    """
    flat = topk_idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def moe_experts(x: jax.Array, w1, w3, w2, topk_idx: jax.Array, topk_weight: jax.Array,
                swiglu_limit: float | None, *, out_dtype=None) -> jax.Array:
    """Routed experts of one MoE layer.

    x [T, D]; w1, w3 [E, I, D]; w2 [E, D, I]; topk_idx [T, k] int; topk_weight [T, k] fp32.
    out[t] = sum_j topk_weight[t, j] * W2[e] (swiglu(W1[e] x, W3[e] x))   with e = topk_idx[t, j].
    The routing weight scales the down projection's fp32 OUTPUT. DeepSeek's reference multiplies it into the
    SwiGLU output instead (same math up to rounding), but NVFP4 checkpoints calibrate the down projection's
    input scale on the unweighted SwiGLU output (transformers/llm-compressor/ModelOpt run the expert as a plain
    module and weight its output; vLLM's fused MoE does the same), so W4A4 must quantize the unweighted input.
    """
    out_dtype = out_dtype or x.dtype
    t, k = topk_idx.shape
    e = w1.shape[0]
    order, group_sizes = route_sort(topk_idx, e)
    token_of_row = order // k
    xs = x[token_of_row]                                              # [T*k, D] sorted by expert
    g = grouped_linear(xs, w1, group_sizes, out_dtype=jnp.float32)
    u = grouped_linear(xs, w3, group_sizes, out_dtype=jnp.float32)
    h = swiglu(g, u, swiglu_limit)
    y = grouped_linear(h.astype(x.dtype), w2, group_sizes, out_dtype=jnp.float32)  # [T*k, D]
    y = y * topk_weight.reshape(-1)[order][:, None].astype(jnp.float32)
    out = jnp.zeros((t, y.shape[-1]), jnp.float32).at[token_of_row].add(y)
    return out.astype(out_dtype)



def quantize_activation(x: jax.Array, global_scale: jax.Array) -> jax.Array:
    """W4A4 activation path: x [..., K] quantize-dequantized to NVFP4 with dequant factor g (scalar or per row).

    fp32 result; what a W4A4 matmul multiplies (the act_quant kernel must reproduce its codes and scales).
    """
    from megamoe_jax.quant import nvfp4
    return nvfp4.fake_quantize(x, global_scale)
