"""Benchmark of the NVFP4 MoE kernels on one Hopper GPU, with the ceilings and baselines measured in the same run.

Shapes: DeepSeek-V4-Flash routed experts (hidden 4096, moe_intermediate 2048, 256 experts, top-6), expert
popularity drawn from Dirichlet(0.3) (a skewed, realistic load). Decode T in {1, 8, 64, 256}, prefill {2048, 8192}.

    PYTHONPATH=. python benchmarks/moe_kernels.py [--tokens 1,8,64,256,2048,8192] [--sections ...] [--out DIR]

Sections: ceilings (device copy, bf16 matmul), grouped (our grouped matmul on the gate/up shape, N = 2 x 2048,
plus the baselines: lax.ragged_dot bf16 (and, above 2048 tokens, where XLA's lowering of the whole call runs out
of memory, the same rows in ragged_dot calls of 2048 tokens each), Pallas ragged_dot_mgpu bf16, XLA dequantize +
ragged_dot, tokamax when importable; at decode sizes also `copy_same_bytes_tbps`, a device copy moving the call's
bytes per launch, the ceiling with launch and ramp-up included; the issue's target is the large copy's rate),
fused (the whole routed-expert block), actquant (the activation quantizer at 8192 x 4096).
Times are medians of CUPTI-measured GPU time (all kernels of the call), over several routings so that repeated
runs do not sit in L2. CUPTI's figure is the sum of the kernels' own times, run one after another: it leaves out
the gaps between launches, and it cannot show kernels that overlap. So the fused block and the decode-sized
grouped calls also get `span_ms`, from a profiler trace taken after every CUPTI measurement (`gpu_trace.py`): the
first kernel's start to the last one's end, gaps counted and overlaps (programmatic dependent launch) counted
once. Out-of-memory and other failures are caught and reported as such. Prints a table and writes results.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

HIDDEN, INTER, EXPERTS, TOPK = 4096, 2048, 256, 6
NVFP4_BYTES = 0.5625          # 4-bit code + one E4M3 byte per 16 weights


# ------------------------------------------------------------------------------------------------------------
# Inputs

def routing(t: int, seed: int, alpha: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """topk_idx [T, 6] (distinct experts per token) drawn with Dirichlet(alpha) popularity; routing weights."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(EXPERTS, alpha))
    gumbel = -np.log(-np.log(rng.random((t, EXPERTS))))
    idx = np.argsort(-(np.log(p + 1e-30) + gumbel), axis=1)[:, :TOPK].astype(np.int32)
    w = rng.random((t, TOPK)).astype(np.float32)
    return idx, w / w.sum(1, keepdims=True)


def group_sizes_of(idx: np.ndarray) -> np.ndarray:
    return np.bincount(idx.reshape(-1), minlength=EXPERTS).astype(np.int32)


def random_nvfp4(key, e: int, n: int, k: int):
    """A random NVFP4 weight [E, N, K] with realistic block scales (quantized from Gaussian data)."""
    from megamoe_jax.quant import nvfp4
    w = jax.random.normal(key, (e, n, k), jnp.bfloat16) * 0.02
    out = []
    for i in range(0, e, 16):     # quantize in slices to bound the f32 temporaries
        out.append(nvfp4.quantize(w[i:i + 16], batch_dims=1))
    del w
    packed = jnp.concatenate([t.packed for t in out])
    scale = jnp.concatenate([t.block_scale for t in out])
    g = jnp.concatenate([t.global_scale for t in out])
    return nvfp4.NVFP4Tensor(packed, scale, g)


# ------------------------------------------------------------------------------------------------------------
# Timing

def measure(f, *argsets, iterations: int = 5) -> float:
    """Median GPU time (ms) of f over `iterations` runs for each argument set (CUPTI: kernel time only)."""
    from jax.experimental.mosaic.gpu import profiler
    times = []
    for args in argsets:
        jax.block_until_ready(f(*args))                       # compile + warm up
        _, ts = profiler.measure(f, iterations=iterations)(*args)
        times.extend(ts)
    return statistics.median(times)


def _launches(f, args):
    from jax.experimental.mosaic.gpu import profiler
    return profiler.measure(f, aggregate=False)(*args)[1]


def copy_ring(nbytes: float, ring_bytes: float = 256e6):
    """A jitted copy that moves `nbytes` per launch (half read, half written) and its arguments: a ring of distinct
    bf16 buffers, more than L2 in all, copied in sequence in one call. Optimization barriers keep XLA from fusing the
    copies into fewer launches."""
    n = max(8, int(nbytes // 4))                    # elements per buffer: 2 bytes read + 2 written each
    ring = min(64, max(2, -(-int(ring_bytes) // (2 * n))))
    bufs = [jnp.full((n,), i, jnp.bfloat16) for i in range(ring)]

    def f(*bufs):
        outs, prev = [], None
        for b in bufs:
            if prev is not None:
                prev, b = jax.lax.optimization_barrier((prev, b))
            prev = b * 2
            outs.append(prev)
        return outs
    return jax.jit(f), bufs


def copy_at(nbytes: float) -> float:
    """TB/s of a device copy of `nbytes` (read + write) per launch: the copy ceiling at a decode kernel's size, where
    launch, ramp-up and drain weigh as much as in the kernel (median per-launch CUPTI time over the ring)."""
    from jax.experimental.mosaic.gpu import profiler
    f, bufs = copy_ring(nbytes)
    jax.block_until_ready(f(*bufs))
    _, kernels = profiler.measure(f, aggregate=False)(*bufs)
    return 4 * bufs[0].size / (statistics.median(ms for _, ms in kernels) * 1e-3) / 1e12


def safe(fn, *a, **kw):
    """Run a measurement; on OOM or any failure return the error text instead of crashing the run."""
    try:
        return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - a benchmark reports failures, it does not stop on them
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        kind = "OOM" if ("RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()) else "error"
        print(f"    [{kind}] {msg}", flush=True)
        if kind == "error" and os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        return f"{kind}: {msg}"


# ------------------------------------------------------------------------------------------------------------
# Sections

# Calls whose span is measured at the end of the run (a profiler trace ends Mosaic GPU's CUPTI measurements in
# this process): (row to complete, jitted f, argument sets, floor ms or None, bytes moved or None).
_SPANS: list = []


def spans(res):
    from benchmarks import gpu_trace
    for row, f, sets, floor_ms, nbytes in _SPANS:
        try:
            traced = [gpu_trace.span(f, *args) for args in sets]
        except Exception as e:  # noqa: BLE001 - reported, the CUPTI figure stands
            row["span_ms"] = f"error: {str(e)[:160]}"
            continue
        row["span_ms"] = statistics.median(sp for sp, _, _ in traced)
        row["span_activities"] = [(name[:40], round(st, 1), round(du, 1)) for name, st, du in traced[0][2]]
        if floor_ms:
            row["span_over_floor"] = row["span_ms"] / floor_ms
        if nbytes:
            row["span_tbps"] = nbytes / (row["span_ms"] * 1e-3) / 1e12
            if "copy_tbps" in res:
                row["span_of_copy"] = row["span_tbps"] / res["copy_tbps"]
        print("span", {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}, flush=True)


def ceilings(res):
    x = jnp.ones((1 << 30,), jnp.bfloat16)                   # 2 GiB
    f = jax.jit(lambda a: a * 2)
    ms = measure(f, (x,))
    res["copy_tbps"] = 2 * x.nbytes / (ms * 1e-3) / 1e12
    del x
    a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (8192, 8192), jnp.bfloat16)
    ms = measure(jax.jit(jnp.dot), (a, b))
    res["matmul_tflops"] = 2 * 8192 ** 3 / (ms * 1e-3) / 1e12
    print(f"ceilings: copy {res['copy_tbps']:.2f} TB/s (read+write), bf16 matmul {res['matmul_tflops']:.0f} TFLOP/s",
          flush=True)


def grouped(res, tokens, baselines: bool, n_routings: int = 3):
    from megamoe_jax.quant import nvfp4
    from pallas_kernels import grouped_matmul as gm
    n, k = 2 * INTER, HIDDEN
    w = random_nvfp4(jax.random.PRNGKey(0), EXPERTS, n, k)
    wb = None
    rows = []
    for t in tokens:
        m = t * TOPK
        sets, touched = [], []
        for r in range(n_routings):
            idx, _ = routing(t, seed=100 * t + r)
            gs = group_sizes_of(idx)
            touched.append(int((gs > 0).sum()))
            x = (jax.random.normal(jax.random.PRNGKey(r), (m, k), jnp.float32)).astype(jnp.bfloat16)
            sets.append((x, jnp.asarray(gs)))
        e_touched = statistics.median(touched)
        wbytes = e_touched * n * k * NVFP4_BYTES
        io = m * k * 2 + m * n * 2
        flops = 2 * m * n * k
        row = dict(T=t, rows=m, experts_touched=e_touched, weight_bytes=wbytes, flops=flops)
        # Weights are passed as arguments (a closure would embed GBs of constants in the program).
        f = jax.jit(lambda x, gs, w: gm.grouped_linear(x, w, gs))
        ms = safe(measure, f, *[(x, gs, w) for x, gs in sets])
        row["ours_ms"] = ms
        if isinstance(ms, float):
            row["ours_tbps"] = (wbytes + io) / (ms * 1e-3) / 1e12
            row["ours_tflops"] = flops / (ms * 1e-3) / 1e12
        if t <= 256:    # decode: the copy ceiling at this size too (the target is the large copy's rate)
            row["copy_same_bytes_tbps"] = safe(copy_at, wbytes + io)
            _SPANS.append((row, f, [(x, gs, w) for x, gs in sets], None, wbytes + io))
        if baselines:
            if wb is None:
                wb = jnp.swapaxes(nvfp4.dequantize(w, jnp.bfloat16), 1, 2)      # [E, K, N] bf16, 8.6 GB
                jax.block_until_ready(wb)
            with_wb = [(x, gs, wb) for x, gs in sets]
            rd = jax.jit(lambda x, gs, wb: jax.lax.ragged_dot(x, wb, gs))
            row["ragged_dot_bf16_ms"] = safe(measure, rd, *with_wb)
            if t > RAGGED_CHUNK_TOKENS:    # XLA's lowering of the whole call OOMs at T = 8192 (asks for 96 GiB)
                row["ragged_dot_bf16_chunked_ms"] = safe(measure, chunked_ragged_dot(RAGGED_CHUNK_TOKENS * TOPK),
                                                         *with_wb)
            row["ragged_dot_mgpu_bf16_ms"] = safe(measure, _mgpu_ragged(), *with_wb)
            xla = jax.jit(lambda x, gs, w: jax.lax.ragged_dot(
                x, jnp.swapaxes(nvfp4.dequantize(w, jnp.bfloat16), 1, 2), gs))
            row["xla_dequant_ragged_dot_ms"] = safe(measure, xla, *[(x, gs, w) for x, gs in sets])
            row["tokamax_ms"] = safe(_tokamax, with_wb)
        rows.append(row)
        print("grouped", {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}, flush=True)
    res["grouped"] = rows


# Frozen configs per T (Config fields), to pick `default_config`. T = 64 and 256 ask whether larger row tiles pay
# for themselves on the skewed load: at 16 rows an expert with 25 rows takes two items and streams its weights
# twice (T = 64: 4-5% more weight bytes than touched; T = 256: 40-45%; 32 rows: 0% / 9-11%, 64 rows: 0% / 1%).
SWEEP = {
    # Decode K splits (balanced_split_k models the busiest SM with min(M, E) items; the skewed load touches
    # fewer groups: T = 8 routes 48 rows to 30-38 experts, 960-1216 units where the model assumed 1536).
    1: [dict(tile_m=16, num_stages=6, k_unroll=2, compute_wgs=4, split_k=s) for s in (1, 4)],
    8: [dict(tile_m=16, num_stages=6, k_unroll=2, compute_wgs=4, split_k=s) for s in (2, 4)],
    64: [dict(tile_m=16, num_stages=6, k_unroll=2, compute_wgs=2), dict(tile_m=16, num_stages=6, k_unroll=2, compute_wgs=4),
         dict(tile_m=32, num_stages=5, k_unroll=2, compute_wgs=2), dict(tile_m=32, num_stages=5, k_unroll=2, compute_wgs=4)],
    256: [dict(tile_m=16, num_stages=6, k_unroll=2, compute_wgs=4), dict(tile_m=32, num_stages=5, k_unroll=2),
          dict(tile_m=32, num_stages=5, k_unroll=2, compute_wgs=4), dict(tile_m=64, num_stages=3)],
    # Prefill: every item streams its group's weights, so the row tile sets the weight traffic (T = 2048 with
    # 32-row tiles: ~577 items for 193 experts, 3x the touched bytes).
    1024: [dict(tile_m=32, num_stages=5, k_unroll=2, natural_k=True), dict(tile_m=64, num_stages=3, natural_k=True),
           dict(tile_m=128, num_stages=2, natural_k=True)],
    2048: [dict(tile_m=32, num_stages=5, k_unroll=2, natural_k=True), dict(tile_m=64, num_stages=3, natural_k=True),
           dict(tile_m=128, num_stages=2, natural_k=True)],
}
# The fused block (both kernels under one config), same question at prefill (128-row tiles do not fit the
# two-weight kernel: 237 KB of SMEM).
FUSED_SWEEP = {t: [dict(tile_m=32, num_stages=3, natural_k=True), dict(tile_m=64, num_stages=2, natural_k=True),
                   dict(tile_m=64, num_stages=3, natural_k=True)] for t in (1024, 2048, 8192)}


def sweep(res, tokens):
    """Our kernel under several frozen configs (to pick `default_config`), at the T of SWEEP / FUSED_SWEEP that are
    in `tokens`; not a baseline comparison."""
    from pallas_kernels import grouped_matmul as gm
    n, k = 2 * INTER, HIDDEN
    grouped_ts = [(t, c) for t, c in SWEEP.items() if t in tokens]
    fused_ts = [(t, c) for t, c in FUSED_SWEEP.items() if t in tokens]
    w = random_nvfp4(jax.random.PRNGKey(0), EXPERTS, n, k) if grouped_ts else None
    out = []
    for t, cfgs in grouped_ts:
        m = t * TOPK
        sets = []
        for r in range(3):
            idx, _ = routing(t, seed=100 * t + r)
            x = jax.random.normal(jax.random.PRNGKey(r), (m, k), jnp.float32).astype(jnp.bfloat16)
            sets.append((x, jnp.asarray(group_sizes_of(idx)), w))
        for c in [None, *cfgs]:           # None: default_config
            cfg = gm.Config(**c) if c is not None else None
            f = jax.jit(lambda x, gs, w, cfg=cfg: gm.grouped_linear(x, w, gs, config=cfg))
            ms = safe(measure, f, *sets)
            auto = (gm.one_row_items_config(m, n, k) if gm.use_one_row_items(m, EXPERTS, False) else
                    gm.default_config(m, EXPERTS, n=n, k=k))
            name = str(cfg) if cfg is not None else f"default {auto}"
            out.append(dict(T=t, config=name, ms=ms))
            print("sweep", t, name, ms, flush=True)
    del w
    if not fused_ts:
        res["sweep"] = out
        return
    from pallas_kernels import fused_moe
    w1 = random_nvfp4(jax.random.PRNGKey(1), EXPERTS, INTER, HIDDEN)
    w3 = random_nvfp4(jax.random.PRNGKey(2), EXPERTS, INTER, HIDDEN)
    w2 = random_nvfp4(jax.random.PRNGKey(3), EXPERTS, HIDDEN, INTER)
    for t, cfgs in fused_ts:
        sets = []
        for r in range(3):
            idx, tw = routing(t, seed=7 * t + r)
            x = jax.random.normal(jax.random.PRNGKey(r), (t, HIDDEN), jnp.float32).astype(jnp.bfloat16)
            sets.append((x, jnp.asarray(idx), jnp.asarray(tw), w1, w3, w2))
        for c in [None, *cfgs]:
            cfg = gm.Config(**c) if c is not None else None
            f = jax.jit(lambda x, i, tw, w1, w3, w2, cfg=cfg: fused_moe.moe_experts(x, w1, w3, w2, i, tw, 10.0,
                                                                                   config=cfg))
            ms = safe(measure, f, *sets)
            out.append(dict(T=t, block="fused", config=str(cfg) if cfg else "default", ms=ms))
            print("sweep fused", t, cfg or "default", ms, flush=True)
    res["sweep"] = out


def breakdown(res, tokens=(1, 8, 64, 8192)):
    """Per-kernel GPU time of our grouped matmul call (the Mosaic kernel vs the XLA glue: item table, K permutation
    of x, split-K sum), one routing per T."""
    from jax.experimental.mosaic.gpu import profiler
    from pallas_kernels import grouped_matmul as gm
    w = random_nvfp4(jax.random.PRNGKey(0), EXPERTS, 2 * INTER, HIDDEN)
    out = {}
    for t in tokens:
        idx, _ = routing(t, seed=100 * t)
        x = jax.random.normal(jax.random.PRNGKey(0), (t * TOPK, HIDDEN), jnp.float32).astype(jnp.bfloat16)
        gs = jnp.asarray(group_sizes_of(idx))
        f = jax.jit(lambda x, gs, w: gm.grouped_linear(x, w, gs))
        jax.block_until_ready(f(x, gs, w))
        _, kernels = profiler.measure(f, aggregate=False)(x, gs, w)
        out[t] = [(name[:60], round(ms, 4)) for name, ms in kernels]
        print("breakdown", t, out[t], flush=True)
    res["breakdown"] = out
    # The routed-expert block (fused_moe) the same way: its two kernels against the XLA launches around them.
    from pallas_kernels import fused_moe
    w1 = random_nvfp4(jax.random.PRNGKey(1), EXPERTS, INTER, HIDDEN)
    w3 = random_nvfp4(jax.random.PRNGKey(2), EXPERTS, INTER, HIDDEN)
    w2 = random_nvfp4(jax.random.PRNGKey(3), EXPERTS, HIDDEN, INTER)
    f = jax.jit(lambda x, i, tw, w1, w3, w2: fused_moe.moe_experts(x, w1, w3, w2, i, tw, 10.0))
    fused_out = {}
    for t in tokens:
        if t > 256:
            continue
        idx, tw = routing(t, seed=7 * t)
        x = jax.random.normal(jax.random.PRNGKey(0), (t, HIDDEN), jnp.float32).astype(jnp.bfloat16)
        args = (x, jnp.asarray(idx), jnp.asarray(tw), w1, w3, w2)
        jax.block_until_ready(f(*args))
        _, kernels = profiler.measure(f, aggregate=False)(*args)
        fused_out[t] = [(name[:60], round(ms, 4)) for name, ms in kernels]
        print("breakdown fused", t, round(sum(ms for _, ms in kernels), 4), fused_out[t], flush=True)
    res["breakdown_fused"] = fused_out


def _perm_take(a):
    """The permutation as a gather of columns (an index constant)."""
    from pallas_kernels import nvfp4_decode
    return jnp.take(a, jnp.asarray(nvfp4_decode.k_permutation(a.shape[1])), axis=1)


def _permute_variants():
    from pallas_kernels import nvfp4_decode
    return {"bf16 moveaxis (permute_k)": nvfp4_decode.permute_k, "bf16 take": _perm_take,
            "u32 halves of strided slices (permute_activation)": nvfp4_decode.permute_activation}


def permute(res, rows=(6, 48, 384, 1536, 4032)):
    """The activation's K permutation (decode configs, natural_k=False) in XLA, in several formulations; each is
    checked equal to nvfp4_decode.permute_k first. Bytes: read + write of x."""
    from pallas_kernels import nvfp4_decode
    out = []
    for m in rows:
        x = jax.random.normal(jax.random.PRNGKey(m), (m, HIDDEN), jnp.float32).astype(jnp.bfloat16)
        want = np.asarray(nvfp4_decode.permute_k(x))
        for name, fn in _permute_variants().items():
            f = jax.jit(fn)
            if not np.array_equal(np.asarray(f(x)), want):
                out.append(dict(rows=m, variant=name, ms="error: differs from permute_k"))
                continue
            ms = safe(measure, f, (x,))
            row = dict(rows=m, variant=name, ms=ms)
            if isinstance(ms, float):
                row["tbps"] = 2 * x.nbytes / (ms * 1e-3) / 1e12
            out.append(row)
            print("permute", row, flush=True)
    res["permute"] = out


def fused(res, tokens):
    """The routed-expert block: ours (fused gate/up+SwiGLU kernel, down kernel, XLA glue) vs the XLA path a user
    would write (dequantize the three NVFP4 weights to bf16, three lax.ragged_dot), and the weight-stream floor."""
    from megamoe_jax.quant import nvfp4
    from pallas_kernels import fused_moe
    w1 = random_nvfp4(jax.random.PRNGKey(1), EXPERTS, INTER, HIDDEN)
    w3 = random_nvfp4(jax.random.PRNGKey(2), EXPERTS, INTER, HIDDEN)
    w2 = random_nvfp4(jax.random.PRNGKey(3), EXPERTS, HIDDEN, INTER)
    ours = jax.jit(lambda x, i, tw, w1, w3, w2: fused_moe.moe_experts(x, w1, w3, w2, i, tw, 10.0))

    def xla_path(x, i, tw, w1, w3, w2):
        t, k = i.shape
        order = jnp.argsort(i.reshape(-1), stable=True)
        gs = jnp.bincount(i.reshape(-1), length=EXPERTS)
        xs = x[order // k]
        deq = lambda w: jnp.swapaxes(nvfp4.dequantize(w, jnp.bfloat16), 1, 2)
        g = jax.lax.ragged_dot(xs, deq(w1), gs, preferred_element_type=jnp.float32)
        u = jax.lax.ragged_dot(xs, deq(w3), gs, preferred_element_type=jnp.float32)
        h = (jnp.minimum(g, 10.0) * jax.nn.sigmoid(jnp.minimum(g, 10.0)) * jnp.clip(u, -10, 10)).astype(x.dtype)
        y = jax.lax.ragged_dot(h, deq(w2), gs, preferred_element_type=jnp.float32) * tw.reshape(-1)[order][:, None]
        return jnp.zeros((t, HIDDEN), jnp.float32).at[order // k].add(y).astype(x.dtype)

    per_expert = (2 * INTER * HIDDEN + HIDDEN * INTER) * NVFP4_BYTES
    rows = []
    for t in tokens:
        sets, touched = [], []
        for r in range(3):
            idx, tw = routing(t, seed=7 * t + r)
            touched.append(int((group_sizes_of(idx) > 0).sum()))
            x = jax.random.normal(jax.random.PRNGKey(r), (t, HIDDEN), jnp.float32).astype(jnp.bfloat16)
            sets.append((x, jnp.asarray(idx), jnp.asarray(tw), w1, w3, w2))
        floor_bytes = statistics.median(touched) * per_expert
        row = dict(T=t, experts_touched=statistics.median(touched), weight_bytes=floor_bytes)
        row["ours_ms"] = safe(measure, ours, *sets)
        if t <= 8:      # the launches of one call (CUPTI, us)
            row["ours_launches_us"] = safe(lambda: [(name[:40], round(ms * 1e3, 1)) for name, ms in
                                                    _launches(ours, sets[0])])
        row["xla_dequant_ragged_dot_ms"] = safe(measure, jax.jit(xla_path), *sets) if t <= 2048 else "skipped"
        if isinstance(row["ours_ms"], float) and "copy_tbps" in res:
            floor_ms = floor_bytes / (res["copy_tbps"] * 1e12) * 1e3
            row["floor_ms"] = floor_ms
            row["ours_over_floor"] = row["ours_ms"] / floor_ms
        if t <= 256:
            _SPANS.append((row, ours, sets, row.get("floor_ms"), None))
        rows.append(row)
        print("fused", {kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}, flush=True)
    res["fused"] = rows


def actquant(res, t=8192, k=HIDDEN):
    """The activation quantizer at 8192 x 4096: Mosaic kernel (codes + scales + row amax; and the W4A4 "values"
    output) against the exact XLA path on the same input. Bytes: each input read once, each output written once."""
    from megamoe_jax.quant import nvfp4
    from pallas_kernels import act_quant
    x = (jax.random.normal(jax.random.PRNGKey(0), (t, k), jnp.float32) * 3).astype(jnp.bfloat16)
    g = jnp.float32(0.004)
    G = nvfp4.multiplier_from_g(g)
    codes = t * k * 2 + t * k // 2 + t * k // 16
    variants = {
        "kernel codes+scales": (lambda v: act_quant._quantize_mgpu(v, G[None], None, "codes", False,
                                                                   act_quant.Config())[:2], codes),
        "kernel codes+scales+amax": (lambda v: act_quant.quantize(v, g, with_amax=True),
                                     codes + t * k // 16 * 2 * 2 + t * 4),
        "kernel values (W4A4 operand)": (lambda v: act_quant._quantize_mgpu(v, G[None], None, "values", False,
                                                                            act_quant.Config())[0], 4 * t * k),
        "XLA exact path codes+scales+amax": (lambda v: (nvfp4.quantize_with_multiplier(v, G), nvfp4.row_amax(v)),
                                             codes + t * 4),
    }
    for bpt in (2, 8):
        variants[f"kernel codes+scales, blocks_per_thread={bpt}"] = (
            lambda v, bpt=bpt: act_quant._quantize_mgpu(v, G[None], None, "codes", False,
                                                        act_quant.Config(bpt))[:2], codes)
    rows = []
    for name, (fn, byts) in variants.items():
        ms = safe(measure, jax.jit(fn), (x,))
        row = dict(T=t, K=k, variant=name, bytes=byts, ms=ms)
        if isinstance(ms, float):
            row["tbps"] = byts / (ms * 1e-3) / 1e12
            if "copy_tbps" in res:
                row["fraction_of_copy"] = row["tbps"] / res["copy_tbps"]
        print("actquant", row, flush=True)
        rows.append(row)
    res["actquant"] = rows


# lax.ragged_dot over consecutive row chunks of this many tokens: the form a user falls back to where the whole
# call does not compile (T = 8192 of V4-Flash); the same rows, groups and FLOPs.
RAGGED_CHUNK_TOKENS = 2048


def chunked_ragged_dot(chunk_rows: int):
    """jit(x [M, K], group_sizes [E], w [E, K, N]) -> [M, N]: lax.ragged_dot on rows [c, c + chunk_rows) in turn,
    each with the group sizes that fall inside its rows (rows past sum(group_sizes) stay zero, as in one call)."""
    def f(x, gs, w):
        ends = jnp.cumsum(gs.astype(jnp.int32))
        starts = ends - gs.astype(jnp.int32)
        outs = []
        for c0 in range(0, x.shape[0], chunk_rows):
            c1 = min(c0 + chunk_rows, x.shape[0])
            sizes = jnp.clip(ends, c0, c1) - jnp.clip(starts, c0, c1)
            outs.append(jax.lax.ragged_dot(x[c0:c1], w, sizes))
        return jnp.concatenate(outs)
    return jax.jit(f)


def _mgpu_ragged():
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return jax.jit(lambda x, gs, wb: ragged_dot_mgpu.ragged_dot(
        x, wb, group_sizes=gs, block_m=64, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1))


def _tokamax(sets):
    carried = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".carry", "tokamax")
    if os.path.isdir(carried) and carried not in sys.path:   # benchmarks/carry_tokamax.sh; installed ones first
        sys.path.append(carried)
    try:
        import tokamax
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {type(e).__name__}: {str(e)[:100]}"
    f = jax.jit(lambda x, gs, wb: tokamax.ragged_dot(x, wb, gs, implementation="mosaic"))
    return measure(f, *sets)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,64,256,2048,8192")
    ap.add_argument("--sections", default="ceilings,grouped")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    dev = jax.devices()[0]
    res = dict(device=dev.device_kind, date=datetime.date.today().isoformat(), jax=jax.__version__)
    print(f"device: {dev.device_kind}  jax {jax.__version__}  {res['date']}", flush=True)
    sections = args.sections.split(",")
    if "ceilings" in sections:
        ceilings(res)
    if "grouped" in sections:
        grouped(res, tokens, baselines=not args.no_baselines)
    if "sweep" in sections:
        sweep(res, tokens)
    if "permute" in sections:
        permute(res)
    if "breakdown" in sections:
        breakdown(res, [t for t in tokens if t <= 8192])
    if "fused" in sections:
        fused(res, tokens)
    if "actquant" in sections:
        actquant(res)
    spans(res)
    os.makedirs(args.out, exist_ok=True)    # a new --out folder (it used to fail here, after the whole run)
    path = os.path.join(args.out, "results.json")
    with open(path + ".tmp", "w") as fh:     # written whole, then renamed: never a half file
        json.dump(res, fh, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return res


if __name__ == "__main__":
    main()
