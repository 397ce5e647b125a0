"""Each sorted row's group, built inside the grouped-matmul kernel from `group_sizes` (one-row items, decode sizes).

One-row items need the group of every row r < M (rows sorted by group, as `lax.ragged_dot`): the last group whose
segment starts at or before r, and -1 for rows past sum(group_sizes) (the zero tail). XLA needs two launches for
that table (a prefix sum over the groups, then a count per row: a reduction cannot feed another inside one
fusion), and a search in every thread over a one-launch table of segment starts cost the kernel 2.5 us at T = 1
(H200, benchmarks/RESULTS.md, eighteenth session). Here each warp of the memory warpgroup builds the whole table
in shared memory from `group_sizes` itself, once per CTA (the four write the same words), and every unit then
reads its row's group with one shared-memory load:

1. lane L reads groups [L * P, L * P + P) (P = ceil(E / 32); one round of independent global loads) and clamps
   each size to [0, M], as `row_start_table` does;
2. the lanes' totals are scanned across the warp (five `shfl.sync.up`), which gives every group its rows
   [start, end), and the total (`shfl.sync.idx` from lane 31);
3. each lane writes its groups' indices into their rows (a loop over at most M rows in all) and -1 into the rows
   r in [total, M) that are its own (r % 32 == L); rows are disjoint, so no two lanes write one entry.

`simulate_warp` is the three steps in numpy, lane by lane (the CPU tests check it against the XLA form of the
same table, `grouped_matmul.row_groups_of_sizes`); `build` emits them for the GPU, `load` reads an entry from a
warp or a warpgroup (Mosaic GPU has no warp-level lowering of scalar shared-memory loads).
"""
from __future__ import annotations

import numpy as np

import jax.numpy as jnp

LANES = 32
# Groups per lane are unrolled in the emitted code: up to 1024 groups (32 per lane).
MAX_GROUPS = 1024


def groups_per_lane(num_groups: int) -> int:
    return -(-num_groups // LANES)


def supported(m: int, num_groups: int) -> str | None:
    """None if `build` handles m rows over num_groups groups, else why not."""
    if not 0 < num_groups <= MAX_GROUPS:
        return f"{num_groups} groups (the in-kernel table takes 1 to {MAX_GROUPS})"
    if not 0 < m <= 1024:
        return f"{m} rows (the in-kernel table takes 1 to 1024)"
    return None


def simulate_warp(group_sizes, m: int) -> np.ndarray:
    """The warp's algorithm in numpy, one lane at a time, in the order `build` emits it (for the CPU tests)."""
    sizes_in = np.asarray(group_sizes, np.int64)
    e = sizes_in.shape[0]
    per = groups_per_lane(e)
    table = np.full(m, -7, np.int64)        # never a valid output: an entry nobody wrote shows up
    # 1. loads and the lane's inclusive prefix
    incl = np.zeros((LANES, per), np.int64)
    for lane in range(LANES):
        run = 0
        for j in range(per):
            g = lane * per + j
            v = sizes_in[min(g, e - 1)] if g < e else 0
            run += min(max(v, 0), m)
            incl[lane, j] = run
    lane_total = incl[:, -1].copy()
    # 2. warp scan (shfl.sync.up by 1, 2, 4, 8, 16; lanes below the distance add nothing)
    x = lane_total.copy()
    for d in (1, 2, 4, 8, 16):
        y = np.concatenate([x[:d], x[:-d]])            # shfl.up: lane L reads lane L - d (lanes < d: their own)
        x = x + np.where(np.arange(LANES) >= d, y, 0)
    excl = x - lane_total
    total = x[LANES - 1]
    # 3. writes
    seen = np.zeros(m, np.int64)
    for lane in range(LANES):
        for i in range(-(-m // LANES)):
            r = lane + LANES * i
            if r < m and r >= total:
                table[r] = -1
                seen[r] += 1
        for j in range(per):
            start = excl[lane] + (incl[lane, j - 1] if j else 0)
            end = excl[lane] + incl[lane, j]
            for r in range(min(start, m), min(end, m)):
                table[r] = lane * per + j
                seen[r] += 1
    if (seen != 1).any():
        raise AssertionError(f"rows written {seen.tolist()} times (each must be written once)")
    return table.astype(np.int32)


def build(sizes_gmem, table_smem, m: int):
    """Inside the kernel, every warp that runs it (all 32 lanes; each warp independently): table_smem[r] = row r's
    group for r < m, from group_sizes (int32 [E] in global memory). Ends with the warp synchronised, so the warp
    may read any entry at once, and its writes are ordered before a later arrival on a barrier (release) that
    other warps wait on (acquire)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    (e,) = sizes_gmem.shape
    if (why := supported(m, e)) is not None:
        raise ValueError(f"row_table.build: unsupported: {why}")

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
    def emit(ctx, sizes_ref, table_ref):
        del ctx
        _emit_build(sizes_ref, table_ref, m, e)
        return None

    emit(sizes_gmem, table_smem)


def load(table_smem, i):
    """table_smem[i] (int32 scalar i) with one `ld.shared`, as an int32 scalar (in a warp or a warpgroup)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    splat = plgpu.Layout.WGMMA
    scalar = plgpu.ShapeDtypeStruct((), jnp.int32, layout=splat)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), splat), return_type=scalar)
    def emit(ctx, table_ref, idx):
        del ctx
        from jax.experimental.mosaic import gpu as mgpu
        from jax.experimental.mosaic.gpu import utils
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, llvm

        i32 = ir.IntegerType.get_signless(32)
        base = llvm.ptrtoint(i32, utils.memref_ptr(table_ref))
        addr = arith.addi(base, arith.muli(idx.registers.item(), arith.constant(i32, ir.IntegerAttr.get(i32, 4))))
        v = utils.inline_ptx("ld.shared.b32 $0, [$1];", addr, result_types=i32, has_side_effects=True)
        return mgpu.FragmentedArray.splat(v, (), is_signed=True)

    return emit(table_smem, jnp.asarray(i, jnp.int32))


def _emit_build(sizes_ref, table_ref, m: int, e: int):
    from jax.experimental.mosaic.gpu import utils
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, scf

    i32, i64, index = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64), ir.IndexType.get()
    c32 = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v))
    c64 = lambda v: arith.constant(i64, ir.IntegerAttr.get(i64, v))
    ptx = utils.inline_ptx
    lt, ge = arith.CmpIPredicate.slt, arith.CmpIPredicate.sge
    per = groups_per_lane(e)

    lane = arith.remui(utils.thread_idx(), c32(LANES))
    first = arith.muli(lane, c32(per))
    src = llvm.ptrtoint(i64, utils.memref_ptr(sizes_ref))
    tab = llvm.ptrtoint(i32, utils.memref_ptr(table_ref))

    # 1. one round of independent loads (clamped addresses; groups past E count 0), sizes clipped to [0, m]
    incl, run = [], c32(0)
    for j in range(per):
        g = arith.addi(first, c32(j))
        ok = arith.cmpi(lt, g, c32(e))
        addr = arith.addi(src, arith.muli(arith.extui(i64, arith.minui(g, c32(e - 1))), c64(4)))
        v = ptx("ld.global.b32 $0, [$1];", addr, result_types=i32)
        v = arith.select(ok, arith.minsi(arith.maxsi(v, c32(0)), c32(m)), c32(0))
        run = arith.addi(run, v)
        incl.append(run)
    lane_total = run

    # 2. inclusive scan of the lane totals over the warp; every lane learns the grand total from lane 31
    x = lane_total
    for d in (1, 2, 4, 8, 16):
        y = ptx(f"shfl.sync.up.b32 $0, $1, {d}, 0, 0xffffffff;", x, result_types=i32, convergent=True)
        x = arith.addi(x, arith.select(arith.cmpi(ge, lane, c32(d)), y, c32(0)))
    excl = arith.subi(x, lane_total)
    total = ptx("shfl.sync.idx.b32 $0, $1, 31, 31, 0xffffffff;", x, result_types=i32, convergent=True)

    def store(row, value, predicate=None):
        ptx("st.shared.b32 [$0], $1;", arith.addi(tab, arith.muli(row, c32(4))), value, predicate=predicate,
            has_side_effects=True)

    # 3. -1 for the tail rows this lane owns, then each of its groups' rows (disjoint over all lanes)
    for i in range(-(-m // LANES)):
        r = arith.addi(lane, c32(LANES * i))
        store(r, c32(-1), arith.andi(arith.cmpi(lt, r, c32(m)), arith.cmpi(ge, r, total)))
    start = excl
    for j in range(per):
        end = arith.addi(excl, incl[j])
        lo, hi = arith.minsi(start, c32(m)), arith.minsi(end, c32(m))
        loop = scf.ForOp(arith.index_cast(index, lo), arith.index_cast(index, hi), arith.constant(index, 1))
        with ir.InsertionPoint(loop.body):
            store(arith.index_cast(i32, loop.induction_variable), arith.addi(first, c32(j)))
            scf.yield_([])
        start = end
    ptx("bar.warp.sync 0xffffffff;", has_side_effects=True, convergent=True)
