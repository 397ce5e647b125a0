"""Where the grouped-matmul kernel's time goes at decode sizes: Mosaic GPU's on-device profiler, per warpgroup.

    PYTHONPATH=. python benchmarks/kernel_trace.py [--cases grouped1,grouped8,fused1] [--out DIR]

Each case runs with MEGAMOE_KERNEL_PROFILE set, so the kernel records its regions (grouped_matmul._region: setup,
fetch, wait_w, decode, wait_x, mma, hand_over, wait_half, epilogue in the compute warpgroups; fetch and wait_free
in the weight loader, the memory warpgroup's warp 0) with the SM clock. Every kernel's first call after a compile
writes a trace; a second compile (jax.clear_caches) gives a trace of a warm call. The raw buffers are kept
(`*.npz`) and summarised: when each SM starts (globaltimer), when its first weight tile lands, how the compute
warpgroups split their time, when each SM finishes. Prints a table per kernel and writes trace_summary.json.
The regions cost a few instructions each; the CUPTI time with the regions on is printed beside the case.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import traceback

import numpy as np

ENTER_EXIT = 1 << 31


def _install_raw_dump():
    """Make the profiler also keep its raw buffer (its JSON mixes nanoseconds and clock cycles)."""
    from jax.experimental.mosaic.gpu import profiler
    orig = profiler.ProfilerSpec.dump

    def dump(self, buffer, f, grid, block):
        np.savez(f.name[:-len(".json")] + ".npz", buffer=np.asarray(buffer), grid=np.asarray(grid),
                 block=np.asarray(block), entries=self.entries_per_warpgroup,
                 names=json.dumps(self.interned_names))
        return orig(self, buffer, f, grid, block)
    profiler.ProfilerSpec.dump = dump


def parse(path: str, warpgroups: int):
    """One raw trace -> per (block, warpgroup): start ns, sm, [(name, t0_cycles, t1_cycles)] relative to the
    first event."""
    z = np.load(path)
    names = {v: k for k, v in json.loads(str(z["names"])).items()}
    e = int(z["entries"])
    buf = z["buffer"].astype(np.uint32).reshape(-1, warpgroups, e)
    out = []
    for b in range(buf.shape[0]):
        row = []
        for w in range(warpgroups):
            start, sm, used = int(buf[b, w, 0]), int(buf[b, w, 1]), int(buf[b, w, 2])
            ev = buf[b, w, 3:3 + used].reshape(-1, 2)
            if len(ev) == 0:
                row.append(dict(start=start, sm=sm, regions=[]))
                continue
            t = (ev[:, 1].astype(np.int64) - int(ev[0, 1])) % (1 << 32)
            stack, regions = [], []
            for (tag, _), ti in zip(ev, t):
                tag = int(tag)
                if tag & ENTER_EXIT:
                    if stack:
                        name, t0 = stack.pop()
                        regions.append((name, t0, int(ti)))
                else:
                    stack.append((names[tag], int(ti)))
            row.append(dict(start=start, sm=sm, regions=sorted(regions, key=lambda r: r[1])))
        out.append(row)
    return out


def summarise(trace, cwgs: int, ghz: float):
    """Timeline figures of one kernel call (us)."""
    starts = np.array([row[0]["start"] for row in trace], np.int64)
    t_min = starts.min()
    rel_start = (starts - t_min) / 1e3
    ends, first_w, busy = [], [], collections.defaultdict(list)
    per_step = []
    for row, s0 in zip(trace, rel_start):
        end = s0
        for w in range(cwgs + 1):
            regs = row[w]["regions"]
            if regs:
                end = max(end, (row[w]["start"] - t_min) / 1e3 + max(r[2] for r in regs) / ghz / 1e3)
            if w < cwgs:
                tot = collections.Counter()
                for name, a, b in regs:
                    tot[name] += (b - a) / ghz / 1e3
                for name, v in tot.items():
                    busy[name].append(v)
                waits = [r for r in regs if r[0] == "wait_w"]
                if w == 0 and waits:
                    first_w.append(s0 + waits[0][2] / ghz / 1e3)
                    st = [r[1] for r in waits]
                    per_step.extend(np.diff(st) / ghz / 1e3)
            else:
                tot = collections.Counter()
                for name, a, b in regs:
                    tot["loader_" + name] += (b - a) / ghz / 1e3
                for name, v in tot.items():
                    busy[name].append(v)
        ends.append(end)
    ends = np.array(ends)
    q = lambda a, p: float(np.percentile(a, p)) if len(a) else float("nan")   # noqa: E731
    return dict(
        sms=len(trace), span_us=float(ends.max()),
        start_spread_us=dict(p50=q(rel_start, 50), max=q(rel_start, 100)),
        first_weight_tile_us=dict(min=q(first_w, 0), p50=q(first_w, 50), max=q(first_w, 100)),
        sm_end_us=dict(min=q(ends, 0), p10=q(ends, 10), p50=q(ends, 50), max=q(ends, 100)),
        step_period_us=dict(p10=q(per_step, 10), p50=q(per_step, 50), p90=q(per_step, 90)),
        mean_us_per_warpgroup={k: float(np.mean(v)) for k, v in sorted(busy.items())},
    )


def print_summary(label, s):
    print(f"\n### {label}: {s['sms']} CTAs, span {s['span_us']:.1f} us")
    print(f"- CTA start (globaltimer, from the first): median {s['start_spread_us']['p50']:.2f}, "
          f"max {s['start_spread_us']['max']:.2f} us")
    f = s["first_weight_tile_us"]
    print(f"- first weight tile in SMEM (compute WG 0): min {f['min']:.2f}, median {f['p50']:.2f}, "
          f"max {f['max']:.2f} us")
    e = s["sm_end_us"]
    print(f"- CTA end: min {e['min']:.1f}, p10 {e['p10']:.1f}, median {e['p50']:.1f}, max {e['max']:.1f} us")
    p = s["step_period_us"]
    print(f"- compute WG 0, between K steps: p10 {p['p10']:.3f}, median {p['p50']:.3f}, p90 {p['p90']:.3f} us")
    print("- time in regions, mean per warpgroup (us): " +
          ", ".join(f"{k} {v:.2f}" for k, v in s["mean_us_per_warpgroup"].items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="grouped1,grouped8,fused1")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ghz", type=float, default=1.98, help="SM clock (cycles -> us)")
    args = ap.parse_args()
    out_dir = args.out or tempfile.mkdtemp()
    trace_dir = os.path.join(out_dir, "traces")
    os.makedirs(trace_dir, exist_ok=True)
    os.environ["MEGAMOE_KERNEL_PROFILE"] = trace_dir
    _install_raw_dump()

    import jax
    import jax.numpy as jnp
    from benchmarks import moe_kernels as mk
    from pallas_kernels import fused_moe
    from pallas_kernels import grouped_matmul as gm
    from jax.experimental.mosaic.gpu import profiler as mprof
    assert gm._PROFILE_DIR == trace_dir, "grouped_matmul was imported before MEGAMOE_KERNEL_PROFILE was set"

    d, inter, e, k = mk.HIDDEN, mk.INTER, mk.EXPERTS, mk.TOPK
    need_fused = any(c.startswith("fused") for c in args.cases.split(","))
    w13 = mk.random_nvfp4(jax.random.PRNGKey(0), e, 2 * inter, d)
    if need_fused:
        w1 = mk.random_nvfp4(jax.random.PRNGKey(1), e, inter, d)
        w3 = mk.random_nvfp4(jax.random.PRNGKey(2), e, inter, d)
        w2 = mk.random_nvfp4(jax.random.PRNGKey(3), e, d, inter)
    results = {}
    for case in args.cases.split(","):
        t = int(case.lstrip("groupedfus"))
        idx, tw = mk.routing(t, seed=100 * t)
        x = jax.random.normal(jax.random.PRNGKey(5), (t, d), jnp.bfloat16)
        if case.startswith("grouped"):
            gs = jnp.asarray(mk.group_sizes_of(idx))
            xs = jnp.repeat(x, k, axis=0)

            def make():
                return jax.jit(lambda xs, gs: gm.grouped_linear(xs, w13, gs)), (xs, gs)
        else:
            idx_j, tw_j = jnp.asarray(idx), jnp.asarray(tw)

            def make():
                return jax.jit(lambda x, i, w: fused_moe.moe_experts(x, w1, w3, w2, i, w, 10.0)), (x, idx_j, tw_j)
        print(f"{case}: running", flush=True)
        cfg_note = ""
        try:
            run_case(case, make, trace_dir, args.ghz, results, jax, mprof)
        except Exception:  # noqa: BLE001 - report and go on with the next case
            traceback.print_exc()
    with open(os.path.join(out_dir, "trace_summary.json"), "w") as fh:
        json.dump(dict(device=str(jax.devices()[0]), ghz=args.ghz, results=results), fh, indent=1)


def run_case(case, make, trace_dir, ghz, results, jax, mprof):
    if True:
        cfg_note = ""
        for phase in ("cold", "warm"):
            jax.clear_caches()
            before = set(glob.glob(os.path.join(trace_dir, "*.npz")))
            f, a = make()
            jax.block_until_ready(f(*a))
            jax.effects_barrier()
            new = sorted(set(glob.glob(os.path.join(trace_dir, "*.npz"))) - before)
            print(f"  {phase}: files {sorted(os.listdir(trace_dir))[-4:]}", flush=True)
            for n_kernel, path in enumerate(new):
                z = np.load(path)
                wgs = int(np.prod(z["block"])) // 128
                trace = parse(path, wgs)
                s = summarise(trace, wgs - 1, ghz)
                label = f"{case} kernel {n_kernel} ({phase}, {os.path.basename(path)})"
                results[label] = s
                print_summary(label, s)
            print(f"  {phase}: {len(new)} trace(s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
