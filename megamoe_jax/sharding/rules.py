"""Partition rules: which mesh axis splits which dim of every parameter, keyed by its DeepSeek-native name.

One table, first match wins, on the native name without its ".weight" suffix, which is also the model's
parameter path ("layers.3.attn.wq_b"). A spec names a mesh axis (or None) per logical dim of the weight (`w.shape`, the
logical [N, K] / [E, N, K] shape for quantized weights). Every leaf of a quantized weight follows the same
logical spec (`pallas_kernels.ep_moe.weight_specs`): NVFP4 codes, E4M3 block scales, global and input scales,
MXFP4 codes and E8M0 scales, FP8 weights and their 128x128 scales are sharded together.

Fallback rule: a dim that does not split evenly at block boundaries (packed byte, 16/32/128 block) is
replicated, except the routed experts' E, which must divide by the "expert" size (ValueError otherwise).

| name (native, without ".weight")            | logical dims          | spec                      | why |
|---------------------------------------------|-----------------------|---------------------------|-----|
| embed, head                                 | [V, D]                | (tensor, None)            | vocab rows over tensor |
| *.ffn.experts.w1/w3                         | [E, I, D]             | (expert, tensor, None)    | E/ep experts per device; I over tensor when I/tp is block aligned |
| *.ffn.experts.w2                            | [E, D, I]             | (expert, None, tensor)    | same split of I (row-parallel inside the expert) |
| *.ffn.shared_experts.w1/w3                  | [I, D]                | (tensor, None)            | column-parallel |
| *.ffn.shared_experts.w2                     | [D, I]                | (None, tensor)            | row-parallel (XLA adds the all-reduce) |
| *.attn.wq_b                                 | [H*hd, Rq]            | (tensor, None)            | query heads |
| *.attn.attn_sink                            | [H]                   | (tensor,)                 | per head, follows wq_b |
| *.attn.wo_b                                 | [D, G*Ro]             | (None, tensor)            | row-parallel |
| everything else                             |                       | replicated                | norms, hc_* (mHC), gate + bias, tid2eid, wq_a, wkv (one KV head), compressors ([coff*hd, D]); wo_a (its grouped matmul is one ragged call that XLA cannot split by group: a split would be all-gathered every step); the indexer (splitting its heads would all-reduce a [T, S/4] score per layer) |

Everything is replicated over "data". Activations are not annotated: jit propagates these placements (GSPMD)
and inserts the all-reduces/all-gathers of the tensor-parallel layers; the routed experts alone run as an
explicit shard_map with all-to-all dispatch and combine.
"""
from __future__ import annotations

import dataclasses
import re

from jax.sharding import PartitionSpec as P

from pallas_kernels import ep_moe
from pallas_kernels.ep_moe import EXPERT, TENSOR


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str            # regex, full match on the native name without ".weight" (= the model's param path)
    spec: tuple             # mesh axis (or None) per logical dim; () = replicated
    why: str
    expert: str | None = None   # "w1" | "w3" | "w2": routed-expert rule (ep_moe decides the tensor split)


RULES: tuple[Rule, ...] = (
    Rule(r"(embed|head)", (TENSOR, None), "vocab rows over tensor"),
    Rule(r".*\.ffn\.experts\.w1", (EXPERT, TENSOR, None), "E over expert, I over tensor", expert="w1"),
    Rule(r".*\.ffn\.experts\.w3", (EXPERT, TENSOR, None), "E over expert, I over tensor", expert="w3"),
    Rule(r".*\.ffn\.experts\.w2", (EXPERT, None, TENSOR), "E over expert, I over tensor", expert="w2"),
    Rule(r".*\.ffn\.shared_experts\.w[13]", (TENSOR, None), "column-parallel"),
    Rule(r".*\.ffn\.shared_experts\.w2", (None, TENSOR), "row-parallel"),
    Rule(r".*\.attn\.wq_b", (TENSOR, None), "query heads"),
    Rule(r".*\.attn\.attn_sink", (TENSOR,), "per head"),
    Rule(r".*\.attn\.wo_b", (None, TENSOR), "row-parallel"),
    Rule(r".*", (), "replicated"),
)
_COMPILED = tuple((re.compile(r.pattern), r) for r in RULES)


def rule_for(name: str) -> Rule:
    """The rule of a native tensor name ("layers.3.attn.wq_b.weight", "model." prefix allowed) or of a model
    param path ("layers.3.attn.wq_b")."""
    name = name.removeprefix("model.").removesuffix(".weight")
    for rx, rule in _COMPILED:
        if rx.fullmatch(name):
            return rule
    raise AssertionError("the last rule matches everything")


def param_specs(name: str, w, mesh) -> list[P]:
    """PartitionSpecs for every leaf of weight `w` (plain array or quantized pytree) named `name`
    (DeepSeek-native, e.g. "layers.3.attn.wq_b.weight"), in `jax.tree_util.tree_leaves(w)` order."""
    rule = rule_for(name)
    if rule.expert is not None:
        return ep_moe.expert_weight_spec(w, rule.expert, mesh)
    return ep_moe.weight_specs(w, rule.spec, mesh, name=name)[0]


def markdown_table() -> str:
    rows = ["| pattern | spec | why |", "|---|---|---|"]
    for r in RULES:
        pattern = r.pattern.replace("|", "\\|")
        rows.append(f"| `{pattern}` | {r.spec or 'replicated'} | {r.why} |")
    return "\n".join(rows)
