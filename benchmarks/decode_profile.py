"""Where one decode step of the V4-Flash-shaped slice spends its GPU time: a per-kernel CUPTI breakdown.

The same model and state as `model_decode.py` (full V4-Flash widths, `--layers` layers, NVFP4 experts, context
`--context`); one step = the model on one new token per sequence plus the head (the body of the production decode
loop without sampling). Kernels are grouped by XLA's name for them (fusion kind, cuBLAS gemv/gemm, the Mosaic GPU
kernel), summed over the step, and set against the floor: the bytes the step must read over the copy bandwidth.

    PYTHONPATH=. python benchmarks/decode_profile.py [--batch 1] [--top 40] [--json decode_profile.json]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import re

import jax
import jax.numpy as jnp

from benchmarks.model_decode import (build_model, copy_bandwidth, non_expert_bytes, random_state, slice_config,
                                     weight_bytes)
from megamoe_jax.generate import Generator


def _category(name: str) -> str:
    n = name.lower()
    if "mosaic" in n:
        return "mosaic kernel (NVFP4 experts)"
    if "gemv" in n:
        return "cuBLAS gemv"
    if "gemm_fusion" in n:
        return "XLA gemm fusion (the dots; Triton)"
    if "gemm" in n or "cutlass" in n or "xmma" in n or "sm90" in n or "nvjet" in n:
        return "cuBLAS/cutlass gemm"
    if "triton" in n:
        return "XLA Triton fusion (softmax)"
    if "sort" in n or "topk" in n or "top_k" in n:
        return "sort / top-k"
    if "memcpy" in n or "memset" in n:
        return "memcpy / memset"
    if "reduce" in n:
        return "XLA reduction fusion"
    if "scatter" in n or "gather" in n or "dynamic_update" in n:
        return "XLA gather/scatter"
    return "XLA other fusion"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--json", default="decode_profile.json")
    ap.add_argument("--hlo", default=None, help="also write the step's optimized HLO here (kernel names -> source)")
    args = ap.parse_args()
    from jax.experimental.mosaic.gpu import profiler

    cfg = slice_config(args.layers)
    # The floor uses the copy rate in GPU time (CUPTI, as the step is measured), not wall-clock time.
    big = jnp.ones((1 << 30,), jnp.bfloat16)
    double = jax.jit(lambda a: a * 2)
    jax.block_until_ready(double(big))
    bw = 2 * big.nbytes / (min(profiler.measure(double)(big)[1] for _ in range(5)) * 1e-3)
    del big
    bw_wall = copy_bandwidth()
    model = build_model(cfg, nvfp4=True)
    gen = Generator(model)
    fwd = gen.forward_fn()
    b = args.batch
    state = random_state(model, b, args.context, args.context + 64)
    ids = jnp.ones((b, 1), jnp.int32)
    lengths = jnp.ones((b,), jnp.int32)

    def step(params, st):
        logits, st = fwd(params, ids, st, lengths)
        return jnp.argmax(logits[:, -1], axis=-1), st

    # Not donated (the profiler calls the function twice on the same arguments): the new state is a copy, a few
    # MB per step, which the production loop updates in place.
    step = jax.jit(step)
    jax.block_until_ready(step(gen.params, state))           # compile
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(step.lower(gen.params, state).compile().as_text())
    runs = []
    for _ in range(3):
        _, kernels = profiler.measure(step, aggregate=False)(gen.params, state)
        runs.append(kernels)
    kernels = min(runs, key=lambda ks: sum(t for _, t in ks))
    total = sum(t for _, t in kernels)
    floor = (non_expert_bytes(model, cfg) + weight_bytes(cfg, b, True)) / bw * 1e3
    by_name = collections.defaultdict(lambda: [0, 0.0])
    by_cat = collections.defaultdict(lambda: [0, 0.0])
    for name, t in kernels:
        short = re.sub(r"[_.]\d+$", "", name)[:90]
        by_name[short][0] += 1
        by_name[short][1] += t
        by_cat[_category(name)][0] += 1
        by_cat[_category(name)][1] += t

    dev = jax.devices()[0].device_kind
    print(f"\n{dev}, {datetime.date.today()}: one decode step, batch {b}, {cfg.num_hidden_layers} layers, "
          f"context {args.context}; copy {bw / 1e12:.2f} TB/s in GPU time ({bw_wall / 1e12:.2f} wall-clock)")
    print(f"kernels: {len(kernels)}; GPU time {total:.3f} ms; floor {floor:.3f} ms ({100 * floor / total:.0f}%)")
    print("\n| category | kernels | ms | share |\n|---|---|---|---|")
    for cat, (n, t) in sorted(by_cat.items(), key=lambda kv: -kv[1][1]):
        print(f"| {cat} | {n} | {t:.3f} | {100 * t / total:.0f}% |")
    print("\n| kernel (XLA name) | count | ms |\n|---|---|---|")
    for name, (n, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"| {name} | {n} | {t:.4f} |")
    with open(args.json, "w") as f:
        json.dump(dict(device=dev, date=str(datetime.date.today()), batch=b, layers=cfg.num_hidden_layers,
                       context=args.context, copy_tb_s=bw / 1e12, copy_tb_s_wall=bw_wall / 1e12,
                       total_ms=total, floor_ms=floor, kernels=kernels), f, indent=1)


if __name__ == "__main__":
    main()
