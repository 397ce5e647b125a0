"""Activation tiles that the grouped matmul's x-loader warp builds itself (rows mode: decode of one or two tokens).

In rows mode every work item is one activation row. Instead of an XLA launch that prepares the operand before
the kernel (gather, padding to 8 rows, the K permutation of `nvfp4_decode.k_permutation`) and a TMA load of the
prepared rows, the x-loader warp reads the row from global memory itself and writes it, permuted, into the
stage's SMEM tile. Two sources:

- "gather": a bf16 row in natural column order (x[token] for the gate/up kernel; h for a down kernel whose
  gate/up kernel wrote bf16).
- "swiglu": the fp32 split-K partial sums [S, M', 2I] of the two-weight gate/up kernel. The warp adds the S
  partials of gate and up, applies DeepSeek-V4's clamped SwiGLU and rounds to bf16: the XLA launch between the two
  kernels (split-K sum, SwiGLU, permutation, padding) disappears.

Each of the 32 lanes owns 8 consecutive natural columns 32t + 8q .. + 7 of the tile's 256 (lane = 4t + q). In
the permuted order they are the bf16 pairs (j, j + 4) at operand columns 32t + 8j + 2q, j = 0..3: one 32-bit
`prmt` (or `cvt.rn.bf16x2.f32`) per pair and one `st.shared.b32` per pair. Only the item's row of the tile is
written (its row in the 8-row TMA box, item % 8): the other rows hold whatever the slot held before, and their
wgmma columns are garbage that the storer never stores (it stores the item's row only). Writing all 8 rows cost
32 stores and their address arithmetic per lane and step, more instructions than the loads and the SwiGLU; one
row took the routed-expert block at T = 1 from 37.3 to 35.8 us (H200, benchmarks/RESULTS.md, seventeenth session).
`load_pairs` (global loads and arithmetic) runs before the warp waits for the stage slot to be free,
`store_pairs` after. For "swiglu" two warps take alternate slots: one warp's loads took longer than a K step of
the down kernel (H200, benchmarks/RESULTS.md, sixteenth session).

The SMEM tile is [8, 256] bf16, tiled (8, 64) with the 128-byte swizzle that wgmma reads: the 16-byte chunk c of
row r of 64-column tile ct sits at byte ct * 1024 + r * 128 + (c ^ r) * 16.

`reference` is the same tile in jnp (the tests' oracle for the math; the kernel path itself runs on the GPU only).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_kernels import nvfp4_decode

TILE_K = 256
TILE_ROWS = 8
SOURCES = ("gather", "swiglu")
_LOG2E = 1.0 / math.log(2.0)


def smem_byte_offset(row: int, col: int) -> int:
    """Byte offset of bf16 element (row, col) in the [8, 256] tile (tiling (8, 64), 128-byte swizzle)."""
    ct, cc = divmod(col, 64)
    chunk, within = divmod(2 * cc, 16)
    return ct * 1024 + row * 128 + ((chunk ^ row) * 16) + within


def lane_pairs(lane: int) -> list[tuple[int, tuple[int, int]]]:
    """(operand column, (natural columns of its low and high half)) of the four pairs that lane writes."""
    t, q = divmod(lane, 4)
    return [(32 * t + 8 * j + 2 * q, (32 * t + 8 * q + j, 32 * t + 8 * q + 4 + j)) for j in range(4)]


def reference(src: jnp.ndarray, source: str, inter: int = 0, limit: float | None = None) -> jnp.ndarray:
    """The bf16 operand row [256] (permuted K) the warp builds. gather: src bf16 [256]; swiglu: src fp32
    [S, 2 * inter] whose columns [0, 256) are gate and [inter, inter + 256) up of the tile's columns."""
    if source == "gather":
        row = src.astype(jnp.bfloat16)
    elif source == "swiglu":
        g = src[:, :TILE_K].astype(jnp.float32).sum(0)
        u = src[:, inter:inter + TILE_K].astype(jnp.float32).sum(0)
        if limit is not None:
            g = jnp.minimum(g, limit)
            u = jnp.clip(u, -limit, limit)
        row = (g / (1.0 + jnp.exp(-g)) * u).astype(jnp.bfloat16)
    else:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    return nvfp4_decode.permute_k(row)


def load_pairs(src, *, source: str, splits: int = 1, split_stride: int = 0, inter: int = 0,
               limit: float | None = None):
    """Inside the kernel, one warp (all 32 lanes): read this lane's 8 columns of the row from global memory and
    return its four permuted bf16 pairs (int32 scalars, pair j for operand column 32t + 8j + 2q). Nothing here
    touches the stage's SMEM slot, so the x loader issues it before waiting for the slot to be free: the loads'
    latency then overlaps the wait.

    gather: src is a [256] bf16 slice of global memory. swiglu: src is the [S, 256] fp32 slice of the gate
    partials (split stride `split_stride` elements); up sits `inter` elements after gate. limit: SwiGLU's clamp."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    scalar = plgpu.ShapeDtypeStruct((), jnp.int32, layout=plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=(scalar,) * 4)
    def load(ctx, src_ref):
        del ctx
        from jax.experimental.mosaic import gpu as mgpu
        return tuple(mgpu.FragmentedArray.splat(v, (), is_signed=True)      # scalars cross as 0-d splats
                     for v in _emit_pairs(src_ref, source, splits, split_stride, inter, limit))

    return load(src)


def store_pairs(pairs, dst, row):
    """One warp: write the lanes' pairs (`load_pairs`) into row `row` (int32 scalar in [0, 8)) of the SMEM tile dst
    ([8, 256] bf16, (8, 64)-tiled, 128-byte swizzle), fence them for wgmma (async proxy) and sync the warp. The
    caller then arrives on the stage's barrier once."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    splat = plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(arg_types=(splat, splat, splat, splat, splat, plgpu.RefType(transforms=transforms)))
    def store(ctx, p0, p1, p2, p3, r, dst_ref):
        del ctx
        _emit_store(dst_ref, [p.registers.item() for p in (p0, p1, p2, p3)], r.registers.item())
        return None

    store(*pairs, row, dst)


def _emit_pairs(src_ref, source, splits, split_stride, inter, limit):
    from jax.experimental.mosaic.gpu import utils
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm

    i32, i64, f32 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64), ir.F32Type.get()
    c32 = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v))
    c64 = lambda v: arith.constant(i64, ir.IntegerAttr.get(i64, v))
    cf = lambda v: arith.constant(f32, ir.FloatAttr.get(f32, v))
    ptx = utils.inline_ptx

    lane = arith.remui(utils.thread_idx(), c32(32))
    t, q = arith.shrui(lane, c32(2)), arith.andi(lane, c32(3))
    nat = arith.addi(arith.muli(t, c32(32)), arith.muli(q, c32(8)))          # first natural column of the lane
    src_base = llvm.ptrtoint(i64, utils.memref_ptr(src_ref))
    elem = 2 if source == "gather" else 4
    src_addr = arith.addi(src_base, arith.muli(arith.extui(i64, nat), c64(elem)))

    if source == "gather":
        w = ptx("ld.global.nc.v4.u32 {$0, $1, $2, $3}, [$4];", src_addr, result_types=[i32] * 4)
        pairs = [ptx(f"prmt.b32 $0, $1, $2, {sel};", w[lo], w[lo + 2], result_types=i32)
                 for lo, sel in ((0, "0x5410"), (0, "0x7632"), (1, "0x5410"), (1, "0x7632"))]
    else:
        def load8(byte_off):
            a = arith.addi(src_addr, c64(byte_off))
            v = ptx("ld.global.nc.v4.f32 {$0, $1, $2, $3}, [$4];", a, result_types=[f32] * 4)
            v2 = ptx("ld.global.nc.v4.f32 {$0, $1, $2, $3}, [$4];", arith.addi(a, c64(16)), result_types=[f32] * 4)
            return list(v) + list(v2)
        loads = [(load8(4 * s * split_stride), load8(4 * (s * split_stride + inter))) for s in range(splits)]
        g, u = loads[0]
        for gs, us in loads[1:]:        # split order as XLA's sum of the partials: 0, 1, 2, ...
            g = [arith.addf(a, b) for a, b in zip(g, gs)]
            u = [arith.addf(a, b) for a, b in zip(u, us)]
        h = []
        for gi, ui in zip(g, u):
            if limit is not None:
                gi = arith.minimumf(gi, cf(limit))
                ui = arith.maximumf(arith.minimumf(ui, cf(limit)), cf(-limit))
            e = ptx("ex2.approx.ftz.f32 $0, $1;", arith.mulf(gi, cf(-_LOG2E)), result_types=f32)
            h.append(arith.mulf(arith.divf(gi, arith.addf(cf(1.0), e)), ui))
        pairs = [ptx("cvt.rn.bf16x2.f32 $0, $1, $2;", h[4 + j], h[j], result_types=i32) for j in range(4)]
    return pairs


def _emit_store(dst_ref, pairs, row):
    from jax.experimental.mosaic.gpu import utils
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm

    i32 = ir.IntegerType.get_signless(32)
    c32 = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v))
    ptx = utils.inline_ptx
    lane = arith.remui(utils.thread_idx(), c32(32))
    t, q = arith.shrui(lane, c32(2)), arith.andi(lane, c32(3))
    # pair j -> operand column 32t + 8j + 2q: 64-column tile t // 2, chunk 4 (t % 2) + j, byte 4q of the chunk
    dst_base = llvm.ptrtoint(i32, utils.memref_ptr(dst_ref))
    tile_off = arith.muli(arith.shrui(t, c32(1)), c32(1024))
    chunk0 = arith.muli(arith.andi(t, c32(1)), c32(4))
    row = arith.andi(row, c32(TILE_ROWS - 1))
    lane_off = arith.addi(arith.addi(arith.addi(dst_base, tile_off), arith.muli(q, c32(4))),
                          arith.muli(row, c32(128)))
    for j, pair in enumerate(pairs):
        chunk = arith.xori(arith.addi(chunk0, c32(j)), row)
        addr = arith.addi(lane_off, arith.muli(chunk, c32(16)))
        ptx("st.shared.b32 [$0], $1;", addr, pair)
    ptx("fence.proxy.async.shared::cta;")
    ptx("bar.warp.sync 0xffffffff;", convergent=True)
