"""convert(): bf16 / DeepSeek FP8+MXFP4 / NVFP4 -> NVFP4 (both conventions) or bf16; round trips; atomicity."""
import json
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import megamoe_jax
from megamoe_jax.checkpoint import convert as CV
from megamoe_jax.checkpoint import formats
from megamoe_jax.checkpoint.names import canonical_name
from megamoe_jax.checkpoint.reader import CheckpointError, open_checkpoint
from megamoe_jax.model.config import HASH_MOE, TOPK_MOE, tiny
from megamoe_jax.quant import fp8_block, mxfp4, nvfp4
from tests.checkpoint_fixtures import (CT_CONFIG, E8M0, MO_CONFIG, MO_HF_QUANT, ct_module, mo_module, nvfp4_parts,
                                       save)
from tests.helpers_tiny import make_hf_model

CFG = tiny(num_hidden_layers=2, compress_ratios=(0, 4), mlp_layer_types=(HASH_MOE, TOPK_MOE))
BF16 = ml_dtypes.bfloat16


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    make_hf_model(CFG, seed=3).to(torch.bfloat16).save_pretrained(path)
    return path


def _nv(ck):
    return {n: e for n, e in formats.layout(ck).items() if e.kind == formats.NVFP4}


def _same(t, ref):
    np.testing.assert_array_equal(np.asarray(t.packed), np.asarray(ref.packed))
    np.testing.assert_array_equal(np.asarray(t.block_scale).view(np.uint8),
                                  np.asarray(ref.block_scale).view(np.uint8))
    g, g_ref = (np.asarray(v.global_scale, np.float32).reshape(-1)[0] for v in (t, ref))
    assert g == g_ref


@pytest.mark.parametrize("convention", ["compressed-tensors", "modelopt"])
def test_bf16_to_nvfp4_equals_quantize_in_memory(src, tmp_path, convention):
    dst = CV.convert(src, tmp_path / "out", scope="all-linear", convention=convention, progress=False)
    s, ck = open_checkpoint(src), open_checkpoint(dst)
    nv = _nv(ck)
    canon = {canonical_name(n) for n in nv}
    assert all(e.convention == convention for e in nv.values())
    assert "layers.1.ffn.experts.7.w2.weight" in canon and "layers.1.attn.wq_a.weight" in canon
    assert "layers.1.attn.indexer.weights_proj.weight" in canon and "layers.0.ffn.shared_experts.w3.weight" in canon
    for keep in ("layers.0.attn.wo_a.weight", "head.weight", "layers.0.ffn.gate.weight", "embed.weight"):
        assert keep not in canon
    for n in nv:
        x = jnp.asarray(s.get(n))
        c = canonical_name(n)
        m = re.match(r"(.*\.(?:experts\.\d+|shared_experts))\.(w1|w3)\.weight$", c) or \
            re.match(r"(.*\.attn)\.(wq_a|wkv)\.weight$", c)
        if m:   # fused shards: the in-memory quantization of the fused matrix, split
            a, b = (("w1", "w3") if m.group(2) in ("w1", "w3") else ("wq_a", "wkv"))
            na, nb = n.replace(f".{m.group(2)}.", f".{a}."), n.replace(f".{m.group(2)}.", f".{b}.")
            both = nvfp4.quantize(jnp.concatenate([jnp.asarray(s.get(na)), jnp.asarray(s.get(nb))]))
            rows = slice(0, x.shape[0]) if m.group(2) == a else slice(s.shape(na)[0], None)
            ref = nvfp4.NVFP4Tensor(both.packed[rows], both.block_scale[rows], both.global_scale)
        else:
            ref = nvfp4.quantize(x)
        _same(formats.read_weight(ck, n), ref)
    # everything else is copied bit for bit
    for n in formats.weight_names(ck):
        if n not in nv:
            np.testing.assert_array_equal(ck.get(n), s.get(n))
    qc = ck.config["quantization_config"]
    if convention == "compressed-tensors":
        g = qc["config_groups"]["group_0"]
        assert qc["format"] == "nvfp4-pack-quantized" and g["input_activations"] is None
        assert sorted(g["targets"]) == sorted(e.module for e in nv.values())
        assert "model.layers.0.attn.wo_a" in qc["ignore"] and "head" in qc["ignore"]
    else:
        assert ck.hf_quant_config["quantization"]["quant_algo"] == "W4A16_NVFP4"
    assert (dst / "generation_config.json").is_file()


def test_scope_ignore_and_sharding(src, tmp_path):
    dst = CV.convert(src, tmp_path / "e", scope="experts", ignore=[r"re:.*layers\.1\.ffn\.experts\.[0-3]\..*"],
                     max_shard_bytes=64 * 1024, progress=False)
    ck = open_checkpoint(dst)
    canon = sorted(canonical_name(n) for n in _nv(ck))
    assert all(".ffn.experts." in c for c in canon)
    assert len(canon) == 3 * (CFG.n_routed_experts * 2 - 4)
    assert len(ck.headers) > 3 and (dst / "model.safetensors.index.json").is_file()


def test_stacked_hf_experts_are_split_and_load(tmp_path):
    """transformers' in-memory names (stacked mlp.experts.gate_up_proj) -> per-expert modules that load."""
    from safetensors.torch import save_file
    model = make_hf_model(CFG, seed=4).to(torch.bfloat16)
    src = tmp_path / "hf"
    src.mkdir()
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(model.config.to_dict()))
    dst = CV.convert(src, tmp_path / "out", scope="experts", progress=False)
    ck = open_checkpoint(dst)
    i = CFG.moe_intermediate_size
    gu = sd["model.layers.1.mlp.experts.gate_up_proj"].float().numpy().astype(BF16)
    for e in (0, 5):
        w1 = formats.read_weight(ck, f"model.layers.1.mlp.experts.{e}.gate_proj.weight")
        w3 = formats.read_weight(ck, f"model.layers.1.mlp.experts.{e}.up_proj.weight")
        both = nvfp4.quantize(jnp.asarray(gu[e]))
        _same(w1, nvfp4.NVFP4Tensor(both.packed[:i], both.block_scale[:i], both.global_scale))
        _same(w3, nvfp4.NVFP4Tensor(both.packed[i:], both.block_scale[i:], both.global_scale))
    assert "model.layers.1.mlp.experts.gate_up_proj" not in ck
    m = megamoe_jax.load(dst)                                     # names.py maps the per-expert HF names
    assert type(m.module.layers[1].ffn.experts.w1.value).__name__ == "NVFP4Tensor"


def _deepseek_official(src, dst):
    """The bf16 tiny model in DeepSeek's release format: FP8 attention (E8M0 .scale per 128x128), MXFP4 experts."""
    ck = open_checkpoint(src)
    t = {}
    for n in ck.keys():
        c = canonical_name(n)
        x = jnp.asarray(ck.get(n))
        if re.match(r"layers\.\d+\.attn\.(wq_a|wq_b|wkv|wo_b)\.weight$", c):
            q = fp8_block.quantize(x, scale_fmt="ue8m0")
            b = np.log2(np.asarray(q.scale)).astype(np.int32) + 127
            t[n] = np.asarray(q.weight)
            t[n[:-len("weight")] + "scale"] = b.astype(np.uint8).view(E8M0)
        elif re.match(r"layers\.\d+\.ffn\.experts\.\d+\.w[123]\.weight$", c):
            q = mxfp4.quantize(x, rule="ceil")
            t[n] = np.asarray(q.packed).view(np.int8)
            t[n[:-len("weight")] + "scale"] = np.asarray(q.scale).view(E8M0)
        else:
            t[n] = np.asarray(ck.get(n))
    cfg = dict(ck.config, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                               "weight_block_size": [128, 128], "activation_scheme": "dynamic"})
    return save(dst, t, cfg, shards=2)


def test_deepseek_fp8_mxfp4_checkpoint_loads_and_converts(src, tmp_path):
    ds = _deepseek_official(src, tmp_path / "ds")
    ck = open_checkpoint(ds)
    kinds = {e.kind for e in formats.layout(ck).values()}
    assert kinds == {"plain", "fp8_block", "mxfp4"}
    m = megamoe_jax.load(ds)                                      # a mixed file loads as such, and runs
    assert type(m.module.layers[0].attn.wq_a.value).__name__ == "FP8BlockTensor"
    assert type(m.module.layers[0].ffn.experts.w2.value).__name__ == "MXFP4Tensor"
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 24))
    a, b = np.asarray(m.logits(ids)).ravel(), np.asarray(megamoe_jax.load(src).logits(ids)).ravel()
    cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    print("mixed FP8/MXFP4 vs bf16 logits cosine", cos)
    assert cos > 0.95, cos
    for convention, scale_leaf in (("compressed-tensors", "weight_scale"), ("modelopt", "scale")):
        dst = CV.convert(ds, tmp_path / convention, scope="experts", convention=convention, progress=False)
        out = open_checkpoint(dst)
        lay = formats.layout(out)
        w2 = "model.layers.1.ffn.experts.6.w2.weight"
        assert lay[w2].kind == "nvfp4"
        src_w2 = formats.read_weight(ck, w2).dequantize(jnp.float32)
        _same(formats.read_weight(out, w2), nvfp4.quantize(src_w2))      # MXFP4 -> fp32 -> NVFP4
        wq = "model.layers.0.attn.wq_a.weight"
        assert lay[wq].kind == "fp8_block" and lay[wq].parts["block_scale"].endswith("." + scale_leaf)
        a, b = formats.read_weight(ck, wq), formats.read_weight(out, wq)   # FP8 attention kept bit for bit
        np.testing.assert_array_equal(np.asarray(a.weight).view(np.uint8), np.asarray(b.weight).view(np.uint8))
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
        qc = out.config["quantization_config"]
        if convention == "compressed-tensors":
            fmts = {g["format"] for g in qc["config_groups"].values()}
            assert fmts == {"nvfp4-pack-quantized", "float-quantized"}
        else:
            assert wq[:-len(".weight")] in out.hf_quant_config["quantization"]["exclude_modules"]


def test_modelopt_compressed_tensors_round_trip(tmp_path):
    """ModelOpt <-> compressed-tensors, W4A4, against compressed-tensors' own ModelOptNvfp4Converter."""
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
    from safetensors.torch import load_file
    rng = np.random.default_rng(7)
    t = {"layers.0.attn_norm.weight": np.ones(32, BF16)}
    for e in range(3):
        for p in ("w1", "w2", "w3"):
            t.update(mo_module(f"layers.0.ffn.experts.{e}.{p}", *nvfp4_parts(rng, 16, 32, amax=rng.uniform(0.1, 4)),
                               g_in=np.float32(rng.uniform(0.1, 9)) / np.float32(2688)))
    mo = save(tmp_path / "mo", t, MO_CONFIG, hf_quant_config=MO_HF_QUANT)
    ct = CV.convert(mo, tmp_path / "ct", convention="compressed-tensors", progress=False)
    ours = load_file(str(ct / "model.safetensors"))
    theirs = ModelOptNvfp4Converter(targets=["re:.*experts.*"]).process(load_file(str(mo / "model.safetensors")))
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k].view(-1).view(torch.uint8),
                                                                 theirs[k].reshape(-1).view(torch.uint8)), k
    mo2 = CV.convert(ct, tmp_path / "mo2", convention="modelopt", progress=False)
    ct2 = CV.convert(mo2, tmp_path / "ct2", convention="compressed-tensors", progress=False)
    a, b = open_checkpoint(ct), open_checkpoint(ct2)
    assert a.keys() == b.keys()
    for n in a.keys():              # G -> 1/G -> G is exact for every fp32 G (1/(1/(1/x))) == 1/x)
        np.testing.assert_array_equal(np.asarray(a.get(n)).reshape(-1).view(np.uint8),
                                      np.asarray(b.get(n)).reshape(-1).view(np.uint8))
    a, b = open_checkpoint(mo), open_checkpoint(mo2)
    for n in a.keys():              # g -> 1/g -> g may move by one ulp (as with compressed-tensors' converter)
        x, y = np.asarray(a.get(n)), np.asarray(b.get(n))
        if x.dtype == np.float32:
            np.testing.assert_array_max_ulp(x, y, maxulp=1)
        else:
            np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))
    assert b.hf_quant_config["quantization"]["quant_algo"] == "NVFP4"


def test_nvfp4_to_bf16(tmp_path):
    rng = np.random.default_rng(8)
    t = {"layers.0.attn_norm.weight": np.ones(32, BF16)}
    t.update(ct_module("layers.0.ffn.experts.0.w1", *nvfp4_parts(rng, 16, 64), g_in=0.5 / 2688))
    ct = save(tmp_path / "ct", t, CT_CONFIG)
    dst = CV.convert(ct, tmp_path / "bf16", to="bf16", progress=False)
    ck = open_checkpoint(dst)
    assert "quantization_config" not in ck.config and ck.keys() == ["layers.0.attn_norm.weight",
                                                                     "layers.0.ffn.experts.0.w1.weight"]
    w = formats.read_weight(open_checkpoint(ct), "layers.0.ffn.experts.0.w1.weight").dequantize(jnp.float32)
    np.testing.assert_array_equal(ck.get("layers.0.ffn.experts.0.w1.weight"), np.asarray(w).astype(BF16))


def test_failures_leave_nothing_behind(src, tmp_path, monkeypatch):
    dst = CV.convert(src, tmp_path / "out", progress=False)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    calls = {"n": 0}
    real = CV.quantize_blocks

    def flaky(x, g):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("disk full")
        return real(x, g)

    monkeypatch.setattr(CV, "quantize_blocks", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        CV.convert(src, tmp_path / "out", overwrite=True, max_shard_bytes=32 * 1024, progress=False)
    with pytest.raises(RuntimeError, match="disk full"):
        calls["n"] = 0
        CV.convert(src, tmp_path / "fresh", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]     # no partial output, no temp dirs
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before  # the old output untouched
    with pytest.raises(CheckpointError, match="already exists"):
        CV.convert(src, tmp_path / "out", progress=False)
    for bad, match in ((dict(to="int8"), "to must be"), (dict(scope="attn"), "scope must be"),
                       (dict(convention="vllm"), "convention must be"), (dict(to="bf16", calibrate=[1, 2]),
                                                                         "calibrate only applies")):
        with pytest.raises(ValueError, match=match):
            CV.convert(src, tmp_path / "x", progress=False, **bad)
    with pytest.raises(ValueError, match="must differ"):
        CV.convert(src, src)


def test_streaming_peak_host_memory(tmp_path):
    """Host (numpy) allocations while converting stay near one output shard plus one layer, far below the
    checkpoint: sources are memory-mapped, layers are converted one at a time, shards are written as they fill."""
    import tracemalloc
    rng = np.random.default_rng(9)
    layers, experts = 8, 8
    t = {f"layers.{i}.ffn.experts.{e}.{p}.weight": rng.standard_normal((64, 512)).astype(BF16)
         for i in range(layers) for e in range(experts) for p in ("w1", "w2", "w3")}
    total = sum(v.nbytes for v in t.values())
    src = save(tmp_path / "src", t, {"model_type": "deepseek_v4"}, shards=4)
    del t
    CV.convert(src, tmp_path / "warm", progress=False)                 # compile outside the measurement
    shard = 256 * 1024
    tracemalloc.start()
    try:
        CV.convert(src, tmp_path / "out", max_shard_bytes=shard, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < shard + total // layers, (peak, total)
    assert len(open_checkpoint(tmp_path / "out").headers) > 4


def test_convert_with_calibration_publishes_w4a4(src, tmp_path):
    from megamoe_jax import calibrate as C
    ids = np.random.default_rng(1).integers(0, CFG.vocab_size, (4, 32))
    dst = CV.convert(src, tmp_path / "w4a4", scope="experts", calibrate=ids, progress=False,
                     calibrate_options={"file": False})
    ck = open_checkpoint(dst)
    nv = _nv(ck)
    assert nv and all("input_scale" in e.parts for e in nv.values())
    assert ck.config["quantization_config"]["config_groups"]["group_0"]["input_activations"] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4a4"]          # staged, calibrated, then published
    # calibrating into a separate output leaves the source checkpoint as it was
    before = {n: np.asarray(ck.get(n)).copy() for n in ck.keys() if n.endswith("input_global_scale")}
    res = C.calibrate(dst, ids[:2], out=tmp_path / "again", file=False)
    assert res.path == tmp_path / "again"
    for n, v in before.items():
        np.testing.assert_array_equal(open_checkpoint(dst).get(n), v)
    assert open_checkpoint(tmp_path / "again").keys() == ck.keys()
