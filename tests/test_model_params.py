"""The name table and the params map: every naming convention loads the same weights; missing / unexpected /
misshapen tensors are refused with the tensor and file named; mtp.* is skipped; quantized weights run through
the same model code."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import megamoe_jax
from megamoe_jax.checkpoint.names import canonical_name, expert_of, hf_module_name, layer_of
from megamoe_jax.checkpoint.reader import CheckpointError
from megamoe_jax.model.config import tiny
from tests.helpers_tiny import rel_err, tiny_checkpoint

# Small and cheap: one CSA (hash-routed) and one HCA layer.
CFG = tiny(num_hidden_layers=2, compress_ratios=(4, 16), mlp_layer_types=("hash_moe", "moe"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, hf = tiny_checkpoint(tmp_path_factory.mktemp("params"), CFG, seed=2)
    return path, hf


def _params(model):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.iter_graph(model.module)
            if isinstance(v, nnx.Param)}


# ---- names ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, canonical", [
    # transformers save_pretrained (reverted conversion mapping, with its quirks)
    ("model.embed_tokens.weight", "embed.weight"),
    ("head.weight", "head.weight"),
    ("model.norm.weight", "norm.weight"),
    ("model.hc_head.hc_fn", "hc_head_fn"),
    ("model.layers.3.attn.norm.weight", "layers.3.attn.kv_norm.weight"),
    ("model.layers.3.attn.compressor.norm.weight", "layers.3.attn.compressor.norm.weight"),
    ("model.layers.3.attn.indexer.compressor.ape", "layers.3.attn.indexer.compressor.ape"),
    ("model.layers.0.ffn.experts.7.w3.weight", "layers.0.ffn.experts.7.w3.weight"),
    # DeepSeek-native, with quantization companions
    ("layers.5.attn.wq_a.scale", "layers.5.attn.wq_a.scale"),
    ("layers.5.ffn.experts.2.w1.weight_scale_2", "layers.5.ffn.experts.2.w1.weight_scale_2"),
    ("mtp.0.e_proj.weight", "mtp.0.e_proj.weight"),
    ("mtp.0.hc_head_fn", "mtp.0.hc_head_fn"),
    # HF module names (transformers' state dict, llm-compressor exports)
    ("lm_head.weight", "head.weight"),
    ("model.layers.1.self_attn.q_a_proj.weight", "layers.1.attn.wq_a.weight"),
    ("model.layers.1.self_attn.q_a_norm.weight", "layers.1.attn.q_norm.weight"),
    ("model.layers.1.self_attn.kv_norm.weight", "layers.1.attn.kv_norm.weight"),
    ("model.layers.1.self_attn.sinks", "layers.1.attn.attn_sink"),
    ("model.layers.1.self_attn.o_a_proj.weight_packed", "layers.1.attn.wo_a.weight_packed"),
    ("model.layers.1.self_attn.compressor.position_bias", "layers.1.attn.compressor.ape"),
    ("model.layers.1.self_attn.compressor.kv_norm.weight", "layers.1.attn.compressor.norm.weight"),
    ("model.layers.1.self_attn.compressor.indexer.gate_proj.weight", "layers.1.attn.indexer.compressor.wgate.weight"),
    ("model.layers.1.self_attn.compressor.indexer.q_b_proj.weight", "layers.1.attn.indexer.wq_b.weight"),
    ("model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight", "layers.1.attn.indexer.weights_proj.weight"),
    ("model.layers.1.input_layernorm.weight", "layers.1.attn_norm.weight"),
    ("model.layers.1.ffn_hc.scale", "layers.1.hc_ffn_scale"),
    ("model.layers.1.mlp.gate.e_score_correction_bias", "layers.1.ffn.gate.bias"),
    ("model.layers.1.mlp.gate.tid2eid", "layers.1.ffn.gate.tid2eid"),
    ("model.layers.1.mlp.experts.gate_up_proj", "layers.1.ffn.experts.w13.weight"),
    ("model.layers.1.mlp.experts.down_proj", "layers.1.ffn.experts.w2.weight"),
    ("model.layers.1.mlp.experts.4.up_proj.weight_global_scale", "layers.1.ffn.experts.4.w3.weight_global_scale"),
    ("model.layers.1.mlp.shared_experts.down_proj.weight", "layers.1.ffn.shared_experts.w2.weight"),
])
def test_canonical_names(name, canonical):
    assert canonical_name(name) == canonical
    assert canonical_name(canonical) == canonical                     # idempotent on native names


def test_hf_module_names_round_trip(ckpt):
    _, hf = ckpt
    for k in hf.state_dict():
        c = canonical_name(k)
        assert hf_module_name(c) == k
    assert expert_of("layers.3.ffn.experts.17.w2.weight") == (3, 17, "w2")
    assert expert_of("layers.3.ffn.shared_experts.w2.weight") is None
    assert layer_of("layers.12.hc_attn_fn") == 12 and layer_of("mtp.0.norm.weight") is None


# ---- loading -------------------------------------------------------------------------------------------------

def _rewrite(src, dst, edit):
    """Copy a checkpoint dir, editing its tensors dict with `edit(tensors) -> tensors`."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    save_file(edit(load_file(f)), f)
    return dst


def test_hf_module_names_load_identically(ckpt, tmp_path):
    """A checkpoint written with HF module names and transformers' fused experts loads to the same params."""
    path, hf = ckpt
    base = megamoe_jax.load(path, dtype=jnp.float32)
    d = tmp_path / "hfnames"
    d.mkdir()
    (d / "config.json").write_text((path / "config.json").read_text())
    save_file({k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}, d / "model.safetensors")
    other = megamoe_jax.load(d, dtype=jnp.float32)
    a, b = _params(base), _params(other)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert a["layers.0.ffn.gate.tid2eid"].dtype == np.int32         # int64 in the file, cast on load


def test_mtp_tensors_are_skipped_and_reported(ckpt, tmp_path):
    path, _ = ckpt
    d = _rewrite(path, tmp_path / "mtp", lambda t: {
        **t, "mtp.0.e_proj.weight": np.ones((CFG.hidden_size, CFG.hidden_size), np.float32),
        "mtp.0.hc_head_fn": np.ones((4, 4 * CFG.hidden_size), np.float32)})
    model = megamoe_jax.load(d, dtype=jnp.float32)
    assert model.load_report.skipped == ["mtp.0.e_proj.weight", "mtp.0.hc_head_fn"]


@pytest.mark.parametrize("edit, match", [
    (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.attn.wq_b.weight"},
     r"missing tensor.*layers\.1\.attn\.wq_b"),
    (lambda t: {k: v for k, v in t.items() if k != "model.layers.0.ffn.experts.5.w2.weight"},
     r"missing tensor 'layers\.0\.ffn\.experts\.5\.w2\.weight'"),
    (lambda t: {**t, "model.layers.0.attn.wq_c.weight": np.zeros((2, 2), np.float32)},
     r"model\.safetensors: unexpected tensor 'model\.layers\.0\.attn\.wq_c\.weight'"),
    (lambda t: {**t, "model.layers.1.ffn.experts.8.w1.weight": t["model.layers.1.ffn.experts.0.w1.weight"]},
     r"unexpected tensor 'model\.layers\.1\.ffn\.experts\.8\.w1\.weight'.*n_routed_experts=8"),
    (lambda t: {**t, "model.layers.2.attn_norm.weight": np.ones((CFG.hidden_size,), np.float32)},
     r"unexpected tensor 'model\.layers\.2\.attn_norm\.weight'.*num_hidden_layers=2"),
    (lambda t: {**t, "model.layers.1.attn.wkv.weight": np.zeros((5, CFG.hidden_size), np.float32)},
     r"model\.safetensors: tensor 'model\.layers\.1\.attn\.wkv\.weight' has shape \(5, 64\)"),
    (lambda t: {**t, "model.layers.1.ffn.experts.3.w2.weight": np.zeros((3, 3), np.float32)},
     r"tensor 'model\.layers\.1\.ffn\.experts\.3\.w2\.weight' has shape \(3, 3\)"),
    (lambda t: {**t, "layers.0.attn.wkv.weight": t["model.layers.0.attn.wkv.weight"]},
     r"both map to 'layers\.0\.attn\.wkv\.weight'"),
    (lambda t: {**t, "model.layers.0.ffn.gate.tid2eid": t["model.layers.0.ffn.gate.tid2eid"].astype(np.float32)},
     r"tid2eid.*expected an integer table"),
    (lambda t: {**t, "model.layers.0.ffn.gate.tid2eid": t["model.layers.0.ffn.gate.tid2eid"] + 8},
     r"tid2eid.*expert ids must be in \[0, 8\)"),
    (lambda t: {**t, "model.layers.1.ffn.gate.weight": t["model.layers.1.ffn.gate.weight"].astype(np.int32)},
     r"ffn\.gate\.weight' has dtype int32"),
])
def test_bad_checkpoints_name_tensor_and_file(ckpt, tmp_path, edit, match):
    path, _ = ckpt
    d = _rewrite(path, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=match):
        megamoe_jax.load(d, dtype=jnp.float32)


def test_config_disagreeing_with_weights(ckpt, tmp_path):
    path, _ = ckpt
    d = tmp_path / "cfg"
    shutil.copytree(path, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has shape .* the model expects"):
        megamoe_jax.load(d, dtype=jnp.float32)


# ---- quantized weights ------------------------------------------------------------------------------------

def test_quantized_weights_run_through_the_same_model(ckpt):
    """NVFP4 routed experts (W4A16, per-expert global scales), MXFP4 shared experts and FP8-block attention
    linears sit in the same Params and give the logits of the model holding their dequantized values."""
    from megamoe_jax.quant import fp8_block, mxfp4, nvfp4
    path, _ = ckpt
    q = megamoe_jax.load(path, dtype=jnp.float32)
    ref = megamoe_jax.load(path, dtype=jnp.float32)
    for qb, rb in zip(q.module.layers, ref.module.layers):
        pairs = [(qb.ffn.experts.w1, rb.ffn.experts.w1, lambda w: nvfp4.quantize(w, batch_dims=1)),
                 (qb.ffn.experts.w3, rb.ffn.experts.w3, lambda w: nvfp4.quantize(w, batch_dims=1)),
                 (qb.ffn.experts.w2, rb.ffn.experts.w2, lambda w: nvfp4.quantize(w, batch_dims=1)),
                 (qb.ffn.shared_experts.w1, rb.ffn.shared_experts.w1, mxfp4.quantize),
                 (qb.attn.wq_a, rb.attn.wq_a, fp8_block.quantize),
                 (qb.attn.wkv, rb.attn.wkv, fp8_block.quantize)]
        for qp, rp, quant in pairs:
            t = quant(qp.get_value())
            qp.set_value(t)
            rp.set_value(t.dequantize(jnp.float32))
    assert type(q.module.layers[0].ffn.experts.w1.get_value()).__name__ == "NVFP4Tensor"
    q._gen = type(q._gen)(q.module)                                  # re-split the edited modules
    ref._gen = type(ref._gen)(ref.module)
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 40))
    lq, lr = np.asarray(q.logits(ids)), np.asarray(ref.logits(ids))
    assert rel_err(lq, lr) < 1e-5
    # and quantization really changed the weights (the comparison is not trivially between equal models)
    plain = megamoe_jax.load(path, dtype=jnp.float32)
    assert rel_err(np.asarray(plain.logits(ids)), lr) > 1e-4
