"""Expert-parallel MoE (pallas_kernels/ep_moe.py) against the single-device reference on 8 simulated CPUs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ep_moe, reference

AUTO = (jax.sharding.AxisType.Auto,) * 3
# The single-device contract, jitted once per shape (eager op-by-op W4A4 emulation is slow on CPU).
_reference = jax.jit(reference.moe_experts, static_argnums=(6,))


def mesh(data, expert, tensor):
    devs = np.array(jax.devices()[: data * expert * tensor]).reshape(data, expert, tensor)
    return jax.sharding.Mesh(devs, ("data", "expert", "tensor"), axis_types=AUTO)


def _experts(rng, e, i, d, dtype=jnp.float32):
    def w(*s):
        return jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-1]), dtype)
    return w(e, i, d), w(e, i, d), w(e, d, i)


def _routing(rng, t, e, k, allowed=None):
    pool = np.arange(e) if allowed is None else np.asarray(allowed)
    idx = np.stack([rng.choice(pool, k, replace=False) for _ in range(t)]).astype(np.int32)
    wt = rng.random((t, k)).astype(np.float32)
    return jnp.asarray(idx), jnp.asarray(wt / wt.sum(-1, keepdims=True) * 1.5)


def _run(m, x, w1, w3, w2, idx, wt, limit, **kw):
    fn = jax.jit(lambda *a: ep_moe.moe_experts_ep(*a, limit, mesh=m, **kw))
    return fn(x, w1, w3, w2, idx, wt)


# (data, expert, tensor): expert sizes 1, 2, 4, 8, with data and tensor parallel mixed in.
MESHES = [(1, 1, 2), (1, 2, 1), (1, 4, 2), (1, 8, 1), (2, 4, 1), (1, 2, 4)]


@pytest.mark.parametrize("shape", MESHES)
def test_ep_matches_reference_uneven_loads(shape):
    # 13 tokens (not a multiple of any mesh size), 16 experts, top-3, loads skewed onto experts of the first
    # two ranks at ep=8 and expert 15 never chosen: ranks with no rows, experts with no rows, ragged groups.
    rng = np.random.default_rng(sum(shape))
    t, d, i, e, k = 13, 32, 48, 16, 3
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    w1, w3, w2 = _experts(rng, e, i, d)
    idx, wt = _routing(rng, t, e, k, allowed=[0, 1, 2, 3, 7, 9])
    ref = _reference(x, w1, w3, w2, idx, wt, 1.5)       # limit 1.5 so both clamps are active
    out = _run(mesh(*shape), x, w1, w3, w2, idx, wt, 1.5)
    assert out.shape == (t, d) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(ref))) > 0.1   # a non-trivial result


@pytest.mark.parametrize("exchange", ["dense", "ragged"])
def test_all_tokens_to_one_expert_and_single_token(exchange):
    if exchange == "ragged" and jax.devices()[0].platform == "cpu":
        pytest.skip("XLA:CPU has no ragged-all-to-all (the GPU test covers it)")
    # worst case for buffer sizing: every token of every rank routed to experts of rank 0.
    rng = np.random.default_rng(7)
    m = mesh(1, 8, 1)
    t, d, i, e, k = 17, 16, 32, 16, 2
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    w1, w3, w2 = _experts(rng, e, i, d)
    idx = jnp.asarray(np.tile([[1, 0]], (t, 1)), jnp.int32)
    wt = jnp.asarray(rng.random((t, k)), jnp.float32)
    ref = _reference(x, w1, w3, w2, idx, wt, None)
    np.testing.assert_allclose(np.asarray(_run(m, x, w1, w3, w2, idx, wt, None, exchange=exchange)),
                               np.asarray(ref), rtol=1e-5, atol=1e-5)
    # decode-like: one token on an 8-way expert mesh (7 padding tokens that must not count).
    np.testing.assert_allclose(np.asarray(_run(m, x[:1], w1, w3, w2, idx[:1] + 6, wt[:1], 10.0)),
                               np.asarray(_reference(x[:1], w1, w3, w2, idx[:1] + 6, wt[:1], 10.0)),
                               rtol=1e-5, atol=1e-5)


def test_bf16_activations_and_bf16_combine():
    rng = np.random.default_rng(3)
    m = mesh(1, 4, 2)
    t, d, i, e, k = 24, 64, 32, 8, 4
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
    w1, w3, w2 = _experts(rng, e, i, d, jnp.bfloat16)
    idx, wt = _routing(rng, t, e, k)
    ref = _reference(x, w1, w3, w2, idx, wt, 10.0)
    out = _run(m, x, w1, w3, w2, idx, wt, 10.0)
    assert out.dtype == jnp.bfloat16
    # fp32 combine: only summation order differs -> within one bf16 ulp of the reference.
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=8e-3, atol=8e-3)
    out16 = _run(m, x, w1, w3, w2, idx, wt, 10.0, combine_dtype=jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(ref, np.float32), rtol=3e-2, atol=3e-2)


def test_weight_specs_blocks_and_errors():
    m = mesh(1, 4, 2)
    w = jnp.zeros((8, 64, 32))
    specs, split = ep_moe.expert_weight_specs(w, w, jnp.zeros((8, 32, 64)), m)
    assert split and specs[0] == [jax.sharding.PartitionSpec("expert", "tensor", None)]
    assert specs[2] == [jax.sharding.PartitionSpec("expert", None, "tensor")]
    # hidden dim 24 does not split over tensor=2 at a 16-block boundary -> experts replicated over tensor.
    assert ep_moe.dim_splits(24, [12, 2], 2) is False and ep_moe.dim_splits(64, [32, 4], 2) is True
    with pytest.raises(ValueError, match="routed experts do not split"):
        ep_moe.expert_weight_specs(jnp.zeros((6, 8, 8)), jnp.zeros((6, 8, 8)), jnp.zeros((6, 8, 8)), m)
    with pytest.raises(ValueError, match="topk_idx"):
        ep_moe.moe_experts_ep(jnp.zeros((4, 8)), w[:, :, :8], w[:, :, :8], jnp.zeros((8, 8, 64)),
                              jnp.zeros((3, 2), jnp.int32), jnp.zeros((3, 2)), None, mesh=m)


def test_dispatch_uses_the_ambient_mesh():
    # dispatch.moe_experts (the model's entry point) goes expert-parallel under jax.set_mesh, and only there.
    from pallas_kernels import dispatch
    rng = np.random.default_rng(11)
    t, d, i, e, k = 9, 16, 16, 8, 2
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    w1, w3, w2 = _experts(rng, e, i, d)
    idx, wt = _routing(rng, t, e, k)
    fn = jax.jit(lambda *a: dispatch.moe_experts(*a, 10.0))
    ref = _reference(x, w1, w3, w2, idx, wt, 10.0)
    with jax.set_mesh(mesh(2, 4, 1)):
        hlo = fn.lower(x, w1, w3, w2, idx, wt).as_text()
        out = fn(x, w1, w3, w2, idx, wt)
    assert "all_to_all" in hlo or "all-to-all" in hlo
    assert "all_to_all" not in fn.lower(x, w1, w3, w2, idx, wt).as_text()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,w4a4", [((1, 4, 2), False), ((2, 2, 2), True)])
def test_nvfp4_experts_sharded_with_their_scales(shape, w4a4):
    # NVFP4 experts: codes, E4M3 block scales, per-expert global scales [E, 1] and (W4A4) per-expert input
    # scales [E] all split along E; the hidden dim I split over tensor at 16-element block boundaries.
    from megamoe_jax.quant import nvfp4
    rng = np.random.default_rng(5)
    t, d, i, e, k = 11, 32, 64, 8, 3
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    ws = _experts(rng, e, i, d)
    ins = jnp.asarray(rng.uniform(0.5, 2.0, (e,)) / 2688, jnp.float32) if w4a4 else None
    quantize = jax.jit(lambda w, s: nvfp4.quantize(w, batch_dims=1, input_scale=s))
    w1, w3, w2 = (quantize(w, ins) for w in ws)
    idx, wt = _routing(rng, t, e, k, allowed=[0, 2, 3, 4, 6])
    m = mesh(*shape)
    (s1, _, s2), split = ep_moe.expert_weight_specs(w1, w3, w2, m)
    P = jax.sharding.PartitionSpec
    tens = "tensor" if shape[2] > 1 else None
    assert split == (shape[2] > 1)
    assert s1[:3] == [P("expert", tens, None), P("expert", tens, None), P("expert", None)]
    assert s2[:3] == [P("expert", None, tens), P("expert", None, tens), P("expert", None)]
    if w4a4:
        assert s1[3] == P("expert")
    ref = _reference(x, w1, w3, w2, idx, wt, 10.0)
    out = _run(m, x, w1, w3, w2, idx, wt, 10.0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
