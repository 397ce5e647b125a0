"""CPU: the NVFP4 grouped-matmul kernel's work items (table and search), its decode math, and the kernel itself in
Mosaic GPU interpret mode (the real kernel body, simulated threads and barriers) against pallas_kernels/reference.py.

Bound used for kernel outputs (products exact, fp32 sums in another order, one bf16 rounding of the output):
    |out - ref| <= 2^-8 |ref| + 1e-5 (|x| @ |W|^T)
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from megamoe_jax.quant import nvfp4
from pallas_kernels import grouped_matmul as gm
from pallas_kernels import nvfp4_decode
from pallas_kernels import reference


def _weight(key, e, n, k, per_row=False, input_scale=None):
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, (e, n, k)) * jnp.exp(jax.random.uniform(k2, (e, n, 1), minval=-3, maxval=3))
    t = nvfp4.quantize(w, batch_dims=2 if per_row else 1)
    if input_scale is not None:
        t = nvfp4.NVFP4Tensor(t.packed, t.block_scale, t.global_scale, jnp.asarray(input_scale, jnp.float32))
    return t


def _assert_close(out, x, w, gs):
    ref = np.asarray(gm.reference(x, w, gs, out_dtype=jnp.float32))
    mag = np.asarray(reference.grouped_linear(jnp.abs(x.astype(jnp.float32)) * 1.01,
                                              jnp.abs(w.dequantize(jnp.float32)), gs, out_dtype=jnp.float32))
    out = np.asarray(out.astype(jnp.float32))
    assert out.shape == ref.shape
    assert np.isfinite(out).all()
    bad = np.abs(out - ref) > 2.0 ** -8 * np.abs(ref) + 1e-5 * mag
    assert not bad.any(), f"{bad.sum()} of {bad.size} elements out of bound"


@pytest.mark.parametrize("sizes,m,tile_m", [
    ([5, 0, 1, 14], 20, 8),
    ([9, 1, 0, 20, 0, 0, 3], 40, 16),          # tail rows [33, 40)
    ([0, 0, 0], 5, 8),                          # no group has rows: all zero tail
    ([300, 1, 0, 211], 512, 128),
    ([1] * 16, 16, 8),
    ([7, 9, 200, -3, 5], 64, 16),              # sizes past M (clamped) and a negative size (no rows)
    ("random", 1536, 32),                       # 256 groups, skewed: both rounds of the 17-way search
    ("random", 48, 16),
    ([2] * 5, 10, 8),                           # E + 1 = 6 segments: the binary search's steps run past E
])
@pytest.mark.parametrize("search", ["rway", "binary"])
def test_item_table_covers_every_row_once(sizes, m, tile_m, search):
    if sizes == "random":
        rng = np.random.default_rng(m)
        sizes = np.bincount(rng.choice(256, m, p=rng.dirichlet(np.full(256, 0.3))), minlength=256)
    sizes = np.asarray(sizes, np.int32)
    e = len(sizes)
    table = np.asarray(gm.item_table(jnp.asarray(sizes), m, tile_m))
    bound = gm.max_items(m, e, tile_m)
    load = lambda i: jnp.asarray(table)[i]     # noqa: E731
    its = jnp.arange(bound + 40, dtype=jnp.int32)
    f = {k: np.asarray(v) for k, v in jax.vmap(lambda i: gm.item_fields(i, load, m, e, tile_m, search))(its).items()}
    extent = int(gm.item_extent(load, m, e, tile_m))
    assert extent <= bound and not f["valid"][extent:].any()
    ends = np.minimum(np.cumsum(np.maximum(sizes, 0)), m)
    owner = np.full(m, -2)
    for it in np.flatnonzero(f["valid"]):
        g, start, off, size = f["group"][it], f["load_start"][it], f["offset"][it], f["size"][it]
        assert start % 8 == 0 and 0 <= off < 8 and off + size <= tile_m and size > 0, it
        for r in range(start + off, start + off + size):
            assert owner[r] == -2, f"row {r} covered twice"
            owner[r] = g
    expect = np.searchsorted(ends, np.arange(m), side="right")
    expect = np.where(expect < e, expect, -1)
    np.testing.assert_array_equal(owner, expect)
    # Slack item indices are few: at most one per group with rows.
    assert f["valid"][:extent].sum() >= extent - np.count_nonzero(np.diff(np.r_[0, ends]))


def test_decode_matches_dequantize_and_permutation():
    w = _weight(jax.random.PRNGKey(0), 2, 8, 64)
    dec = nvfp4_decode.decode_jnp(w.packed, w.block_scale, nvfp4_decode.SUBNORMAL).astype(jnp.float32)
    ref = nvfp4.dequantize(nvfp4.NVFP4Tensor(w.packed, w.block_scale, jnp.ones((2, 1), jnp.float32)))
    np.testing.assert_array_equal(np.asarray(dec) * 2.0 ** 8, np.asarray(ref))
    p = nvfp4_decode.k_permutation(256)
    np.testing.assert_array_equal(np.sort(p), np.arange(256))
    c = np.arange(256)                  # operand column 32t + 8j + 2q + b holds weight column 32t + 8q + 4b + j
    np.testing.assert_array_equal(p, 32 * (c // 32) + 8 * ((c // 2) % 4) + 4 * (c % 2) + (c // 8) % 4)
    a = jnp.arange(3 * 256).reshape(3, 256)
    np.testing.assert_array_equal(np.asarray(nvfp4_decode.permute_k(a)), np.asarray(a)[:, p])
    # The XLA form over uint32 pairs: the same columns, bit for bit (NaN payloads and -0 included).
    bits = jax.random.bits(jax.random.PRNGKey(1), (5, 512), jnp.uint16)
    x = jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
    got = jax.jit(nvfp4_decode.permute_activation)(x)
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(got, jnp.uint16)),
                                  np.asarray(bits)[:, nvfp4_decode.k_permutation(512)])


CASES = [
    # m, group sizes, (E, N, K), config, mode
    (20, [5, 0, 1, 14], (4, 128, 256), gm.Config(tile_m=8, num_stages=1), "w4a16"),
    (37, [9, 1, 0, 20], (4, 256, 512), gm.Config(tile_m=16, num_stages=2), "per_row"),   # 7 zero tail rows
    (24, [0, 17, 1, 6], (4, 128, 256), gm.Config(tile_m=16, num_stages=1, natural_k=True), "w4a4"),
    # two K steps per loop iteration over 3 pipeline slots: the slot pairs wrap (0 1, 2 0, 1 2, ...)
    (13, [6, 0, 7], (3, 128, 1536), gm.Config(tile_m=8, num_stages=3, k_unroll=2), "per_row"),
    # K split over 3 units per tile (fp32 partials added in XLA), each unit 2 steps, unrolled; 3 zero tail rows
    (16, [1, 0, 12], (3, 256, 1536), gm.Config(tile_m=8, num_stages=2, k_unroll=2, split_k=3), "w4a4"),
    # four compute warpgroups (two per 64 rows, one per K half, summed through SMEM), over several units per SM
    # (the pair's ready/free barriers wrap), with unrolled steps, and with fp32 partials of a K split
    (29, [3, 0, 17, 9], (4, 256, 512), gm.Config(tile_m=8, num_stages=2, compute_wgs=4), "per_row"),
    (13, [6, 0, 7], (3, 128, 1024), gm.Config(tile_m=16, num_stages=2, k_unroll=2, compute_wgs=4), "w4a4"),
    (9, [0, 9, 0], (3, 256, 1024), gm.Config(tile_m=8, num_stages=2, split_k=2, compute_wgs=4), "w4a16"),
]


@pytest.mark.parametrize("m,sizes,shape,cfg,mode", CASES)
def test_kernel_interpret_matches_reference(m, sizes, shape, cfg, mode):
    e, n, k = shape
    kx, kw, ks = jax.random.split(jax.random.PRNGKey(m), 3)
    ga = jax.random.uniform(ks, (e,), minval=0.01, maxval=0.1) if mode == "w4a4" else None
    w = _weight(kw, e, n, k, per_row=mode == "per_row", input_scale=ga)
    x = (jax.random.normal(kx, (m, k)) * 3).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    out = gm.grouped_linear(x, w, gs, config=cfg, interpret=True)
    _assert_close(out, x, w, gs)


def test_bad_input_is_rejected_with_a_reason():
    w = _weight(jax.random.PRNGKey(1), 2, 128, 256)
    x = jnp.ones((4, 256), jnp.bfloat16)
    gs = jnp.asarray([2, 2], jnp.int32)
    with pytest.raises(ValueError, match="x must be"):
        gm.grouped_linear(jnp.ones((4, 128), jnp.bfloat16), w, gs)
    with pytest.raises(ValueError, match="group_sizes"):
        gm.grouped_linear(x, w, jnp.asarray([4], jnp.int32))
    with pytest.raises(ValueError, match="block scales"):
        gm.grouped_matmul(x, w.packed, w.block_scale[:, :, :8], w.global_scale, gs)
    with pytest.raises(ValueError, match="not a multiple of 256"):
        small = _weight(jax.random.PRNGKey(2), 2, 128, 128)
        gm.grouped_linear(jnp.ones((4, 128), jnp.bfloat16), small, gs)
    assert gm.supported(8, 4096, 4096) is None and "N=96" in gm.supported(8, 96, 256)


def test_fp32_output_request_is_served_in_interpret_mode():
    """An fp32 output (the EP MoE, a quantized compressor or gate) used to fail to build: the kernel's output
    tile holds 16-bit types only. It now returns the bf16-rounded result widened, inside the stated bound."""
    e, n, k = 2, 128, 256
    w = _weight(jax.random.PRNGKey(4), e, n, k)
    x = (jax.random.normal(jax.random.PRNGKey(5), (9, k)) * 3).astype(jnp.bfloat16)
    gs = jnp.asarray([4, 5], jnp.int32)
    out = gm.grouped_linear(x, w, gs, out_dtype=jnp.float32, config=gm.Config(tile_m=8, num_stages=1),
                            interpret=True)
    assert out.dtype == jnp.float32
    _assert_close(out, x, w, gs)


def test_timing_ablations_are_checked_and_never_reach_interpret_mode(monkeypatch):
    """grouped_matmul.ABLATE (timing diagnostics that skip the decode or the stores) rejects unknown names, and
    interpret mode ignores it: the CPU path stays exact even if a benchmark left it set."""
    e, n, k = 2, 128, 256
    w = _weight(jax.random.PRNGKey(6), e, n, k)
    x = (jax.random.normal(jax.random.PRNGKey(7), (5, k)) * 3).astype(jnp.bfloat16)
    gs = jnp.asarray([2, 3], jnp.int32)
    monkeypatch.setattr(gm, "ABLATE", frozenset({"decdoe"}))
    with pytest.raises(ValueError, match="unknown ablations"):
        gm.grouped_linear(x, w, gs, config=gm.Config(tile_m=8, num_stages=1), interpret=True)
    monkeypatch.setattr(gm, "ABLATE", frozenset({"decode", "store"}))
    out = gm.grouped_linear(x, w, gs, config=gm.Config(tile_m=8, num_stages=1), interpret=True)
    _assert_close(out, x, w, gs)


def test_split_k_policy_balances_decode_sizes():
    """The modelled busiest-SM time picks a K split only where the units leave SMs idle or unevenly loaded."""
    assert gm.balanced_split_k(96, 16, 132) == 4       # one token's gate/up: 96 units -> 384 (3 waves)
    assert gm.balanced_split_k(192, 8, 132) == 2       # its down projection: 2 uneven waves -> 3 even ones
    assert gm.balanced_split_k(768, 16, 132) == 1      # 8 tokens: already ~6 even waves
    assert gm.balanced_split_k(5, 2, 132) == 1         # 2 K steps: halves of one step are not allowed
    cfg = gm.default_config(6, 6, num_weights=2, n=2048, k=4096)
    assert (cfg.split_k, cfg.tile_m, cfg.k_unroll, cfg.compute_wgs) == (4, 16, 1, 2)
    cfg = gm.default_config(6, 6, n=4096, k=2048)
    assert (cfg.split_k, cfg.k_unroll, cfg.compute_wgs) == (2, 2, 4)
    cfg = gm.default_config(1536, 256, n=4096, k=4096)      # T = 256: 6 rows per group, 32-row tiles
    assert (cfg.tile_m, cfg.compute_wgs, cfg.split_k) == (32, 2, 1)
    assert gm.default_config(384, 256, n=4096, k=4096).tile_m == 16
    assert gm.default_config(8, 1, n=4096, k=4096).tile_m == 16              # a dense linear at batch 8
    cfg = gm.default_config(6, 256, n=4096, k=4096)                          # one token's rows, sorted: 8-row tiles
    assert (cfg.tile_m, cfg.num_stages, cfg.k_unroll, cfg.compute_wgs, cfg.split_k) == (8, 6, 2, 4, 2)
    assert gm.default_config(12, 256, n=4096, k=4096).tile_m == 16
    assert gm.default_config(1536, 256, num_weights=2, n=2048, k=4096).tile_m == 16
    cfg = gm.default_config(8192, 256, n=4096, k=4096)
    assert (cfg.split_k, cfg.compute_wgs, cfg.natural_k) == (1, 2, True)
    # Prefill (from 4096 rows): 128-row tiles for one weight from 32 rows per group on (2048 tokens: 48), 64 below
    # (m = 8192 here: 32 rows per group); 64 rows x 2 stages for two weights.
    assert (gm.default_config(12288, 256, n=4096, k=4096).tile_m, cfg.tile_m) == (128, 64)
    cfg = gm.default_config(12288, 256, num_weights=2, n=2048, k=4096)
    assert (cfg.tile_m, cfg.num_stages, cfg.natural_k) == (64, 2, True)
    with pytest.raises(ValueError, match="split_k"):
        gm.Config(split_k=0)
    with pytest.raises(ValueError, match="compute_wgs"):
        gm.Config(compute_wgs=3)
    with pytest.raises(ValueError, match="natural_k"):
        gm.Config(compute_wgs=4, natural_k=True)


@pytest.mark.parametrize("m,gather,cfg", [
    (6, True, gm.Config(tile_m=8)),                   # one decode token's rows: the fused bf16 form
    (6, False, gm.Config(tile_m=16)),                 # padded to the row tile
    (48, False, gm.Config(tile_m=16)),                # no padding, no gather: the uint32 form
    (200, True, gm.Config(tile_m=32)),                # above the fused-form limit: gather, then uint32 form
    (13, True, gm.Config(tile_m=64, natural_k=True)),  # natural K: gather and pad only
])
@pytest.mark.parametrize("interpret", [False, True])
def test_prepare_activation_pads_gathers_and_permutes(m, gather, cfg, interpret):
    k = 512
    x = jax.random.normal(jax.random.PRNGKey(m), (m + 3, k)).astype(jnp.bfloat16)
    rows = np.random.default_rng(m).integers(0, m + 3, m).astype(np.int32)
    got = np.asarray(jax.jit(lambda x, r: gm.prepare_activation(x, m, cfg, interpret, rows=r if gather else None))(
        x, jnp.asarray(rows)))
    src = np.asarray(x)[rows] if gather else np.asarray(x)[:m]
    mp = gm.padded_rows(m, cfg, interpret)
    want = np.zeros((mp, k), src.dtype)
    want[:m] = src if cfg.natural_k else src[:, nvfp4_decode.k_permutation(k)]
    assert got.shape == (mp, k) and mp % 8 == 0 and mp >= max(m, cfg.tile_m)
    np.testing.assert_array_equal(got, want)


def test_programmatic_dependent_launch_needs_rows_mode_and_is_inert_in_interpret_mode():
    """pdl_wait lets the weight loader read the weights and the row table before the previous kernel ends: sorted
    rows are refused (their item table is computed right before the kernel). In interpret mode the flags change
    nothing (griddepcontrol is GPU-only)."""
    e, n, k = 2, 128, 256
    w = _weight(jax.random.PRNGKey(8), e, n, k)
    x = (jax.random.normal(jax.random.PRNGKey(9), (5, k)) * 3).astype(jnp.bfloat16)
    gs = jnp.asarray([2, 3], jnp.int32)
    rs = gm.epilogue_row_scale(w.global_scale, e, n)
    cfg = gm.Config(tile_m=8, num_stages=1)
    args = (x, [w.packed], [w.block_scale], [rs])
    with pytest.raises(ValueError, match="pdl_wait needs rows mode"):
        gm._launch(*args, gs, jnp.dtype(jnp.bfloat16), cfg, "linear", None, True, pdl_wait=True)
    out = gm._launch(*args, None, jnp.dtype(jnp.bfloat16), cfg, "linear", None, True,
                     row_group=jnp.asarray([0, 0, 1, 1, 1], jnp.int32), pdl_wait=True, pdl_trigger=True)
    _assert_close(out, x, w, gs)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("rows_mode", [False, True])
def test_paired_n_streams_one_weight_as_two_halves(per_row, rows_mode):
    """Config.paired_n: each unit covers N tiles ni and N/2 + ni of one weight (the two-weight kernel's shape).
    Interpret mode against the reference, with an empty group, per-tensor and per-row global scales, sorted rows and
    one-row items; the shape and configuration errors name the constraint."""
    e, n, k = 3, 512, 1024
    w = _weight(jax.random.PRNGKey(10), e, n, k, per_row=per_row)
    x = (jax.random.normal(jax.random.PRNGKey(11), (7, k)) * 3).astype(jnp.bfloat16)
    gs = jnp.asarray([3, 0, 4], jnp.int32)
    cfg = gm.Config(tile_m=8, num_stages=2, split_k=2, paired_n=True)
    if rows_mode:
        rs = gm.epilogue_row_scale(w.global_scale, e, n)
        out = gm._launch(x, [w.packed], [w.block_scale], [rs], None, jnp.dtype(jnp.bfloat16), cfg, "linear", None,
                         True, row_group=jnp.asarray([0, 0, 0, 2, 2, 2, 2], jnp.int32))
    else:
        out = gm.grouped_linear(x, w, gs, config=cfg, interpret=True)
    _assert_close(out, x, w, gs)
    with pytest.raises(ValueError, match="split_k must be >= 2"):
        gm.Config(tile_m=8, paired_n=True)
    narrow = _weight(jax.random.PRNGKey(12), e, 128, k)
    with pytest.raises(ValueError, match="paired_n streams one weight"):
        gm.grouped_linear(x, narrow, gs, config=cfg, interpret=True)


@pytest.mark.parametrize("sizes,m", [
    ([0, 1, 0, 0, 1, 1, 0, 1, 1, 1], 6),         # one token's rows in distinct groups, empty groups between
    ([2, 0, 3, 1], 6),                           # a group with several rows (each row still its own item)
    ([0, 0, 1, 2], 7),                           # trailing rows past the sizes' sum: the zero tail (-1)
    ([0, 0, 0], 3),                              # no group has rows
    ([9, -2, 4], 5),                             # a size past M (clamped) and a negative size (no rows)
    ("random", 16),                              # 256 groups: both rounds of the 17-way search
])
def test_row_segment_finds_every_rows_group(sizes, m):
    """One-row items from sorted rows: each thread searches `row_start_table` for its row's group."""
    if sizes == "random":
        rng = np.random.default_rng(3)
        sizes = np.bincount(rng.choice(256, m - 2, replace=False), minlength=256)
    sizes = np.asarray(sizes, np.int32)
    e = len(sizes)
    table = gm.row_start_table(jnp.asarray(sizes), m)
    assert table.shape == (gm._table_width(e),)
    got = np.asarray(jax.vmap(lambda r: gm.row_segment(r, lambda i: table[i], e))(jnp.arange(m)))
    ends = np.minimum(np.cumsum(np.maximum(sizes, 0)), m)
    want = np.searchsorted(ends, np.arange(m), side="right")
    np.testing.assert_array_equal(got, np.where(want < e, want, -1))
    # The same groups computed by XLA (ONE_ROW_TABLE = "xla")
    np.testing.assert_array_equal(np.asarray(jax.jit(gm.row_groups_of_sizes, static_argnums=1)(
        jnp.asarray(sizes), m)), np.where(want < e, want, -1))


@pytest.mark.parametrize("m,sizes,shape,cfg,mode", [
    # paired N tiles with a 4-way K split, an empty group between rows, a group of 3 rows, a 1-row zero tail
    (7, [1, 0, 3, 2], (4, 512, 1024), gm.Config(tile_m=8, num_stages=2, split_k=4, compute_wgs=4, paired_n=True),
     "w4a16"),
    (5, [0, 2, 1, 0, 2], (5, 256, 512), gm.Config(tile_m=8, num_stages=2, split_k=2, compute_wgs=4,
                                                  paired_n=True), "per_row"),
    (4, [0, 0, 1], (3, 128, 512), gm.Config(tile_m=8, num_stages=2), "w4a16"),    # one N tile, no split; 3 tail
    (3, [0, 0, 0], (3, 128, 512), gm.Config(tile_m=8, num_stages=2, split_k=2), "w4a16"),   # all zero tail
])
@pytest.mark.parametrize("table", ["search", "xla", "smem"])     # smem: interpret mode takes the xla table
def test_one_row_items_from_group_sizes_match_reference(m, sizes, shape, cfg, mode, table, monkeypatch):
    monkeypatch.setattr(gm, "ONE_ROW_TABLE", table)
    e, n, k = shape
    kx, kw = jax.random.split(jax.random.PRNGKey(30 + m))
    w = _weight(kw, e, n, k, per_row=mode == "per_row")
    x = (jax.random.normal(kx, (m, k)) * 3).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    out = gm.grouped_linear(x, w, gs, config=cfg, one_row_items=True, interpret=True)
    _assert_close(out, x, w, gs)
    tail = int(np.minimum(np.cumsum(sizes), m)[-1])
    assert not np.asarray(out[tail:], np.float32).any()


def test_one_row_items_policy_and_config():
    """The automatic choice: W4A16 with at most 16 rows and at least as many groups (one or two decode tokens,
    a dense linear of one row); the config pairs 128-row N tiles and balances the SMs with a K split."""
    assert gm.use_one_row_items(6, 256, False) and gm.use_one_row_items(16, 256, False)
    assert gm.use_one_row_items(1, 1, False)                        # a dense linear at batch 1
    assert not gm.use_one_row_items(17, 256, False)                 # 3 tokens: sorted tiles
    assert not gm.use_one_row_items(8, 4, False)                    # rows would share groups
    assert not gm.use_one_row_items(6, 256, True)                   # W4A4 quantizes x in XLA first
    assert not gm.use_one_row_items(0, 256, False)
    cfg = gm.one_row_items_config(6, 4096, 4096)                    # T = 1 of V4-Flash's gate/up-sized weight
    assert (cfg.tile_m, cfg.compute_wgs, cfg.paired_n, cfg.split_k, cfg.num_stages) == (8, 4, True, 4, 4)
    assert gm.one_row_items_config(12, 4096, 4096).split_k == 2     # T = 2
    cfg = gm.one_row_items_config(6, 128, 4096)                     # one N tile: nothing to pair
    assert not cfg.paired_n
    assert not gm.one_row_items_config(6, 4096, 512).paired_n       # 2 K steps: no split for the pair
    e, n, k = 2, 256, 1024
    w = _weight(jax.random.PRNGKey(40), e, n, k)
    x = jnp.ones((2, k), jnp.bfloat16)
    with pytest.raises(ValueError, match="one_row_items takes group_sizes"):
        gm._launch(x, [w.packed], [w.block_scale], [gm.epilogue_row_scale(w.global_scale, e, n)], None,
                   jnp.dtype(jnp.bfloat16), gm.Config(tile_m=8), "linear", None, True, one_row_items=True)
