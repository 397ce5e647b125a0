"""Routed experts of one MoE layer on Hopper: route-sorted dispatch -> fused gate/up + SwiGLU -> down -> combine.

    out[t] = sum_j w[t, j] * W2[e] (swiglu(W1[e] x[t], W3[e] x[t]))      e = topk_idx[t, j]    (reference.moe_experts)

The routing weight scales the down projection's fp32 output (as the reference: W4A4 checkpoints calibrate the
down projection's input scale on the unweighted SwiGLU output).

HBM round trips (what the hardware allows without a grid-wide barrier between the two matmuls):
1. XLA: sort the T*k (token, slot) pairs by expert and gather the token rows (already in the column order the
   kernel's decoded weights use, see nvfp4_decode.k_permutation); W4A4 quantizes them here. For T*k <= 16
   (decode of one or two tokens) the rows stay in token order, one work item per row (`ROWS_MODE_MAX_ROWS`):
   no sort and no un-sort, ~14 fewer small launches per layer (benchmarks/RESULTS.md, 2026-12-02).
2. Kernel (grouped_matmul, "swiglu" epilogue): each CTA streams the matching 64-row tiles of W1 and W3 of one
   expert, so gate and up for the same intermediate columns meet in one warpgroup's registers; the epilogue
   applies DeepSeek-V4's clamps, SiLU and the product and writes h [T*k, I] in bf16 only (gate and up never
   reach HBM).
3. Kernel (grouped_matmul, "linear"): y = h W2^T per expert, [T*k, D].
4. XLA: weight each row by its routing weight, un-sort (sorted mode) and sum the k rows of each token (fp32).
In rows mode with W4A16 weights on the GPU (`IN_KERNEL_ACTIVATIONS`), steps 1 and the split-K sum between 2 and 3
move into the kernels' x-loader warps (activation_tile.py): the gate/up kernel reads the token's row of x itself,
the down kernel reads gate/up's fp32 partials and applies SwiGLU itself: three launches per layer instead of five.
There the down kernel is also launched early (`PDL`, programmatic dependent launch): it streams its first weight
tiles on each SM as soon as gate/up's CTA there has exited, and builds its activations once gate/up has completed.
Only the weights of experts that received tokens are read, once per 128-row N tile of the activation rows.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import act_quant
from pallas_kernels import grouped_matmul as gm
from pallas_kernels import reference as _reference


def supported(x, w1, w3, w2) -> str | None:
    """None when the fused path handles these weights, else the reason (dispatch then uses the reference)."""
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        if type(w).__name__ != "NVFP4Tensor" or w.ndim != 3:
            return f"{name} is not a stacked NVFP4 weight"
    e, i, d = w1.shape
    if w3.shape != (e, i, d) or w2.shape != (e, d, i):
        return f"expert shapes disagree: w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape}"
    if x.shape[-1] != d:
        return f"x has {x.shape[-1]} features, experts expect {d}"
    for why in (gm.supported(1, i, d), gm.supported(1, d, i)):
        if why is not None:
            return why
    if (w1.input_scale is None) != (w3.input_scale is None):
        return "w1 and w3 disagree on W4A4 (input_scale)"
    return None


# Up to this many (token, slot) rows go to the kernels unsorted, one work item per row (`row_group` of
# grouped_matmul._launch): the k experts of one token are distinct, so nothing is streamed twice, and the sort, the
# gathers in sorted order, the item tables and the un-sort disappear (~14 small launches per layer while the work
# list took 7 a call; fewer since the item table, 2026-12-03). With more tokens experts repeat and sorting wins
# (T = 8: 48 rows on ~42 experts would stream 14% more weights).
ROWS_MODE_MAX_ROWS = 16
ROWS_TILE_M = 8       # one-row items need only wgmma's narrowest N (benchmarks/ncu_experts.py --variants)
# Rows mode: the gate/up kernel may ask L2 for the rows' down-projection weights once an SM has issued its own
# weight loads, so that HBM streams them while gate/up drains and the down kernel launches
# (grouped_matmul._prefetch_rows_l2). Off: on an H200 at T = 1, 2 the prefetch ran (gate/up read 74 MB from DRAM,
# not 57) but the down kernel gained 0.1-0.5 us and gate/up lost as much; the down kernel is 13.2 us even with its
# weights in L2 (15.1 cold), so at most ~2 us is there to win (RESULTS.md, fourteenth session).
PREFETCH_DOWN = False
# Rows mode, W4A16, on the GPU: the kernels' x-loader warps build their activation tiles themselves
# (grouped_matmul x_source, activation_tile.py): the gate/up kernel gathers and permutes the token's row, the down
# kernel adds gate/up's split-K partials and applies SwiGLU. The two XLA launches around the gate/up kernel
# (activation prep; split-K sum + SwiGLU + permutation) disappear: three launches per layer instead of five.
IN_KERNEL_ACTIVATIONS = True
# With IN_KERNEL_ACTIVATIONS: the down kernel is launched with programmatic dependent launch (grouped_matmul
# `_Dims.pdl_wait`): its CTAs take each SM as soon as the gate/up kernel's CTA there exits and start streaming the
# down weights; only the activation build (and the stores) wait for gate/up to complete. H200, T = 1: the block's
# span 37.2 us against 40.5 launched serially (benchmarks/RESULTS.md, seventeenth session). CUPTI's kernel times
# serialise the kernels and do not show the gain; a profiler trace's span does (benchmarks/gpu_trace.py).
PDL = True


def moe_experts(x: jax.Array, w1, w3, w2, topk_idx: jax.Array, topk_weight: jax.Array,
                swiglu_limit: float | None, *, out_dtype=None, config: gm.Config | None = None,
                rows_mode: bool | None = None, prefetch_down: bool | None = None,
                interpret: bool = False) -> jax.Array:
    """x [T, D]; w1, w3 NVFP4 [E, I, D]; w2 NVFP4 [E, D, I]; topk_idx [T, k] int; topk_weight [T, k] -> [T, D].

    rows_mode None picks unsorted rows for T*k <= ROWS_MODE_MAX_ROWS (decode of one token), sorted otherwise.
    prefetch_down (None: PREFETCH_DOWN) turns on the rows mode's L2 prefetch of the down weights from the gate/up
    kernel."""
    if (why := supported(x, w1, w3, w2)) is not None:
        raise ValueError(f"fused_moe.moe_experts: {why}")
    prefetch_down = PREFETCH_DOWN if prefetch_down is None else prefetch_down
    if topk_idx.shape != topk_weight.shape or topk_idx.ndim != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"topk_idx {topk_idx.shape} and topk_weight {topk_weight.shape} must both be [T={x.shape[0]}, k]")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    t, k = topk_idx.shape
    e, inter, d = w1.shape
    m = t * k
    if rows_mode is None:
        rows_mode = m <= ROWS_MODE_MAX_ROWS
    if rows_mode:     # row r = (token r // k, slot r % k), in that order
        row_group = topk_idx.reshape(-1).astype(jnp.int32)          # the kernel clamps it to [0, E)
        group_sizes = None
        token_of_row = jnp.arange(m, dtype=jnp.int32) // k
        route_w = topk_weight.reshape(-1).astype(jnp.float32)                     # [M]
        gid = row_group                                             # (act_quant clamps it too)
    else:
        row_group = None
        order, group_sizes = _reference.route_sort(topk_idx, e)
        token_of_row = order // k
        route_w = topk_weight.reshape(-1)[order].astype(jnp.float32)                # [M]
        gid = None

    n_groups = m if rows_mode else e
    cfg1 = config or _rows_tile(gm.default_config(m, n_groups, num_weights=2, n=inter, k=d), rows_mode)
    cfg2 = config or _rows_tile(gm.default_config(m, n_groups, n=d, k=inter), rows_mode)
    rs1 = gm.epilogue_row_scale(w1.global_scale, e, inter, w1.input_scale)
    rs3 = gm.epilogue_row_scale(w3.global_scale, e, inter, w3.input_scale)
    rs2 = gm.epilogue_row_scale(w2.global_scale, e, d, w2.input_scale)
    pf = (w2.packed, w2.block_scale) if (rows_mode and prefetch_down) else None
    in_kernel = (IN_KERNEL_ACTIVATIONS and rows_mode and not interpret and w1.input_scale is None
                 and w2.input_scale is None and cfg1.tile_m == cfg2.tile_m == gm.activation_tile.TILE_ROWS
                 and not (cfg1.natural_k or cfg2.natural_k)
                 and (cfg1.split_k == 1 or cfg2.compute_wgs == 4))   # the SwiGLU build's registers: see _build_kernel
    if in_kernel:
        xb, w2p, w2s = x.astype(jnp.bfloat16), w2.packed, w2.block_scale
        if PDL:
            # The down kernel's weight loader reads w2 and row_group before gate/up has finished: have XLA compute
            # them before gate/up starts (the barrier's outputs are ready together; gate/up consumes one of them).
            xb, w2p, w2s, row_group = jax.lax.optimization_barrier((xb, w2p, w2s, row_group))
        # gate/up from x's rows (token r // k), its raw output (fp32 partials with a K split, else h) straight
        # into the down kernel
        h = gm._launch(xb, [w1.packed, w3.packed], [w1.block_scale, w3.block_scale],
                       [rs1, rs3], None, jnp.dtype(jnp.bfloat16), cfg1, "swiglu", swiglu_limit, interpret,
                       row_group=row_group, m=m, l2_prefetch=pf, x_source="gather", rows_per_token=k,
                       raw_output=True, pdl_trigger=PDL)
        src = dict(x_source="swiglu", x_limit=swiglu_limit) if cfg1.split_k > 1 else dict(x_source="gather")
        y = gm._launch(h, [w2p], [w2s], [rs2], None, jnp.dtype(jnp.bfloat16), cfg2, "linear",
                       None, interpret, row_group=row_group, m=m, pdl_wait=PDL, **src)         # [M, D]
    else:
        if w1.input_scale is not None:      # W4A4: quantize in the natural column order, then prepare
            g13, m13 = _shared_input_scale(w1, w3)
            xs = act_quant.quantize_dequantize_grouped(x[token_of_row].astype(jnp.bfloat16), g13, group_sizes,
                                                       multiplier=m13, gid=gid)
            xs = gm.prepare_activation(xs, m, cfg1, interpret)
        else:   # the gather, padding and K permutation of the rows: one launch at decode sizes
            xs = gm.prepare_activation(x.astype(jnp.bfloat16), m, cfg1, interpret, rows=token_of_row)   # [M', D]
        # W4A16 down projection: the first launch returns h as the second's operand (padded, permuted).
        h_ready = w2.input_scale is None
        h = gm._launch(xs, [w1.packed, w3.packed], [w1.block_scale, w3.block_scale], [rs1, rs3], group_sizes,
                       jnp.dtype(x.dtype), cfg1, "swiglu", swiglu_limit, interpret, row_group=row_group, m=m,
                       prepare_for=cfg2 if h_ready else None, l2_prefetch=pf)           # [M, I] or [M', I]

        if not h_ready:
            h = act_quant.quantize_dequantize_grouped(h, w2.input_scale, group_sizes,
                                                      multiplier=w2.input_multiplier, gid=gid)
            h = gm.prepare_activation(h, m, cfg2, interpret)
        y = gm._launch(h, [w2.packed], [w2.block_scale], [rs2], group_sizes, jnp.dtype(jnp.bfloat16),
                       cfg2, "linear", None, interpret, row_group=row_group, m=m)         # [M, D]
    y = y.astype(jnp.float32) * route_w[:, None]
    if not rows_mode:
        inv = jnp.zeros_like(order).at[order].set(jnp.arange(m, dtype=order.dtype))  # order^-1: a scatter
        y = y[inv]
    out = y.reshape(t, k, d).sum(axis=1)
    return out.astype(out_dtype)


def _rows_tile(cfg: gm.Config, rows_mode: bool) -> gm.Config:
    """One-row work items: activation tiles of ROWS_TILE_M rows (default 8, wgmma's narrowest N), decoded by four
    compute warpgroups (the two-weight kernel too: with 8-row tiles it fits 104 registers; -5% at T = 1 and 2,
    benchmarks/RESULTS.md, 2026-12-02, session 7)."""
    if not rows_mode:
        return cfg
    return dataclasses.replace(cfg, tile_m=ROWS_TILE_M, compute_wgs=4 if ROWS_TILE_M <= 8 else cfg.compute_wgs)


def _shared_input_scale(w1, w3):
    """Gate and up share their input; checkpoints store one input scale for both (use the larger if not).
    Returns (g_a, the multiplier that quantizes with it: the stored one of the weight it came from, if any)."""
    g1, g3 = jnp.asarray(w1.input_scale, jnp.float32), jnp.asarray(w3.input_scale, jnp.float32)
    g = jnp.maximum(g1, g3)
    if w1.input_multiplier is None or w3.input_multiplier is None:
        return g, None
    return g, jnp.where(g1 >= g3, jnp.asarray(w1.input_multiplier, jnp.float32),
                        jnp.asarray(w3.input_multiplier, jnp.float32))


def reference(x, w1, w3, w2, topk_idx, topk_weight, swiglu_limit, *, out_dtype=None):
    """What `moe_experts` computes: pallas_kernels/reference.py (fp32, dequantized weights)."""
    return _reference.moe_experts(x, w1, w3, w2, topk_idx, topk_weight, swiglu_limit, out_dtype=out_dtype)
