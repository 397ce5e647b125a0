"""Block-scaled grouped (ragged) matmul with NVFP4 weights for Hopper (Mosaic GPU, sm90).

    out[r, n] = sum_k x[r, k] * W[g(r)][n, k]        rows r sorted by group g(r), as `lax.ragged_dot`

W is NVFP4 [E, N, K] as stored in checkpoints: packed e2m1 codes uint8 [E, N, K/2] (K contiguous), E4M3 block
scales [E, N, K/16] and an fp32 global scale. The kernel streams the 4.5-bit weights of the groups that have
rows, decodes them in registers (`nvfp4_decode`), and feeds them to bf16 wgmma; products are exact, sums fp32, the
global scale (and, in W4A4 mode, the activation's global scale) is applied to the fp32 accumulator. No
dequantized weight is ever written to HBM.

Structure (per CTA, persistent over the SMs; tokamax's sm90 quantized kernel has the same shape):
- two compute warpgroups, each owning 64 weight rows of the CTA's 128-row N tile: decode W into the wgmma
  register operand A ("swap AB": the weight is the M side, tokens are the N side, so a group with 3 rows costs
  an M=64 x N=tile_m wgmma, not a 64-row tile), accumulate [64, tile_m] in fp32. At decode sizes
  (`Config.compute_wgs` = 4) two warpgroups share each 64 rows, one per 128-column K half of every step, and
  add their accumulators through SMEM before the epilogue: twice the decoding warps per SM. The decode either skips the
  register relayout and works on K permuted inside 32-column groups (the activation is permuted to match in
  XLA: cheap while x is small, i.e. decode) or relayouts the packed codes first and keeps K in order (prefill);
  `Config.natural_k`, chosen by `default_config`;
- one memory warpgroup: warp 0 streams W and its scales, warp 1 the activation rows of the group (a power-of-two
  number of rows, so small groups read little; in rows mode it may build the tile itself from global memory,
  `_Dims.x_source`, with warp 3 sharing the work), warp 2 stores the transposed result rows with TMA. Each warp
  loops over the SM's work units on its own, so the loaders run ahead into the next unit while the compute
  warpgroups finish the current one. With programmatic dependent launch (`_Dims.pdl_wait`, rows mode) the weight
  loader starts streaming while the previous kernel still runs; every other warp first waits for it to complete.
- work units: (item, 128-row N tile, K part); `Config.split_k` > 1 splits K over several units (decode sizes,
  to balance the SMs) and the kernel then writes fp32 partial sums that XLA adds.
- Work items (group, rows): one XLA launch turns `group_sizes` into a table of prefix sums (`item_table`); every
  thread finds its unit's item by a search over it (`item_fields`). Only item indices that can have rows are
  visited; rows past sum(group_sizes) get explicit zero items. At decode sizes (<= 16 rows over at least as many
  groups, `use_one_row_items`) every row is its own item instead, and the x-loader warp reads the row itself, so
  x needs no preparation launch. Where each row's group comes from is `ONE_ROW_TABLE`: built in shared memory by
  the memory warpgroup from `group_sizes` ("smem", `row_table.py`: no launch before the kernel), computed by XLA
  ("xla", two launches), or searched by every thread in the rows' segment starts ("search", `row_start_table`,
  `row_segment`: one launch). `fused_moe` passes each row's group directly (`row_group`, unsorted rows).

Two epilogues share the body: "linear" (out = acc * row_scale) and "swiglu" (two weights, W1 and W3, in the
same CTA: out = silu(min(g, L)) * clip(u, -L, L)); the latter is used by `fused_moe`.

Error bound (tests/gpu/test_kernels_grouped.py, both modes): |out - ref| <= 2^-8 |ref| + 1e-5 (|x| @ |W|^T).
Limits: N % 128 == 0 and K % 256 == 0 (`supported`; the dispatcher falls back to the reference otherwise);
W4A16 activations below ~2^-100 lose precision (the decoded weight carries a 2^-8 factor, products of
magnitude < 2^-126 are fp32 subnormals); block-scale bytes must be finite and positive (every
quantizer writes such scales and checkpoint validation rejects negative ones; a zero-scale block with non-zero
codes would not decode to zero, a negative one not to its value).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import activation_tile
from pallas_kernels import nvfp4_decode
from pallas_kernels import row_table

_ROW_SLOTS = 2                      # 64-row weight slices per CTA tile (each owned by 1 or 2 compute warpgroups)
_WG_ROWS = 64                       # weight rows per compute warpgroup (wgmma M)
_CTA_ROWS = _ROW_SLOTS * _WG_ROWS
_TILE_K = 256                       # 128 B of packed codes and 16 B of scales per row per step (TMA minimum)
_TABLE_COLS = 32                    # the item table is [rows, 32] int32: 128-byte rows, TMA boxes of <= 256 rows
_WGMMA = plgpu.Layout.WGMMA
# Item search (`item_fields`) of the memory warps (global memory: few dependent rounds) and of the compute
# warpgroups (the SMEM copy: few instructions). H200, 2026-12-03, gate/up kernel alone: the binary search in the
# warpgroups took 31.2 / 147.6 / 418.1 us at T = 1 / 8 / 64 where the 17-way one took 32.2 / 150.5 / 430.6.
_WARP_SEARCH = "rway"
_WG_SEARCH = "binary"
# One-row items from group sizes search `row_start_table` in global memory: the memory warps and every thread's
# first unit with "rway" (two rounds of L2 latency), the compute warpgroups' later units with "binary" (nine
# dependent rounds that hit L1 once the table's 1 KB is there, ~70 instructions against rway's ~350 in each of the
# 16 compute warps). Both forms took the same time at T = 1 and 2 (H200, RESULTS.md eighteenth session); splitting
# the memory warps' search so that they never stall on it (the row-independent first round once per warp, the
# second a unit ahead) made the kernel 1.3 us slower, and was removed.
# Where one-row items from group sizes find their rows' groups. "search": in the kernel, over `row_start_table`
# (one XLA launch before the kernel); "xla": XLA computes them (`row_groups_of_sizes`, two launches) and each thread
# loads its row's with one load, as the row_group of `fused_moe` (the kernel then ran 20.8 us at T = 1 against the
# search's 23.3, H200, RESULTS.md eighteenth session); "smem": no XLA launch, the memory warpgroup builds the table
# in shared memory from group_sizes (`row_table.py`) and every unit reads its row's group there (the call at T = 1
# 23.5 us against 24.5 for "xla" and 26.0 for "search", H200, RESULTS.md nineteenth session; interpret mode, and
# more than row_table.MAX_GROUPS groups, take "xla").
ONE_ROW_TABLE = "smem"
_ONE_ROW_TABLES = ("search", "xla", "smem")
_WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)
# Diagnostics only (the results are WRONG while set): parts of the kernel's work to skip, to time what remains
# (benchmarks/ncu_experts.py --variants ablate_*). "decode": the wgmma operand is the raw code words (the SMEM
# loads stay, the integer decode and the scale multiply go); "store": the storer skips the output's TMA stores.
# Read when a kernel is built (trace time): set it before jitting.
ABLATE: frozenset = frozenset()
_ABLATIONS = frozenset({"decode", "store"})


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen tuning of the kernel (chosen by `default_config` from the problem size; see RESULTS.md).

    tile_m: activation rows per work item (wgmma N, multiple of 8, power of two).
    num_stages: depth of the TMA pipeline over K (each stage: 128 x 256 weights and tile_m x 256 activations).
    natural_k: relayout the codes in registers so K keeps its order (prefill: no pass over x); False decodes
      without the relayout and permutes x instead (decode: x is small, the kernel is cheaper). nvfp4_decode.
    overlap_mma: software-pipeline the K loop: decode each weight tile while the previous tile's wgmma runs
      (wait for all but the last wgmma group before decoding), instead of waiting for every step's wgmmas before
      the next decode. Two-weight (SwiGLU) kernel with num_stages >= 3 only (the activation slot of a step is
      released about one step later; for one weight ptxas serialises the wgmmas anyway); ignored otherwise.
      Slower on an H200 (benchmarks/RESULTS.md, 2026-12-02, session 6: gate/up +29% at T = 2, +25% at T = 64,
      -3% at T = 1): off by default, kept for the record.
    k_unroll: K steps per iteration of the one-weight kernel's K loop (1 or 2): with 2, the tiles of two steps
      are decoded before their two wgmmas and one wait, i.e. the ILP and register use of the two-weight kernel.
      Needs k_iters % k_unroll == 0 and num_stages >= k_unroll (else 1 is used).
    split_k: work units per (item, N tile), each summing K / split_k (split_k must divide K / 256). More, smaller
      units balance the SMs when there are few rows (decode of one token: 96 gate/up units for 132 SMs); the
      kernel then writes fp32 partial sums [split_k, M, N] (both weights side by side for SwiGLU) and XLA adds
      them (and applies SwiGLU) in one small fusion.
    compute_wgs: 2 (each compute warpgroup owns 64 weight rows of the 128-row tile and all of K) or 4 (two per
      64 rows, each decoding one 128-column half of every K step into its own accumulator; the pair adds them
      through SMEM before the epilogue). Four give each SM sub-partition two decoding warps instead of one pair
      to hide the decode's latency, at about half the registers per thread (decode sizes: small accumulators).
    paired_n: one weight (the "linear" epilogue) streamed as two: each work unit covers the 128-row N tiles ni and
      N/2 + ni of its group, two weight tiles per stage, as the SwiGLU kernel does with W1 and W3. Half the units,
      twice the bytes per stage and per barrier round trip. Needs N % 256 == 0 and split_k > 1 (the unit's two
      tiles go out as fp32 partials in natural column order). Not chosen by `default_config`: untimed (RESULTS.md,
      seventeenth session).
    """
    tile_m: int = 64
    num_stages: int = 4
    natural_k: bool = False
    overlap_mma: bool = False
    k_unroll: int = 1
    split_k: int = 1
    compute_wgs: int = 2
    paired_n: bool = False

    def __post_init__(self):
        if self.tile_m < 8 or self.tile_m > 256 or self.tile_m & (self.tile_m - 1):
            raise ValueError(f"tile_m must be a power of two in [8, 256], got {self.tile_m}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.k_unroll not in (1, 2):
            raise ValueError(f"k_unroll must be 1 or 2, got {self.k_unroll}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")
        if self.compute_wgs not in (2, 4):
            raise ValueError(f"compute_wgs must be 2 or 4, got {self.compute_wgs}")
        if self.compute_wgs == 4 and (self.natural_k or self.overlap_mma):
            raise ValueError("compute_wgs=4 decodes K halves of the permuted-K operand: natural_k and overlap_mma "
                             "must be off")
        if self.paired_n and self.split_k < 2:
            raise ValueError("paired_n writes its two N tiles as fp32 split-K partials: split_k must be >= 2")


def default_config(m: int, num_groups: int, num_weights: int = 1, n: int | None = None,
                   k: int | None = None) -> Config:
    """Decode-sized problems (few rows per group) get small row tiles and deep pipelines; prefill (from 4096 rows)
    gets 64- or 128-row tiles and K in natural order. Given the weight shape (n, k), decode-sized problems also get
    the K split that balances the SMs."""
    rows_per_group = m / max(1, min(num_groups, m))
    # Permuting x in XLA costs a pass over it, the relayout ~12% kernel time at decode sizes (RESULTS.md sweep: T=64
    # 0.52 vs 0.58 ms, T=256 1.00 vs 1.06). The threshold dates from the bf16 transpose (3.8 ms at 49152 x 4096);
    # `permute_activation` runs at ~4 TB/s (16.6 us at 4032 x 4096), so prefill may now prefer the permuted K too:
    # not yet timed.
    if m >= 4096:
        # Prefill: every work item streams its group's weights, so the row tile sets the weight traffic (T = 2048 of
        # V4-Flash, 48 rows per group: gate/up 1.666 ms with 128-row tiles, 1.690 with 64, 2.157 with the 32 that the
        # decode rules below would pick; T = 1024, 24 rows per group: 64 rows best, 1.245 against 1.364 with 128).
        # Two weights keep 64 rows x 2 stages (3 stages: +1% at T = 2048, +2% at T = 8192; RESULTS.md, 2026-12-02,
        # session 8).
        if num_weights == 2:
            cfg = Config(tile_m=64, num_stages=2)
        else:
            cfg = Config(tile_m=128, num_stages=2) if rows_per_group > 32 else Config(tile_m=64, num_stages=3)
        return dataclasses.replace(cfg, natural_k=True)
    # One weight over many groups: 32-row tiles from 4 rows per group on (T = 256 of V4-Flash: -6%, the skewed
    # load's big groups take fewer items, each of which streams the group's weights; T = 64 keeps 16: RESULTS.md,
    # session 7 sweep). The two-weight kernel keeps 16-row tiles there (32 not measured), and so does a dense
    # linear (one group: nothing is streamed twice).
    small_rows = 4 if (num_weights == 1 and num_groups > 1) else 16
    if m <= 16 * num_groups and rows_per_group <= small_rows:
        # At most 8 rows in all (one decode token's k experts): every group fits wgmma's narrowest N, and the
        # 8-row tile is 5% faster than 16 (T = 1 of V4-Flash, [6, 4096] x [4096, 4096]: kernel 26.9 us against
        # 28.9, H200, RESULTS.md fifteenth session).
        cfg = Config(tile_m=8 if (m <= 8 and num_weights == 1 and num_groups > 1) else 16, num_stages=6)
    elif rows_per_group <= 48:
        cfg = Config(tile_m=32, num_stages=5)
    elif rows_per_group <= 96:
        cfg = Config(tile_m=64, num_stages=3)
    else:
        cfg = Config(tile_m=128, num_stages=2)
    if num_weights == 2:   # two weight tiles per stage: halve the depth, keep SMEM under 227 KB
        cfg = dataclasses.replace(cfg, num_stages=max(2, cfg.num_stages // 2 + (cfg.tile_m <= 32)),
                                  tile_m=min(cfg.tile_m, 64))
    elif cfg.tile_m <= 32:  # one weight, small accumulator: decode two K steps per wait (registers allow it)
        cfg = dataclasses.replace(cfg, k_unroll=2)
    if n is not None and k is not None and cfg.tile_m <= 16:
        # Few rows per group: about one item per touched group (at most min(m, groups) of them).
        units = min(m, num_groups) * (n // _CTA_ROWS)
        cfg = dataclasses.replace(cfg, split_k=balanced_split_k(units, k // _TILE_K, _num_sms()))
    if cfg.tile_m <= 16 and num_weights == 1:
        # Small accumulators leave room for four decoding warpgroups (RESULTS.md, 2026-12-02, session 7: the down
        # kernel -3% to -6% at T = 1 .. 64). The two-weight kernel with 16-row tiles was 3-4% slower at T = 8
        # (equal at T = 64) while it spilled 64 bytes at 104 registers, a spill that went away once setmaxnreg
        # moved out of the unit loop (untimed since); with 8-row tiles (fused_moe's row items) it gains 5-6%.
        cfg = dataclasses.replace(cfg, compute_wgs=4)
    return cfg


def balanced_split_k(units: int, k_steps: int, num_sms: int, max_split: int = 8) -> int:
    """The K split S (dividing k_steps, >= 2 steps per unit) with the least modelled time: the busiest SM runs
    ceil(units * S / num_sms) units of k_steps / S steps plus ~half a step of per-unit cost (epilogue, refill).
    E.g. decode of one token on 132 SMs: gate/up 96 units of 16 steps -> 4 (three waves of 4 steps instead of
    one SM in four idle), down 192 units of 8 steps -> 2 (three waves of 4 steps instead of two of 8)."""
    def cost(s):
        return -(-units * s // num_sms) * (k_steps / s + 0.5)
    splits = [s for s in range(1, max_split + 1) if k_steps % s == 0 and (s == 1 or k_steps // s >= 2)]
    return min(splits, key=lambda s: (cost(s), s))


# --------------------------------------------------------------------------------------------------------------
# Work items (one XLA launch before the kernel; the kernel derives each item itself)
#
# Segments 0..E-1 are the groups, segment E the zero tail [sum(sizes), M). A segment [a, b) is covered by
# tiles(s) = cdiv(b - floor8(a), tile_m) items of tile_m rows starting at floor8(a) (TMA tiles of the activation
# are 8 rows high, so loads start at multiples of 8; the first item's `offset` = a % 8). Each group reserves
# slots(s) = cdiv(size + 7, tile_m) >= tiles(s) consecutive item indices: unlike tiles(s), slots(s) depends on the
# group's own size only, so one prefix sum (a single XLA launch) gives every group's first index, and
# the kernel maps an item index to its group by a search over those prefix sums. The slack (slots - tiles <= 1,
# at a group's end) leaves a few item indices empty; the kernel skips them.

def _table_width(num_groups: int) -> int:
    return pl.cdiv(num_groups + 2, _TABLE_COLS) * _TABLE_COLS       # each half starts a 128-byte line


def max_items(m: int, num_groups: int, tile_m: int) -> int:
    """Bound on the item indices with rows: every segment with rows (at most min(E, M) groups and the tail) ends
    below sum(size + tile_m + 6) / tile_m."""
    return (m + (min(num_groups, m) + 1) * (tile_m + 6)) // tile_m


def _exclusive_prefix(per_group: jax.Array) -> jax.Array:
    """[P, E] int32 -> [P, W]: entry s is the sum of the first s values (s <= E; entries past E repeat the total).
    One masked reduction ([P, W, E], ~75K adds per row at E = 256): XLA fuses the producers into it and launches
    once, where a cumsum's reduce-window becomes a two-level scan of 2-3 launches."""
    e = per_group.shape[1]
    w = _table_width(e)
    before = lax.broadcasted_iota(jnp.int32, (w, e), 1) < lax.broadcasted_iota(jnp.int32, (w, e), 0)
    return jnp.sum(jnp.where(before[None], per_group[:, None, :], 0), axis=2)


def item_table(group_sizes: jax.Array, m: int, tile_m: int) -> jax.Array:
    """int32 [2 * W] (W = _table_width(E)): [0, W) the row where segment s starts (before clamping to M), [W, 2W)
    the first item index of segment s, for s in [0, E] (entries past E repeat the last)."""
    sizes = jnp.clip(group_sizes.astype(jnp.int32), 0, m)
    per_group = jnp.stack([sizes, (sizes + 6 + tile_m) // tile_m * (sizes > 0)])             # [2, E]
    return _exclusive_prefix(per_group).reshape(-1)


def row_start_table(group_sizes: jax.Array, m: int) -> jax.Array:
    """int32 [W]: the row where segment s starts, for s in [0, E] (entries past E repeat the last): the first half
    of `item_table`, all that one-row items need (`row_segment`)."""
    sizes = jnp.clip(group_sizes.astype(jnp.int32), 0, m)
    return _exclusive_prefix(sizes[None])[0]


def row_groups_of_sizes(group_sizes: jax.Array, m: int) -> jax.Array:
    """int32 [M]: each sorted row's group, -1 past sum(group_sizes). Two XLA launches (the segment starts, then a
    count of the starts at or before each row: a reduction cannot feed another inside one fusion)."""
    e = group_sizes.shape[0]
    starts = row_start_table(group_sizes, m)[1:e + 1]                                     # segments 1 .. E
    # Each start at or before the row counts 1, the tail's (segment E) counts -E: a tail row, at or after every
    # start, sums (E - 1) - E = -1. (The -1 as a select after the sum would be an XLA launch of its own.)
    weight = jnp.where(jnp.arange(1, e + 1) < e, 1, -e).astype(jnp.int32)                 # [E]
    before = starts[None, :] <= jnp.arange(m, dtype=jnp.int32)[:, None]                     # [M, E]
    return jnp.sum(jnp.where(before, weight[None, :], 0), axis=1)


def segment_search(load, value, num_groups: int, search: str = "rway"):
    """The last segment s in [0, E] whose entry load(s) is <= value, for entries non-decreasing in s (segment
    starts, in rows or in item indices). Returns (s, load(s)). Scalar jnp code (runs in every thread).

    search: "rway": two rounds of independent loads (latency is paid per round, not per load): R-way with R * R >
    E, the first round at fixed entries (s = R, 2R, ...), the second over the R - 1 entries after the first's
    answer. ~34 loads and ~350 instructions at E = 256: for global memory, where a round costs ~0.3 us.
    "binary": ceil(log2(E + 1)) dependent rounds of one load each, ~70 instructions: for shared memory (a round
    ~30 cycles), where every compute warp runs the search at each unit boundary and the instruction count is what
    delays the decode."""
    e = num_groups
    if search == "binary":
        seg = jnp.int32(0)
        step = 1 << max(0, e.bit_length() - 1)         # the largest power of two <= E
        while step:
            cand = seg + step
            take = (cand <= e) & (load(jnp.minimum(cand, e)) <= value)
            seg = jnp.where(take, cand, seg)
            step //= 2
        return seg, load(seg)
    if search == "rway":
        r = 2
        while r * r <= e:
            r += 1
        hits = [(load(j * r) <= value) for j in range(1, r) if j * r <= e]
        base = sum(h.astype(jnp.int32) for h in hits) * r
        firsts = [load(jnp.minimum(base + j, e)) for j in range(r)]          # entries base .. base + R - 1
        c2 = sum(((base + j <= e) & (firsts[j] <= value)).astype(jnp.int32) for j in range(1, r))
        first = firsts[0]
        for j in range(1, r):       # firsts[c2]: selects (registers cannot be indexed dynamically)
            first = jnp.where(c2 == j, firsts[j], first)
        return base + c2, first
    raise ValueError(f"search must be 'rway' or 'binary', got {search!r}")


def row_segment(row, load, num_groups: int, search: str = "rway"):
    """The group of `row` from `row_start_table` (load(i) -> its entry i), -1 for rows past sum(group_sizes) (the
    zero tail). Empty groups start where the next one does, so the last segment starting at or before the row is
    the row's group."""
    seg, _ = segment_search(load, row, num_groups, search)
    return jnp.where(seg < num_groups, seg, -1)


def item_fields(it, load, m: int, num_groups: int, tile_m: int, search: str = "rway"):
    """Item `it` from the table (load(i) -> int32 entry i of the flat table): dict of group (-1: zero tail),
    load_start (a multiple of 8), offset, size (rows [load_start + offset, + size) of x and of the output) and
    valid. Scalar jnp code: the kernel runs it in every thread, the tests vmap it over all items.

    search: how the last segment s in [0, E] whose first item is <= it is found (`segment_search`: "rway" for
    global memory, "binary" for shared memory). A last round reads the segment's bounds."""
    e, w = num_groups, _table_width(num_groups)
    if tile_m < 1 or tile_m & (tile_m - 1):
        raise ValueError(f"tile_m must be a power of two, got {tile_m}")
    seg, first = segment_search(lambda s: load(w + s), it, e, search)
    a = jnp.minimum(load(seg), m)
    b = jnp.where(seg < e, jnp.minimum(load(jnp.minimum(seg + 1, w - 1)), m), m)
    # Floor division by powers of two as bit operations (the same values for any sign; `//` costs a sign fix-up
    # of several instructions per use in every thread).
    shift = tile_m.bit_length() - 1
    a8 = a & -8
    tiles = jnp.where(b > a, (b - a8 + tile_m - 1) >> shift, 0)
    j = it - first
    valid = j < tiles
    load_start = a8 + jnp.where(valid, j, 0) * tile_m
    lo = jnp.maximum(load_start, a)
    hi = jnp.minimum(load_start + tile_m, b)
    return dict(group=jnp.where(seg < e, seg, -1), load_start=load_start, offset=jnp.where(valid, lo - load_start, 0),
                size=jnp.where(valid, jnp.maximum(hi - lo, 0), 0), valid=valid)


def item_extent(load, m: int, num_groups: int, tile_m: int):
    """Item indices to visit: every item with rows is below this (the tail's last item, or the bound)."""
    e, w = num_groups, _table_width(num_groups)
    a = jnp.minimum(load(e), m)
    tail = jnp.where(m > a, (m - (a & -8) + tile_m - 1) >> (tile_m.bit_length() - 1), 0)
    return jnp.minimum(load(w + e) + tail, max_items(m, e, tile_m))


# --------------------------------------------------------------------------------------------------------------
# The kernel

@dataclasses.dataclass(frozen=True)
class _Dims:
    m: int          # activation rows (the work items cover exactly these)
    k: int
    n: int          # output columns per weight
    e: int
    num_weights: int
    row_scale_per_row: bool
    out_dtype: jnp.dtype
    n_items: int    # static bound on the item indices with rows (max_items; M in rows mode)
    rows_mode: bool = False   # items are one row each, in order: the table is just the row's group [M]
    # Rows mode from group sizes (sorted rows, `grouped_matmul(one_row_items=True)`): the table is
    # `row_start_table` and each thread finds its row's group by a search over it (`row_segment`); rows past
    # sum(group_sizes) get group -1 and zero output.
    rows_from_sizes: bool = False
    # Rows mode whose row_group may hold -1 (rows past sum(group_sizes): no matmul, zero output) instead of being
    # clamped to [0, E): `row_groups_of_sizes`' table (ONE_ROW_TABLE = "xla").
    row_tail: bool = False
    # Rows mode from group sizes with the rows' groups built in shared memory by each warp of the memory warpgroup
    # (`row_table.build`, ONE_ROW_TABLE = "smem"): the table operand is group_sizes itself, the compute warpgroups
    # wait for it once, every unit reads its row's group with one shared-memory load; -1 past sum(group_sizes).
    row_table_smem: bool = False
    split_k: int = 1          # > 1: each unit sums K / split_k; fp32 partials [split_k, M, nw * N] are the output
    prefetch_rows: int = 0    # rows mode: L2-prefetch the next kernel's weight [E, N2, K2] of the first rows' groups
    # Rows mode: where the activation comes from. "tma": the prepared operand (`prepare_activation`), loaded by TMA.
    # "gather" / "swiglu": the x-loader warp builds each tile itself (activation_tile.py) from a natural-order bf16
    # x [R, K] (row of item r: r // rows_per_token) or from a gate/up kernel's fp32 partials [S, M', 2K].
    x_source: str = "tma"
    rows_per_token: int = 1
    x_limit: float | None = None
    # Programmatic dependent launch (sm90; GPU only). pdl_trigger: every CTA lets the next kernel in the stream
    # launch as soon as it starts (`griddepcontrol.launch_dependents`): that kernel's CTAs then take each SM as
    # this kernel's CTA there exits, instead of waiting for the whole grid and a launch. pdl_wait: this kernel may
    # be launched before the previous one has finished; every warp but the weight loader first waits for the
    # previous kernels to complete (`griddepcontrol.wait`). The weight loader streams the weights and reads the
    # row table at once, so the caller must make sure that those were ready before the previous kernel started.
    pdl_trigger: bool = False
    pdl_wait: bool = False
    # Config.paired_n: weights 0 and 1 are the same [E, 2n, K] weight; weight j's rows start at j * n.
    paired_n: bool = False


def _transforms(dtype, swizzle=128):
    bits = jnp.dtype(dtype).itemsize * 8 if jnp.dtype(dtype) != jnp.dtype(jnp.int4) else 4
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


_W_I4_TRANSFORMS = _transforms(jnp.int4)


def _tiled(shape, dtype, swizzle=128):
    return plgpu.SMEM(shape, dtype, transforms=_transforms(dtype, swizzle))


def _build_kernel(dims: _Dims, cfg: Config, epilogue: str, swiglu_limit: float | None, interpret: bool):
    tm, tk, stages = cfg.tile_m, _TILE_K, cfg.num_stages
    nw = dims.num_weights
    variant = nvfp4_decode.SUBNORMAL
    split = dims.split_k
    k_iters = dims.k // tk // split     # K steps per work unit
    stages = min(stages, k_iters)       # every slot is used by every unit (barrier phase bookkeeping relies on it)
    n_tiles = dims.n // _CTA_ROWS
    n_items = dims.n_items
    epi_fold = variant.epilogue_fold
    limit = float(swiglu_limit) if (swiglu_limit is not None and swiglu_limit > 0) else None
    if not ABLATE <= _ABLATIONS:
        raise ValueError(f"unknown ablations {sorted(ABLATE - _ABLATIONS)} (known: {sorted(_ABLATIONS)})")
    ablate = frozenset() if interpret else ABLATE

    # ptxas (CUDA 13, 2026-12-02) pipelines the two-weight kernel's wgmmas only with K-half tiles; for one weight it
    # serialises them either way (C7512 "insufficient register resources" with whole tiles, C7513 "non wgmma
    # instructions defining input registers" with halves), so the one-weight kernel keeps the plain loop.
    overlap = cfg.overlap_mma and stages >= 3 and nw == 2
    cwgs = cfg.compute_wgs              # compute warpgroups; 4: two per 64-row slot, one per K half
    halves = cwgs // _ROW_SLOTS
    # setmaxnreg: the register file (64K) is shared by cwgs + 1 warpgroups; 640 threads launch with at most 96
    # registers each (61440), so 4 x 128 x 104 + 128 x 40 = 58368 fits where 112 would not.
    compute_regs, memory_regs = (232, 40) if cwgs == 2 else (104, 40)
    if dims.x_source != "tma":
        if not dims.rows_mode or tm != activation_tile.TILE_ROWS or interpret:
            raise ValueError(f"x_source={dims.x_source!r} needs rows mode, {activation_tile.TILE_ROWS}-row tiles "
                             "and a GPU (not interpret mode)")
        # The x-loader warp adds the splits' partials of its 8 columns in registers: give it what the compute
        # warpgroups leave of the launch's allocation (640 threads x 96 = 61440: 4 x 128 x 104 + 128 x 64).
        # setmaxnreg.inc waits for the registers to be freed: asking for more than the allocation hangs the kernel
        # (80 did, H200, 2026-12-04).
        memory_regs = 64 if cwgs == 4 else 40
    unroll = cfg.k_unroll if (nw == 1 and k_iters % cfg.k_unroll == 0 and stages >= cfg.k_unroll) else 1
    # With overlap, the activation slot of step s is released once all of its P wgmma groups (tiles) are done:
    # after the wait that precedes tile n = ki * P + q of a later step, every tile <= n - 2 is done, which
    # completes step s = ki + (q - 1) // P - 1 when (q - 1) % P == 0. The steps left over are released after the
    # loop.
    # The two weights decode in K halves ([64, 128] tiles): two tiles in flight fit the register budget.
    tiles_per_step = 2 * nw
    release_at = {q: (q - 1) // tiles_per_step - 1 for q in range(tiles_per_step) if (q - 1) % tiles_per_step == 0}
    released = {ki + d for ki in range(k_iters) for d in release_at.values() if 0 <= ki + d < k_iters}
    release_after = [st for st in range(k_iters) if st not in released]

    pdl_wait = dims.pdl_wait and not interpret
    pdl_wait_if = (lambda: plgpu.griddepcontrol_wait()) if pdl_wait else (lambda: None)

    def kernel(table_gmem, x_gmem, *refs):
        if dims.pdl_trigger and not interpret:
            plgpu.griddepcontrol_launch_dependents()
        w_gmems = refs[0:nw]
        s_gmems = refs[nw:2 * nw]
        rs_gmems = refs[2 * nw:3 * nw]
        rest = refs[3 * nw:]
        if dims.prefetch_rows:
            pf_packed, pf_scales, rest = rest[0], rest[1], rest[2:]
        o_gmem, scratch = rest[0], rest[1:]

        def prefetch_next_weight():
            # A warp's lanes each ask L2 for a few rows of the next kernel's weights (fire and forget): the HBM
            # then streams them while this kernel drains and the next one launches, when it would be idle.
            if dims.prefetch_rows and not interpret:
                _prefetch_rows_l2(table_gmem, pf_packed, pf_scales, dims.prefetch_rows, _num_sms())
        if not dims.rows_mode:     # the item table: searched for every unit (`item_fields`)
            scratch, (t_smem, t_bar) = scratch[:-2], scratch[-2:]
        if dims.row_table_smem:    # the rows' groups (`row_table.build`), and their "ready" barrier
            scratch, (rt_smem, rt_bar) = scratch[:-2], scratch[-2:]

        def wait_row_table():
            if dims.row_table_smem:
                plgpu.barrier_wait(rt_bar)

        def load_table(i, warp):
            # The compute warpgroups read a copy in SMEM (TMA'd once) with a binary search; Mosaic GPU has no
            # warp-level lowering of SMEM scalar loads, so the memory warps read global memory (17-way search, two
            # rounds of loads). All 16 compute warps run their search at every unit boundary, so its instruction
            # count is what costs (the PTX has plain ld.shared, no barrier): RESULTS.md, 2026-12-03, sessions
            # 11-12.
            ref = table_gmem if warp else t_smem
            return ref[i // _TABLE_COLS, i % _TABLE_COLS]
        (x_smem, w_smem, s_smem, o_smem, x_bar, w_bar, o_bar, x_free, w_free, o_free, *extra) = scratch
        a_red = extra[:3] if halves == 2 else None          # K-half sums: SMEM, ready and free barriers
        a_smem = extra[3:] if halves == 2 else extra        # interpret mode: wgmma A operands in SMEM
        if interpret:
            w_u8 = w_i4 = w_smem
        else:
            w_u8, w_i4 = w_smem

        def _pipelined_k_loop(accs, wg):
            """The K loop with each tile's decode overlapping the previous tile's wgmma (Config.overlap_mma)."""
            @pl.loop(0, k_iters)
            def _k_loop(ki):
                si = lax.rem(ki, stages)
                plgpu.barrier_wait(w_bar.at[si])
                for q in range(tiles_per_step):
                    j, hf = divmod(q, 2)      # weight j, K half hf
                    plgpu.wgmma_wait(1)      # all but the last issued group done: their operand registers are free
                    if q in release_at:
                        done_step = ki + release_at[q]
                        pl.when(done_step >= 0)(lambda d=done_step: plgpu.barrier_arrive(
                            x_free.at[lax.rem(d + stages, stages)]))
                    slot = j * _ROW_SLOTS + wg
                    a_op = _decode_operand(w_u8.at[si, slot], w_i4.at[si, slot], s_smem.at[si, slot], variant,
                                           cfg.natural_k, interpret, k_half=hf, raw="decode" in ablate)
                    if q == tiles_per_step - 1:
                        plgpu.barrier_arrive(w_free.at[si])
                    if q == 0:
                        plgpu.barrier_wait(x_bar.at[si])
                    half = pl.ds(hf * (tk // 2), tk // 2)
                    x_op = x_smem.at[si, :, half]
                    if interpret:
                        a_buf = a_smem[0].at[wg, j, :, half]
                        a_buf[...] = a_op
                        a_op = a_buf
                    plgpu.wgmma(accs[j], a_op, x_op.T)

            plgpu.wgmma_wait(0)
            for st in release_after:
                plgpu.barrier_arrive(x_free.at[st % stages])

        def fetch(lin, warp, first=False):
            """The item fields of unit lin (any index past the end: the values go unused). first: the SM's first
            unit, looked up before the loop."""
            item = lin // (n_tiles * split)
            if dims.row_table_smem:      # one shared-memory load (any index past the end reads the last row)
                i = jnp.minimum(item, dims.m - 1)
                return (row_table.load(rt_smem, i),)
            if dims.rows_from_sizes:     # global loads, one unit ahead of their use
                search = "rway" if (warp or first) else "binary"
                return (row_segment(item, lambda i: table_gmem[i], dims.e, search),)
            if dims.rows_mode:
                return (table_gmem[jnp.minimum(item, n_items - 1)],)
            f = item_fields(item, functools.partial(load_table, warp=warp), dims.m, dims.e, tm,
                            search=_WARP_SEARCH if warp else _WG_SEARCH)
            return f["group"], f["load_start"], f["offset"], f["size"], f["valid"]

        def unit(lin, raw, warp=False):
            """Work unit lin = (item, 128-row N tile, K part): its fields, the same in every warpgroup; raw is
            fetch(lin). warp: inside a warp_map, where pl.multiple_of does not lower: the row offset is written
            v // 8 * 8 instead (same value, item load starts are multiples of 8), which layout inference
            can prove."""
            aligned = (lambda v: v // 8 * 8) if warp else (lambda v: pl.multiple_of(v, 8))
            item = lin // (n_tiles * split)
            ni = lin // split % n_tiles
            k_base = lin % split * k_iters      # first K step of this unit
            if dims.rows_mode:
                # Unsorted rows, one work item each: item r = (group of row r, 8 * (r // 8), r % 8, 1). For a
                # handful of rows with distinct groups (the k experts of one decode token) this skips sorting
                # the rows and un-sorting the result, and building the item table.
                # (row_group from the caller is clamped; a searched group is -1 in the zero tail: no matmul)
                gi = raw[0] if (dims.rows_from_sizes or dims.row_tail) else jnp.clip(raw[0], 0, dims.e - 1)
                load_start = aligned(item // 8 * 8)
                offset = item % 8
                size = jnp.int32(1)
                valid = item < dims.m
            else:
                gi, load_start, offset, size, valid = raw
                load_start = aligned(load_start)
            return dict(lin=lin, ni=ni, k_base=k_base, valid=valid, has_mm=valid & (gi >= 0), g=jnp.maximum(gi, 0),
                        load_start=load_start, offset=offset, size=size)

        def unit_loop(body, warp=False):
            """This SM's units in order (nd_loop: lin = sm, sm + num_sms, ...), body(unit fields, carry) -> carry
            (an int32, from 0). Each unit's item fields are looked up one unit ahead (the rows mode's one global
            load then hides behind the unit before; the table search runs where it is issued, ahead of the
            unit's first wait)."""
            sm, num_sms = lax.axis_index("sm"), lax.axis_size("sm")

            def step(info, carry):
                count, raw = carry
                lin = info.index[0]
                ahead = fetch(lin + num_sms, warp)
                return body(unit(lin, raw, warp), count), ahead

            # Visit only the item indices that can have rows (read from the table: all threads agree).
            extent = (n_items if dims.rows_mode else
                      item_extent(functools.partial(load_table, warp=warp), dims.m, dims.e, tm))
            count, _ = plgpu.nd_loop((extent * (n_tiles * split),), collective_axes="sm",
                                     init_carry=(jnp.int32(0), fetch(sm, warp, first=True)))(step)
            return count

        # The memory warps each run their own loop over the units (not one shared loop): a warp_map ends with a
        # warpgroup barrier, so one shared loop would hold the weight loader at every unit boundary until the
        # storer has stored the unit, and each unit would pay the pipeline fill (HBM latency) again.

        def k_loop(accs, wg, rs, kh):
            """The K loop of compute warpgroup wg: rows slot rs (dynamic), K half kh (static; None: all of K)."""
            xcols = slice(None) if kh is None else pl.ds(kh * (tk // 2), tk // 2)

            @pl.loop(0, k_iters // unroll)
            def _k_loop(kk):
                # Decode every tile of the iteration's steps, then issue their wgmmas, then wait once.
                sis = [lax.rem(kk * unroll + u, stages) for u in range(unroll)]
                a_ops = []      # (stage slot, weight, operand), in K order per weight
                for si in sis:
                    plgpu.barrier_wait(w_bar.at[si])
                    for j in range(nw):
                        slot = j * _ROW_SLOTS + rs      # this warpgroup's 64 rows of weight j
                        a_ops.append((si, j, _decode_operand(
                            w_u8.at[si, slot], w_i4.at[si, slot], s_smem.at[si, slot], variant,
                            cfg.natural_k, interpret, k_half=kh, raw="decode" in ablate)))
                    plgpu.barrier_arrive(w_free.at[si])
                for n, (si, j, a_op) in enumerate(a_ops):
                    if j == 0:      # the step's first tile: its activation slot must have landed
                        plgpu.barrier_wait(x_bar.at[si])
                    if interpret:   # the interpreter's wgmma takes its A operand from SMEM only
                        a_buf = a_smem[0].at[wg, n, :, xcols]
                        a_buf[...] = a_op
                        a_op = a_buf
                    plgpu.wgmma(accs[j], a_op, x_smem.at[si, :, xcols].T)
                plgpu.wgmma_wait(0)
                for si in sis:
                    plgpu.barrier_arrive(x_free.at[si])

        def compute_body(u, carry):
            carry_all = carry          # valid units this SM has computed before this one
            ni, valid, has_mm, g = u["ni"], u["valid"], u["has_mm"], u["g"]
            wg = lax.axis_index("wg")
            rs = lax.rem(wg, _ROW_SLOTS)       # the 64 weight rows of this warpgroup
            kh = wg // _ROW_SLOTS              # its K half (0 with two compute warpgroups: all of K)

            @pl.when(valid & (wg < cwgs))
            def _compute_wg():
                def acc_scope(*accs):
                    if overlap:
                        pl.when(has_mm)(lambda: _pipelined_k_loop(accs, wg))
                    elif halves == 1:
                        pl.when(has_mm)(lambda: k_loop(accs, wg, rs, None))
                    else:
                        for h in range(halves):
                            pl.when(has_mm & (kh == h))(lambda h=h: k_loop(accs, wg, rs, h))
                    return tuple(a[...] for a in accs)

                n0 = ni * _CTA_ROWS + rs * _WG_ROWS
                row_scales = [_load_row_scale(rs_gmems[j], g, n0 + (j * dims.n if dims.paired_n else 0), dims,
                                              epi_fold, interpret) for j in range(nw)]
                accs = pl.run_scoped(acc_scope, *[plgpu.ACC((_WG_ROWS, tm))] * nw)

                def finish(accs):      # row scale, SwiGLU, output tile to SMEM for the storer
                    scaled = [_apply_row_scale(accs[j], row_scales[j], tm, dims) for j in range(nw)]
                    if split > 1:     # fp32 partial sums of every weight; the caller reduces (and applies SwiGLU)
                        outs = scaled
                    elif epilogue == "swiglu":
                        outs = [_swiglu(scaled[0], scaled[1], limit)]
                    else:
                        outs = [scaled[0]]
                    # Zero-tail items ran no wgmma: the accumulator is still zero, and so is `out`.
                    pl.when(carry_all > 0)(lambda: plgpu.barrier_wait(o_free))
                    for j, out in enumerate(outs):
                        o_smem.at[j * _ROW_SLOTS + rs].T[...] = plgpu.layout_cast(
                            out.astype(o_smem.dtype), plgpu.Layout.WGMMA_TRANSPOSED)
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(o_bar)

                if halves == 1:
                    finish(accs)
                    return
                red_smem, red_bar, red_free = a_red

                @pl.when(kh == 1)       # the second K half hands its sums to the first
                def _():
                    pl.when(carry_all > 0)(lambda: plgpu.barrier_wait(red_free.at[rs]))
                    for j in range(nw):
                        red_smem.at[j * _ROW_SLOTS + rs][...] = accs[j]
                    plgpu.barrier_arrive(red_bar.at[rs])

                @pl.when(kh == 0)
                def _():
                    plgpu.barrier_wait(red_bar.at[rs])
                    total = [accs[j] + red_smem.at[j * _ROW_SLOTS + rs][...] for j in range(nw)]
                    plgpu.barrier_arrive(red_free.at[rs])
                    finish(total)

            return carry_all + valid.astype(jnp.int32)

        wg = lax.axis_index("wg")

        @pl.when(wg < cwgs)
        def _compute_wgs():
            wait_row_table()    # (before setmaxnreg: after it, ptxas spilled 28 bytes in a deviceless compile)
            plgpu.set_max_registers(compute_regs, action="increase")    # once, before the loop (it synchronises)
            pdl_wait_if()       # the row scales and everything after them: the previous kernels' results
            if not dims.rows_mode:
                plgpu.barrier_wait(t_bar)
            n_all = unit_loop(compute_body)

            # Observe the last completion of every "free" barrier, so that each thread has waited on every phase
            # (the interpreter checks this; on the GPU it also orders the exit after the last stores).
            if halves == 1:
                pl.when(n_all > 0)(lambda: plgpu.barrier_wait(o_free))
            else:
                rs, kh = lax.rem(wg, _ROW_SLOTS), wg // _ROW_SLOTS
                pl.when((n_all > 0) & (kh == 0))(lambda: plgpu.barrier_wait(o_free))
                pl.when((n_all > 0) & (kh == 1))(lambda: plgpu.barrier_wait(a_red[2].at[rs]))

        @pl.when(wg == cwgs)
        def _memory_wg():
            plgpu.set_max_registers(memory_regs, action="decrease")
            if dims.row_table_smem:
                # Each of the four warps builds the whole table (the same values into the same words), so each
                # reads only its own writes and none waits on a barrier (a wait in the loader warps made ptxas
                # spill 28 bytes at 64 registers, deviceless compile); the compute warpgroups wait for this
                # warpgroup's arrival, made after the first warp's writes.
                row_table.build(table_gmem, rt_smem, dims.m)
                plgpu.barrier_arrive(rt_bar)
            if not dims.rows_mode:
                # For the compute warpgroups; the warps read global memory and start at once (this thread
                # observes the barrier's phase after them).
                plgpu.copy_gmem_to_smem(table_gmem, t_smem, t_bar)

            @plgpu.warp_map
            def _warps(warp_id):
                def w_loader(u, carry):
                    carry_mm = carry       # units with a matmul this warp has loaded before
                    ni, k_base, g = u["ni"], u["k_base"], u["g"]

                    @pl.when(u["has_mm"])
                    def _():
                        @pl.loop(0, k_iters)
                        def _(ki):
                            si = lax.rem(ki, stages)
                            pl.when((ki >= stages) | (carry_mm > 0))(lambda: plgpu.barrier_wait(w_free.at[si]))
                            for j in range(nw):
                                for h in range(_ROW_SLOTS):
                                    row0 = j * dims.n if dims.paired_n else 0     # paired: N/2 + ...
                                    src_rows = pl.ds(row0 + ni * _CTA_ROWS + h * _WG_ROWS, _WG_ROWS)
                                    slot = j * _ROW_SLOTS + h
                                    plgpu.copy_gmem_to_smem(
                                        w_gmems[j].at[g, src_rows, pl.ds((k_base + ki) * (tk // 2), tk // 2)],
                                        w_u8.at[si, slot], w_bar.at[si])
                                    plgpu.copy_gmem_to_smem(
                                        s_gmems[j].at[g, src_rows,
                                                      pl.ds((k_base + ki) * (tk // 16), tk // 16)],
                                        s_smem.at[si, slot], w_bar.at[si])

                    return carry_mm + u["has_mm"].astype(jnp.int32)

                def x_loader(u, carry, part=None):
                    """part None: every stage slot; 0 / 1: the even / odd slots (two warps share the "swiglu"
                    build, whose loads from global memory take longer than a K step)."""
                    carry_mm = carry
                    k_base, load_start, offset, size = u["k_base"], u["load_start"], u["offset"], u["size"]

                    @pl.when(u["has_mm"])
                    def _():
                        need = offset + size

                        def slot_step(ki, si):
                            ks = pl.ds((k_base + ki) * tk, tk)
                            if dims.x_source != "tma":      # rows mode: item = load_start + offset is the row
                                # the row's values first (global loads), then wait for the slot, then store
                                row = load_start + offset
                                if dims.x_source == "gather":
                                    tok = row // dims.rows_per_token if dims.rows_per_token > 1 else row
                                    pairs = activation_tile.load_pairs(x_gmem.at[tok, ks], source="gather")
                                else:       # partials [S, M', 2K]: gate columns ks, up columns K + ks
                                    splits, rows_p, cols_p = x_gmem.shape
                                    pairs = activation_tile.load_pairs(
                                        x_gmem.at[:, row, ks], source="swiglu", splits=splits,
                                        split_stride=rows_p * cols_p, inter=dims.k, limit=dims.x_limit)
                                pl.when((ki >= stages) | (carry_mm > 0))(lambda: plgpu.barrier_wait(x_free.at[si]))
                                activation_tile.store_pairs(pairs, x_smem.at[si], offset)
                                plgpu.barrier_arrive(x_bar.at[si])
                                return
                            pl.when((ki >= stages) | (carry_mm > 0))(lambda: plgpu.barrier_wait(x_free.at[si]))

                            def copy(p):
                                return lambda: plgpu.copy_gmem_to_smem(
                                    x_gmem.at[pl.ds(load_start, p), ks], x_smem.at[si, pl.ds(0, p)], x_bar.at[si])

                            def ladder(p):
                                if p >= tm:
                                    return copy(tm)()
                                return lax.cond(need <= p, copy(p), lambda: ladder(2 * p))
                            ladder(min(8, tm))

                        @pl.loop(0, k_iters)
                        def _(ki):
                            si = lax.rem(ki, stages)
                            if part is None:
                                slot_step(ki, si)
                            else:
                                pl.when(lax.rem(si, 2) == part)(lambda: slot_step(ki, si))

                    return carry_mm + u["has_mm"].astype(jnp.int32)

                def storer(u, carry):
                    lin, ni, load_start, offset, size = u["lin"], u["ni"], u["load_start"], u["offset"], u["size"]

                    @pl.when(u["valid"])
                    def _():
                        plgpu.barrier_wait(o_bar)
                        if split > 1:
                            dst = o_gmem.at[lin % split]
                            cols = [j * dims.n + ni * _CTA_ROWS + h * _WG_ROWS for j in range(nw)
                                    for h in range(_ROW_SLOTS)]
                        else:
                            dst = o_gmem
                            cols = [ni * _CTA_ROWS + h * _WG_ROWS for h in range(_ROW_SLOTS)]
                        if "store" not in ablate:
                            _ragged_store(o_smem, dst, cols, load_start, offset, size, tm, dims.m)
                        plgpu.barrier_arrive(o_free)

                    return carry

                two_x = dims.x_source == "swiglu"       # warps 1 and 3 build the even and odd slots
                loaders = [(0, w_loader, w_free, None)]
                loaders += ([(1, functools.partial(x_loader, part=0), x_free, 0),
                             (3, functools.partial(x_loader, part=1), x_free, 1)] if two_x else
                            [(1, x_loader, x_free, None)])
                for wid, loader, bar, part in loaders:
                    @pl.when(warp_id == wid)
                    def _(loader=loader, bar=bar, wid=wid, part=part):
                        if wid != 0:        # the activation: the previous kernel's output
                            pdl_wait_if()
                        n_mm = unit_loop(loader, warp=True)
                        if wid == 0:      # this SM's weight loads are all issued
                            prefetch_next_weight()

                        @pl.when(n_mm > 0)
                        def _():
                            for st in range(stages):
                                if part is None or st % 2 == part:
                                    plgpu.barrier_wait(bar.at[st])

                @pl.when(warp_id == 2)
                def _():
                    pdl_wait_if()           # its output buffer may be one the previous kernels still read
                    unit_loop(storer, warp=True)

            if not dims.rows_mode:
                plgpu.barrier_wait(t_bar)

    # Weight tiles are kept per (weight, warpgroup) slot of 64 rows: an int4 view of SMEM can only be sliced at
    # static row offsets, and the two views (uint8 for the TMA, int4 for the register load) alias the same bytes.
    slots = nw * _ROW_SLOTS
    if interpret:
        w_scratch = plgpu.SMEM((stages, slots, _WG_ROWS, tk // 2), jnp.uint8)
    else:
        w_scratch = plgpu.RefUnion(_tiled((stages, slots, _WG_ROWS, tk // 2), jnp.uint8),
                                   _tiled((stages, slots, _WG_ROWS, tk), jnp.int4))
    scratch = [
        _tiled((stages, tm, tk), jnp.bfloat16),                                       # x
        w_scratch,                                                                    # packed W (u8 / i4 views)
        plgpu.SMEM((stages, slots, _WG_ROWS, tk // 16), jnp.float8_e4m3fn),           # block scales
        _out_smem(dims, tm),                                                          # output rows
        plgpu.Barrier(num_barriers=stages),                                           # x landed
        plgpu.Barrier(num_arrivals=2 * slots, num_barriers=stages),                   # W + scales landed
        plgpu.Barrier(num_arrivals=_ROW_SLOTS),                                       # output tile ready
        plgpu.Barrier(num_arrivals=cwgs, num_barriers=stages),                        # x slot free
        plgpu.Barrier(num_arrivals=cwgs, num_barriers=stages),                        # W slot free
        plgpu.Barrier(),                                                              # output buffer free
    ]
    if halves == 2:     # the second K half's fp32 sums per (weight, row slot), and their ready / free barriers
        red = (plgpu.SMEM((slots, _WG_ROWS, tm), jnp.float32) if interpret else
               _tiled((slots, _WG_ROWS, tm), jnp.float32, swizzle=min(128, tm * 4)))
        scratch += [red, plgpu.Barrier(num_barriers=_ROW_SLOTS), plgpu.Barrier(num_barriers=_ROW_SLOTS)]
    if interpret:
        scratch.append(plgpu.SMEM((cwgs, max(nw, unroll), _WG_ROWS, tk), jnp.bfloat16))
    if not dims.rows_mode:
        scratch += [plgpu.SMEM((2 * _table_width(dims.e) // _TABLE_COLS, _TABLE_COLS), jnp.int32), plgpu.Barrier()]
    if dims.row_table_smem:
        scratch += [plgpu.SMEM((dims.m,), jnp.int32), plgpu.Barrier()]
    return kernel, scratch


# Weight rows per L2 prefetch request (`_prefetch_rows_l2`): 32 rows of V4-Flash's down projection are 32 KB of
# codes and 4 KB of scales: 6 experts are 768 requests, ~6 per SM (one lane each, of one warp per SM).
_PREFETCH_ROWS = 32
# Bytes of a following kernel's weights that one launch asks L2 to hold (H100/H200: 50 MB of L2, which the
# streaming kernel's own tiles pass through as well).
L2_PREFETCH_BUDGET = 32 << 20


def prefetch_rows_for(packed_shape, m: int, budget_bytes: int = L2_PREFETCH_BUDGET) -> int:
    """How many of the m rows' groups an L2 prefetch of a weight [E, N, K/2] (and its scales) covers within the
    budget (0: none). In rows mode the groups of one decode token are distinct, so a row is a whole weight."""
    e, n, k2 = packed_shape
    if n % _PREFETCH_ROWS:      # whole pieces only (a piece is 32 rows: a multiple of 16 bytes, 16-byte aligned)
        return 0
    per_group = n * k2 * 9 // 8                    # codes and E4M3 block scales
    return max(0, min(m, budget_bytes // per_group))


def _prefetch_rows_l2(table_gmem, packed_gmem, scale_gmem, rows: int, num_sms: int):
    """Inside the kernel, one warp: ask L2 for the weights [g, :, :] (codes and scales) of the groups g = table[r]
    of rows r < rows, in _PREFETCH_ROWS-row pieces dealt round-robin over the SMs, then this warp's lanes
    (`cp.async.bulk.prefetch.L2`: no SMEM, no barrier, nothing to wait for)."""
    e, n, k2 = packed_gmem.shape
    ks = scale_gmem.shape[2]
    pieces = n // _PREFETCH_ROWS
    total = rows * pieces
    iters = pl.cdiv(total, num_sms * 32)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()))
    def issue(ctx, table, packed, scales):
        del ctx
        from jax.experimental.mosaic.gpu import utils
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref

        i32, i64, idx = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64), ir.IndexType.get()
        c32 = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v))
        c64 = lambda v: arith.constant(i64, ir.IntegerAttr.get(i64, v))
        lane = arith.remui(utils.thread_idx(), c32(32))
        sm = arith.index_cast(i32, gpu.block_id(gpu.Dimension.x))
        bases = [llvm.ptrtoint(i64, utils.memref_ptr(r)) for r in (packed, scales)]
        for it in range(iters):
            # consecutive pieces go to different SMs: every SM's TMA unit issues a few (6 experts: ~6 each)
            chunk = arith.addi(arith.muli(arith.addi(c32(it * 32), lane), c32(num_sms)), sm)
            ok = arith.cmpi(arith.CmpIPredicate.ult, chunk, c32(total))
            row = arith.minui(arith.divui(chunk, c32(pieces)), c32(rows - 1))
            piece = arith.extui(i64, arith.remui(chunk, c32(pieces)))
            g = memref.load(table, [arith.index_cast(idx, row)])
            g = arith.extui(i64, arith.minui(arith.maxsi(g, c32(0)), c32(e - 1)))
            for base, rb in zip(bases, (k2, ks)):
                off = arith.addi(arith.muli(g, c64(n * rb)), arith.muli(piece, c64(_PREFETCH_ROWS * rb)))
                utils.inline_ptx("cp.async.bulk.prefetch.L2.global [$0], $1;", arith.addi(base, off),
                                 c32(_PREFETCH_ROWS * rb), predicate=ok)
        return None

    issue(table_gmem, packed_gmem, scale_gmem)


def _decode_operand(w_u8, w_i4, s_ref, variant, natural_k, interpret, k_half=None, raw=False):
    """One warpgroup's [64, 256] weight tile -> scaled bf16 wgmma operand (value * s_b / 2^8); with k_half 0/1
    only the first/second 128 columns ([64, 128]: half the registers, for the pipelined K loop). raw: the code
    words themselves, undecoded (ABLATE "decode": timing only)."""
    cols = _TILE_K if k_half is None else _TILE_K // 2
    if interpret:
        packed, scales = w_u8[...], s_ref[...]
        if k_half is not None:
            packed = packed[:, k_half * cols // 2:(k_half + 1) * cols // 2]
            scales = scales[:, k_half * cols // 16:(k_half + 1) * cols // 16]
        w = nvfp4_decode.decode_jnp(packed, scales, variant)
        return w if natural_k else nvfp4_decode.permute_k(w)

    @plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(transforms=_W_I4_TRANSFORMS), plgpu.RefType()),
        return_type=plgpu.ShapeDtypeStruct((_WG_ROWS, cols), jnp.bfloat16, layout=_WGMMA),
    )
    def decode(ctx, w_ref, s_ref):
        del ctx
        return nvfp4_decode.decode_tile_mgpu(w_ref, s_ref, variant, natural_k, k_half=k_half, raw=raw)

    return decode(w_i4, s_ref)


def _load_row_scale(rs_gmem, g, n0, dims: _Dims, epi_fold: float, interpret: bool):
    """fp32 epilogue factor for the warpgroup's 64 weight rows: [64] (per-row, WGMMA row layout) or a scalar.
    Loaded before the unit's K loop so that its global-memory latency hides behind the loop instead of delaying
    the epilogue (while the epilogue waits, the pipeline's slots are full and the loaders idle)."""
    if dims.row_scale_per_row:
        if interpret:
            v = lax.dynamic_slice_in_dim(rs_gmem[g], n0, _WG_ROWS)
        else:
            v = plgpu.load(rs_gmem.at[g, pl.ds(n0, _WG_ROWS)], layout=_WGMMA_ROW, optimized=False)
        return v * epi_fold
    return rs_gmem[g, 0] * epi_fold


def _apply_row_scale(acc, scale, tm: int, dims: _Dims):
    if dims.row_scale_per_row:
        return acc * lax.broadcast_in_dim(scale, (_WG_ROWS, tm), [0])
    return acc * scale


def _swiglu(g, u, limit):
    """DeepSeek-V4 clamped SwiGLU in fp32 (same formula as reference.swiglu)."""
    if limit is not None:
        g = jnp.minimum(g, limit)
        u = jnp.minimum(jnp.maximum(u, -limit), limit)
    return g / (1.0 + jnp.exp(-g)) * u


def _out_smem(dims: _Dims, tm: int):
    """The output tiles [slot, tm, 64], one per (weight, warpgroup) with split_k (fp32), else per warpgroup."""
    if dims.split_k > 1:
        return plgpu.SMEM((dims.num_weights * _ROW_SLOTS, tm, _WG_ROWS), jnp.float32)
    return plgpu.SMEM((_ROW_SLOTS, tm, _WG_ROWS), dims.out_dtype, transforms=(plgpu.SwizzleTransform(128),))


def _ragged_store(o_smem, o_gmem, col_starts, load_start, offset, size, tm, m):
    """TMA-store rows [offset, offset + size) of the [tm, 64] tiles o_smem[i] to columns col_starts[i] of o_gmem,
    largest power of two first.

    The compute warpgroups fenced their SMEM writes (commit_smem) before arriving on the barrier we waited on.
    """
    smem_off = offset
    p = 1 << (min(tm, m).bit_length() - 1)
    while p > 0:
        @pl.when((size & p) != 0)
        def _(p=p, smem_off=smem_off):
            for slot, c0 in enumerate(col_starts):
                plgpu.copy_smem_to_gmem(o_smem.at[slot, pl.ds(smem_off, p)],
                                        o_gmem.at[pl.ds(load_start + smem_off, p), pl.ds(c0, _WG_ROWS)],
                                        commit_group=False)
        smem_off = smem_off + (size & p)
        p //= 2
    plgpu.commit_smem_to_gmem_group()
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


# --------------------------------------------------------------------------------------------------------------
# Public entry point

def _num_sms() -> int:
    try:
        dev = jax.devices()[0]
        return int(getattr(dev, "core_count", 0)) or 132
    except Exception:       # noqa: BLE001 - no backend: export / interpret on the CPU
        return 132


def check_weight(packed, block_scale, global_scale, name: str = "weight"):
    """Shape/dtype checks for NVFP4 stacked-expert weights [E, N, K]. Returns (E, N, K)."""
    if packed.ndim != 3 or packed.dtype != jnp.uint8:
        raise ValueError(f"{name}: packed codes must be uint8 [E, N, K/2], got {packed.dtype}{list(packed.shape)}")
    e, n, k2 = packed.shape
    k = 2 * k2
    if block_scale.shape != (e, n, k // 16) or block_scale.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"{name}: block scales must be float8_e4m3fn {[e, n, k // 16]}, got "
                         f"{block_scale.dtype}{list(block_scale.shape)}")
    gs = jnp.shape(global_scale)
    if len(gs) not in (0, 2) or (len(gs) == 2 and (gs[0] not in (1, e) or gs[1] not in (1, n))):
        raise ValueError(f"{name}: global scale must be a scalar or [E|1, N|1] for weights [{e}, {n}, {k}], "
                         f"got shape {list(gs)}")
    return e, n, k


def supported(m: int, n: int, k: int) -> str | None:
    """None when the kernel handles this shape, else the reason (the dispatcher then uses the reference)."""
    if k % _TILE_K:
        return f"K={k} is not a multiple of {_TILE_K}"
    if n % _CTA_ROWS:
        return f"N={n} is not a multiple of {_CTA_ROWS}"
    if m == 0:
        return "no rows"
    return None


def epilogue_row_scale(global_scale, e: int, n: int, input_scale=None) -> jax.Array:
    """fp32 [E, 1] or [E, N] factor applied to the accumulator: g_w (x g_a in W4A4)."""
    g = jnp.asarray(global_scale, jnp.float32)
    g = g.reshape(1, 1) if g.ndim == 0 else g
    if g.shape[1] == 1:
        g = jnp.broadcast_to(g, (e, 1))
    else:
        g = jnp.broadcast_to(g, (e, n))
    if input_scale is not None:
        ga = jnp.asarray(input_scale, jnp.float32)
        g = g * (ga.reshape(e, 1) if ga.ndim == 1 else ga)
    return g


# Up to this many rows, W4A16 with at least as many groups as rows runs one work item per row
# (`one_row_items_config`): decode of one or two tokens, whose rows are mostly in distinct groups.
ONE_ROW_ITEMS_MAX_ROWS = 16


def use_one_row_items(m: int, num_groups: int, w4a4: bool) -> bool:
    """The automatic choice of `grouped_matmul`: one-row items for few rows spread over many groups. A group with
    r rows then streams its weights r times, so the rule assumes rows in distinct groups (one token's k experts:
    T = 2 of V4-Flash has 12 rows in 11 groups and was still faster, RESULTS.md, eighteenth session); W4A4
    quantizes x in XLA first and keeps the sorted items."""
    return not w4a4 and 0 < m <= ONE_ROW_ITEMS_MAX_ROWS and num_groups >= m


def one_row_items_config(m: int, n: int, k: int) -> Config:
    """One-row items: 8-row activation tiles (the row's own row of the TMA box), four compute warpgroups, and, for
    N % 256 == 0, each unit streaming two 128-row N tiles (`paired_n`, as the SwiGLU kernel does with its two
    weights: T = 1 of V4-Flash, [6, 4096] x [4096, 4096], kernel 20.8 us against 25.4 with one tile per unit,
    H200, RESULTS.md eighteenth session), with the K split that balances the SMs."""
    steps = k // _TILE_K
    paired = n % (2 * _CTA_ROWS) == 0 and steps % 2 == 0 and steps >= 4
    units = m * (n // (2 * _CTA_ROWS if paired else _CTA_ROWS))
    split = balanced_split_k(units, steps, _num_sms())
    if paired and split == 1:
        split = 2
    return Config(tile_m=8, num_stages=4, split_k=split, compute_wgs=4, paired_n=paired)


def grouped_matmul(x: jax.Array, packed: jax.Array, block_scale: jax.Array, global_scale: jax.Array,
                   group_sizes: jax.Array, *, input_scale: jax.Array | None = None,
                   input_multiplier: jax.Array | None = None, out_dtype=None,
                   config: Config | None = None, one_row_items: bool | None = None,
                   interpret: bool = False) -> jax.Array:
    """NVFP4 grouped matmul: x [M, K] rows sorted by group, weights [E, N, K] -> [M, N] (fp32 accumulation).

    input_scale None: W4A16 (x used as given, bf16). input_scale g_a (scalar or [E]): W4A4, x is first
    quantized to NVFP4 with the global scale of its row's group (Blackwell numerics: exact products, fp32 sums);
    input_multiplier (input_scale's shape) is a stored compressed-tensors multiplier the quantizer then uses
    exactly (`NVFP4Tensor.input_multiplier`). out_dtype float32 returns the bf16-rounded result widened (the
    kernel stores 16-bit tiles).
    Rows past sum(group_sizes) are zero. `interpret=True` runs the kernel in Mosaic GPU interpret mode (CPU;
    see `_interpret_params` for the host-device requirement).
    one_row_items: one work item per row (its group found in-kernel; on the GPU the x-loader warp reads the row
    itself, no preparation launch) instead of tiles of a group's rows. None: `use_one_row_items` when no config is
    given, else False. config None then picks `one_row_items_config` or `default_config`.
    """
    from pallas_kernels import act_quant  # local: act_quant imports this module's helpers indirectly

    e, n, k = check_weight(packed, block_scale, global_scale)
    m = x.shape[0]
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}] to match weights [{e}, {n}, {k}], got {list(x.shape)}")
    if group_sizes.shape != (e,):
        raise ValueError(f"group_sizes must be [{e}], got {list(group_sizes.shape)}")
    if (why := supported(m, n, k)) is not None:
        raise ValueError(f"grouped_matmul kernel: unsupported shape: {why}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if input_scale is not None:
        x = act_quant.quantize_dequantize_grouped(x, input_scale, group_sizes, interpret=interpret,
                                                  multiplier=input_multiplier)
    rs = epilogue_row_scale(global_scale, e, n, input_scale)
    # The output tile goes through 128-byte-swizzled SMEM rows of 64 columns, which holds 16-bit types only; an
    # fp32 request gets the fp32 accumulator rounded to bf16 once (inside the stated bound), then widened.
    kernel_dtype = out_dtype if out_dtype.itemsize == 2 else jnp.dtype(jnp.bfloat16)
    if one_row_items is None:
        one_row_items = config is None and use_one_row_items(m, e, input_scale is not None)
    if one_row_items:
        cfg = config or one_row_items_config(m, n, k)
        # GPU: the x-loader warp reads each natural-order row itself (8-row tiles only); interpret mode has no
        # such warp code, so the operand is prepared and TMA'd.
        gather = not interpret and cfg.tile_m == activation_tile.TILE_ROWS and not cfg.natural_k
        xb = x.astype(jnp.bfloat16)
        out = _launch(xb if gather else prepare_activation(xb, m, cfg, interpret), [packed], [block_scale], [rs],
                      group_sizes, kernel_dtype, cfg, "linear", None, interpret, m=m,
                      x_source="gather" if gather else "tma", one_row_items=True)
        return out.astype(out_dtype)
    out = _launch(x.astype(jnp.bfloat16), [packed], [block_scale], [rs], group_sizes, kernel_dtype,
                  config or default_config(m, e, n=n, k=k), "linear", None, interpret)
    return out.astype(out_dtype)


def padded_rows(m: int, cfg: Config, interpret: bool = False) -> int:
    """Rows of the activation the kernel reads for m rows: TMA needs a multiple of its 8-row tile, and activation
    windows may run past row m (TMA zero-fills them on the GPU; interpret mode needs real rows)."""
    m8 = (m + 7) // 8 * 8
    return max(m8, cfg.tile_m) if not interpret else m8 + cfg.tile_m


# Up to this many rows the activation is padded and permuted by one loop fusion over bf16 (`prepare_activation`);
# above it the permutation runs on uint32 pairs (`nvfp4_decode.permute_activation`, ~4 TB/s, a second launch
# when padding is needed).
_FUSED_PREP_MAX_ROWS = 128


def prepare_activation(x: jax.Array, m: int, cfg: Config, interpret: bool = False,
                       rows: jax.Array | None = None) -> jax.Array:
    """The kernel's activation operand: x[:m] (or x[rows], rows int [m]) zero-padded to padded_rows(m, cfg) rows
    and, unless cfg.natural_k, with K permuted to the decoded weights' order (`nvfp4_decode.k_permutation`).

    Small row counts take one XLA launch: the gather, the padding and the permutation fuse into one loop fusion
    when the permutation is written on bf16 (reshapes, before the gather), where the faster uint32 form of a
    large activation would be a launch of its own."""
    mp = padded_rows(m, cfg, interpret)
    # (With neither a gather nor padding to fuse with, XLA emits the bf16 form as a slow transpose: 4.6 us at 48
    # rows where the uint32 form takes 1.1, RESULTS.md 2026-12-02.)
    small = m <= _FUSED_PREP_MAX_ROWS and not cfg.natural_k and (rows is not None or mp != m)
    if small:
        src = nvfp4_decode.permute_k(x)                     # fused into its consumer below: no launch of its own
    else:
        src = x
    if rows is not None:
        idx = jnp.pad(rows.astype(jnp.int32), (0, mp - m))
        xp = jnp.where((jnp.arange(mp) < m)[:, None], src[idx], jnp.zeros((), x.dtype))
    else:
        xp = src[:m] if mp == m else jnp.pad(src[:m], ((0, mp - m), (0, 0)))
    if not cfg.natural_k and not small:
        xp = nvfp4_decode.permute_activation(xp)
    return xp


def _launch(x, packs, scales, row_scales, group_sizes, out_dtype, cfg: Config, epilogue, swiglu_limit,
            interpret, row_group=None, *, m: int | None = None, prepare_for: Config | None = None,
            l2_prefetch=None, x_source: str = "tma", rows_per_token: int = 1, x_limit: float | None = None,
            raw_output: bool = False, pdl_trigger: bool = False, pdl_wait: bool = False,
            one_row_items: bool = False):
    """Run the kernel: x [M, K] (natural column order), 1 or 2 NVFP4 weights [E, N, K] -> [M, N].

    Rows sorted by group (`group_sizes`), or, with row_group [M] given, in any order: one work item per row (rows
    of one group in different items each stream its weights, so this is for rows whose groups seldom repeat).
    one_row_items: rows sorted by group (`group_sizes`) but one work item per row, as with row_group; where each
    row's group comes from is ONE_ROW_TABLE ("smem": built by the kernel itself, `row_table.py`).
    m given: x is already `prepare_activation(x, m, cfg)`. prepare_for given: the result is returned as
    `prepare_activation(result, M, prepare_for)`, the next launch's operand (with a K split, the permutation
    fuses into the XLA sum of the partials). l2_prefetch = (packed, block_scale) of a weight [E, N2, K2] (rows
    mode only): the kernel also asks L2 for that weight's groups of the rows, the next launch's weights, once this
    SM has issued its weight loads, within L2_PREFETCH_BUDGET bytes, so that HBM streams them while this kernel
    drains and the next one launches.

    x_source (rows mode, GPU): "gather": x is natural-order bf16 [R, K] and row r of the problem is x[r //
    rows_per_token] (m given); "swiglu": x is a two-weight kernel's raw partials [S, M', 2K] (`raw_output`) and
    row r is swiglu(sum_s gate, sum_s up) with clamp x_limit. The x-loader warp builds each tile itself
    (activation_tile.py): no preparation launch. raw_output: return the kernel's output as it wrote it: with a K
    split the fp32 partials [split, M', nw * N] (epilogue not applied), else [M', N] (rows past m unwritten).
    pdl_trigger / pdl_wait: programmatic dependent launch (`_Dims`); with pdl_wait the caller guarantees that the
    weights and row_group (or group_sizes) were computed before the previous kernel in the stream started."""
    e, n, _ = packs[0].shape
    tm = cfg.tile_m
    k = packs[0].shape[2] * 2
    if one_row_items and (row_group is not None or group_sizes is None):
        raise ValueError("one_row_items takes group_sizes (sorted rows), not row_group")
    rows_mode = row_group is not None or one_row_items
    if x_source != "tma":
        if m is None or not rows_mode:
            raise ValueError(f"x_source={x_source!r} needs rows mode (row_group or one_row_items) and m")
        if x_source == "gather" and (x.ndim != 2 or x.shape[1] != k or x.shape[0] * rows_per_token < m):
            raise ValueError(f"x_source='gather': x must be [>= {m} / {rows_per_token}, {k}], got {list(x.shape)}")
        if x_source == "swiglu" and (x.ndim != 3 or x.shape[2] != 2 * k or x.shape[1] < m
                                     or x.dtype != jnp.float32):
            raise ValueError(f"x_source='swiglu': x must be fp32 partials [S, >= {m}, {2 * k}], got "
                             f"{x.dtype}{list(x.shape)}")
        xp, mp = x, padded_rows(m, cfg, interpret)
    elif m is None:
        m = x.shape[0]
        xp = prepare_activation(x, m, cfg, interpret)
        mp = xp.shape[0]
    else:
        if x.shape[0] != padded_rows(m, cfg, interpret):
            raise ValueError(f"a prepared activation for {m} rows has {padded_rows(m, cfg, interpret)} rows, got "
                             f"{x.shape[0]}")
        xp = x
        mp = xp.shape[0]
    if ONE_ROW_TABLE not in _ONE_ROW_TABLES:
        raise ValueError(f"ONE_ROW_TABLE must be one of {_ONE_ROW_TABLES}, got {ONE_ROW_TABLE!r}")
    table_mode = ONE_ROW_TABLE if one_row_items else None
    if table_mode == "smem" and (interpret or row_table.supported(m, e) is not None):
        table_mode = "xla"      # no warp code in interpret mode; too many groups
    table_in_kernel = table_mode == "search"
    if table_mode == "smem":
        table, n_items = group_sizes.astype(jnp.int32), m
    elif table_mode == "xla":
        table, n_items = row_groups_of_sizes(group_sizes, m), m
    elif one_row_items:
        table, n_items = row_start_table(group_sizes, m), m
    elif row_group is None:
        if 2 * _table_width(e) // _TABLE_COLS > 256:     # one TMA box
            raise ValueError(f"grouped_matmul kernel: {e} groups is more than the item table holds (4094)")
        table, n_items = item_table(group_sizes, m, tm).reshape(-1, _TABLE_COLS), max_items(m, e, tm)
    else:   # the kernel derives each one-row item from its index
        if row_group.shape != (m,):
            raise ValueError(f"row_group must be [{m}], got {list(row_group.shape)}")
        table, n_items = row_group.astype(jnp.int32), m
    per_row = any(r.shape[1] != 1 for r in row_scales)
    if per_row:
        row_scales = [jnp.broadcast_to(r, (e, n)) for r in row_scales]
    if cfg.paired_n:    # one weight as two half-N weights: the same operands twice, the second's rows from n / 2
        if len(packs) != 1 or epilogue != "linear" or n % (2 * _CTA_ROWS):
            raise ValueError(f"paired_n streams one weight with N % {2 * _CTA_ROWS} == 0 and the linear epilogue; "
                             f"got {len(packs)} weights, N={n}, epilogue {epilogue!r}")
        packs, scales, row_scales, n = packs * 2, scales * 2, row_scales * 2, n // 2
    split, nw = cfg.split_k, len(packs)
    if (k // _TILE_K) % split:
        raise ValueError(f"split_k={split} must divide the {k // _TILE_K} K steps of K={k}")
    if pdl_wait and row_group is None:
        raise ValueError("pdl_wait needs rows mode with row_group: the table of sorted rows is computed right "
                         "before the kernel, and its weight loader would read it before the wait")
    pf_rows = 0
    if l2_prefetch is not None:
        if row_group is None:
            raise ValueError("l2_prefetch needs rows mode (row_group): sorted groups are not known per row")
        pf_rows = prefetch_rows_for(l2_prefetch[0].shape, m)
    dims = _Dims(m=m, k=k, n=n, e=e, num_weights=nw, row_scale_per_row=per_row, out_dtype=out_dtype,
                 n_items=n_items, rows_mode=rows_mode, rows_from_sizes=table_in_kernel,
                 row_tail=table_mode in ("xla", "smem"), row_table_smem=table_mode == "smem", split_k=split,
                 prefetch_rows=pf_rows,
                 x_source=x_source, rows_per_token=rows_per_token,
                 x_limit=float(x_limit) if (x_limit is not None and x_limit > 0) else None,
                 pdl_trigger=pdl_trigger, pdl_wait=pdl_wait, paired_n=cfg.paired_n)
    body, scratch = _build_kernel(dims, cfg, epilogue, swiglu_limit, interpret)
    args = [table, xp, *packs, *scales, *row_scales, *(l2_prefetch if pf_rows else ())]
    out_type = (jax.ShapeDtypeStruct((split, mp, nw * n), jnp.float32) if split > 1 else
                jax.ShapeDtypeStruct((mp, n), out_dtype))
    kernel = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(2 if interpret else _num_sms(),),   # interpret mode simulates every thread: keep it small
        grid_names=("sm",),
        num_threads=cfg.compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params() if interpret else None,
    )
    out = kernel(*args)
    if raw_output:
        return out
    if split > 1:   # every (split, row, column) was written once: add the partials, then the epilogue
        part = out[:, :m]                                                           # [split, M, nw * N] fp32
        permute_first = prepare_for is not None and not prepare_for.natural_k and n % 32 == 0
        if permute_first:   # permute each weight's columns here: XLA fuses it into the sum (one launch)
            part = nvfp4_decode.permute_k(part.reshape(split, m, nw, n)).reshape(split, m, nw * n)
        part = part.sum(axis=0)                                                     # [M, nw * N] fp32
        if epilogue == "swiglu":
            lim = float(swiglu_limit) if (swiglu_limit is not None and swiglu_limit > 0) else None
            part = _swiglu(part[:, :n], part[:, n:], lim)
        res = part.astype(out_dtype)
        if prepare_for is None:
            return res
        if permute_first:
            mp2 = padded_rows(m, prepare_for, interpret)
            return jnp.pad(res, ((0, mp2 - m), (0, 0)))
        return prepare_activation(res, m, prepare_for, interpret)
    if prepare_for is not None:
        return prepare_activation(out, m, prepare_for, interpret)
    return out if mp == m else out[:m]


def grouped_linear(x: jax.Array, w, group_sizes: jax.Array, *, out_dtype=None, config: Config | None = None,
                   one_row_items: bool | None = None, interpret: bool = False) -> jax.Array:
    """`reference.grouped_linear` for an NVFP4Tensor weight [E, N, K] (W4A16, or W4A4 with its input_scale)."""
    return grouped_matmul(x, w.packed, w.block_scale, w.global_scale, group_sizes, input_scale=w.input_scale,
                          input_multiplier=w.input_multiplier, out_dtype=out_dtype, config=config,
                          one_row_items=one_row_items, interpret=interpret)


def reference(x: jax.Array, w, group_sizes: jax.Array, *, out_dtype=None) -> jax.Array:
    """What `grouped_linear` computes, from pallas_kernels/reference.py (fp32, dequantized weights)."""
    from pallas_kernels import reference as ref
    return ref.grouped_linear(x, w, group_sizes, out_dtype=out_dtype)


def _interpret_params():
    """GPU interpret mode (CPU). MEGAMOE_INTERPRET_LOG=1 logs every barrier wait (debugging a hang).

    Each simulated thread blocks in an XLA:CPU callback, so interpret mode needs XLA to run several
    computations at once: with a single host device on a 2-core machine it deadlocks; tests/conftest.py's 8
    host devices (--xla_force_host_platform_device_count=8) are enough.
    """
    if os.environ.get("MEGAMOE_INTERPRET_LOG"):
        from jax._src.pallas.mosaic.interpret.params import LoggingMode
        return plgpu.InterpretGPUParams(logging_mode=LoggingMode.BARRIER)
    return plgpu.InterpretGPUParams()
