"""The routed-expert path of one V4-Flash MoE layer at decode sizes, for Nsight Compute (ncu) on the GPU machine.

Runs `fused_moe.moe_experts` (NVFP4 W4A16, 256 experts, hidden 4096, intermediate 2048, top-6) on T tokens a few
times so that ncu can read the Mosaic GPU kernels' hardware counters:

    ncu --clock-control none -k regex:mosaic --launch-skip 2 --launch-count 2 --section SpeedOfLight ... \\
        python benchmarks/ncu_experts.py --tokens 1

(the first call compiles and warms up; `--launch-skip 2` skips its two kernels, the next two are gate/up and down).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.model_decode import random_nvfp4
from pallas_kernels import fused_moe


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    e, d, i, k = 256, 4096, 2048, 6
    keys = jax.random.split(jax.random.key(0), 4)
    w1, w3, w2 = (random_nvfp4(keys[0], (e, i, d)), random_nvfp4(keys[1], (e, i, d)),
                  random_nvfp4(keys[2], (e, d, i)))
    rng = np.random.default_rng(0)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(args.tokens)]), jnp.int32)
    wts = jnp.full((args.tokens, k), 1.0 / k, jnp.float32)
    x = (0.5 * jax.random.normal(keys[3], (args.tokens, d), jnp.float32)).astype(jnp.bfloat16)
    f = jax.jit(lambda x, a, b, c, idx, w: fused_moe.moe_experts(x, a, b, c, idx, w, 10.0))
    for _ in range(args.calls):
        out = f(x, w1, w3, w2, idx, wts)
    print("out", out.shape, float(jnp.abs(out.astype(jnp.float32)).mean()))


if __name__ == "__main__":
    main()
