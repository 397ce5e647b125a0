"""DeepSeek-V4 attention (megamoe_jax/model/attention.py) against transformers 5.23's DeepseekV4Attention.

Each layer type runs as a one-layer config (so transformers' per-model cache and masks are consistent) with random
non-trivial weights (norm weights, sinks and the compressors' position biases included) copied into ours. fp32
throughout; outputs must agree to 1e-5 relative (max-abs error over max-abs output).

Transformers 5.23 and DeepSeek's reference [R] agree on this layer's fp32 math, prefill and decode (checked
below). The differences that exist are recorded in their own tests:
  * bf16: [R] computes the compressor projections and pooling in fp32; transformers in the model dtype.
  * batching: transformers' compressors ignore position ids and padding (left-padded tokens fill windows); [R]
    has no padding. We follow [R] per row: every row equals its own unbatched run.
QAT numerics of [R] (FP8 kv nope dims, FP4 + Hadamard indexer) are not simulated by either side (documented in
compressor.py); the Hadamard cancels in the indexer's q.k.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DeepseekV4Config, DynamicCache
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

from megamoe_jax.model import config as C
from megamoe_jax.model.attention import Attention, AttentionState

RTOL = 1e-5
MAX_LEN = 96

# transformers module path -> DeepSeek-native attribute path in our layer.
_NAMES = {
    "q_a_proj.weight": "wq_a", "q_a_norm.weight": "q_norm", "q_b_proj.weight": "wq_b", "kv_proj.weight": "wkv",
    "kv_norm.weight": "kv_norm", "o_a_proj.weight": "wo_a", "o_b_proj.weight": "wo_b", "sinks": "attn_sink",
    "compressor.kv_proj.weight": "compressor.wkv", "compressor.gate_proj.weight": "compressor.wgate",
    "compressor.position_bias": "compressor.ape", "compressor.kv_norm.weight": "compressor.norm",
    "compressor.indexer.q_b_proj.weight": "indexer.wq_b",
    "compressor.indexer.scorer.weights_proj.weight": "indexer.weights_proj",
    "compressor.indexer.kv_proj.weight": "indexer.compressor.wkv",
    "compressor.indexer.gate_proj.weight": "indexer.compressor.wgate",
    "compressor.indexer.position_bias": "indexer.compressor.ape",
    "compressor.indexer.kv_norm.weight": "indexer.compressor.norm",
}


def layer_config(ratio: int, **kw):
    # 16 indexer heads: with very few heads relu(q.k) is often 0 for every head, and exact score ties make
    # top-k selection implementation-defined (torch and XLA break ties differently).
    base = dict(compress_ratios=(ratio,), num_hidden_layers=1, mlp_layer_types=("moe",), index_n_heads=16,
                max_position_embeddings=1024)
    base.update(kw)
    return C.tiny(**base)


class Oracle:
    """A transformers DeepseekV4Attention with random weights, run with or without its cache."""

    def __init__(self, cfg, seed: int = 0):
        self.hf_cfg = DeepseekV4Config(**cfg.to_hf_config())
        self.hf_cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        self.attn = hf_v4.DeepseekV4Attention(self.hf_cfg, 0).float().eval()
        self.rotary = hf_v4.DeepseekV4RotaryEmbedding(self.hf_cfg)
        with torch.no_grad():
            for name, p in self.attn.named_parameters():
                if "norm" in name:
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif "sinks" in name:
                    p.copy_(torch.randn_like(p))
                elif "position_bias" in name:
                    p.copy_(0.5 * torch.randn_like(p))
                else:
                    p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        self.cache = None

    def weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy().copy() for k, v in self.attn.state_dict().items()}

    @torch.no_grad()
    def __call__(self, x: np.ndarray, pos0: int = 0, cache=None, attention_mask=None, position_ids=None):
        xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        pid = position_ids if position_ids is not None else torch.arange(pos0, pos0 + x.shape[1])[None]
        pe = {k: self.rotary(xt, pid, layer_type=k) for k in ("main", "compress")}
        mask = create_sliding_window_causal_mask(config=self.hf_cfg, inputs_embeds=xt, attention_mask=attention_mask,
                                                 past_key_values=cache, position_ids=pid)
        out, _ = self.attn(xt, position_embeddings=pe, position_ids=pid, attention_mask=mask, past_key_values=cache)
        return out.numpy()

    def new_cache(self):
        return DynamicCache(config=self.hf_cfg)


def param_paths(layer) -> set[str]:
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))}


def ours_from(oracle: Oracle, cfg, param_dtype=jnp.float32) -> Attention:
    layer = Attention(cfg, 0, rngs=nnx.Rngs(0), param_dtype=param_dtype)
    seen = set()
    for hf_name, value in oracle.weights().items():
        path = _NAMES[hf_name]
        *parents, leaf = path.split(".")
        mod = functools.reduce(getattr, parents, layer)
        param = getattr(mod, leaf)
        assert param.get_value().shape == value.shape, (path, param.get_value().shape, value.shape)
        param.set_value(jnp.asarray(value, param.get_value().dtype))
        seen.add(path)
    assert seen == param_paths(layer)          # every parameter of ours came from the oracle, and vice versa
    return layer


@functools.lru_cache(maxsize=None)
def setup(ratio: int, **kw):
    cfg = layer_config(ratio, **kw)
    oracle = Oracle(cfg, seed=ratio + 1)
    return cfg, oracle, ours_from(oracle, cfg)


@nnx.jit
def run(layer, x, state, start_pos, lengths):
    return layer(x, state, start_pos, lengths)


def relerr(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def inputs(cfg, t, b=1, seed=0):
    return np.random.default_rng(seed).standard_normal((b, t, cfg.hidden_size)).astype(np.float32)


def i32(*v):
    return jnp.asarray(v, jnp.int32)


# ---- prefill --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0, 4, 16])
def test_prefill_matches_transformers(ratio):
    # 70 tokens: the window (8) wraps 8 times; HCA (m = 16) completes 4 entries; CSA completes 17 > index_topk 4.
    cfg, oracle, layer = setup(ratio)
    x = inputs(cfg, 70)
    want = oracle(x)
    out, state = run(layer, jnp.asarray(x), layer.init_state(1, MAX_LEN, jnp.float32), i32(0), i32(70))
    assert relerr(out, want) < RTOL
    if ratio == 4:
        # The indexer picked the same sets as transformers' (the test would be meaningless on score ties).
        qr = oracle.attn.q_a_norm(oracle.attn.q_a_proj(torch.from_numpy(x)))
        with torch.no_grad():
            hf_idx = oracle.attn.compressor.indexer(torch.from_numpy(x), qr, torch.arange(70)[None], None, 0).numpy()
        idx, sel, _ = layer.indexer(jnp.asarray(x), jnp.asarray(qr.detach().numpy()),
                                    layer.indexer.init_state(1, MAX_LEN, jnp.float32), i32(0), i32(70), layer.freqs)
        ours = np.where(np.asarray(sel), np.asarray(idx), -1)
        assert hf_idx.shape == ours.shape == (1, 70, cfg.index_topk)
        assert [sorted(r) for r in hf_idx[0]] == [sorted(r) for r in ours[0]]
        assert (ours[0, 40:] >= 0).all() and (ours[0, :3] == -1).all()   # later queries have > topk candidates


@pytest.mark.parametrize("ratio", [0, 4, 16])
def test_chunked_prefill_equals_one_prefill(ratio):
    # The first chunk completes no compression window, later ones start and end mid-window; positions cross
    # every window / compression boundary with arbitrary alignment (few distinct sizes: each one compiles).
    cfg, oracle, layer = setup(ratio)
    x = inputs(cfg, 70, seed=1)
    want = oracle(x)
    state = layer.init_state(1, MAX_LEN, jnp.float32)
    outs, p = [], 0
    for n in (3, 9, 3, 21, 34):
        o, state = run(layer, jnp.asarray(x[:, p:p + n]), state, i32(p), i32(n))
        outs.append(np.asarray(o))
        p += n
    assert relerr(np.concatenate(outs, 1), want) < RTOL


# ---- decode ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0, 4, 16])
def test_decode_matches_transformers_cache_and_prefill(ratio):
    # prefill(21) then token-by-token decode to 70 equals one prefill(70), and transformers' own cache path.
    cfg, oracle, layer = setup(ratio)
    x = inputs(cfg, 70, seed=2)
    full = oracle(x)
    cache = oracle.new_cache()
    hf_steps = [oracle(x[:, :21], 0, cache)]
    state = layer.init_state(1, MAX_LEN, jnp.float32)
    o, state = run(layer, jnp.asarray(x[:, :21]), state, i32(0), i32(21))
    ours = [np.asarray(o)]

    # The ring holds K=V of position p in slot p % W: compare with transformers' window cache (last W-1 tokens).
    w = cfg.sliding_window
    hf_keys = cache.layers[0].keys[0, 0].numpy()                       # [W-1, hd], positions 21-(W-1) .. 20
    ring = np.asarray(state.window[0])
    for k, p in enumerate(range(21 - (w - 1), 21)):
        np.testing.assert_allclose(ring[p % w], hf_keys[k], rtol=1e-5, atol=1e-6)

    for p in range(21, 70):
        hf_steps.append(oracle(x[:, p:p + 1], p, cache))
        o, state = run(layer, jnp.asarray(x[:, p:p + 1]), state, i32(p), i32(1))
        ours.append(np.asarray(o))
    hf_dec = np.concatenate(hf_steps, 1)
    assert relerr(hf_dec, full) < RTOL            # transformers' decode agrees with its prefill (as [R])
    assert relerr(np.concatenate(ours, 1), full) < RTOL
    if ratio:
        # Entries completed so far; the one completed by the last token (position 69 -> 70 // m) included.
        n_done = 70 // ratio
        hf_entries = cache.layers[0].compressed_kv["compressor"][0].numpy()
        assert hf_entries.shape[0] == n_done
        np.testing.assert_allclose(np.asarray(state.compressed_kv[0, :n_done]), hf_entries, rtol=1e-5, atol=1e-5)
        assert not np.asarray(state.compressed_kv[0, n_done:]).any()


def test_hca_ratio_128_prefill_and_decode_across_an_entry():
    # The released HCA ratio: 250-token prefill (one entry), decode across position 255 (the second entry
    # completes and becomes attendable at that very token).
    cfg, oracle, layer = setup(128, sliding_window=16)
    x = inputs(cfg, 262, seed=3)
    want = oracle(x)
    state = layer.init_state(1, 384, jnp.float32)
    o, state = run(layer, jnp.asarray(x[:, :250]), state, i32(0), i32(250))
    outs = [np.asarray(o)]
    for p in range(250, 262):
        o, state = run(layer, jnp.asarray(x[:, p:p + 1]), state, i32(p), i32(1))
        outs.append(np.asarray(o))
    assert relerr(np.concatenate(outs, 1), want) < RTOL
    assert np.asarray(state.compressed_kv[0, :2]).any() and not np.asarray(state.compressed_kv[0, 2]).any()


def test_decode_step_compiles_once_for_all_positions():
    cfg, _, layer = setup(4)
    traces = []

    @nnx.jit
    def step(layer, x, state, start_pos):
        traces.append(1)
        return layer(x, state, start_pos, jnp.ones_like(start_pos))

    state = layer.init_state(2, MAX_LEN, jnp.float32)
    x = inputs(cfg, 12, b=2, seed=4)
    for p in range(12):     # crosses compression (4) and window (8) boundaries
        _, state = step(layer, jnp.asarray(x[:, p:p + 1]), state, i32(p, p + 30))
    assert len(traces) == 1


# ---- batching, padding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0, 4, 16])
def test_batch_rows_at_different_positions_equal_single_runs(ratio):
    # Three sequences in one batch: right-padded prefill (lengths 40, 23, 0), a second padded chunk, then decode
    # steps with every row at its own position. Padding is NaN: it must neither leak nor touch the state.
    cfg, oracle, layer = setup(ratio)
    lens = [(40, 5, 6), (23, 12, 6), (0, 17, 6)]          # per row: prefill, chunk, decode steps
    seqs = [inputs(cfg, sum(l), seed=10 + r)[0] for r, l in enumerate(lens)]

    def padded(chunks):
        t = max(len(c) for c in chunks)
        out = np.full((len(chunks), t, cfg.hidden_size), np.nan, np.float32)
        for r, c in enumerate(chunks):
            out[r, :len(c)] = c
        return jnp.asarray(out)

    state = layer.init_state(3, MAX_LEN, jnp.float32)
    got = [[] for _ in lens]
    starts = np.zeros(3, np.int64)
    for phase in range(2):
        n = [l[phase] for l in lens]
        chunk = [s[st:st + k] for s, st, k in zip(seqs, starts, n)]
        before = state
        o, state = run(layer, padded(chunk), state, jnp.asarray(starts, jnp.int32), jnp.asarray(n, jnp.int32))
        if phase == 0:     # row 2 had no tokens: its state is bit-identical to before
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state)):
                np.testing.assert_array_equal(np.asarray(a)[2], np.asarray(b)[2])
        for r in range(3):
            got[r].append(np.asarray(o[r, :n[r]]))
        starts += n
    for _ in range(6):
        x = jnp.asarray(np.stack([s[st:st + 1] for s, st in zip(seqs, starts)]))
        o, state = run(layer, x, state, jnp.asarray(starts, jnp.int32), i32(1, 1, 1))
        for r in range(3):
            got[r].append(np.asarray(o[r]))
        starts += 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))
    for r, s in enumerate(seqs):
        want = oracle(s[None])[0]
        assert relerr(np.concatenate(got[r], 0), want) < RTOL, f"row {r}"


def test_transformers_left_padding_differs_from_per_row_semantics():
    # Recorded difference: transformers' compressors pool whatever tokens arrive, left padding included (the
    # padding shifts every window boundary), so a left-padded row of a compressed layer differs from its own
    # unbatched run even with correct position ids. [R] has no padding; we keep each row's own positions.
    cfg, oracle, layer = setup(16)
    short = inputs(cfg, 40, seed=5)
    pad = 7
    x = np.concatenate([np.zeros((1, pad, cfg.hidden_size), np.float32), short], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)], 1)
    pid = (mask.cumsum(-1) - 1).clamp(min=0)
    hf_padded = oracle(x, attention_mask=mask, position_ids=pid)[0, pad:]
    alone = oracle(short)[0]
    assert relerr(hf_padded, alone) > 1e-2
    o, _ = run(layer, jnp.asarray(short), layer.init_state(1, MAX_LEN, jnp.float32), i32(0), i32(40))
    assert relerr(o[0], alone) < RTOL


# ---- precision: [R] vs transformers in bf16 ---------------------------------------------------------------------

def test_compressor_pools_in_fp32_with_bf16_activations_as_reference():
    # [R] Compressor.forward: "compression need fp32" (x.float(), fp32 wkv/wgate, fp32 softmax and sum), then
    # one cast before the norm. transformers 5.23 runs kv_proj/gate_proj and the weighted sum in the model dtype.
    # Ours follows [R]: with bf16 activations and bf16-representable weights, our compressed entries are the fp32
    # result up to the final bf16 roundings; transformers' bf16 entries are measurably further away.
    cfg, oracle, _ = setup(16)
    x = jnp.asarray(inputs(cfg, 64, seed=6)).astype(jnp.bfloat16)
    layer = ours_from(oracle, cfg)            # a private copy: its weights get rounded below
    comp = layer.compressor
    for p in (comp.wkv, comp.wgate):
        p.set_value(p.get_value().astype(jnp.bfloat16).astype(jnp.float32))
    args = (jnp.zeros(1, jnp.int32), i32(64), layer.freqs)
    exact = comp(x.astype(jnp.float32), comp.init_state(1, 64, jnp.float32), *args).entries[0]
    ours = comp(x, comp.init_state(1, 64, jnp.bfloat16), *args).entries[0]

    hf_comp = hf_v4.DeepseekV4HCACompressor(oracle.hf_cfg)
    with torch.no_grad():
        for name, src in (("kv_proj.weight", comp.wkv), ("gate_proj.weight", comp.wgate),
                          ("position_bias", comp.ape), ("kv_norm.weight", comp.norm)):
            hf_comp.get_parameter(name).copy_(torch.from_numpy(np.array(src.get_value(), np.float32)))
        hf_comp.kv_proj.to(torch.bfloat16)
        hf_comp.gate_proj.to(torch.bfloat16)     # position_bias and kv_norm stay fp32 (_keep_in_fp32_modules_strict)
        xt = torch.from_numpy(np.array(x.astype(jnp.float32))).to(torch.bfloat16)
        hf_entries, _ = hf_comp(xt, None, torch.arange(64)[None], None, 0)
    hf_entries = hf_entries[0, 0].float().numpy()
    exact = np.asarray(exact)
    err_ours = relerr(np.asarray(ours.astype(jnp.float32)), exact)
    err_hf = relerr(hf_entries, exact)
    assert err_ours < 2 ** -7                       # a couple of bf16 roundings
    assert err_hf > 2 * err_ours


# ---- weight formats and dtypes ---------------------------------------------------------------------------------

def _weight_params(layer):
    return [(path, v) for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))
            if path[-1] in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "weights_proj")]


def test_quantized_weights_run_through_dispatch_without_format_branches():
    # Every projection takes an NVFP4 weight (W4A16) and gives the output of its dequantized copy; wo_a's grouped
    # matmul splits the quantized pytree per group, including a per-row global scale [G*Ro].
    # Random codes and block scales make valid NVFP4 weights (nvfp4.quantize is too slow to run here).
    from megamoe_jax.quant.nvfp4 import NVFP4Tensor
    cfg, oracle, _ = setup(4)
    q_layer, d_layer = ours_from(oracle, cfg), ours_from(oracle, cfg)
    rng = np.random.default_rng(9)
    for (path, v), (_, dv) in zip(_weight_params(q_layer), _weight_params(d_layer)):
        n, k = v.get_value().shape
        g = np.float32(0.6 / k ** 0.5)
        t = NVFP4Tensor(jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8),
                        jnp.asarray(rng.uniform(0.5, 2.0, (n, k // 16)), jnp.float8_e4m3fn),
                        jnp.full((n,), g) if path[-1] == "wo_a" else jnp.asarray(g))
        v.set_value(t)
        dv.set_value(t.dequantize(jnp.float32))
    x = jnp.asarray(inputs(cfg, 30, seed=7))
    args = (i32(0), i32(30))
    got, _ = run(q_layer, x, q_layer.init_state(1, MAX_LEN, jnp.float32), *args)
    want, _ = run(d_layer, x, d_layer.init_state(1, MAX_LEN, jnp.float32), *args)
    assert relerr(got, np.asarray(want)) < 1e-6


def test_bf16_activations_state_and_weights_stay_close_to_fp32():
    cfg, oracle, layer = setup(4)
    x = inputs(cfg, 40, seed=8)
    want = oracle(x)
    b_layer = ours_from(oracle, cfg, param_dtype=jnp.bfloat16)
    for _, v in _weight_params(b_layer):
        v.set_value(v.get_value().astype(jnp.bfloat16))
    out, state = run(b_layer, jnp.asarray(x, jnp.bfloat16), b_layer.init_state(1, MAX_LEN, jnp.bfloat16),
                     i32(0), i32(40))
    assert out.dtype == jnp.bfloat16 and state.window.dtype == jnp.bfloat16
    assert state.compressor.kv.dtype == jnp.float32          # pending compressor rows stay fp32 ([R])
    assert relerr(np.asarray(out.astype(jnp.float32)), want) < 5e-2


# ---- state layout and bad input ---------------------------------------------------------------------------------

def test_state_layout_per_layer_type():
    cfg = layer_config(4)
    for ratio, has_comp, has_idx in ((0, False, False), (4, True, True), (16, True, False)):
        layer = Attention(layer_config(ratio), 0, rngs=nnx.Rngs(0))
        st = layer.init_state(3, 64, jnp.bfloat16)
        assert isinstance(st, AttentionState)
        assert st.window.shape == (3, cfg.sliding_window, cfg.head_dim) and st.window.dtype == jnp.bfloat16
        assert (st.compressor is not None) == has_comp and (st.indexer is not None) == has_idx
        if has_comp:
            coff = 2 if ratio == 4 else 1
            assert st.compressor.kv.shape == (3, coff * ratio, coff * cfg.head_dim)
            assert st.compressor.score.dtype == jnp.float32
            assert st.compressed_kv.shape == (3, 64 // ratio, cfg.head_dim)
        if has_idx:
            assert st.indexer.kv.shape == (3, 8, 2 * cfg.index_head_dim)
            assert st.index_keys.shape == (3, 16, cfg.index_head_dim)
    # Parameter names are DeepSeek-native.
    assert param_paths(Attention(cfg, 0, rngs=nnx.Rngs(0))) == {"wq_a", "q_norm", "wq_b", "wkv", "kv_norm", "wo_a", "wo_b", "attn_sink", "compressor.wkv",
                     "compressor.wgate", "compressor.ape", "compressor.norm", "indexer.wq_b", "indexer.weights_proj",
                     "indexer.compressor.wkv", "indexer.compressor.wgate", "indexer.compressor.ape",
                     "indexer.compressor.norm"}


def test_bad_input_raises_clear_errors():
    cfg = layer_config(16)
    layer = Attention(cfg, 0, rngs=nnx.Rngs(0))
    st = layer.init_state(2, 64, jnp.float32)
    x = jnp.zeros((2, 3, cfg.hidden_size))
    ok = (i32(0, 0), i32(3, 3))
    with pytest.raises(ValueError, match=r"x must be \[B, T, 64\]"):
        layer(jnp.zeros((2, 3, 7)), st, *ok)
    with pytest.raises(ValueError, match="start_pos must be an int array of shape"):
        layer(x, st, i32(0), ok[1])
    with pytest.raises(ValueError, match="lengths must be an int array"):
        layer(x, st, ok[0], jnp.ones(2))
    with pytest.raises(ValueError, match="state.window"):
        layer(x, layer.init_state(3, 64, jnp.float32), *ok)
    with pytest.raises(ValueError, match="state.compressor is missing"):
        layer(x, AttentionState(window=st.window), *ok)
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        layer.init_state(2, 0)
    with pytest.raises(ValueError, match="layer_idx 3 out of range"):
        Attention(cfg, 3, rngs=nnx.Rngs(0))
