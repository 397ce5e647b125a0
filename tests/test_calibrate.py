"""Warmup calibration end to end: the seed bug detected at load, repaired by calibration, logits close to bf16.

The tiny model is transformers' DeepseekV4 with random weights (tests/helpers_tiny.py), 2 layers (SWA + hash
routing, CSA + top-k routing). Its residual-branch output projections (attn wo_b, expert/shared w2) are scaled by
1/4 so that, as in a trained LLM, each block adds a modest update to the residual stream; with full-size random
updates every block's quantization error compounds and even W4A16 lands near cosine 0.96 on this toy.
"""
import functools
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import megamoe_jax
from megamoe_jax import calibrate as C
from megamoe_jax.checkpoint import formats, validate, writer
from megamoe_jax.checkpoint.convert import convert
from megamoe_jax.checkpoint.reader import open_checkpoint
from megamoe_jax.model.config import HASH_MOE, TOPK_MOE, tiny
from tests.helpers_tiny import make_hf_model

CFG = tiny(num_hidden_layers=2, compress_ratios=(0, 4), mlp_layer_types=(HASH_MOE, TOPK_MOE))
RESIDUAL_SCALE = 0.25
CALIB = np.random.default_rng(10).integers(0, CFG.vocab_size, (8, 64))
EVAL = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 48))


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, ids):
    model = nnx.merge(graphdef, params)
    h, _ = model(ids, model.init_state(ids.shape[0], ids.shape[1]))
    return model.logits(h)


def logits(module, ids=EVAL) -> np.ndarray:
    g, p = nnx.split(getattr(module, "module", module))
    return np.asarray(_logits(g, p, jnp.asarray(ids, jnp.int32)))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    model = make_hf_model(CFG, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("o_b_proj.weight", "experts.down_proj", "shared_experts.down_proj.weight")):
                p.mul_(RESIDUAL_SCALE)
    path = tmp_path_factory.mktemp("bf16")
    model.to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ref(src):
    return logits(megamoe_jax.load(src))


@pytest.fixture(scope="module")
def w4a16(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("w4a16") / "ck"
    convert(src, dst, scope="all-linear", progress=False)
    return dst


def _copy(path, tmp_path, name):
    import shutil
    dst = tmp_path / name
    shutil.copytree(path, dst)
    return dst


def test_w4a16_quality(w4a16, ref):
    cos = cosine(logits(megamoe_jax.load(w4a16)), ref)
    assert cos >= 0.99, cos


def test_seed_bug_detected_at_load_and_repaired_by_calibration(w4a16, ref, tmp_path):
    ck_path = _copy(w4a16, tmp_path, "ck")
    out = io.StringIO()
    res = C.calibrate(ck_path, CALIB, batch_size=4, file=out)
    assert res.off == [] and res.tokens == CALIB.size
    assert all(v is None for v in res.old.values())               # W4A16 before: no scales
    lay = formats.layout(open_checkpoint(ck_path))
    nv = [n for n, e in lay.items() if e.kind == formats.NVFP4]
    assert sorted(res.scales) == sorted(nv) and all("input_scale" in lay[n].parts for n in nv)
    good = {n: res.scales[n] for n in nv}
    ck = open_checkpoint(ck_path)
    assert validate.scale_report(ck).ok
    cfg = json.loads((ck_path / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"

    # The seed bug: the attention's activation scales stored as the dequant factor g in the compressed-tensors
    # field that holds the multiplier G = 1/g (vLLM's `input_global_scale_inv = input_scale.max()`).
    attn = [n for n in nv if ".attn." in n]
    assert len(attn) >= 8
    bad = {lay[n].parts["input_scale"]: np.asarray([good[n]], np.float32) for n in attn}
    writer.update_checkpoint(ck_path, bad)
    with pytest.raises(validate.ScaleError) as exc:
        megamoe_jax.load(ck_path)
    msg = str(exc.value)
    assert "model.layers.0.attn.wq_a.input_global_scale" in msg and "wrong convention" in msg
    assert len(exc.value.issues) == len(attn) and all(i.repairable for i in exc.value.issues)

    # Used as stored (experiment mode), the saturating quantizer keeps the forward finite (check_finite raises
    # otherwise): every attention activation block underflows to zero, so attention silently contributes nothing.
    broken, _ = C.load_model(ck_path, bad_scales="allow")
    broken_cos = cosine(C.check_finite(broken, EVAL), ref)

    # Warmup calibration finds, reports and repairs them.
    out = io.StringIO()
    with pytest.warns(UserWarning, match=r"off by more than 4x"):
        res = C.calibrate(ck_path, CALIB, batch_size=4, file=out)
    assert sorted(res.off) == sorted(attn)
    table = out.getvalue()
    flagged = [line for line in table.splitlines() if "off by > 4x" in line]
    assert flagged and all(" attn." in line for line in flagged)
    for n in nv:                                                  # the data did not change: same scales
        np.testing.assert_allclose(res.scales[n], good[n], rtol=1e-6)
    repaired, _ = C.load_model(ck_path)                            # validates: raises if anything is still off
    cos = cosine(C.check_finite(repaired, EVAL), ref)
    assert cos >= 0.98, cos
    assert broken_cos < cos - 0.002, (broken_cos, cos)


def test_modelopt_convention_and_scale_sharing(src, tmp_path):
    dst = tmp_path / "mo"
    convert(src, dst, scope="all-linear", convention="modelopt", progress=False)
    res = C.calibrate(dst, CALIB, batch_size=4, file=False)
    ck = open_checkpoint(dst)
    assert ck.hf_quant_config["quantization"]["quant_algo"] == "NVFP4"
    assert ck.config["quantization_config"]["quant_algo"] == "NVFP4"
    lay = formats.layout(ck)
    for n, g in res.scales.items():
        t = lay[n].parts["input_scale"]
        assert t.endswith(".input_scale") and ck.shape(t) == ()
        assert np.float32(ck.get(t)) == np.float32(g)
    s = {re.sub(r"^model\.", "", n): g for n, g in res.scales.items()}
    # inputs read by one GEMM share a scale: wq_a/wkv, an expert's (and the shared expert's) w1/w3
    assert s["layers.1.attn.wq_a.weight"] == s["layers.1.attn.wkv.weight"]
    for e in range(CFG.n_routed_experts):
        assert s[f"layers.1.ffn.experts.{e}.w1.weight"] == s[f"layers.1.ffn.experts.{e}.w3.weight"]
        assert s[f"layers.1.ffn.experts.{e}.w1.weight"] == s["layers.1.ffn.experts.0.w1.weight"]
    assert s["layers.1.ffn.shared_experts.w1.weight"] == s["layers.1.ffn.shared_experts.w3.weight"]
    assert validate.scale_report(ck).ok


def test_check_finite_names_the_first_failing_layer(w4a16, tmp_path):
    ck_path = _copy(w4a16, tmp_path, "nan")
    ck = open_checkpoint(ck_path)
    name = "model.layers.1.attn_norm.weight"
    w = np.array(ck.get(name))
    w[3] = np.inf
    writer.update_checkpoint(ck_path, {name: w})
    module, _ = C.load_model(ck_path)
    with pytest.raises(C.NonFiniteError, match=r"layer 1: the input of layers\.1\.attn\.wq_a is"):
        C.check_finite(module, EVAL)


def test_amax_mapping_fallbacks():
    entries = {f"layers.0.ffn.experts.{e}.w{p}.weight": f"layers.0.ffn.experts.{e}.w{p}.weight"
               for e in range(3) for p in (1, 2, 3)}
    entries.update({"mtp.0.ffn.experts.1.w2.weight": "mtp.0.ffn.experts.1.w2.weight",
                    "layers.0.attn.wq_a.weight": "layers.0.attn.wq_a.weight",
                    "layers.0.attn.wkv.weight": "layers.0.attn.wkv.weight"})
    observed = {"layers.0.ffn.experts.w13": np.float32(2.0), "layers.0.ffn.experts.w2": np.float32([0.5, 0, 3.0]),
                "layers.0.attn.wq_a": np.float32(1.0), "layers.0.attn.wkv": np.float32(1.5)}
    amax, notes = C.amax_for_modules(entries, observed)
    assert amax["layers.0.ffn.experts.1.w1.weight"] == 2.0
    assert amax["layers.0.ffn.experts.0.w2.weight"] == 0.5
    assert amax["layers.0.ffn.experts.1.w2.weight"] == 3.0            # saw no token: max of its siblings
    assert amax["mtp.0.ffn.experts.1.w2.weight"] == 3.0               # MTP: largest main-layer value
    assert amax["layers.0.attn.wq_a.weight"] == amax["layers.0.attn.wkv.weight"] == 1.5
    assert any("saw no tokens" in n for n in notes)
    with pytest.raises(C.CalibrationError, match=r"layers\.0\.attn\.wo_b"):
        C.amax_for_modules({"layers.0.attn.wo_b.weight": "layers.0.attn.wo_b.weight"}, observed)
    t, v = C.input_scale_value("m", 0.6758, convention=formats.CT)
    assert t == "m.input_global_scale" and v.shape == (1,) and abs(float(v[0]) - 3977.5) < 0.5
    t, v = C.input_scale_value("m", 0.6758, convention=formats.MODELOPT)
    assert t == "m.input_scale" and v.shape == () and abs(float(v) - 2.5141e-4) < 1e-8


def test_calibration_data_forms(tmp_path):
    b = C.calibration_batches(np.arange(300) % 7, batch_size=2, seq_len=128)
    assert [x.shape for x in b] == [(2, 128), (1, 44)]
    b = C.calibration_batches([[1, 2, 3], [4, 5, 6], [7, 8]], batch_size=4)
    assert [x.shape for x in b] == [(2, 3), (1, 2)]
    from megamoe_jax.tokenizer import ByteTokenizer
    for f, content in ByteTokenizer.hf_files().items():
        (tmp_path / f).write_text(json.dumps(content))
    (tmp_path / "data.txt").write_text("hello calibration\n" * 10)
    b = C.calibration_batches(tmp_path / "data.txt", tokenizer_path=tmp_path, seq_len=64)
    assert b[0][0, :5].tolist() == list(b"hello")
    with pytest.raises(C.CalibrationError, match="tokenizer"):
        C.calibration_batches(tmp_path / "data.txt", tokenizer_path=tmp_path / "nowhere")
    with pytest.raises(C.CalibrationError, match="empty"):
        C.calibration_batches([])
    with pytest.raises(C.CalibrationError, match="integers"):
        C.calibration_batches(np.ones((2, 4), np.float32))
