"""The routed-expert path of one V4-Flash MoE layer at decode sizes, for Nsight Compute (ncu) on the GPU machine.

Runs `fused_moe.moe_experts` (NVFP4 W4A16, 256 experts, hidden 4096, intermediate 2048, top-6) on T tokens a few
times so that ncu can read the Mosaic GPU kernels' hardware counters:

    ncu --clock-control none -k regex:mosaic --launch-skip 2 --launch-count 2 --section SpeedOfLight ... \\
        python benchmarks/ncu_experts.py --tokens 1

(the first call compiles and warms up; `--launch-skip 2` skips its two kernels, the next two are gate/up and down).

`--time` instead prints the CUPTI GPU time of the whole call and of each Mosaic GPU kernel for every
`--tokens-list` value, against the floor (touched expert bytes over --copy-tb-s), then each call's span from a
profiler trace (`gpu_trace.py`: gaps counted, the down kernel's early launch counted once).
"""
from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.model_decode import random_nvfp4
from pallas_kernels import fused_moe
from pallas_kernels import grouped_matmul as gm


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--tokens-list", default=None, help="with --time: comma list of token counts")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--variants", default="default",
                    help="with --time: comma list of default, sorted (rows sorted by expert), rows16 (one-row "
                         "items in 16-row tiles), overlap (pipelined K loop in the SwiGLU kernel), nosplit (no K "
                         "split), unroll1 (down kernel: one K step per wait), pf_loads / pf_none (rows mode: L2 "
                         "prefetch of the down weights from the gate/up kernel on / off), ablate_decode / ablate_store / "
                         "ablate_both (grouped_matmul.ABLATE: skip the FP4 decode / the output stores; wrong "
                         "results, timing only), nopdl (fused_moe.PDL off), cfg:F=V;... (both kernels' configs), "
                         "down:F=V;... (the down kernel's only)")
    ap.add_argument("--chain", type=int, default=0,
                    help="with --time: also time CHAIN calls in one program, each on other experts (a decode "
                         "step's layers: every call's weights are cold in L2), output fed to the next call")
    ap.add_argument("--down-l2", action="store_true",
                    help="time the rows-mode down kernel alone at T = 1: the same 6 experts again and again (their "
                         "27 MB stay in L2) against 8 disjoint expert sets in one program (cold)")
    ap.add_argument("--grouped", action="store_true",
                    help="time moe_kernels' grouped call ([T*6, 4096] x NVFP4 [256, 4096, 4096], skewed routing) at "
                         "--tokens-list: the default config, 8-row tiles, and one-row items (rows mode, groups "
                         "from group_sizes); per launch and per kernel. --variants: auto (grouped_matmul's own "
                         "choice, e.g. one-row items from group sizes; auto:TABLE with ONE_ROW_TABLE=TABLE: search, xla or smem), default (default_config, sorted), tile8, rows, "
                         "cfg:F=V;..., rows:F=V;... (rows mode with these Config fields), rowsg:F=V;... (the same "
                         "with the in-kernel gather of x), each optionally +decode:store (ablations)")
    ap.add_argument("--copy-tb-s", type=float, default=3.29, help="copy rate for the floor (measured, sustained)")
    args = ap.parse_args()
    if args.down_l2:
        for v in args.variants.split(","):
            _set_variant(v)
            print(f"variant {v}:", end=" ")
            time_down_l2()
        return
    if args.grouped:
        return time_grouped([int(t) for t in str(args.tokens_list or args.tokens).split(",")], args.variants.split(","))
    if args.time:
        return time_tokens([int(t) for t in str(args.tokens_list or args.tokens).split(",")], args.copy_tb_s,
                           args.variants.split(","), args.chain)
    e, d, i, k = 256, 4096, 2048, 6
    keys = jax.random.split(jax.random.key(0), 4)
    w1, w3, w2 = (random_nvfp4(keys[0], (e, i, d)), random_nvfp4(keys[1], (e, i, d)),
                  random_nvfp4(keys[2], (e, d, i)))
    rng = np.random.default_rng(0)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(args.tokens)]), jnp.int32)
    wts = jnp.full((args.tokens, k), 1.0 / k, jnp.float32)
    x = (0.5 * jax.random.normal(keys[3], (args.tokens, d), jnp.float32)).astype(jnp.bfloat16)
    _set_variant(args.variants.split(",")[0])     # for ncu: the first variant
    f = jax.jit(lambda x, a, b, c, idx, w: fused_moe.moe_experts(x, a, b, c, idx, w, 10.0))
    for _ in range(args.calls):
        out = f(x, w1, w3, w2, idx, wts)
    print("out", out.shape, float(jnp.abs(out.astype(jnp.float32)).mean()))


_CONFIG_VARIANTS = {"overlap": dict(overlap_mma=True), "nosplit": dict(split_k=1), "unroll1": dict(k_unroll=1),
                    "wg2": dict(compute_wgs=2), "wg4": dict(compute_wgs=4), "wg4_nosplit": dict(compute_wgs=4, split_k=1),
                    "split2x": lambda c: dict(split_k=_doubled_split(c))}


def _doubled_split(cfg):
    """Twice the default K split where the unit's K steps allow it (>= 2 steps per unit; split <= 8)."""
    return cfg.split_k * 2 if cfg.split_k > 1 and cfg.split_k <= 4 else cfg.split_k


def _set_variant(variant):
    """default; sorted (rows always sorted by expert); rows16 (one-row items in 16-row tiles); overlap (the
    SwiGLU kernel's pipelined K loop, Config.overlap_mma); nosplit (Config.split_k = 1); unroll1 (k_unroll = 1);
    wg2 / wg4 (Config.compute_wgs); wg4_nosplit (four compute warpgroups, no K split); split2x (twice the
    default K split where it is > 1); pf_loads / pf_none (fused_moe.PREFETCH_DOWN on / off); xla_prep (rows mode
    with the activations prepared by XLA launches, fused_moe.IN_KERNEL_ACTIVATIONS off); nopdl (fused_moe.PDL
    off: the down kernel launches after gate/up has ended)."""
    if variant not in ("default", "sorted", "rows16", "xla_prep", "nopdl", *_PREFETCH_VARIANTS, *_CONFIG_VARIANTS, *_ABLATE_VARIANTS) \
            and not variant.startswith(("cfg:", "down:")):
        raise ValueError(f"unknown variant {variant!r}")
    # down:FIELD=V;...: fields of the one-weight (down) kernel's default config only
    down_change = _config_fields(variant[5:]) if variant.startswith("down:") else None

    def default_config(m, groups, num_weights=1, **kw):
        cfg = _DEFAULT_CONFIG(m, groups, num_weights, **kw)
        return dataclasses.replace(cfg, **down_change) if (down_change and num_weights == 1) else cfg
    gm.default_config = default_config
    gm.ABLATE = _ABLATE_VARIANTS.get(variant, frozenset())
    fused_moe.IN_KERNEL_ACTIVATIONS = variant != "xla_prep"
    fused_moe.PDL = _DEFAULTS[4] and variant != "nopdl"
    fused_moe.PREFETCH_DOWN = _PREFETCH_VARIANTS.get(variant, _DEFAULTS[3])
    fused_moe.ROWS_MODE_MAX_ROWS = 0 if variant == "sorted" else _DEFAULTS[0]
    fused_moe.ROWS_TILE_M = 16 if variant == "rows16" else _DEFAULTS[1]
    change = _config_fields(variant[4:]) if variant.startswith("cfg:") else _CONFIG_VARIANTS.get(variant)

    def changed(cfg, rows_mode):     # applied to the fused path's final config (after its row-item tile)
        cfg = _DEFAULTS[2](cfg, rows_mode)
        return dataclasses.replace(cfg, **(change(cfg) if callable(change) else change))
    fused_moe._rows_tile = changed if change else _DEFAULTS[2]


_DEFAULTS = (fused_moe.ROWS_MODE_MAX_ROWS, fused_moe.ROWS_TILE_M, fused_moe._rows_tile, fused_moe.PREFETCH_DOWN,
             fused_moe.PDL)
_DEFAULT_CONFIG = gm.default_config
_ONE_ROW_TABLE = gm.ONE_ROW_TABLE
_PREFETCH_VARIANTS = {"pf_none": False, "pf_loads": True}
_ABLATE_VARIANTS = {"ablate_decode": frozenset({"decode"}), "ablate_store": frozenset({"store"}),
                    "ablate_both": frozenset({"decode", "store"})}


def time_tokens(tokens, copy_tb_s, variants=("default",), chain=0, span_rounds=3):
    import statistics
    from jax.experimental.mosaic.gpu import profiler
    e, d, i, k = 256, 4096, 2048, 6
    keys = jax.random.split(jax.random.key(0), 4)
    w1, w3, w2 = (random_nvfp4(keys[0], (e, i, d)), random_nvfp4(keys[1], (e, i, d)),
                  random_nvfp4(keys[2], (e, d, i)))
    from benchmarks import gpu_trace
    print("call ms: CUPTI, the sum of the call's kernel times; span ms: first kernel start to last kernel end "
          "(profiler trace: launch gaps counted, overlaps counted once)")
    print("| variant | T | experts | call ms | kernels ms (gate/up, down) | floor ms | call / floor |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for variant, t in [(v, t) for t in tokens for v in variants]:
        _set_variant(variant)
        f = jax.jit(lambda x, a, b, c, idx, w: fused_moe.moe_experts(x, a, b, c, idx, w, 10.0))
        rng = np.random.default_rng(t)
        idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
        touched = len(np.unique(np.asarray(idx)))
        wts = jnp.full((t, k), 1.0 / k, jnp.float32)
        x = (0.5 * jax.random.normal(keys[3], (t, d), jnp.float32)).astype(jnp.bfloat16)
        args = (x, w1, w3, w2, idx, wts)
        jax.block_until_ready(f(*args))
        calls = [profiler.measure(f)(*args)[1] for _ in range(7)]
        _, kern = profiler.measure(f, aggregate=False)(*args)
        ks = [ms for name, ms in kern if "mosaic" in name.lower()]
        print(f"  launches: {len(kern)}: " + ", ".join(f"{name[:28]} {ms * 1e3:.1f} us" for name, ms in kern),
              flush=True)
        floor = touched * 3 * d * i * 0.5625 / (copy_tb_s * 1e12) * 1e3
        call = statistics.median(calls)
        rows.append((variant, t, touched, call, ks, floor, f, args))
        print(f"| {variant} | {t} | {touched} | {call:.4f} | {', '.join(f'{v:.4f}' for v in ks)} | "
              f"{floor:.4f} | {call / floor:.3f}x |", flush=True)
        if chain:
            c_call, c_ks, c_touched = time_chain(t, chain, (w1, w3, w2), x)
            c_floor = c_touched * 3 * d * i * 0.5625 / (copy_tb_s * 1e12) * 1e3
            print(f"| {variant} chain{chain} | {t} | {c_touched:g} | {c_call:.4f} | "
                  f"{', '.join(f'{v:.4f}' for v in c_ks)} | {c_floor:.4f} | {c_call / c_floor:.2f}x |", flush=True)
    # The traces last: after jax.profiler.trace, Mosaic GPU's CUPTI measurement fails in this process. Mosaic's
    # CUPTI records serialise the kernels (an early-launched kernel does not overlap there); the trace's do not.
    print("\nspans (profiler trace, rounds of 9 calls, variants interleaved; median of the rounds' medians):")
    spans = {i: [] for i in range(len(rows))}
    for _ in range(span_rounds):
        for i, (variant, *_rest) in enumerate(rows):
            _set_variant(variant)
            try:
                sp, _, acts = gpu_trace.span(rows[i][6], *rows[i][7])
            except Exception as err:  # noqa: BLE001 - the CUPTI figures stand without the trace
                print(f"  trace failed: {str(err)[:300]}", flush=True)
                continue
            spans[i].append(sp)
            print(f"  {variant} T={rows[i][1]}: span {sp * 1e3:.1f} us: " +
                  ", ".join(f"{name[:20]} @{st:.1f} +{du:.1f}" for name, st, du in acts), flush=True)
    print("| variant | T | experts | call ms (CUPTI) | span ms | floor ms | span / floor |")
    print("|---|---|---|---|---|---|---|")
    for i, (variant, t, touched, call, ks, floor, _f, _a) in enumerate(rows):
        sp = statistics.median(spans[i]) if spans[i] else float("nan")
        print(f"| {variant} | {t} | {touched} | {call:.4f} | {sp:.4f} | {floor:.4f} | {sp / floor:.3f}x |",
              flush=True)


def time_down_l2(calls=8, e=256, d=4096, i=2048, k=6):
    """Is the rows-mode down kernel (one token's 6 experts, [6, 2048] x [4096, 2048]) limited by DRAM? Its
    CUPTI time when its 27 MB of weights sit in L2 (the same experts every call) against cold (`calls` disjoint
    expert sets in one program)."""
    import statistics
    from jax.experimental.mosaic.gpu import profiler
    w2 = random_nvfp4(jax.random.key(2), (e, d, i))
    cfg = fused_moe._rows_tile(gm.default_config(k, k, n=d, k=i), True)
    h = (0.5 * jax.random.normal(jax.random.key(3), (k, i), jnp.float32)).astype(jnp.bfloat16)
    rs = gm.epilogue_row_scale(w2.global_scale, e, d)
    gs = jnp.zeros((e,), jnp.int32)

    def down(h, groups):
        return gm._launch(h, [w2.packed], [w2.block_scale], [rs], gs, jnp.dtype(jnp.bfloat16), cfg, "linear",
                          None, False, row_group=groups)
    perm = np.random.default_rng(5).permutation(e)
    sets = jnp.asarray(perm[:calls * k].reshape(calls, k), jnp.int32)
    hot = jax.jit(down)
    jax.block_until_ready(hot(h, sets[0]))
    hot_ms = statistics.median([ms for _ in range(5) for name, ms in
                                profiler.measure(hot, aggregate=False)(h, sets[0])[1] if "mosaic" in name.lower()])

    def chain(h, sets):
        outs = [down(h, sets[j]) for j in range(calls)]
        return jnp.stack(outs)
    cold = jax.jit(chain)
    jax.block_until_ready(cold(h, sets))
    _, kern = profiler.measure(cold, aggregate=False)(h, sets)
    ks = [ms for name, ms in kern if "mosaic" in name.lower()]
    print(f"down kernel alone (config {cfg}): hot in L2 {hot_ms:.4f} ms (kernel); cold, per kernel: "
          f"{', '.join(f'{v:.4f}' for v in ks)} (mean {np.mean(ks):.4f}); all launches of the cold program: "
          f"{[(n[:40], round(v, 4)) for n, v in kern[:6]]}", flush=True)


def time_grouped(tokens, variants):
    """The grouped call of moe_kernels.py at decode sizes: which of its costs a config or the rows mode removes.
    Rows mode derives each row's group from group_sizes (a row per item; a group with several rows streams its
    weights once per row), so it is only exact-cost where groups have one row (T = 1: a token's distinct
    experts)."""
    import statistics
    from jax.experimental.mosaic.gpu import profiler
    from benchmarks import moe_kernels as mk
    n, k = 2 * mk.INTER, mk.HIDDEN
    w = mk.random_nvfp4(jax.random.PRNGKey(0), mk.EXPERTS, n, k)
    rs = gm.epilogue_row_scale(w.global_scale, mk.EXPERTS, n)
    print("| variant | ablate | T | rows | experts | call ms | kernels ms | TB/s on weights + io |")
    print("|---|---|---|---|---|---|---|---|")
    for t in tokens:
        m = t * mk.TOPK
        idx, _ = mk.routing(t, seed=100 * t)
        gs_np = mk.group_sizes_of(idx)
        gs = jnp.asarray(gs_np)
        x = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32).astype(jnp.bfloat16)
        byts = int((gs_np > 0).sum()) * n * k * 0.5625 + m * k * 2 + m * n * 2
        base = gm.default_config(m, mk.EXPERTS, n=n, k=k)
        for variant in variants:
            name, _, abl = variant.partition("+")
            gm.ABLATE = frozenset(abl.split(":")) - {""}
            cfg = {"default": base, "tile8": dataclasses.replace(base, tile_m=8),
                   "rows": dataclasses.replace(base, tile_m=8)}.get(name)
            if name.startswith("cfg:"):     # e.g. cfg:num_stages=8;compute_wgs=2 (fields of gm.Config)
                cfg = dataclasses.replace(base, **_config_fields(name[4:]))
            if name.startswith(("rows:", "rowsg:")):     # rows mode (rowsg: in-kernel gather) with these fields
                cfg = dataclasses.replace(base, tile_m=8, **_config_fields(name.partition(":")[2]))
            if name == "auto" or name.startswith("auto:"):   # grouped_matmul's own choice (one-row items for
                cfg = "auto"        # <= 16 rows), no config; auto:TABLE sets ONE_ROW_TABLE (search, xla, smem)
                gm.ONE_ROW_TABLE = name.partition(":")[2] or _ONE_ROW_TABLE
            if cfg is None:
                raise ValueError(f"unknown grouped variant {name!r} (auto, default, tile8, rows, cfg:FIELD=V;..., "
                                 f"rows:FIELD=V;..., rowsg:FIELD=V;...; +decode:store ablates)")
            if name == "rows" or name.startswith(("rows:", "rowsg:")):
                gather = name.startswith("rowsg")

                def f(x, gs, w, cfg=cfg, gather=gather):
                    row_group = gm.row_groups_of_sizes(gs, m)     # two small launches
                    return gm._launch(x, [w.packed], [w.block_scale], [rs], None, jnp.dtype(jnp.bfloat16), cfg,
                                      "linear", None, False, row_group=row_group,
                                      **(dict(m=m, x_source="gather") if gather else {}))
            elif cfg == "auto":
                def f(x, gs, w):
                    return gm.grouped_linear(x, w, gs)
            else:
                def f(x, gs, w, cfg=cfg):
                    return gm.grouped_linear(x, w, gs, config=cfg)
            f = jax.jit(f)
            jax.block_until_ready(f(x, gs, w))
            call = statistics.median([profiler.measure(f)(x, gs, w)[1] for _ in range(7)])
            _, kern = profiler.measure(f, aggregate=False)(x, gs, w)
            print(f"| {name} | {abl or '-'} | {t} | {m} | {int((gs_np > 0).sum())} | {call:.4f} | "
                  f"{', '.join(f'{nm[:24]} {v:.4f}' for nm, v in kern)} | {byts / (call * 1e9):.3f} |", flush=True)
    gm.ABLATE = frozenset()
    gm.ONE_ROW_TABLE = _ONE_ROW_TABLE


def _config_fields(spec: str) -> dict:
    """'num_stages=8;compute_wgs=2' -> {'num_stages': 8, 'compute_wgs': 2} (ints and true/false)."""
    out = {}
    for item in filter(None, spec.split(";")):
        key, _, val = item.partition("=")
        out[key] = {"true": True, "false": False}.get(val.lower(), None)
        if out[key] is None:
            out[key] = int(val)
    return out


def time_chain(t, calls, weights, x, e=256, k=6):
    """`calls` MoE calls in one jitted program, each on experts the previous calls did not touch (consecutive
    slices of one permutation), each call's output the next one's input, as a decode step's layers: no call finds
    its weights in L2. Returns per call: the median CUPTI GPU time (ms), the mean of each Mosaic kernel's time in
    call order (gate/up, down), and the touched experts."""
    import statistics
    from jax.experimental.mosaic.gpu import profiler
    perm = np.random.default_rng(1000 + t).permutation(e)
    pos = np.arange(calls * t * k).reshape(calls, t, k)
    idx = jnp.asarray(perm[pos % e], jnp.int32)                                   # [calls, T, k]
    touched = float(np.mean([len(np.unique(perm[p % e])) for p in pos]))
    wts = jnp.full((t, k), 1.0 / k, jnp.float32)

    def run(x, a, b, c, idx, w):
        for j in range(calls):
            x = fused_moe.moe_experts(x, a, b, c, idx[j], w, 10.0)
        return x
    f = jax.jit(run)
    args = (x, *weights, idx, wts)
    jax.block_until_ready(f(*args))
    total = statistics.median([profiler.measure(f)(*args)[1] for _ in range(5)])
    _, kern = profiler.measure(f, aggregate=False)(*args)
    ks = [ms for name, ms in kern if "mosaic" in name.lower()]
    per = len(ks) // calls
    means = [float(np.mean(ks[j::per])) for j in range(per)] if per else []
    return total / calls, means, touched


if __name__ == "__main__":
    main()
