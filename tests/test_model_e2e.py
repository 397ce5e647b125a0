"""The whole model against transformers' DeepseekV4ForCausalLM on tiny random checkpoints, and the decode-state
invariants: incremental decode == one prefill, a right-padded batch at different positions == each sequence alone,
a zero-length step leaves a sequence's state untouched.

Compile budget: per config every call goes through one jitted `forward` with three shapes ([2, T], [2, 13],
[2, 1]) and one state capacity, so the whole file compiles ~8 programs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import megamoe_jax
from tests.helpers_tiny import TINY_CONFIGS, hf_logits, rel_err, tiny_checkpoint

# config -> tokens: enough to wrap the window several times, pass index_topk CSA entries and complete >= 2
# entries of every HCA layer.
CASES = {"all_types": 53, "variant": 41}
CAP = 64          # decode-state capacity used throughout
CHUNK = 13        # prefill chunk


def _row_rel_err(a, b):
    """Per position: max |a - b| over the vocab / max |b| over the vocab."""
    return np.max(np.abs(a - b), axis=-1) / np.max(np.abs(b), axis=-1)


class Runner:
    """Calls the model's jitted forward on an explicit decode state."""

    def __init__(self, model):
        gen = model._gen
        self.params, self.fwd = gen.params, gen.forward_fn()
        self.module = nnx.merge(gen.graphdef, gen.params)

    def empty(self, batch=2):
        return self.module.init_state(batch, CAP)

    def __call__(self, ids, state, lengths):
        logits, state = self.fwd(self.params, jnp.asarray(ids, jnp.int32), state, jnp.asarray(lengths, jnp.int32))
        return np.asarray(logits), state


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    cfg, t = TINY_CONFIGS[name], CASES[name]
    # "variant" is saved with a legacy config.json (compress_ratios / num_hash_layers / rope_scaling / ...)
    path, hf = tiny_checkpoint(tmp_path_factory.mktemp(name), cfg, seed=11, legacy_config=(name == "variant"))
    model = megamoe_jax.load(path, dtype=jnp.float32)
    assert model.config == cfg
    run = Runner(model)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, t))
    full, _ = run(ids, run.empty(), [t, t])                       # one prefill of both sequences
    return dict(name=name, cfg=cfg, t=t, hf=hf, model=model, run=run, ids=ids, full=full, path=path)


def test_logits_match_transformers(case):
    cfg, t, full = case["cfg"], case["t"], case["full"]
    ref = hf_logits(case["hf"], case["ids"])
    assert full.shape == ref.shape == (2, t, cfg.vocab_size) and full.dtype == np.float32
    err = _row_rel_err(full, ref)
    assert err.max() < 1e-4, f"worst position {np.unravel_index(err.argmax(), err.shape)}: {err.max():.2e}"
    assert _row_rel_err(full[:, 1:], ref[:, :-1]).min() > 1e-2      # sharp: one position off is far away
    # what the sequences exercised: window wraps, CSA entries beyond top-k, >= 2 entries per HCA layer
    assert t > 2 * cfg.sliding_window
    for m in cfg.compress_ratios:
        if m == 4:
            assert t // 4 > cfg.index_topk
        elif m > 0:
            assert t // m >= 2


def test_incremental_decode_equals_prefill(case):
    run, ids, t = case["run"], case["ids"], case["t"]
    state = run.empty()
    # a prefill chunk, a second chunk at start_pos > 0, then one token at a time across window / compression
    # boundaries
    outs = []
    for a in (0, CHUNK):
        lg, state = run(ids[:, a:a + CHUNK], state, [CHUNK, CHUNK])
        outs.append(lg)
    for p in range(2 * CHUNK, t):
        lg, state = run(ids[:, p:p + 1], state, [1, 1])
        outs.append(lg)
    np.testing.assert_array_equal(np.asarray(state.positions), [t, t])
    assert rel_err(np.concatenate(outs, axis=1), case["full"]) < 1e-5


def test_ragged_batch_equals_each_sequence_alone(case):
    """Row 0 holds sequence B (t - 3 real tokens), row 1 sequence A (7 real tokens), right padded. Their logits,
    and three decode steps from different positions (with a zero-length step for row 0 in the middle), equal
    the single-sequence logits (rows of the full prefill, where the sequences sit in the other rows)."""
    run, ids, t, full = case["run"], case["ids"], case["t"], case["full"]
    a, b = ids[0], ids[1]
    la, lb = 7, t - 3
    padded = np.stack([b, np.concatenate([a[:la], np.zeros(t - la, a.dtype)])])
    lg, state = run(padded, run.empty(), [lb, la])
    np.testing.assert_array_equal(np.asarray(state.positions), [lb, la])
    assert rel_err(lg[0, :lb], full[1, :lb]) < 1e-5
    assert rel_err(lg[1, :la], full[0, :la]) < 1e-5
    # decode: step 0 both rows; step 1 row 0 appends nothing; step 2 both rows
    pos_b, pos_a = lb, la
    for step, len0 in enumerate([1, 0, 1]):
        tok = [[b[pos_b]], [a[pos_a]]]
        before = jax.tree.map(np.asarray, state)
        lg, state = run(tok, state, [len0, 1])
        if len0:
            assert rel_err(lg[0, 0], full[1, pos_b]) < 1e-5
            pos_b += 1
        else:
            for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, state))):
                np.testing.assert_array_equal(x[0], y[0])           # untouched state row
        assert rel_err(lg[1, 0], full[0, pos_a]) < 1e-5
        pos_a += 1
    np.testing.assert_array_equal(np.asarray(state.positions), [pos_b, pos_a])


def test_load_report_and_params(case):
    model, cfg = case["model"], case["cfg"]
    rep = model.load_report
    assert rep.skipped == []
    n_expert_tensors = 3 * cfg.n_routed_experts * cfg.num_hidden_layers
    assert sum(".experts." in n and "shared" not in n for n in rep.loaded) == n_expert_tensors
    w1 = model.module.layers[0].ffn.experts.w1.get_value()
    assert w1.shape == (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size)
    # the expert weights are the checkpoint's, stacked in expert order
    gate_up = case["hf"].model.layers[0].mlp.experts.gate_up_proj.detach().numpy()
    np.testing.assert_array_equal(np.asarray(w1), gate_up[:, :cfg.moe_intermediate_size])


def test_bf16_close_to_fp32(case):
    """bf16 compute (the GPU default): close to the fp32 oracle; mHC parameters and norms stay fp32."""
    if case["name"] != "all_types":
        pytest.skip("one config is enough")
    model = megamoe_jax.load(case["path"], dtype=jnp.bfloat16)
    ids = case["ids"][:1, :24]
    ours = np.asarray(model.logits(ids))
    ref = hf_logits(case["hf"], ids)
    cos = np.sum(ours * ref, -1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert ours.dtype == np.float32 and cos.min() > 0.99
    assert model.module.layers[0].ffn.experts.w1.get_value().dtype == jnp.bfloat16
    assert model.module.layers[0].hc_attn_fn.get_value().dtype == jnp.float32


def test_hca_ratio_128_matches_transformers(tmp_path):
    """DeepSeek's real HCA ratio: 300 tokens complete 2 HCA entries, and 75 CSA entries of which 8 are picked."""
    cfg = TINY_CONFIGS["hca128"]
    path, hf = tiny_checkpoint(tmp_path, cfg, seed=5)
    model = megamoe_jax.load(path, dtype=jnp.float32)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 300))
    err = _row_rel_err(np.asarray(model.logits(ids)), hf_logits(hf, ids))
    assert err.max() < 1e-4
