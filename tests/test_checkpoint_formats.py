"""Format detection by suffix + dtype, shape checks, config cross-checks and decoding of every format."""

import ml_dtypes
import numpy as np
import pytest

from megamoe_jax.checkpoint import formats
from megamoe_jax.checkpoint.reader import CheckpointError, open_checkpoint
from tests.checkpoint_fixtures import (CT_CONFIG, CT_CONFIG_W4A16, E4M3, E8M0, FP8_CONFIG, MO_CONFIG, MO_HF_QUANT,
                                       ct_module, mo_module, nvfp4_parts, save)

BF16 = ml_dtypes.bfloat16


def _mixed(rng):
    """A DeepSeek-style mixed file: ModelOpt NVFP4 experts, FP8 attention, MXFP4 MTP experts, bf16 norms."""
    t = {"layers.0.attn_norm.weight": np.ones(64, BF16), "layers.0.hc_attn_scale": np.ones(3, np.float32),
         "layers.0.attn.wq_a.weight": rng.standard_normal((160, 64)).astype(np.float32).astype(E4M3),
         "layers.0.attn.wq_a.scale": np.array([[127], [126]], np.uint8).view(E8M0),
         "mtp.0.ffn.experts.0.w1.weight": rng.integers(-128, 127, (32, 32), dtype=np.int8),
         "mtp.0.ffn.experts.0.w1.scale": np.full((32, 2), 127, np.uint8).view(E8M0)}
    for e in range(2):
        t.update(mo_module(f"layers.0.ffn.experts.{e}.w1", *nvfp4_parts(rng, 32, 64), g_in=0.5 / 2688))
    return t


def test_layout_mixed_modelopt_file(tmp_path):
    rng = np.random.default_rng(0)
    ck = open_checkpoint(save(tmp_path, _mixed(rng), MO_CONFIG, hf_quant_config=MO_HF_QUANT))
    lay = formats.layout(ck)
    kinds = {n: (e.kind, e.convention) for n, e in lay.items()}
    assert kinds == {
        "layers.0.attn.wq_a.weight": ("fp8_block", "deepseek"),
        "layers.0.attn_norm.weight": ("plain", None),
        "layers.0.ffn.experts.0.w1.weight": ("nvfp4", "modelopt"),
        "layers.0.ffn.experts.1.w1.weight": ("nvfp4", "modelopt"),
        "layers.0.hc_attn_scale": ("plain", None),
        "mtp.0.ffn.experts.0.w1.weight": ("mxfp4", "deepseek"),
    }
    assert lay["layers.0.ffn.experts.0.w1.weight"].parts == {
        "weight": "layers.0.ffn.experts.0.w1.weight", "block_scale": "layers.0.ffn.experts.0.w1.weight_scale",
        "global_scale": "layers.0.ffn.experts.0.w1.weight_scale_2",
        "input_scale": "layers.0.ffn.experts.0.w1.input_scale"}
    assert formats.weight_names(ck) == list(kinds)


def test_layout_compressed_tensors_and_hf_names(tmp_path):
    rng = np.random.default_rng(1)
    t = {"model.layers.0.self_attn.q_a_proj.weight": rng.standard_normal((32, 32)).astype(BF16),
         "model.layers.0.attn_hc.scale": np.ones(3, np.float32),        # a plain parameter named "scale"
         "model.layers.0.self_attn.kv_proj.weight": rng.standard_normal((32, 32)).astype(np.float32).astype(E4M3),
         "model.layers.0.self_attn.kv_proj.weight_scale": np.ones((1, 1), np.float32)}     # CT FP8 block
    t.update(ct_module("model.layers.0.mlp.experts.3.gate_proj", *nvfp4_parts(rng, 32, 64), g_in=0.3 / 2688))
    t["model.layers.0.mlp.experts.4.gate_proj.weight_packed"] = rng.integers(0, 255, (32, 32), dtype=np.uint8)
    t["model.layers.0.mlp.experts.4.gate_proj.weight_scale"] = np.full((32, 2), 120, np.uint8)   # CT MXFP4
    cfg = {**CT_CONFIG}
    ck = open_checkpoint(save(tmp_path, t, cfg))
    lay = formats.layout(ck)
    assert lay["model.layers.0.mlp.experts.3.gate_proj.weight"].kind == "nvfp4"
    assert lay["model.layers.0.mlp.experts.3.gate_proj.weight"].convention == "compressed-tensors"
    assert lay["model.layers.0.mlp.experts.4.gate_proj.weight"].kind == "mxfp4"
    assert lay["model.layers.0.self_attn.kv_proj.weight"].kind == "fp8_block"
    assert lay["model.layers.0.attn_hc.scale"].kind == "plain"
    assert lay["model.layers.0.self_attn.q_a_proj.weight"].kind == "plain"


def _expect(tmp_path, tensors, config, pattern, hf=None):
    ck = open_checkpoint(save(tmp_path, tensors, config, hf_quant_config=hf))
    with pytest.raises(CheckpointError, match=pattern):
        formats.layout(ck)


def test_bad_tensors_are_named(tmp_path):
    rng = np.random.default_rng(2)
    p, bs, g = nvfp4_parts(rng, 16, 64)
    base = mo_module("l.w1", p, bs, g)
    cases = [
        # wrong dtype: bf16 weight with NVFP4 companions
        ({**base, "l.w1.weight": np.zeros((16, 32), BF16)}, r"'l\.w1\.weight': is BF16 but has the quantization "
                                                            r"tensor 'l\.w1\.weight_scale"),
        # missing global scale
        ({k: v for k, v in base.items() if not k.endswith("weight_scale_2")}, r"no weight_scale_2"),
        # misshapen block scale
        ({**base, "l.w1.weight_scale": bs[:, :3]}, r"'l\.w1\.weight_scale': shape \[16, 3\] does not match"),
        # misshapen global scale
        ({**base, "l.w1.weight_scale_2": np.ones(3, np.float32)}, r"weight_scale_2': shape \[3\]: expected a single"),
        # orphan companion (extra tensor)
        ({**base, "l.w9.input_scale": np.float32(1)}, r"'l\.w9\.input_scale': quantization tensor without a weight"),
        # extra tensor for a quantized module
        ({**base, "l.w1.input_global_scale": np.ones(1, np.float32)},
         r"'l\.w1\.input_global_scale': unexpected tensor for a nvfp4 \(modelopt\)"),
        # packed weight with the wrong dtype
        ({"l.w1.weight_packed": p.view(np.int8), "l.w1.weight_scale": bs, "l.w1.weight_global_scale":
          np.ones(1, np.float32)}, r"weight_packed must be U8, found I8"),
        # FP8 weight without any scale
        ({"l.wq.weight": np.zeros((4, 4), E4M3)}, r"'l\.wq\.weight': is F8_E4M3 but has no scale companion"),
        # FP8 block scale of the wrong grid
        ({"l.wq.weight": np.zeros((130, 4), E4M3), "l.wq.scale": np.ones((1, 1), np.float32)},
         r"'l\.wq\.scale': shape \[1, 1\] does not match FP8 weight"),
    ]
    for i, (t, pat) in enumerate(cases):
        _expect(tmp_path / str(i), t, MO_CONFIG if i < 6 else FP8_CONFIG, pat, MO_HF_QUANT if i < 6 else None)


def test_config_disagreeing_with_weights(tmp_path):
    rng = np.random.default_rng(3)
    ct = ct_module("m.experts.0.w1", *nvfp4_parts(rng, 16, 32))            # W4A16 tensors
    mo = mo_module("m.experts.0.w1", *nvfp4_parts(rng, 16, 32), g_in=0.1)
    _expect(tmp_path / "a", ct, CT_CONFIG, r"declares static NVFP4 activation scales but "
                                           r"m\.experts\.0\.w1\.input_global_scale is missing")
    _expect(tmp_path / "b", mo, CT_CONFIG, r"modelopt NVFP4 tensors, but config\.json declares quant_method "
                                           r"'compressed-tensors'")
    _expect(tmp_path / "c", ct, {"model_type": "deepseek_v4"}, r"is nvfp4 \(compressed-tensors\) but config\.json "
                                                              r"has no quantization_config")
    ign = {**CT_CONFIG_W4A16, "quantization_config": {**CT_CONFIG_W4A16["quantization_config"],
                                                      "ignore": ["re:.*experts.*"]}}
    _expect(tmp_path / "d", ct, ign, r"module 'm\.experts\.0\.w1' is NVFP4 but the checkpoint's ignore list")
    _expect(tmp_path / "e", {"x.weight": np.ones((2, 2), BF16)}, CT_CONFIG, r"declares compressed-tensors but no "
                                                                           r"tensor of the checkpoint is quantized")
    w4a16 = {**MO_HF_QUANT, "quantization": {**MO_HF_QUANT["quantization"], "quant_algo": "W4A16_NVFP4"}}
    _expect(tmp_path / "f", mo, {"model_type": "deepseek_v4"}, r"declares weight-only NVFP4 .* but this activation "
                                                               r"scale is present", hf=w4a16)
    # and the consistent versions load
    formats.layout(open_checkpoint(save(tmp_path / "g", ct, CT_CONFIG_W4A16)))
    formats.layout(open_checkpoint(save(tmp_path / "h", mo, MO_CONFIG, hf_quant_config=MO_HF_QUANT)))


def test_ignore_pattern_semantics():
    assert formats.matches("model.layers.3.mlp.gate", ["re:.*mlp.gate$"])
    assert not formats.matches("model.layers.3.mlp.gate_proj", ["re:.*mlp.gate$"])
    assert formats.matches("model.layers.3.mlp.gate", ["model.layers.*.mlp.gate"])
    assert formats.matches("mtp.0.ffn.experts.1.w1", ["mtp.*"])
    assert formats.matches("lm_head", ["lm_head"]) and formats.matches("model.lm_head", ["lm_head"])
    assert not formats.matches("lm_head_x", ["lm_head"])


# ---- decoding against independent numpy references --------------------------------------------------------

E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _unpack(packed):
    p = np.asarray(packed).view(np.uint8)
    return E2M1[np.stack([p & 0xF, p >> 4], axis=-1).reshape(p.shape[:-1] + (-1,))]


def test_decode_deepseek_fp8_and_mxfp4(tmp_path):
    rng = np.random.default_rng(4)
    n, k = 200, 320                                     # ragged 128-blocks on both dims
    w = (rng.standard_normal((n, k)) * 50).astype(np.float32).astype(E4M3)
    sb = rng.integers(110, 135, (2, 3)).astype(np.uint8)
    pe = rng.integers(0, 256, (40, 48), dtype=np.uint8)     # MXFP4 [40, 96]
    se = rng.integers(100, 140, (40, 3)).astype(np.uint8)
    t = {"layers.0.attn.wq_a.weight": w, "layers.0.attn.wq_a.scale": sb.view(E8M0),
         "layers.0.attn.wkv.weight": w, "layers.0.attn.wkv.scale": np.ldexp(1.0, sb.astype(int) - 127).astype(
             np.float32) * 1.5,                             # "-Base": fp32 block scales
         "layers.0.ffn.experts.0.w1.weight": pe.view(np.int8), "layers.0.ffn.experts.0.w1.scale": se.view(E8M0)}
    ck = open_checkpoint(save(tmp_path, t, FP8_CONFIG))
    got = np.asarray(formats.read_weight(ck, "layers.0.attn.wq_a.weight").dequantize())
    full = np.repeat(np.repeat(np.ldexp(1.0, sb.astype(int) - 127), 128, 0), 128, 1)[:n, :k]
    np.testing.assert_array_equal(got, w.astype(np.float32) * full)
    got = np.asarray(formats.read_weight(ck, "layers.0.attn.wkv.weight").dequantize())
    np.testing.assert_array_equal(got, w.astype(np.float32) * (full * 1.5).astype(np.float32))
    got = np.asarray(formats.read_weight(ck, "layers.0.ffn.experts.0.w1.weight").dequantize())
    ref = _unpack(pe) * np.repeat(np.ldexp(1.0, se.astype(int) - 127), 32, 1)
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    # E8M0 NaN (0xFF) is refused with the tensor's name
    t["layers.0.attn.wq_a.scale"] = np.array([[255, 127, 127], [127, 127, 127]], np.uint8).view(E8M0)
    ck = open_checkpoint(save(tmp_path / "nan", t, FP8_CONFIG))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.wq_a\.scale':.*0xFF"):
        formats.read_weight(ck, "layers.0.attn.wq_a.weight")


def test_decode_nvfp4_both_conventions(tmp_path):
    rng = np.random.default_rng(5)
    p, bs, g = nvfp4_parts(rng, 24, 96, amax=3.0)
    ga = np.float32(0.75) / np.float32(2688)
    ref = (_unpack(p).reshape(24, 6, 16) * bs.astype(np.float32)[..., None]).reshape(24, 96) * g
    ct = open_checkpoint(save(tmp_path / "ct", ct_module("layers.0.ffn.experts.0.w2", p, bs, g, ga), CT_CONFIG))
    mo = open_checkpoint(save(tmp_path / "mo", mo_module("layers.0.ffn.experts.0.w2", p, bs, g, ga), MO_CONFIG,
                              hf_quant_config=MO_HF_QUANT))
    for ck in (ct, mo):
        t = formats.read_weight(ck, "layers.0.ffn.experts.0.w2.weight")
        assert t.shape == (24, 96) and t.global_scale.shape == (1,) and t.input_scale.shape == ()
        np.testing.assert_array_equal(np.asarray(t.dequantize()), ref.astype(np.float32))
        np.testing.assert_allclose(float(t.input_scale), ga, rtol=1e-7)
        assert formats.read_weight(ck, "layers.0.ffn.experts.0.w2.weight",
                                   activation_scales="drop").input_scale is None
    t = formats.read_weight(ct, "layers.0.ffn.experts.0.w2.weight")
    # compressed-tensors' stored multiplier is kept for exact W4A4 activation codes
    assert np.float32(t.input_multiplier) == ct.get("layers.0.ffn.experts.0.w2.input_global_scale")[0]
    assert formats.read_weight(mo, "layers.0.ffn.experts.0.w2.weight").input_multiplier is None


def test_iter_weights_streams_layers(tmp_path):
    rng = np.random.default_rng(6)
    t = {}
    for layer in range(3):
        for e in range(2):
            t.update(mo_module(f"layers.{layer}.ffn.experts.{e}.w1", *nvfp4_parts(rng, 16, 32), g_in=0.1))
        t[f"layers.{layer}.attn_norm.weight"] = np.ones(16, BF16)
    ck = open_checkpoint(save(tmp_path, t, MO_CONFIG, hf_quant_config=MO_HF_QUANT, shards=3))
    got = dict(formats.iter_weights(ck, progress=False))
    assert sorted(got) == formats.weight_names(ck) and len(got) == 9
    assert not ck._maps                                          # every shard unmapped at the end
