"""GPU: the fused MoE expert path and the dispatcher's kernel choice on Hopper, against reference.moe_experts.

Bound: h and y are rounded to bf16 once each (as the reference's bf16 intermediate), so
max |out - ref| <= 2^-6 max |ref|; no NaN; every output written (a NaN buffer is freed before each call)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from megamoe_jax.quant import nvfp4
from pallas_kernels import dispatch, fused_moe


def _experts(key, e, d, i, w4a4):
    ks = jax.random.split(key, 4)
    ga = jax.random.uniform(ks[3], (e,), minval=0.001, maxval=0.004) if w4a4 else None
    def q(k, shape, scale):
        t = nvfp4.quantize(jax.random.normal(k, shape) * scale, batch_dims=1)
        return nvfp4.NVFP4Tensor(t.packed, t.block_scale, t.global_scale, ga)
    return q(ks[0], (e, i, d), 0.05), q(ks[1], (e, i, d), 0.05), q(ks[2], (e, d, i), 0.05)


def _distinct_routing(seed, t, e, k):
    """[T, k] int32: each token's k distinct experts."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)


def _tokens(key_weights, key_x, t, k, d, scale=1.0):
    """Routing weights [T, k] (softmax) and bf16 tokens [T, D]."""
    tw = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(key_weights), (t, k)), -1)
    x = (scale * jax.random.normal(jax.random.PRNGKey(key_x), (t, d))).astype(jnp.bfloat16)
    return tw, x


def _poison(rows, d):
    """Free a NaN buffer of the output's size just before a call: the allocator hands that memory to the output,
    so an element the kernels skip stays NaN."""
    buf = jnp.full((rows, d), jnp.nan, jnp.bfloat16)
    buf.block_until_ready()
    buf.delete()


@pytest.mark.parametrize("t", [1, 37, 300, 1100])      # 1100: 4400 rows, the prefill configs (natural K)
@pytest.mark.parametrize("w4a4", [False, True])
def test_fused_moe_matches_reference(t, w4a4):
    e, d, i, k = 16, 1024, 512, 4
    w1, w3, w2 = _experts(jax.random.PRNGKey(t), e, d, i, w4a4)
    rng = np.random.default_rng(t)
    idx = jnp.asarray(np.argsort(rng.random((t, e)) * rng.dirichlet(np.full(e, 0.3)), axis=1)[:, -k:], jnp.int32)
    tw = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (t, k)), -1)
    x = jax.random.normal(jax.random.PRNGKey(2), (t, d)).astype(jnp.bfloat16)
    _poison(t, d)
    assert dispatch.kernels_enabled()
    out = np.asarray(dispatch.moe_experts(x, w1, w3, w2, idx, tw, 7.0).astype(jnp.float32))
    ref = np.asarray(fused_moe.reference(x, w1, w3, w2, idx, tw, 7.0, out_dtype=jnp.float32))
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 2.0 ** -6 * np.abs(ref).max()


@pytest.mark.parametrize("lead", [(3, 5), (1, 1)])     # (1, 1): batch-1 decode, one row over one group: one-row
def test_dense_nvfp4_linear_through_dispatch(lead):      # items, the row's group built in SMEM from [1]
    w = nvfp4.quantize(jax.random.normal(jax.random.PRNGKey(0), (512, 1024)))
    x = jax.random.normal(jax.random.PRNGKey(1), (*lead, 1024)).astype(jnp.bfloat16)
    out = np.asarray(dispatch.linear(x, w).astype(jnp.float32))
    hi = jax.lax.Precision.HIGHEST     # the GPU's default f32 matmul precision is not fp32
    ref = np.asarray(jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w.dequantize(jnp.float32), precision=hi))
    mag = np.asarray(jnp.einsum("...k,nk->...n", jnp.abs(x.astype(jnp.float32)), jnp.abs(w.dequantize()),
                                precision=hi))
    assert (np.abs(out - ref) <= 2.0 ** -8 * np.abs(ref) + 1e-5 * mag).all()


@pytest.mark.parametrize("t,rows_mode", [(1, False), (2, True), (4, True), (1, True)])
@pytest.mark.parametrize("w4a4", [False, True])
def test_fused_moe_row_items_and_sorted_agree(t, rows_mode, w4a4):
    """Unsorted one-row work items (the default for T*k <= 16) and sorted groups, at V4-Flash widths, with tokens
    sharing experts (each expert of token 0 reappears in later tokens)."""
    e, d, i, k = 32, 4096, 2048, 4
    w1, w3, w2 = _experts(jax.random.PRNGKey(10 + t), e, d, i, w4a4)
    rng = np.random.default_rng(t)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
    idx[1:, 0] = idx[0, 1]                                                   # shared experts across tokens
    idx = jnp.asarray(idx, jnp.int32)
    tw = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(3), (t, k)), -1)
    x = jax.random.normal(jax.random.PRNGKey(4), (t, d)).astype(jnp.bfloat16)
    _poison(t * k, d)
    out = np.asarray(jax.jit(lambda *a: fused_moe.moe_experts(*a, 7.0, rows_mode=rows_mode))(
        x, w1, w3, w2, idx, tw).astype(jnp.float32))
    ref = np.asarray(fused_moe.reference(x, w1, w3, w2, idx, tw, 7.0, out_dtype=jnp.float32))
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 2.0 ** -6 * np.abs(ref).max()


@pytest.mark.parametrize("t", [1, 37])
def test_fused_moe_pipelined_k_loop_on_gpu(t):
    """Config.overlap_mma (the SwiGLU kernel decodes each K-half tile while the previous tile's wgmma runs) at
    V4-Flash widths: same bound as the default loop."""
    from pallas_kernels import grouped_matmul as gm
    e, d, i, k = 32, 4096, 2048, 4
    w1, w3, w2 = _experts(jax.random.PRNGKey(20 + t), e, d, i, False)
    idx = _distinct_routing(t, t, e, k)
    tw, x = _tokens(5, 6, t, k, d)
    cfg = gm.Config(tile_m=8 if t == 1 else 16, num_stages=4, overlap_mma=True)
    out = np.asarray(jax.jit(lambda *a: fused_moe.moe_experts(*a, 7.0, config=cfg))(
        x, w1, w3, w2, idx, tw).astype(jnp.float32))
    ref = np.asarray(fused_moe.reference(x, w1, w3, w2, idx, tw, 7.0, out_dtype=jnp.float32))
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 2.0 ** -6 * np.abs(ref).max()


@pytest.mark.parametrize("t,rows_mode", [(1, True), (2, True), (37, False)])
def test_fused_moe_four_compute_warpgroups_on_gpu(t, rows_mode):
    """Config.compute_wgs = 4 (each 64-row slice decoded by two warpgroups, one per K half, summed through SMEM
    before SwiGLU / the row scale) at V4-Flash widths, with and without a K split: same bound."""
    from pallas_kernels import grouped_matmul as gm
    e, d, i, k = 32, 4096, 2048, 4
    w1, w3, w2 = _experts(jax.random.PRNGKey(30 + t), e, d, i, t == 2)
    idx = _distinct_routing(t, t, e, k)
    tw, x = _tokens(7, 8, t, k, d)
    cfg = gm.Config(tile_m=8 if rows_mode else 16, num_stages=3, split_k=2 if t < 37 else 1, compute_wgs=4)
    _poison(t * k, d)
    out = np.asarray(jax.jit(lambda *a: fused_moe.moe_experts(*a, 7.0, config=cfg, rows_mode=rows_mode))(
        x, w1, w3, w2, idx, tw).astype(jnp.float32))
    ref = np.asarray(fused_moe.reference(x, w1, w3, w2, idx, tw, 7.0, out_dtype=jnp.float32))
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 2.0 ** -6 * np.abs(ref).max()


@pytest.mark.parametrize("t", [1, 2])
def test_fused_moe_down_weight_prefetch_changes_no_bit(t):
    """The rows mode's L2 prefetch of the down weights (off by default) only asks L2 for bytes: the output is the
    same, bit for bit, as without it, and matches the reference (V4-Flash widths, 256 experts, top-6)."""
    e, d, i, k = 256, 4096, 2048, 6
    w1, w3, w2 = _experts(jax.random.PRNGKey(20 + t), e, d, i, False)
    idx = _distinct_routing(20 + t, t, e, k)
    tw, x = _tokens(5, 6, t, k, d)
    run = lambda pf: np.asarray(jax.jit(lambda *a: fused_moe.moe_experts(*a, 7.0, rows_mode=True,
                                                                           prefetch_down=pf))(
        x, w1, w3, w2, idx, tw).astype(jnp.float32))
    _poison(t * k, d)
    out = run(True)
    ref = np.asarray(fused_moe.reference(x, w1, w3, w2, idx, tw, 7.0, out_dtype=jnp.float32))
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 2.0 ** -6 * np.abs(ref).max()
    np.testing.assert_array_equal(out, run(False))


@pytest.mark.parametrize("t,split,limit", [(1, None, 7.0), (1, 1, 7.0), (2, 2, 1.0), (2, 4, None), (3, None, 1.0)])
def test_fused_moe_in_kernel_activations_on_gpu(t, split, limit, monkeypatch):
    """Rows mode with the x-loader warps building the activation tiles (fused_moe.IN_KERNEL_ACTIVATIONS): the
    gate/up kernel gathers and permutes x's rows itself, the down kernel sums gate/up's split-K partials and applies
    SwiGLU (split > 1) or reads its bf16 h (split 1). Against the reference, and against the XLA-prepared path,
    with clamps active (limit 1) and off (None)."""
    from pallas_kernels import grouped_matmul as gm
    e, d, i, k = 64, 4096, 2048, 6
    w1, w3, w2 = _experts(jax.random.PRNGKey(40 + t), e, d, i, False)
    idx = _distinct_routing(40 + t, t, e, k)
    tw, x = _tokens(9, 10, t, k, d, scale=3.0)
    cfg = None if split is None else gm.Config(tile_m=8, num_stages=4, split_k=split, compute_wgs=4)

    def run(in_kernel):     # the switch is read at trace time; monkeypatch restores it after the test
        monkeypatch.setattr(fused_moe, "IN_KERNEL_ACTIVATIONS", in_kernel)
        f = jax.jit(lambda *a: fused_moe.moe_experts(*a, limit, config=cfg, rows_mode=True))
        _poison(t * k, d)
        return np.asarray(f(x, w1, w3, w2, idx, tw).astype(jnp.float32))

    out, old = run(True), run(False)
    ref = np.asarray(fused_moe.reference(x, w1, w3, w2, idx, tw, limit, out_dtype=jnp.float32))
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 2.0 ** -6 * np.abs(ref).max()
    if split == 1:      # the same bf16 h either way (the gate/up epilogue's SwiGLU): bit for bit
        np.testing.assert_array_equal(out, old)
    else:               # ex2.approx against XLA's exp: close (bit for bit at T = 1 on an H200, 2026-12-04)
        assert np.abs(out - old).max() <= 2.0 ** -7 * np.abs(ref).max()


@pytest.mark.parametrize("t", [1, 2])
def test_fused_moe_pdl_matches_serial_launch_on_gpu(t, monkeypatch):
    """The down kernel launched early (fused_moe.PDL: programmatic dependent launch) gives the output of the serial
    launch bit for bit: its activation build and its stores wait for gate/up. Three layers in a row, each one's
    output the next one's input, with each layer's down weight computed inside the jit from the running x (the
    early weight loader reads it before it waits: moe_experts' barrier has it computed before gate/up starts).
    With the barrier removed this test still passed on an H200 (2026-12-04): XLA had scheduled the weight
    computation early anyway, so it checks the launch, not the barrier."""
    from megamoe_jax.quant.nvfp4 import NVFP4Tensor
    e, d, i, k = 64, 4096, 2048, 6
    w1, w3, w2 = _experts(jax.random.PRNGKey(50 + t), e, d, i, False)
    idx = _distinct_routing(50 + t, t, e, k)
    tw, x = _tokens(11, 12, t, k, d, scale=3.0)

    def layers(x, w1, w3, w2, idx, tw):
        for layer in range(3):
            # a fresh down weight per layer, from the running x: flips code bits (values stay finite)
            flip = (jnp.abs(x[0, layer]).astype(jnp.float32) > -1).astype(jnp.uint8) * jnp.uint8(0x11 * (layer + 1))
            w2l = NVFP4Tensor(w2.packed ^ flip, w2.block_scale, w2.global_scale)
            x = fused_moe.moe_experts(x, w1, w3, w2l, idx, tw, 7.0, rows_mode=True).astype(jnp.bfloat16)
        return x

    def run(pdl):
        monkeypatch.setattr(fused_moe, "PDL", pdl)
        _poison(t * k, d)
        return np.asarray(jax.jit(layers)(x, w1, w3, w2, idx, tw).astype(jnp.float32))

    early, serial = run(True), run(False)
    assert np.isfinite(early).all() and np.abs(early).max() > 0
    np.testing.assert_array_equal(early, serial)
