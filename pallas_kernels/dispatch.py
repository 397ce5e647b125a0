"""Every matmul of the model goes through these three functions.

On a Hopper GPU they run the Mosaic GPU kernels of this package for the formats those kernels support;
everywhere else (CPU CI, other GPUs, unsupported formats) they run `reference.py`. The choice is made at trace
time from the default backend and can be forced with MEGAMOE_KERNELS=reference|pallas.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import reference


# Calibration hook: while `observe(fn)` is active (at trace time), every named quantization-aware matmul calls
# fn(name, amax) with the fp32 amax of its input: a scalar for a linear and for the shared gate/up input of an
# MoE layer ("<name>.w13"), [E] per expert for the down-projection inputs ("<name>.w2"; 0 where an expert got
# no rows). fn runs inside the trace, so it must treat amax as a traced value (e.g. collect and return it).
_observer: Callable | None = None


@contextlib.contextmanager
def observe(fn: Callable):
    global _observer
    prev, _observer = _observer, fn
    try:
        yield
    finally:
        _observer = prev


def _amax(x):
    return jnp.max(jnp.abs(x.astype(jnp.float32)))


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


def sinkhorn(logits: jax.Array, iters: int, eps: float, *, decode: bool = False) -> jax.Array:
    """mHC Sinkhorn: logits [..., n, n] -> comb [..., n, n] fp32.

    On Hopper, prefill-shaped calls (`decode=False`) use the Mosaic GPU kernel (pallas_kernels/sinkhorn.py: one
    launch, and a GPU compile of the tiny model 5x faster than the unrolled XLA form); decode steps (one token
    per sequence) keep the unrolled XLA form, whose fusions ran the V4-Flash decode step 1.6% (batch 1) and 3.5%
    (batch 8) faster on an H200 (benchmarks/RESULTS.md, 2026-12-02). MEGAMOE_SINKHORN_KERNEL=1 / 0 forces the
    kernel / the XLA form everywhere."""
    from pallas_kernels import sinkhorn as sk
    forced = os.environ.get("MEGAMOE_SINKHORN_KERNEL")
    use_kernel = forced == "1" if forced in ("0", "1") else not decode
    if use_kernel and kernels_enabled():
        return sk.sinkhorn(logits, iters, eps)
    return sk.reference(logits.astype(jnp.float32), iters, eps)


def linear(x: jax.Array, w, *, out_dtype=None, name: str | None = None) -> jax.Array:
    """x [..., K] @ w[N, K]^T -> [..., N] for any weight format. `name` (module path) feeds calibration."""
    if _observer is not None and name is not None:
        _observer(name, _amax(x))
    if not reference.is_quantized(w):
        out_dtype = out_dtype or x.dtype
        y = jnp.einsum("...k,nk->...n", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    if _use_nvfp4_kernel(w, 2, x.size // max(x.shape[-1], 1)):
        return _nvfp4_linear(x, w, out_dtype)
    return reference.linear(x, w, out_dtype=out_dtype)


def linear_per_group(x: jax.Array, w, *, out_dtype=None, name: str | None = None) -> jax.Array:
    """Block-diagonal linear: x [..., G, K], w [G, N, K] -> [..., G, N] (group g of x meets w[g] only).

    DeepSeek-V4's grouped output projection `wo_a`. Plain weights are one batched einsum; quantized weights run
    as a grouped matmul with G equal groups (the NVFP4 kernel on Hopper)."""
    if _observer is not None and name is not None:
        _observer(name, _amax(x))
    out_dtype = out_dtype or x.dtype
    if not reference.is_quantized(w):
        y = jnp.einsum("...gk,gnk->...gn", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    lead, (g, k) = x.shape[:-2], x.shape[-2:]
    rows = x.reshape(-1, g, k).transpose(1, 0, 2).reshape(-1, k)                     # [G*M, K] sorted by group
    m = rows.shape[0] // g
    y = grouped_linear(rows, w, jnp.full((g,), m, jnp.int32), out_dtype=out_dtype)   # [G*M, N]
    return y.reshape(g, m, -1).transpose(1, 0, 2).reshape(*lead, g, -1)


def grouped_linear(x: jax.Array, w, group_sizes: jax.Array, *, out_dtype=None) -> jax.Array:
    """Ragged grouped matmul: x [M, K] sorted by group, w [E, N, K], group_sizes [E] -> [M, N]."""
    if _use_nvfp4_kernel(w, 3, x.shape[0]):
        from pallas_kernels import grouped_matmul
        return grouped_matmul.grouped_linear(x, w, group_sizes, out_dtype=out_dtype)
    return reference.grouped_linear(x, w, group_sizes, out_dtype=out_dtype)


def moe_experts(x, w1, w3, w2, topk_idx, topk_weight, swiglu_limit, *, out_dtype=None, name: str | None = None,
                mesh=None):
    """Routed experts of one MoE layer (see `reference.moe_experts` for the exact math).

    `name` is the experts' module path (e.g. "layers.3.ffn.experts"); with an observer active it receives the
    shared gate/up input amax and the per-expert down-projection input amax.
    `mesh` (or, when None, the mesh set by `jax.set_mesh`) with an "expert" axis runs the expert-parallel
    version (`ep_moe.moe_experts_ep`: all-to-all dispatch/combine in shard_map, same math).
    """
    if _observer is not None and name is not None:
        _observer(name + ".w13", _amax(x))
        _observer(name + ".w2", _expert_hidden_amax(x, w1, w3, topk_idx, swiglu_limit))
    mesh = mesh if mesh is not None else _expert_mesh()
    if mesh is not None:
        from pallas_kernels import ep_moe
        return ep_moe.moe_experts_ep(x, w1, w3, w2, topk_idx, topk_weight, swiglu_limit, mesh=mesh,
                                     out_dtype=out_dtype)
    if kernels_enabled() and x.shape[0] > 0:
        from pallas_kernels import fused_moe
        if fused_moe.supported(x, w1, w3, w2) is None:
            return fused_moe.moe_experts(x, w1, w3, w2, topk_idx, topk_weight, swiglu_limit, out_dtype=out_dtype)
    return reference.moe_experts(x, w1, w3, w2, topk_idx, topk_weight, swiglu_limit, out_dtype=out_dtype)


def _use_nvfp4_kernel(w, ndim: int, rows: int) -> bool:
    """The Hopper NVFP4 kernel takes this weight: NVFP4 of the given rank, a shape the kernel tiles, kernels on."""
    if type(w).__name__ != "NVFP4Tensor" or w.ndim != ndim or rows == 0 or not kernels_enabled():
        return False
    from pallas_kernels import grouped_matmul
    n, k = w.shape[-2:]
    return grouped_matmul.supported(rows, n, k) is None


def _nvfp4_linear(x, w, out_dtype):
    """A dense NVFP4 linear [N, K] as the one-group case of the grouped kernel."""
    from megamoe_jax.quant.nvfp4 import NVFP4Tensor
    from pallas_kernels import grouped_matmul
    n, k = w.shape
    g = jnp.asarray(w.global_scale, jnp.float32)
    g = g.reshape(1, 1) if g.size == 1 else g.reshape(1, n)
    ga = None if w.input_scale is None else jnp.asarray(w.input_scale, jnp.float32).reshape(())
    gm_ = None if w.input_multiplier is None else jnp.asarray(w.input_multiplier, jnp.float32).reshape(())
    w3 = NVFP4Tensor(w.packed[None], w.block_scale[None], g, ga, gm_)
    rows = x.reshape(-1, k)
    y = grouped_matmul.grouped_linear(rows, w3, jnp.full((1,), rows.shape[0], jnp.int32), out_dtype=out_dtype)
    return y.reshape(*x.shape[:-1], n)


def _expert_mesh():
    """The ambient (`jax.set_mesh`) mesh when it has an "expert" axis: part of jit's cache key, so a model traced
    under a mesh and one traced without never share a compiled function."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or "expert" not in mesh.axis_names else mesh


def _expert_hidden_amax(x, w1, w3, topk_idx, swiglu_limit):
    """Per-expert amax of the down projection's input (the unweighted clamped SwiGLU output)."""
    e = w1.shape[0]
    order, group_sizes = reference.route_sort(topk_idx, e)
    xs = x[order // topk_idx.shape[1]]
    h = reference.swiglu(reference.grouped_linear(xs, w1, group_sizes, out_dtype=jnp.float32),
                         reference.grouped_linear(xs, w3, group_sizes, out_dtype=jnp.float32), swiglu_limit)
    row_expert = jnp.sort(topk_idx.reshape(-1))
    return jax.ops.segment_max(jnp.max(jnp.abs(h), axis=-1), row_expert, num_segments=e).clip(min=0.0)
