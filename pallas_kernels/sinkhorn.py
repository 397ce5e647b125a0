"""mHC Sinkhorn normalisation as one small Mosaic GPU kernel (sm90), with its pure-jnp reference.

    comb = Sinkhorn(softmax_rows(logits) + eps)      logits [..., n, n] fp32 -> comb [..., n, n] fp32
    (one column normalisation after the softmax, then iters - 1 (row, column) normalisations; [R] order)

Why a kernel: unrolled in XLA, the 2 * iters chained reductions over tiny [n, n] matrices cost XLA's GPU
priority-fusion pass seconds per call site (49.8 s to compile the 2-layer tiny model, 7.9 s with 2 iterations;
benchmarks/RESULTS.md), and a rolled loop costs ~2 launches per iteration at decode. Here the loop runs inside
one kernel: one launch, ~1 s to compile. Layout: the n * n entries of each matrix are rows of a [n*n, R] array
(R = matrices, padded to the 128-lane tile), so every step is elementwise over a [128] vector per entry.

Status: matches `reference` in Mosaic GPU interpret mode (CPU) and on an H200 (tests/gpu/test_sinkhorn_gpu.py,
11 passed, 2026-12-02). dispatch.sinkhorn uses it on Hopper for prefill-shaped calls; decode steps keep the XLA
form, which was measured slightly faster there (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_TILE = 128   # matrices per CTA: one fp32 per thread of a warpgroup per entry


def reference(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """The XLA formulation (what the model used before the kernel): logits [..., n, n] -> comb [..., n, n]."""
    comb = jax.nn.softmax(logits, axis=-1) + eps                        # rows: comb[i, :] over j
    comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)         # columns
    # A Python loop, not lax.fori_loop: the iterations are a few tiny [.., n, n] ops that XLA can fuse when
    # unrolled; in a while loop the GPU runs every iteration as kernels of its own.
    for _ in range(iters - 1):
        comb = comb / (jnp.sum(comb, axis=-1, keepdims=True) + eps)
        comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)
    return comb


def _entries_math(c, n: int, iters: int, eps: float):
    """The same steps on c[i][j] = one [_TILE] vector per matrix entry (sums left to right over n entries)."""
    def total(xs):
        out = xs[0]
        for v in xs[1:]:
            out = out + v
        return out

    def rows(c):
        rs = [total(row) + eps for row in c]
        return [[v / rs[i] for v in row] for i, row in enumerate(c)]

    def cols(c):
        cs = [total([c[i][j] for i in range(n)]) + eps for j in range(n)]
        return [[c[i][j] / cs[j] for j in range(n)] for i in range(n)]

    mx = [functools.reduce(jnp.maximum, row) for row in c]
    c = [[jnp.exp(v - mx[i]) for v in row] for i, row in enumerate(c)]
    den = [total(row) for row in c]
    c = cols([[v / den[i] + eps for v in row] for i, row in enumerate(c)])

    def step(_, flat):
        c = cols(rows([list(flat[i * n:(i + 1) * n]) for i in range(n)]))
        return tuple(v for row in c for v in row)
    flat = jax.lax.fori_loop(0, iters - 1, step, tuple(v for row in c for v in row))
    return [list(flat[i * n:(i + 1) * n]) for i in range(n)]


def sinkhorn(logits: jax.Array, iters: int, eps: float, *, interpret: bool = False) -> jax.Array:
    """The kernel: logits [..., n, n] (any float; computed in fp32) -> comb [..., n, n] fp32."""
    *lead, n, n2 = logits.shape
    if n != n2 or n < 1:
        raise ValueError(f"sinkhorn: logits must be [..., n, n], got {list(logits.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn: iters must be >= 1, got {iters}")
    r = math.prod(lead)
    if r == 0:
        return jnp.zeros(logits.shape, jnp.float32)
    rp = -(-r // _TILE) * _TILE
    xt = logits.astype(jnp.float32).reshape(r, n * n).T                  # [n*n, R]
    xt = jnp.pad(xt, ((0, 0), (0, rp - r)))                             # zero logits: finite, discarded

    def body(x_gmem, o_gmem, x_smem, o_smem, bar):
        cols = pl.ds(jax.lax.axis_index("blk") * _TILE, _TILE)
        plgpu.copy_gmem_to_smem(x_gmem.at[:, cols], x_smem, bar)
        plgpu.barrier_wait(bar)
        c = _entries_math([[x_smem[i * n + j] for j in range(n)] for i in range(n)], n, iters, eps)
        for i in range(n):
            for j in range(n):
                o_smem[i * n + j] = c[i][j]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[:, cols])
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((n * n, rp), jnp.float32),
        scratch_types=[plgpu.SMEM((n * n, _TILE), jnp.float32), plgpu.SMEM((n * n, _TILE), jnp.float32),
                       plgpu.Barrier()],
        grid=(rp // _TILE,), grid_names=("blk",),
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    out = kernel(xt)[:, :r]                                             # [n*n, R]
    return out.T.reshape(*lead, n, n)
