"""Scale validation: both conventions normalised, implausible / wrong-convention / corrupt scales named."""
import numpy as np
import pytest

from megamoe_jax.checkpoint import formats, validate
from megamoe_jax.checkpoint.reader import open_checkpoint
from tests.checkpoint_fixtures import (CT_CONFIG, CT_CONFIG_W4A16, MO_CONFIG, MO_HF_QUANT, E4M3, ct_module,
                                       mo_module, nvfp4_parts, save)

AMAX_A = 0.67579                       # nvfp4_format.md TV8/TV9: input_scale 2.5141e-4 <=> G 3977.57
G_SMALL = np.float32(AMAX_A / 2688)    # the ModelOpt (dequant) value, 2.5141e-4
G_BIG = np.float32(1) / G_SMALL        # the compressed-tensors (multiplier) value, 3977.6


def _ckpt(tmp_path, convention, modules, **kw):
    rng = np.random.default_rng(0)
    t = {}
    for name, g_in in modules.items():
        parts = nvfp4_parts(rng, 16, 64, **kw)
        t.update(ct_module(name, *parts, g_in=g_in) if convention == "ct" else mo_module(name, *parts, g_in=g_in))
    static = any(v is not None for v in modules.values())
    if convention == "ct":
        return open_checkpoint(save(tmp_path, t, CT_CONFIG if static else CT_CONFIG_W4A16))
    hf = {**MO_HF_QUANT, "quantization": {**MO_HF_QUANT["quantization"],
                                          "quant_algo": "NVFP4" if static else "W4A16_NVFP4"}}
    return open_checkpoint(save(tmp_path, t, {"model_type": "deepseek_v4"}, hf_quant_config=hf))


def _raw(tmp_path, convention, module, stored_input):
    """A checkpoint whose input scale tensor holds exactly `stored_input` (as written, no conversion)."""
    rng = np.random.default_rng(1)
    parts = nvfp4_parts(rng, 16, 64)
    if convention == "ct":
        t = ct_module(module, *parts)
        t[f"{module}.input_global_scale"] = np.asarray([stored_input], np.float32)
        return open_checkpoint(save(tmp_path, t, CT_CONFIG))
    t = mo_module(module, *parts)
    t[f"{module}.input_scale"] = np.asarray(stored_input, np.float32)
    return open_checkpoint(save(tmp_path, t, MO_CONFIG, hf_quant_config=MO_HF_QUANT))


def test_correct_scales_pass_in_both_conventions(tmp_path):
    for conv in ("ct", "mo"):
        ck = _raw(tmp_path / conv, conv, "layers.0.attn.wq_a", G_BIG if conv == "ct" else G_SMALL)
        rep = validate.scale_report(ck)
        assert rep.ok and rep.checked == 1, str(rep)
        e = formats.entry(ck, "layers.0.attn.wq_a.weight")
        np.testing.assert_allclose(formats.global_scale(ck, e, "input_scale"), G_SMALL, rtol=1e-6)


def test_seed_bug_values_are_wrong_convention(tmp_path):
    # The seed bug: a dequant factor used as the multiplier (CT field holds 2.5e-4) and the reverse (MO field 3977).
    for conv, stored, other in (("ct", G_SMALL, "dequant factor"), ("mo", G_BIG, "multiplier")):
        ck = _raw(tmp_path / conv, conv, "layers.0.attn.wq_a", stored)
        rep = validate.scale_report(ck)
        assert len(rep.issues) == 1
        i = rep.issues[0]
        tensor = "layers.0.attn.wq_a." + ("input_global_scale" if conv == "ct" else "input_scale")
        assert (i.tensor, i.problem, i.repairable) == (tensor, "wrong convention", True)
        assert other in i.message and "0.6758" in i.message and "model.safetensors" in i.message
        with pytest.raises(validate.ScaleError, match=tensor.replace(".", r"\.") + r".*wrong convention"):
            rep.raise_if_bad()
        rep.raise_if_bad(allow_repairable=True)            # calibration may repair it


@pytest.mark.parametrize("stored,problem", [(np.nan, "not finite"), (np.inf, "not finite"), (0.0, "not positive"),
                                            (-3.0, "not positive"), (1e-43, "implausible"), (1e9, "implausible")])
def test_corrupt_input_scales(tmp_path, stored, problem):
    ck = _raw(tmp_path, "mo", "layers.1.ffn.experts.0.w2", stored)
    (i,) = validate.scale_report(ck).issues
    assert i.problem == problem and i.tensor == "layers.1.ffn.experts.0.w2.input_scale"


def test_bad_weight_scales_are_not_repairable(tmp_path):
    rng = np.random.default_rng(2)
    p, bs, g = nvfp4_parts(rng, 16, 64)
    t = mo_module("layers.0.ffn.experts.0.w1", p, bs, 0.0, g_in=G_SMALL)      # degenerate weight_scale_2 = 0
    ck = open_checkpoint(save(tmp_path, t, MO_CONFIG, hf_quant_config=MO_HF_QUANT))
    rep = validate.scale_report(ck)
    assert [(i.role, i.problem) for i in rep.issues] == [("weight global scale", "not positive")]
    with pytest.raises(validate.ScaleError, match=r"weight_scale_2 .*not positive"):
        rep.raise_if_bad(allow_repairable=True)
    # read_weight refuses before returning anything
    with pytest.raises(validate.ScaleError):
        formats.read_weight(ck, "layers.0.ffn.experts.0.w1.weight")


def test_block_scale_normalisation(tmp_path):
    # Largest block scale far below 448: the block scales do not belong to this global scale.
    ck = _ckpt(tmp_path / "a", "ct", {"layers.0.ffn.experts.0.w1": None}, block_max=12.0)
    (i,) = validate.scale_report(ck).issues
    assert i.role == "block scales" and i.tensor == "layers.0.ffn.experts.0.w1.weight_scale" and "12" in i.message
    assert not i.repairable
    # four-over-six (256) is fine
    assert validate.scale_report(_ckpt(tmp_path / "b", "mo", {"layers.0.x.w": None}, block_max=256.0)).ok
    # Fused shards sharing one stored global scale are judged together: w3's max may be small.
    rng = np.random.default_rng(3)
    p1, b1, g = nvfp4_parts(rng, 16, 64)
    p3, b3, _ = nvfp4_parts(rng, 16, 64, block_max=40.0)
    t = {**ct_module("layers.0.ffn.experts.0.w1", p1, b1, g), **ct_module("layers.0.ffn.experts.0.w3", p3, b3, g)}
    assert validate.scale_report(open_checkpoint(save(tmp_path / "c", t, CT_CONFIG_W4A16))).ok
    # ... but not with a different global scale
    t = {**ct_module("layers.0.ffn.experts.0.w1", p1, b1, g),
         **ct_module("layers.0.ffn.experts.0.w3", p3, b3, g * 2)}
    (i,) = validate.scale_report(open_checkpoint(save(tmp_path / "d", t, CT_CONFIG_W4A16))).issues
    assert i.weight == "layers.0.ffn.experts.0.w3.weight"
    # An all-zero weight's block scales are producer filler (CT writes 0.125): not judged.
    t = ct_module("layers.0.ffn.experts.0.w2", np.zeros((16, 32), np.uint8), np.full((16, 4), 0.125, E4M3), g)
    assert validate.scale_report(open_checkpoint(save(tmp_path / "e", t, CT_CONFIG_W4A16))).ok


def test_repair_mode_drops_bad_input_scales(tmp_path):
    ck = _raw(tmp_path, "ct", "layers.0.attn.wq_a", G_SMALL)
    with pytest.raises(validate.ScaleError):
        formats.read_weight(ck, "layers.0.attn.wq_a.weight")
    ck = _raw(tmp_path / "again", "ct", "layers.0.attn.wq_a", G_SMALL)
    formats.set_read_options(ck, bad_scales="repair")
    with pytest.warns(UserWarning, match="wrong convention"):
        formats._ensure_validated(ck)
    assert formats.read_options(ck)["bad_input_scales"] == {"layers.0.attn.wq_a.weight"}


def test_describe_reports_formats_and_scale_problems(tmp_path):
    from megamoe_jax.checkpoint.info import describe
    _raw(tmp_path / "ck", "ct", "layers.0.attn.wq_a", G_SMALL)
    info = describe(tmp_path / "ck")
    assert info.kinds == {"nvfp4 (compressed-tensors)": 1} and info.w4a4 == 1 and info.shards == 1
    assert not info.scales.ok
    text = str(info)
    assert "layers.0.attn.wq_a.input_global_scale" in text and "wrong convention" in text and "W4A4" in text


def test_block_scale_max_on_raw_bytes():
    rng = np.random.default_rng(9)
    v = rng.uniform(0, 448, 1000).astype(np.float32).astype(E4M3)
    assert validate.block_scale_max(v) == float(v.astype(np.float32).max())
    v[3] = -0.0
    assert validate.block_scale_max(v) == float(v.astype(np.float32).max())
    v[5] = -2.0
    assert np.isnan(validate.block_scale_max(v))
    w = np.array([1.0, 2.0], np.float32).astype(E4M3)
    assert validate.block_scale_max(w) == 2.0
    assert np.isnan(validate.block_scale_max(np.array([0x7F, 0x10], np.uint8).view(E4M3)))
