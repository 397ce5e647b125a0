"""CPU: the fused MoE expert path (two Mosaic GPU kernels in interpret mode + XLA glue) against
reference.moe_experts, and its shape checks. Outputs go through two bf16 roundings (h and y) like the reference's
own bf16 intermediate, so the bound is relative to the largest output: max |out - ref| <= 2^-6 max |ref|."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from megamoe_jax.quant import nvfp4
from pallas_kernels import fused_moe
from pallas_kernels import grouped_matmul as gm


def _experts(key, e, d, i, w4a4=False):
    ks = jax.random.split(key, 4)
    ga = jax.random.uniform(ks[3], (e,), minval=0.002, maxval=0.01) if w4a4 else None
    def q(k, shape, scale):
        t = nvfp4.quantize(jax.random.normal(k, shape) * scale, batch_dims=1)
        return nvfp4.NVFP4Tensor(t.packed, t.block_scale, t.global_scale, ga)
    return q(ks[0], (e, i, d), 1.0), q(ks[1], (e, i, d), 1.0), q(ks[2], (e, d, i), 0.1)


@pytest.mark.parametrize("w4a4,limit", [(False, 3.0), (True, None)])
def test_fused_moe_interpret_matches_reference(w4a4, limit):
    e, d, i, t, k = 4, 256, 256, 5, 2
    w1, w3, w2 = _experts(jax.random.PRNGKey(int(w4a4)), e, d, i, w4a4)
    x = jax.random.normal(jax.random.PRNGKey(7), (t, d)).astype(jnp.bfloat16)
    idx = jnp.array([[0, 2], [2, 3], [0, 3], [2, 0], [3, 2]], jnp.int32)      # expert 1 gets no tokens
    tw = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(8), (t, k)), -1)
    out = fused_moe.moe_experts(x, w1, w3, w2, idx, tw, limit, interpret=True,
                                config=gm.Config(tile_m=8, num_stages=1))
    ref = np.asarray(fused_moe.reference(x, w1, w3, w2, idx, tw, limit, out_dtype=jnp.float32))
    out = np.asarray(out.astype(jnp.float32))
    assert out.shape == (t, d) and np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 2.0 ** -6 * np.abs(ref).max()


def test_fused_moe_supported_reasons():
    w1, w3, w2 = _experts(jax.random.PRNGKey(0), 2, 256, 256)
    x = jnp.ones((3, 256), jnp.bfloat16)
    assert fused_moe.supported(x, w1, w3, w2) is None
    assert "w2" in fused_moe.supported(x, w1, w3, w2.dequantize())
    w3_wide, _, _ = _experts(jax.random.PRNGKey(1), 2, 256, 512)
    assert "disagree" in fused_moe.supported(x, w1, w3_wide, w2)
    assert "features" in fused_moe.supported(jnp.ones((3, 128), jnp.bfloat16), w1, w3, w2)
    with pytest.raises(ValueError, match="topk"):
        fused_moe.moe_experts(x, w1, w3, w2, jnp.zeros((3, 2), jnp.int32), jnp.ones((3, 1)), None)


@pytest.mark.parametrize("w4a4,t,k", [(False, 1, 3), (True, 1, 2), (False, 3, 2)])
def test_fused_moe_rows_mode_matches_reference(w4a4, t, k):
    """Unsorted one-row work items (decode): same result as the reference, also when tokens share an expert
    (t=3: expert 2 appears three times) and in W4A4 with per-expert input scales taken from each row's expert."""
    e, d, i = 4, 256, 256
    w1, w3, w2 = _experts(jax.random.PRNGKey(3 + int(w4a4)), e, d, i, w4a4)
    x = jax.random.normal(jax.random.PRNGKey(11), (t, d)).astype(jnp.bfloat16)
    idx = jnp.array([[3, 0, 2], [2, 1, 0], [0, 2, 3]][:t], jnp.int32)[:, :k]
    tw = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(12), (t, k)), -1)
    out = fused_moe.moe_experts(x, w1, w3, w2, idx, tw, 4.0, interpret=True, rows_mode=True,
                                config=gm.Config(tile_m=8, num_stages=1))
    ref = np.asarray(fused_moe.reference(x, w1, w3, w2, idx, tw, 4.0, out_dtype=jnp.float32))
    out = np.asarray(out.astype(jnp.float32))
    assert out.shape == (t, d) and np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 2.0 ** -6 * np.abs(ref).max()
    sorted_out = fused_moe.moe_experts(x, w1, w3, w2, idx, tw, 4.0, interpret=True, rows_mode=False,
                                       config=gm.Config(tile_m=8, num_stages=1))
    # Same per-row products and sums in both modes: only the order of the k-row combine could differ.
    np.testing.assert_allclose(out, np.asarray(sorted_out.astype(jnp.float32)), rtol=2 ** -7, atol=1e-6)


def test_fused_moe_pipelined_k_loop_matches_reference():
    """Config.overlap_mma (decode of each tile overlapping the previous tile's wgmma) in the two-weight SwiGLU
    kernel and the down kernel: 3 K steps each, 3 stages."""
    e, d, i, t, k = 3, 768, 768, 2, 2
    w1, w3, w2 = _experts(jax.random.PRNGKey(5), e, d, i)
    x = jax.random.normal(jax.random.PRNGKey(13), (t, d)).astype(jnp.bfloat16)
    idx = jnp.array([[2, 0], [0, 1]], jnp.int32)
    tw = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(14), (t, k)), -1)
    out = fused_moe.moe_experts(x, w1, w3, w2, idx, tw, 4.0, interpret=True, rows_mode=True,
                                config=gm.Config(tile_m=8, num_stages=3, overlap_mma=True))
    ref = np.asarray(fused_moe.reference(x, w1, w3, w2, idx, tw, 4.0, out_dtype=jnp.float32))
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 2.0 ** -6 * np.abs(ref).max()


def _assert_fused_interpret_matches(seed, d, i, idx, rows_mode, cfg):
    """Interpret-mode moe_experts with a frozen config against the reference (3 experts, random data)."""
    idx = jnp.asarray(idx, jnp.int32)
    t, k = idx.shape
    w1, w3, w2 = _experts(jax.random.PRNGKey(seed), 3, d, i)
    x = jax.random.normal(jax.random.PRNGKey(seed + 10), (t, d)).astype(jnp.bfloat16)
    tw = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(seed + 11), (t, k)), -1)
    out = fused_moe.moe_experts(x, w1, w3, w2, idx, tw, 3.0, interpret=True, rows_mode=rows_mode, config=cfg)
    ref = np.asarray(fused_moe.reference(x, w1, w3, w2, idx, tw, 3.0, out_dtype=jnp.float32))
    out = np.asarray(out.astype(jnp.float32))
    assert out.shape == (t, d) and np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 2.0 ** -6 * np.abs(ref).max()


@pytest.mark.parametrize("rows_mode", [True, False])
def test_fused_moe_four_compute_warpgroups_matches_reference(rows_mode):
    """Config.compute_wgs=4: both weights' K halves decoded by separate warpgroups, summed through SMEM before
    SwiGLU (gate/up) and before the row scale (down)."""
    _assert_fused_interpret_matches(7, 512, 768, [[2, 0], [0, 1], [1, 2]], rows_mode,
                                    gm.Config(tile_m=8, num_stages=2, compute_wgs=4))


@pytest.mark.parametrize("rows_mode", [True, False])
def test_fused_moe_split_k_matches_reference(rows_mode):
    """Config.split_k: each (item, N tile) summed by 3 units over thirds of K; the gate/up kernel then writes fp32
    partial gate and up sums and SwiGLU runs after their sum, the down kernel's partials are added likewise."""
    # expert 1 unused; sorted mode has groups of 2
    _assert_fused_interpret_matches(6, 768, 768, [[2, 0], [0, 2]], rows_mode,
                                    gm.Config(tile_m=8, num_stages=1, split_k=3))


def test_decode_configs_of_the_two_kernels():
    """What the fused path picks at V4-Flash widths (RESULTS.md, session 7): one token's six row items get 8-row
    tiles, four compute warpgroups and a K split in both kernels; sorted rows (T = 8) keep two compute warpgroups
    in the two-weight kernel (four were 3-4% slower there with 16-row tiles) and four in the down kernel."""
    from pallas_kernels import grouped_matmul as gm
    up = fused_moe._rows_tile(gm.default_config(6, 6, num_weights=2, n=2048, k=4096), True)
    down = fused_moe._rows_tile(gm.default_config(6, 6, n=4096, k=2048), True)
    assert (up.tile_m, up.compute_wgs, up.split_k) == (8, 4, 4)
    assert (down.tile_m, down.compute_wgs, down.split_k, down.k_unroll) == (8, 4, 2, 2)
    up8 = fused_moe._rows_tile(gm.default_config(48, 256, num_weights=2, n=2048, k=4096), False)
    down8 = fused_moe._rows_tile(gm.default_config(48, 256, n=4096, k=2048), False)
    assert (up8.tile_m, up8.compute_wgs, down8.tile_m, down8.compute_wgs) == (16, 2, 16, 4)


def test_down_weight_l2_prefetch_sizing_and_rejections():
    """The rows mode's L2 prefetch of the down weights (issued on the GPU only): how many rows' experts fit the
    budget at V4-Flash's down shape (4.5 MB each with scales: 6 of one token, 7 of 32 MB), no prefetch where the
    rows do not split into whole 32-row requests, and a prefetch outside rows mode rejected with a reason."""
    assert gm.prefetch_rows_for((256, 4096, 1024), 6) == 6
    assert gm.prefetch_rows_for((256, 4096, 1024), 12) == 7
    assert gm.prefetch_rows_for((256, 4096, 1024), 12, budget_bytes=1 << 20) == 0
    assert gm.prefetch_rows_for((256, 4080, 1024), 6) == 0          # rows not in 32-row pieces
    assert gm.prefetch_rows_for((256, 4096, 120), 6) == 6           # 15-byte scale rows: 480-byte requests
    w1, w3, w2 = _experts(jax.random.PRNGKey(0), 2, 256, 256)
    xs = jnp.ones((2, 256), jnp.bfloat16)
    args = (xs, [w1.packed], [w1.block_scale], [jnp.ones((2, 1))], jnp.array([1, 1], jnp.int32),
            jnp.dtype(jnp.bfloat16), gm.Config(tile_m=8, num_stages=1), "linear", None, True)
    with pytest.raises(ValueError, match="rows mode"):
        gm._launch(*args, l2_prefetch=(w2.packed, w2.block_scale))
