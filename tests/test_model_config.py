"""ModelConfig: both config.json forms, presets, validation errors (no JAX compilation here)."""
import json

import pytest

from megamoe_jax.model.config import (CSA, HCA, SLIDING, ConfigError, ModelConfig, YarnConfig, flash, pro,
                                      tiny)
from tests.helpers_tiny import TINY_CONFIGS, hf_config, legacy_config_dict


def test_presets_shapes():
    f, p = flash(), pro()
    assert f.num_hidden_layers == 43 and len(f.compress_ratios) == 43
    assert f.compress_ratios[:4] == (0, 0, 4, 128) and f.compress_ratios[-1] == 4
    assert p.compress_ratios[:4] == (128, 128, 4, 128) and p.compress_ratios[-1] == 4
    assert f.num_hash_layers == 3 and p.num_hash_layers == 3
    assert (f.routed_scaling_factor, p.routed_scaling_factor) == (1.5, 2.5)
    assert (f.index_topk, p.index_topk) == (512, 1024)
    assert f.yarn == YarnConfig(16.0, 65536, 32.0, 1.0)
    assert f.hc_mix_dim == 24 and f.nope_head_dim == 448
    t = tiny()
    assert set(t.layer_types) == {SLIDING, CSA, HCA}
    assert set(t.mlp_layer_types) == {"hash_moe", "moe"} and t.yarn is not None
    hash(t), hash(f)                                             # usable as jit static arguments


def test_rope_per_layer_type():
    t = tiny()
    assert t.rope_base(0) == t.rope_theta and t.rope_yarn(0) is None            # SWA: no YaRN ([R])
    assert t.rope_base(1) == t.compress_rope_theta and t.rope_yarn(1) == t.yarn


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_roundtrip_through_transformers_config(name):
    cfg = TINY_CONFIGS[name]
    # Our own writer, transformers' normalisation of it, and the legacy form all read back to the same config.
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    assert ModelConfig.from_hf_config(json.loads(hf_config(cfg).to_json_string())) == cfg
    assert ModelConfig.from_hf_config(legacy_config_dict(cfg)) == cfg


def test_legacy_release_config():
    # The DeepSeek-V4-Flash release form: 44 compress_ratios (trailing MTP entry), num_hash_layers, rope_scaling.
    f = flash()
    d = legacy_config_dict(f)
    assert len(d["compress_ratios"]) == 44
    d["rope_scaling"]["mscale"] = 0
    d["quantization_config"] = {"quant_method": "fp8"}
    d["topk_method"] = "noaux_tc"
    assert ModelConfig.from_hf_config(d) == f
    # transformers itself reads the legacy form the same way
    from transformers import DeepseekV4Config
    t = DeepseekV4Config(**legacy_config_dict(f))
    assert ModelConfig.from_hf_config(t.to_dict()) == f


def test_eos_list_and_flat_rope_parameters():
    d = tiny().to_hf_config()
    d["eos_token_id"] = [1, 7]
    d["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                            "beta_fast": 32, "beta_slow": 1}
    c = ModelConfig.from_hf_config(d)
    assert c.eos_token_ids == (1, 7) and c.yarn == tiny().yarn


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("hidden_size"), "hidden_size"),
    (lambda d: d.update(model_type="llama"), "model_type"),
    (lambda d: d.update(layer_types=d["layer_types"][:2]), "layer_types has 2 entries"),
    (lambda d: d.update(layer_types=["full_attention"] * 4), "layer_types entries"),
    (lambda d: d.update(mlp_layer_types=["dense"] * 4), "mlp_layer_types\\[0\\]"),
    (lambda d: d.update(compress_rates={CSA: 8, HCA: 16}), "CSA .* needs ratio 4"),
    (lambda d: d.update(num_key_value_heads=2), "num_key_value_heads"),
    (lambda d: d.update(hidden_act="gelu"), "hidden_act"),
    (lambda d: d.update(o_groups=3), "divisible by o_groups"),
    (lambda d: d.update(num_experts_per_tok=99), "num_experts_per_tok"),
    (lambda d: d.update(scoring_func="relu"), "scoring_func"),
    (lambda d: d["rope_parameters"]["compress"].update(attention_factor=1.3), "attention_factor"),
    (lambda d: d["rope_parameters"]["main"].update(rope_type="yarn"), "no YaRN on sliding-window"),
    (lambda d: d["rope_parameters"]["compress"].update(rope_type="longrope"), "longrope"),
    (lambda d: (d.pop("layer_types"), d.pop("compress_rates")), "layer_types.*compress_ratios"),
    (lambda d: d.update(rms_norm_eps=-1.0), "rms_norm_eps"),
])
def test_bad_configs_name_the_field(mutate, match):
    d = tiny().to_hf_config()
    mutate(d)
    with pytest.raises(ConfigError, match=match) as e:
        ModelConfig.from_hf_config(d, source="/some/ckpt/config.json")
    assert "/some/ckpt/config.json" in str(e.value)


def test_legacy_short_compress_ratios():
    d = legacy_config_dict(tiny())
    d["compress_ratios"] = [0, 4]
    with pytest.raises(ConfigError, match="compress_ratios has 2 entries"):
        ModelConfig.from_hf_config(d)


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="compress_ratios has 3 entries"):
        tiny(compress_ratios=(0, 4, 16))
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        tiny(qk_rope_head_dim=7)
    with pytest.raises(ConfigError, match="index_head_dim"):
        tiny(index_head_dim=8)
