"""Tiny random transformers DeepSeek-V4 models as test oracles (shared by model, checkpoint and sharding tests).

    from tests.helpers_tiny import tiny_checkpoint, TINY_CONFIGS
    path, hf_model = tiny_checkpoint(tmp_path, TINY_CONFIGS["all_types"], seed=0)
    logits = hf_logits(hf_model, ids)                    # float32 numpy [B, T, V]

`make_hf_model(cfg, seed)` builds transformers' `DeepseekV4ForCausalLM` (torch, CPU, fp32) from a ModelConfig and
fills EVERY tensor with non-trivial random values. transformers' own init leaves several tensors at values that
hide bugs: tid2eid = 0 (every token to expert 0), gate bias = 0, hc base = 0 / scale = 1, sinks = 0,
position_bias (ape) = 0, norm weights = 1. Here: linears ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms ~ 1 + N(0,
0.1^2), hc fn ~ N(0, 1/(n*D)), hc base/scale, sinks, ape, gate bias all random, tid2eid a random table of k
distinct experts per token. Scales are chosen so that softmaxes are far from uniform and the SwiGLU clamps fire.

`tiny_checkpoint(dir, cfg, seed, legacy_config=False)` also `save_pretrained`s it (DeepSeek-native names, see
megamoe_jax/checkpoint/names.py) and optionally rewrites config.json in the legacy form (`compress_ratios` with a
trailing MTP entry, `num_hash_layers`, `rope_scaling`, `qk_rope_head_dim`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from megamoe_jax.model.config import HASH_MOE, ModelConfig, YarnConfig, tiny

# Tiny torch models are dominated by per-op overhead; with 2 test workers on 2 cores, torch's default
# intra-op threads oversubscribe the machine and make transformers' generate ~10x slower. One thread each.
torch.set_num_threads(1)

# Configs covering every layer type (0 = SWA, 4 = CSA, m = HCA) and MLP type (hash / top-k), YaRN on.
TINY_CONFIGS: dict[str, ModelConfig] = {
    # the preset: SWA+hash, CSA+hash, HCA(16)+topk, CSA+topk
    "all_types": tiny(),
    # different widths / head counts, hc_mult 2, HCA first and hash-routed, odd window, 3 Sinkhorn iterations
    "variant": tiny(
        num_hidden_layers=3, compress_ratios=(8, 0, 4), mlp_layer_types=(HASH_MOE, "moe", "moe"),
        hidden_size=48, num_attention_heads=6, head_dim=24, qk_rope_head_dim=8, q_lora_rank=24, o_groups=3,
        o_lora_rank=8, sliding_window=5, index_n_heads=16, index_head_dim=16, index_topk=3, n_routed_experts=6,
        num_experts_per_tok=3, moe_intermediate_size=24, hc_mult=2, hc_sinkhorn_iters=3,
        routed_scaling_factor=2.5, swiglu_limit=0.8, vocab_size=199, yarn=YarnConfig(8.0, 32, 16.0, 2.0),
        eos_token_ids=(3,), bos_token_id=2),
    # DeepSeek's real HCA ratio (slower: needs >= 256 tokens for 2 HCA entries)
    "hca128": tiny(num_hidden_layers=2, compress_ratios=(128, 4), mlp_layer_types=(HASH_MOE, "moe"),
                   max_position_embeddings=512, yarn=YarnConfig(4.0, 128, 32.0, 1.0), sliding_window=16,
                   index_topk=8),
}


def hf_config(cfg: ModelConfig):
    from transformers import DeepseekV4Config
    return DeepseekV4Config(**cfg.to_hf_config())


@torch.no_grad()
def randomize_(model, cfg: ModelConfig, seed: int = 0) -> None:
    """Fill every parameter and buffer of a transformers DeepseekV4ForCausalLM with non-trivial random values."""
    g = torch.Generator().manual_seed(seed)

    def normal(t, std, mean=0.0):
        t.copy_(mean + std * torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype))

    n, d = cfg.hc_mult, cfg.hidden_size
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if "rotary_emb" in name or "inv_freq" in name:
            continue                                              # derived buffers, not weights
        if leaf == "tid2eid":
            perm = torch.argsort(torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=g), dim=-1)
            p.copy_(perm[:, : cfg.num_experts_per_tok].to(p.dtype))
        elif leaf == "e_score_correction_bias":
            normal(p, 0.3)
        elif leaf in ("fn", "hc_fn"):
            normal(p, 1.0 / math.sqrt(n * d))
        elif leaf in ("base", "hc_base"):
            normal(p, 0.5)
        elif leaf in ("scale", "hc_scale"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif leaf == "sinks":
            normal(p, 1.0)
        elif leaf == "position_bias":
            normal(p, 0.5)
        elif "norm" in name.rsplit(".", 2)[-2] or leaf == "weight" and p.ndim == 1:
            normal(p, 0.1, mean=1.0)                              # RMSNorm weights
        elif name.endswith("embed_tokens.weight"):
            normal(p, 1.0)
        elif leaf in ("gate_up_proj", "down_proj") and p.ndim == 3:
            normal(p, 1.0 / math.sqrt(p.shape[-1]))               # stacked experts [E, out, in]
        elif p.ndim == 2:
            normal(p, 1.0 / math.sqrt(p.shape[-1]))               # linears [out, in]
        else:
            raise AssertionError(f"randomize_: no rule for {name} {tuple(p.shape)}")


def make_hf_model(cfg: ModelConfig, seed: int = 0):
    """transformers DeepseekV4ForCausalLM (fp32, eval mode) with random non-trivial weights."""
    from transformers import DeepseekV4ForCausalLM
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(hf_config(cfg)).float().eval()
    randomize_(model, cfg, seed)
    return model


def legacy_config_dict(cfg: ModelConfig) -> dict:
    """config.json in the legacy / DeepSeek-release form for the same model."""
    d = cfg.to_hf_config()
    for k in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters", "partial_rotary_factor"):
        d.pop(k)
    n_hash = cfg.num_hash_layers
    if cfg.mlp_layer_types != (HASH_MOE,) * n_hash + ("moe",) * (cfg.num_hidden_layers - n_hash):
        raise ValueError("legacy configs can only express hash layers as a prefix (num_hash_layers)")
    d.update(compress_ratios=list(cfg.compress_ratios) + [0], num_hash_layers=n_hash,
             qk_rope_head_dim=cfg.qk_rope_head_dim)
    if cfg.yarn is not None:
        d["rope_scaling"] = {"type": "yarn", "factor": cfg.yarn.factor, "beta_fast": cfg.yarn.beta_fast,
                             "beta_slow": cfg.yarn.beta_slow,
                             "original_max_position_embeddings": cfg.yarn.original_max_position_embeddings}
    return d


def tiny_checkpoint(directory, cfg: ModelConfig, seed: int = 0, *, legacy_config: bool = False):
    """Build a random transformers model, save_pretrained it to `directory`; returns (path, hf_model)."""
    path = Path(directory)
    model = make_hf_model(cfg, seed)
    model.save_pretrained(path)
    if legacy_config:
        (path / "config.json").write_text(json.dumps(legacy_config_dict(cfg), indent=2))
    return path, model


@torch.no_grad()
def hf_logits(model, ids) -> np.ndarray:
    """transformers' fp32 logits for int ids [B, T] (no cache)."""
    out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


@torch.no_grad()
def hf_greedy(model, ids, max_new_tokens: int, eos_token_id=None) -> np.ndarray:
    """transformers' greedy `generate` (with its decode cache) for int ids [B, T]."""
    out = model.generate(torch.as_tensor(np.asarray(ids), dtype=torch.long), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
                         attention_mask=torch.ones(np.asarray(ids).shape, dtype=torch.long))
    return out.numpy()


def rel_err(a, b) -> float:
    """max |a - b| / max |b| over everything (the 'relative, max-abs over the vocab' tolerance measure)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
