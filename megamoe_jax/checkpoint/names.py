"""The name table: DeepSeek-native names <-> transformers names, for every DeepSeek-V4 tensor.

Three conventions are found in the wild:
  * DeepSeek-native ([R] `inference/convert.py`; DeepSeek and NVIDIA ModelOpt releases):
      "layers.3.attn.wq_a.weight", "layers.3.ffn.experts.7.w1.weight", "hc_head_fn", "embed.weight", ...
  * transformers 5.23 `save_pretrained` output: its conversion mapping is reverted on save, which gives the
    native names with a "model." prefix, EXCEPT for a few patterns that do not revert cleanly:
      "model.embed_tokens.weight", "head.weight" (no prefix), "model.hc_head.hc_fn|hc_base|hc_scale",
      and the attention's kv norm saved as "model.layers.N.attn.norm.weight" (not "attn.kv_norm").
  * HF module names (transformers' in-memory state dict; llm-compressor / compressed-tensors exports):
      "model.layers.3.self_attn.q_a_proj.weight", "...mlp.experts.gate_up_proj" (stacked, [E, 2I, D]),
      "...mlp.experts.7.gate_proj.weight" (per expert), "lm_head.weight", "model.hc_head.hc_fn", ...

`canonical_name(name)` maps any of them to the DeepSeek-native name without a "model." prefix. Quantization
companions keep their suffix ("...wq_a.scale", "...w1.weight_scale_2", "...input_global_scale"). Stacked HF
experts map to "layers.N.ffn.experts.w13.weight" ([E, 2I, D]: w1 rows then w3 rows) and
"layers.N.ffn.experts.w2.weight" ([E, D, I]).
"""
from __future__ import annotations

import re

# Last name components that name a tensor of a module rather than a module (weights and quant companions).
LEAF_SUFFIXES = ("weight", "bias", "scale", "weight_packed", "weight_scale", "weight_scale_2",
                 "weight_global_scale", "input_scale", "input_global_scale", "weight_shape", "weight_zero_point")

# Attention sub-paths (after "attn."): HF/transformers module path -> native module path.
_ATTN = {
    "q_a_proj": "wq_a", "q_a_norm": "q_norm", "q_b_proj": "wq_b", "kv_proj": "wkv",
    "norm": "kv_norm",                    # transformers save_pretrained writes the kv norm as "attn.norm"
    "o_a_proj": "wo_a", "o_b_proj": "wo_b", "sinks": "attn_sink",
    "compressor.kv_proj": "compressor.wkv", "compressor.gate_proj": "compressor.wgate",
    "compressor.position_bias": "compressor.ape", "compressor.kv_norm": "compressor.norm",
    "compressor.indexer.kv_proj": "indexer.compressor.wkv",
    "compressor.indexer.gate_proj": "indexer.compressor.wgate",
    "compressor.indexer.position_bias": "indexer.compressor.ape",
    "compressor.indexer.kv_norm": "indexer.compressor.norm",
    "compressor.indexer.q_b_proj": "indexer.wq_b",
    "compressor.indexer.scorer.weights_proj": "indexer.weights_proj",
}
_EXPERT_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "attn_hc.fn": "hc_attn_fn", "attn_hc.base": "hc_attn_base", "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn", "ffn_hc.base": "hc_ffn_base", "ffn_hc.scale": "hc_ffn_scale",
}
_TOP = {
    "embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight",
    "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale",
}
_LAYER_RE = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")


def _split_leaf(path: str) -> tuple[str, str]:
    head, _, last = path.rpartition(".")
    if head and last in LEAF_SUFFIXES:
        return head, "." + last
    return path, ""


def _attn(tail: str) -> str:
    module, leaf = _split_leaf(tail)
    return _ATTN.get(module, module) + leaf


def _ffn(tail: str) -> str:
    if tail == "gate.e_score_correction_bias":
        return "gate.bias"
    m = re.fullmatch(r"experts\.(gate_up_proj|down_proj)", tail)       # transformers' stacked experts
    if m:
        return "experts." + ("w13" if m.group(1) == "gate_up_proj" else "w2") + ".weight"
    module, leaf = _split_leaf(tail)
    m = re.fullmatch(r"(experts\.\d+|shared_experts)\.(gate_proj|up_proj|down_proj)", module)
    if m:
        module = f"{m.group(1)}.{_EXPERT_PROJ[m.group(2)]}"
    return module + leaf


def canonical_name(name: str) -> str:
    """DeepSeek-native name (no "model." prefix) for a tensor name in any of the three conventions."""
    n = name
    while n.startswith("model."):
        n = n[len("model."):]
    if n in _TOP:
        return _TOP[n]
    m = _LAYER_RE.match(n)
    if not m:
        return n
    kind, idx, rest = m.groups()
    prefix = f"{kind}.{idx}."
    if rest.startswith("self_attn."):
        return prefix + "attn." + _attn(rest[len("self_attn."):])
    if rest.startswith("attn."):
        return prefix + "attn." + _attn(rest[len("attn."):])
    if rest.startswith("mlp."):
        return prefix + "ffn." + _ffn(rest[len("mlp."):])
    if rest.startswith("ffn."):
        return prefix + "ffn." + _ffn(rest[len("ffn."):])
    if kind == "mtp" and rest.startswith("hc_head."):
        return prefix + _TOP.get(rest, rest)
    module, leaf = _split_leaf(rest)
    if rest in _BLOCK:
        return prefix + _BLOCK[rest]
    return prefix + _BLOCK.get(module, module) + leaf


# ---- the other direction -----------------------------------------------------------------------------------

_ATTN_INV = {v: k for k, v in _ATTN.items() if k != "norm"}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}
_EXPERT_PROJ_INV = {v: k for k, v in _EXPERT_PROJ.items()}


def hf_module_name(canonical: str) -> str:
    """transformers' in-memory (HF module) name for a native name, e.g. 'layers.0.attn.wq_a.weight' ->
    'model.layers.0.self_attn.q_a_proj.weight'. Per-expert weights get the per-expert split naming
    ('mlp.experts.E.gate_proj.weight'); transformers itself holds them fused as 'mlp.experts.gate_up_proj'."""
    if canonical in _TOP_INV:
        t = _TOP_INV[canonical]
        return t if t == "lm_head.weight" else "model." + t
    m = _LAYER_RE.match(canonical)
    if not m:
        return "model." + canonical
    kind, idx, rest = m.groups()
    prefix = ("model.layers." if kind == "layers" else "mtp.") + idx + "."
    if rest.startswith("attn."):
        module, leaf = _split_leaf(rest[len("attn."):])
        return prefix + "self_attn." + _ATTN_INV.get(module, module) + leaf
    if rest.startswith("ffn."):
        tail = rest[len("ffn."):]
        if tail == "gate.bias":
            return prefix + "mlp.gate.e_score_correction_bias"
        if tail == "experts.w13.weight":
            return prefix + "mlp.experts.gate_up_proj"
        if tail == "experts.w2.weight":
            return prefix + "mlp.experts.down_proj"
        module, leaf = _split_leaf(tail)
        mm = re.fullmatch(r"(experts\.\d+|shared_experts)\.(w1|w2|w3)", module)
        if mm:
            module = f"{mm.group(1)}.{_EXPERT_PROJ_INV[mm.group(2)]}"
        return prefix + "mlp." + module + leaf
    module, leaf = _split_leaf(rest)
    if rest in _BLOCK_INV:
        return prefix + _BLOCK_INV[rest]
    return prefix + _BLOCK_INV.get(module, module) + leaf


def is_mtp(canonical: str) -> bool:
    return canonical.startswith("mtp.")


def layer_of(canonical: str) -> int | None:
    """Main-layer index of a native name ('layers.N....'), None for top-level and MTP tensors."""
    m = _LAYER_RE.match(canonical)
    return int(m.group(2)) if m and m.group(1) == "layers" else None


_EXPERT_RE = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def expert_of(canonical: str) -> tuple[int, int, str] | None:
    """(layer, expert, 'w1'|'w2'|'w3') for a per-expert routed weight name, else None."""
    m = _EXPERT_RE.match(canonical)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None
