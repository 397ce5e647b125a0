"""GPU: the NVFP4 grouped-matmul kernel against pallas_kernels/reference.py on fresh random data.

Error bound (both modes): products are exact (e2m1 x E4M3 fits bf16), sums are fp32 in another order, the output
is rounded to bf16 once:  |out - ref| <= 2^-8 |ref| + 1e-5 * (|x| @ |W|^T)  elementwise, and no NaN anywhere.
Every output element is checked written: a NaN buffer of the output's size is freed just before each call, so
the allocator hands that memory to the kernel's output, and any element the kernel skipped stays NaN.
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
    w = jax.random.normal(k1, (e, n, k), jnp.float32) * jnp.exp(jax.random.uniform(k2, (e, n, 1), minval=-3, maxval=3))
    t = nvfp4.quantize(w, batch_dims=2 if per_row else 1)
    if input_scale is not None:
        t = nvfp4.NVFP4Tensor(t.packed, t.block_scale, t.global_scale, jnp.asarray(input_scale, jnp.float32))
    return t


def _poison(shape, dtype):
    buf = jnp.full(shape, jnp.nan, dtype)
    buf.block_until_ready()
    buf.delete()


def _check(out, x, w, gs):
    ref = np.asarray(gm.reference(x, w, gs, out_dtype=jnp.float32))
    xa = x if w.input_scale is None else reference._grouped_prepare(
        x, w, jnp.minimum(jnp.searchsorted(jnp.cumsum(gs), jnp.arange(x.shape[0]), side="right"), gs.shape[0] - 1))
    mag = np.asarray(reference.grouped_linear(jnp.abs(xa.astype(jnp.float32)),
                                              _abs_weight(w), gs, out_dtype=jnp.float32))
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all(), f"{(~np.isfinite(out)).sum()} non-finite (unwritten?) elements"
    bound = 2.0 ** -8 * np.abs(ref) + 1e-5 * mag + 1e-30
    bad = np.abs(out - ref) > bound
    assert not bad.any(), (f"{bad.sum()} of {bad.size} elements out of bound; worst rel "
                           f"{(np.abs(out - ref) / (np.abs(ref) + 1e-30)).max():.3e}")


def _abs_weight(w):
    return jnp.abs(w.dequantize(jnp.float32))


CASES = [
    # m, group sizes, (E, N, K), config
    (1, [0, 1, 0, 0], (4, 128, 256), gm.Config(tile_m=8, num_stages=1)),
    (45, [7, 0, 1, 30, 0, 2, 0, 0], (8, 256, 512), gm.Config(tile_m=16, num_stages=2)),
    (300, [0, 130, 1, 9, 0, 64, 77, 19], (8, 256, 1024), gm.Config(tile_m=64, num_stages=3)),
    (700, [255, 1, 0, 300, 100, 0, 0, 20], (8, 384, 1024), gm.Config(tile_m=128, num_stages=2)),
    (50, [3, 0, 40, 1], (4, 128, 512), gm.Config(tile_m=32, num_stages=2)),    # 6 tail rows (sum 44 < 50)
    (45, [7, 0, 1, 30, 0, 2, 0, 0], (8, 256, 512), gm.Config(tile_m=16, num_stages=2, natural_k=True)),
    (700, [255, 1, 0, 300, 100, 0, 0, 20], (8, 384, 1024), gm.Config(tile_m=128, num_stages=2, natural_k=True)),
    # K split into fp32 partials (4 units of one step / 2 units of 2 steps, the latter two steps per wait)
    (1, [0, 1, 0, 0], (4, 128, 1024), gm.Config(tile_m=8, num_stages=2, split_k=4)),
    (45, [7, 0, 1, 30, 0, 2, 0, 0], (8, 256, 1024), gm.Config(tile_m=16, num_stages=3, split_k=2, k_unroll=2)),
    (50, [3, 0, 40, 1], (4, 128, 512), gm.Config(tile_m=32, num_stages=2, k_unroll=2)),
]


# Four compute warpgroups (two per 64 weight rows, one per K half, summed through SMEM before the epilogue)
CASES_FOUR_WGS = [
    (1, [0, 1, 0, 0], (4, 128, 256), gm.Config(tile_m=8, num_stages=1, compute_wgs=4)),
    (45, [7, 0, 1, 30, 0, 2, 0, 0], (8, 256, 512), gm.Config(tile_m=16, num_stages=3, compute_wgs=4)),
    (50, [3, 0, 40, 1], (4, 128, 1024), gm.Config(tile_m=32, num_stages=4, k_unroll=2, compute_wgs=4)),
    (300, [0, 130, 1, 9, 0, 64, 77, 19], (8, 256, 1024), gm.Config(tile_m=64, num_stages=3, compute_wgs=4)),
    (45, [7, 0, 1, 30, 0, 2, 0, 0], (8, 256, 1024), gm.Config(tile_m=16, num_stages=3, split_k=2, k_unroll=2,
                                                               compute_wgs=4)),
]


@pytest.mark.parametrize("m,sizes,shape,cfg", CASES_FOUR_WGS)
@pytest.mark.parametrize("mode", ["w4a16", "w4a16_per_row", "w4a4"])
def test_grouped_four_compute_wgs_matches_reference(m, sizes, shape, cfg, mode):
    test_grouped_matches_reference(m, sizes, shape, cfg, mode)


@pytest.mark.parametrize("m,sizes,shape,cfg", CASES)
@pytest.mark.parametrize("mode", ["w4a16", "w4a16_per_row", "w4a4"])
def test_grouped_matches_reference(m, sizes, shape, cfg, mode):
    e, n, k = shape
    key = jax.random.PRNGKey(m * 7 + len(mode))
    kx, kw, ks = jax.random.split(key, 3)
    ga = jax.random.uniform(ks, (e,), minval=0.01, maxval=0.1) if mode == "w4a4" else None
    w = _weight(kw, e, n, k, per_row=mode == "w4a16_per_row", input_scale=ga)
    x = (jax.random.normal(kx, (m, k), jnp.float32) * 3).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    _poison((m, n), jnp.bfloat16)
    out = gm.grouped_linear(x, w, gs, config=cfg)
    _check(out, x, w, gs)


@pytest.mark.parametrize("natural_k", [False, True])
def test_decode_every_code_and_scale(natural_k):
    """One-hot activations read single weights back: all 16 codes x E4M3 scales 2^-9 .. 448 come out exact."""
    e, n, k = 1, 128, 256
    rng = np.random.default_rng(0)
    packed = jnp.asarray(rng.integers(0, 256, (e, n, k // 2), dtype=np.uint8))
    scale_bytes = rng.integers(1, 0x7F, (e, n, k // 16), dtype=np.uint8)       # every finite non-zero E4M3
    scale = jax.lax.bitcast_convert_type(jnp.asarray(scale_bytes), jnp.float8_e4m3fn)
    w = nvfp4.NVFP4Tensor(packed, scale, jnp.ones((e, 1), jnp.float32))
    x = jnp.eye(k, dtype=jnp.bfloat16)
    out = gm.grouped_linear(x, w, jnp.asarray([k], jnp.int32),
                            config=gm.Config(tile_m=64, num_stages=1, natural_k=natural_k)).astype(jnp.float32)
    # value * scale is exact in bf16, and so is the kernel's output of it (g = 1).
    expect = (nvfp4_decode.decode_jnp(packed, scale, nvfp4_decode.EXACT)[0].astype(jnp.float32)).T
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expect))


def test_flash_shape_decode_rows():
    """V4-Flash gate/up shape (256 experts, N=4096, K=4096) at a decode load, checked on a sample of rows."""
    e, n, k, t = 256, 4096, 4096, 64
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.full(e, 0.3))
    idx = np.argsort(-(np.log(p) - np.log(-np.log(rng.random((t, e))))), axis=1)[:, :6]
    gs = jnp.asarray(np.bincount(idx.reshape(-1), minlength=e).astype(np.int32))
    parts = [nvfp4.quantize(jax.random.normal(jax.random.PRNGKey(3 + i), (16, n, k), jnp.bfloat16), batch_dims=1)
             for i in range(e // 16)]
    w = nvfp4.NVFP4Tensor(jnp.concatenate([q.packed for q in parts]), jnp.concatenate([q.block_scale for q in parts]),
                          jnp.concatenate([q.global_scale for q in parts]))
    x = jax.random.normal(jax.random.PRNGKey(4), (t * 6, k), jnp.float32).astype(jnp.bfloat16)
    _poison((t * 6, n), jnp.bfloat16)
    out = np.asarray(gm.grouped_linear(x, w, gs).astype(jnp.float32))
    assert np.isfinite(out).all()
    ends = np.cumsum(np.asarray(gs))
    for r in rng.choice(t * 6, 12, replace=False):
        g = int(np.searchsorted(ends, r, side="right"))
        wg = np.asarray(nvfp4.dequantize(nvfp4.NVFP4Tensor(w.packed[g], w.block_scale[g], w.global_scale[g]),
                                         jnp.float32))
        ref = wg @ np.asarray(x[r].astype(jnp.float32))
        mag = np.abs(wg) @ np.abs(np.asarray(x[r].astype(jnp.float32)))
        assert (np.abs(out[r] - ref) <= 2.0 ** -8 * np.abs(ref) + 1e-5 * mag).all(), f"row {r}"


# Config.paired_n (one weight streamed as two half-N weights): sorted rows, then one-row items built in-kernel
CASES_PAIRED = [
    (1, [0, 1, 0, 0], (4, 256, 1024), gm.Config(tile_m=8, num_stages=2, split_k=2, paired_n=True)),
    (6, [1, 0, 2, 1, 0, 1, 1, 0], (8, 512, 2048), gm.Config(tile_m=8, num_stages=4, split_k=4, compute_wgs=4,
                                                             paired_n=True)),
    (45, [7, 0, 1, 30, 0, 2, 0, 0], (8, 256, 1024), gm.Config(tile_m=16, num_stages=3, split_k=2, compute_wgs=4,
                                                               paired_n=True)),
]


@pytest.mark.parametrize("m,sizes,shape,cfg", CASES_PAIRED)
@pytest.mark.parametrize("mode", ["w4a16", "w4a16_per_row", "w4a4"])
def test_grouped_paired_n_matches_reference(m, sizes, shape, cfg, mode):
    test_grouped_matches_reference(m, sizes, shape, cfg, mode)


@pytest.mark.parametrize("per_row", [False, True])
def test_paired_n_rows_mode_gather_matches_reference(per_row):
    """paired_n with one-row items and the x-loader's in-kernel gather (the grouped call at one token's size)."""
    e, n, k = 16, 512, 2048
    sizes = [0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0]
    w = _weight(jax.random.PRNGKey(21), e, n, k, per_row=per_row)
    x = (jax.random.normal(jax.random.PRNGKey(22), (6, k), jnp.float32) * 3).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    row_group = jnp.asarray(np.repeat(np.arange(e), sizes), jnp.int32)
    rs = gm.epilogue_row_scale(w.global_scale, e, n)
    cfg = gm.Config(tile_m=8, num_stages=4, split_k=4, compute_wgs=4, paired_n=True)
    _poison((6, n), jnp.bfloat16)
    out = jax.jit(lambda x, rg: gm._launch(x, [w.packed], [w.block_scale], [rs], None, jnp.dtype(jnp.bfloat16), cfg,
                                           "linear", None, False, row_group=rg, m=6, x_source="gather"))(x, row_group)
    _check(out, x, w, gs)


# One-row items from group sizes (`grouped_matmul`'s automatic choice for <= 16 rows over >= as many groups): each
# row's group from ONE_ROW_TABLE (built in shared memory, computed by XLA, or searched by every thread), the
# x-loader warp reads the row itself; empty groups, a group of several rows (each row streams it), rows past the
# sizes' sum (zero tail), one N tile (unpaired), per-row global scales, 300 groups with a size past M.
CASES_ONE_ROW = [
    (6, [0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0], (16, 512, 2048)),
    (7, [3, 0, 1, 1], (4, 256, 1024)),                  # 2 tail rows
    (16, "distinct", (32, 1024, 4096)),
    (5, [0, 2, 0, 3, 0], (5, 128, 1024)),               # one 128-row N tile: not paired
    (3, [0, 0, 0], (3, 256, 512)),                      # every row in the zero tail
    (9, "skewed300", (300, 256, 512)),                  # 300 groups (lanes of 10, the last lanes short), a size
]                                                       # past M


@pytest.mark.parametrize("m,sizes,shape", CASES_ONE_ROW)
@pytest.mark.parametrize("mode", ["w4a16", "w4a16_per_row"])
@pytest.mark.parametrize("table", ["search", "xla", "smem"])
def test_one_row_items_match_reference(m, sizes, shape, mode, table, monkeypatch):
    monkeypatch.setattr(gm, "ONE_ROW_TABLE", table)     # read at trace time: the rows' groups in-kernel or by XLA
    e, n, k = shape
    if isinstance(sizes, str) and sizes == "distinct":
        sizes = np.zeros(e, np.int32)
        sizes[np.random.default_rng(m).choice(e, m, replace=False)] = 1
    if isinstance(sizes, str) and sizes == "skewed300":
        sizes = np.zeros(e, np.int32)
        sizes[[3, 41, 290, 299]] = [2, 4, 1, 20]      # rows 0-1, 2-5, 6, then 7-8 in the last group
    assert gm.use_one_row_items(m, e, False) == (e >= m)
    kx, kw = jax.random.split(jax.random.PRNGKey(50 + m))
    w = _weight(kw, e, n, k, per_row=mode == "w4a16_per_row")
    x = (jax.random.normal(kx, (m, k), jnp.float32) * 3).astype(jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    cfg = gm.one_row_items_config(m, n, k)
    _poison((cfg.split_k, gm.padded_rows(m, cfg), n), jnp.float32)
    _poison((m, n), jnp.bfloat16)
    out = jax.jit(lambda x, gs: gm.grouped_linear(x, w, gs, one_row_items=True))(x, gs)
    _check(out, x, w, gs)
    tail = int(min(int(np.sum(sizes)), m))
    assert not np.asarray(out[tail:].astype(jnp.float32)).any()
