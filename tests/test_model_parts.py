"""mHC and MoE against transformers' modules on random weights, plus the places where we follow DeepSeek's
reference ([R]) rather than transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from megamoe_jax.model import mhc
from megamoe_jax.model.moe import MoE
from tests.helpers_tiny import TINY_CONFIGS, make_hf_model, rel_err

CFG = TINY_CONFIGS["all_types"]


@pytest.fixture(scope="module")
def hf():
    return make_hf_model(CFG, seed=3)


def _np(t):
    return t.detach().float().numpy()


def _streams(b=2, t=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, t, CFG.hc_mult, CFG.hidden_size)).astype(np.float32) * 1.7


@pytest.mark.parametrize("site", ["attn_hc", "ffn_hc"])
def test_hc_pre_matches_transformers(hf, site):
    mod = getattr(hf.model.layers[2], site)
    x = _streams()
    with torch.no_grad():
        post_t, comb_t, y_t = mod(torch.from_numpy(x))
    y, post, comb = mhc.hc_pre(jnp.asarray(x), _np(mod.fn), _np(mod.scale), _np(mod.base), hc_mult=CFG.hc_mult,
                               iters=CFG.hc_sinkhorn_iters, rms_eps=CFG.rms_norm_eps, hc_eps=CFG.hc_eps)
    assert rel_err(y, _np(y_t)) < 1e-5
    assert rel_err(post, _np(post_t)) < 1e-5
    assert rel_err(comb, _np(comb_t)) < 1e-5
    # post = 2*sigmoid in (0, 2); comb ~ doubly stochastic after Sinkhorn
    assert float(jnp.max(post)) < 2 and float(jnp.min(post)) > 0
    np.testing.assert_allclose(np.sum(comb, -1), 1, atol=1e-3)
    np.testing.assert_allclose(np.sum(comb, -2), 1, atol=1e-3)
    assert float(jnp.max(jnp.abs(comb - jnp.swapaxes(comb, -1, -2)))) > 1e-2   # not symmetric: transpose matters


def test_hc_post_applies_comb_transposed(hf):
    rng = np.random.default_rng(1)
    x = _streams(seed=2)
    f = rng.normal(size=x.shape[:2] + (CFG.hidden_size,)).astype(np.float32)
    mod = hf.model.layers[0].attn_hc
    with torch.no_grad():
        post_t, comb_t, _ = mod(torch.from_numpy(x))
        # transformers DeepseekV4DecoderLayer: post * out + comb^T @ streams
        ref = post_t.unsqueeze(-1) * torch.from_numpy(f).unsqueeze(-2) + torch.matmul(
            comb_t.transpose(-1, -2), torch.from_numpy(x))
    out = mhc.hc_post(jnp.asarray(f), jnp.asarray(x), jnp.asarray(_np(post_t)), jnp.asarray(_np(comb_t)))
    assert rel_err(out, _np(ref)) < 1e-5
    wrong = mhc.hc_post(jnp.asarray(f), jnp.asarray(x), jnp.asarray(_np(post_t)),
                        jnp.swapaxes(jnp.asarray(_np(comb_t)), -1, -2))
    assert rel_err(wrong, _np(ref)) > 1e-3


def test_hc_head_matches_transformers(hf):
    x = _streams(seed=4)
    mod = hf.model.hc_head
    with torch.no_grad():
        ref = mod(torch.from_numpy(x))
    y = mhc.hc_head(jnp.asarray(x), _np(mod.hc_fn), _np(mod.hc_scale), _np(mod.hc_base),
                    rms_eps=CFG.rms_norm_eps, hc_eps=CFG.hc_eps)
    assert rel_err(y, _np(ref)) < 1e-5


def test_hc_post_bf16_rounds_once_like_reference():
    """[R] computes hc_post in fp32 and casts once; transformers casts post/comb to the stream dtype first.
    We follow [R]: in bf16 our result equals the fp32 math rounded once, not transformers' bf16 arithmetic."""
    rng = np.random.default_rng(5)
    x = _streams(1, 33, seed=6)
    f = rng.normal(size=(1, 33, CFG.hidden_size)).astype(np.float32)
    post = (2 / (1 + np.exp(-rng.normal(size=(1, 33, 4))))).astype(np.float32)
    comb = rng.dirichlet(np.ones(4), size=(1, 33, 4)).astype(np.float32)
    xb, fb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(f, jnp.bfloat16)
    ours = mhc.hc_post(fb, xb, jnp.asarray(post), jnp.asarray(comb))
    assert ours.dtype == jnp.bfloat16
    exact = mhc.hc_post(fb.astype(jnp.float32), xb.astype(jnp.float32), jnp.asarray(post), jnp.asarray(comb))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(exact.astype(jnp.bfloat16)))
    with torch.no_grad():
        tb = lambda a: torch.from_numpy(np.asarray(a, np.float32)).bfloat16()
        hf_style = tb(post).unsqueeze(-1) * tb(fb).unsqueeze(-2) + torch.matmul(tb(comb).transpose(-1, -2), tb(xb))
    assert np.any(np.asarray(ours, np.float32) != hf_style.float().numpy())


def _abstract_moe(cfg, layer):
    # eval_shape: no eager random init (each new shape costs a compile on CPU); every value is set below
    return nnx.eval_shape(lambda: MoE(cfg, layer, rngs=nnx.Rngs(0), param_dtype=jnp.float32))


_run_moe = nnx.jit(lambda moe, x, ids: moe(x, ids))
_run_gate = nnx.jit(lambda gate, x, ids: gate(x, ids))


def _our_moe(hf_block, layer):
    moe = _abstract_moe(CFG, layer)
    g = hf_block.gate
    moe.gate.weight.set_value(jnp.asarray(_np(g.weight)))
    if CFG.is_hash_layer(layer):
        moe.gate.tid2eid.set_value(jnp.asarray(g.tid2eid.numpy().astype(np.int32)))
    else:
        moe.gate.bias.set_value(jnp.asarray(_np(g.e_score_correction_bias)))
    i = CFG.moe_intermediate_size
    gu = _np(hf_block.experts.gate_up_proj)
    moe.experts.w1.set_value(jnp.asarray(gu[:, :i]))
    moe.experts.w3.set_value(jnp.asarray(gu[:, i:]))
    moe.experts.w2.set_value(jnp.asarray(_np(hf_block.experts.down_proj)))
    s = hf_block.shared_experts
    moe.shared_experts.w1.set_value(jnp.asarray(_np(s.gate_proj.weight)))
    moe.shared_experts.w3.set_value(jnp.asarray(_np(s.up_proj.weight)))
    moe.shared_experts.w2.set_value(jnp.asarray(_np(s.down_proj.weight)))
    return moe


@pytest.mark.parametrize("layer", [0, 3], ids=["hash", "topk"])
def test_moe_matches_transformers(hf, layer):
    block = hf.model.layers[layer].mlp
    assert block.is_hash == CFG.is_hash_layer(layer)
    rng = np.random.default_rng(layer)
    x = rng.normal(size=(3, 11, CFG.hidden_size)).astype(np.float32) * 2.0
    ids = rng.integers(0, CFG.vocab_size, (3, 11))
    with torch.no_grad():
        ref = block(torch.from_numpy(x), input_ids=torch.from_numpy(ids))
    moe = _our_moe(block, layer)
    out = _run_moe(moe, jnp.asarray(x), jnp.asarray(ids, jnp.int32))
    assert rel_err(out, _np(ref)) < 1e-5
    # the clamps fire on these inputs (swiglu_limit = 1.0), so the test exercises them
    with torch.no_grad():
        gu = torch.nn.functional.linear(torch.from_numpy(x).reshape(-1, CFG.hidden_size), block.experts.gate_up_proj[0])
    assert float(gu.abs().max()) > CFG.swiglu_limit
    # routing: the bias steers selection only, and top-k indices match transformers' router
    if not CFG.is_hash_layer(layer):
        w, idx = _run_gate(moe.gate, jnp.asarray(x.reshape(-1, CFG.hidden_size)), jnp.asarray(ids.reshape(-1)))
        with torch.no_grad():
            _, w_t, idx_t = block.gate(torch.from_numpy(x))
        order = np.argsort(idx_t.numpy(), -1)
        np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.take_along_axis(idx_t.numpy(), order, -1))
        np.testing.assert_allclose(np.sum(np.asarray(w), -1), CFG.routed_scaling_factor, rtol=1e-5)


def test_softmax_scoring_is_not_renormalised_like_reference(hf):
    """[R] Gate renormalises the picked weights only for sigmoid / sqrtsoftplus; transformers 5.23 always does.
    We follow [R]: with softmax scoring the weights are the raw probabilities times the routed scale."""
    cfg = CFG.replace(scoring_func="softmax")
    moe = _abstract_moe(cfg, 3)
    rng = np.random.default_rng(7)
    w_gate = 0.05 * rng.normal(size=(cfg.n_routed_experts, cfg.hidden_size))
    moe.gate.weight.set_value(jnp.asarray(w_gate, jnp.float32))
    moe.gate.bias.set_value(jnp.zeros((cfg.n_routed_experts,), jnp.float32))
    x = jnp.asarray(rng.normal(size=(5, cfg.hidden_size)), jnp.float32)
    w, idx = _run_gate(moe.gate, x, jnp.zeros((5,), jnp.int32))
    logits = x @ moe.gate.weight.get_value().T
    probs = jax.nn.softmax(logits, -1)
    np.testing.assert_allclose(np.asarray(w), np.take_along_axis(np.asarray(probs), np.asarray(idx), -1)
                               * cfg.routed_scaling_factor, rtol=1e-5)
    assert np.all(np.sum(np.asarray(w), -1) < cfg.routed_scaling_factor * 0.999)   # transformers: == scale


def test_experts_go_through_dispatch_moe_experts(monkeypatch):
    """The routed experts are one dispatch.moe_experts call per layer (grouped kernels), with the layer's name."""
    from pallas_kernels import dispatch
    calls = []
    real = dispatch.moe_experts

    def spy(*a, **k):
        calls.append(k.get("name"))
        return real(*a, **k)

    monkeypatch.setattr(dispatch, "moe_experts", spy)
    moe = _abstract_moe(CFG, 2)
    for _, v in nnx.iter_graph(moe):
        if isinstance(v, nnx.Param):
            v.set_value(jnp.zeros(v.get_value().shape, v.get_value().dtype))
    jax.eval_shape(lambda x, i: moe(x, i), jnp.ones((1, 4, CFG.hidden_size)), jnp.zeros((1, 4), jnp.int32))
    assert calls == ["layers.2.ffn.experts"]
