"""Memory plan and communication volume for a ModelConfig on a mesh, computed from the real partition rules.

`python -m megamoe_jax.sharding.plan` prints the tables of docs/scaling.md. Bytes come from the tensor inventory
below (every weight of the main model; the MTP block is not loaded) with each weight's storage format and the
per-leaf PartitionSpecs that `rules.param_specs` gives on an abstract mesh of that shape, so the plan and the
loader cannot disagree.

Storage formats ("recipes"):
  nvfp4+fp8  routed experts NVFP4 (codes 0.5 B + one E4M3 scale per 16 + fp32 global/input scale per expert);
             attention, indexer wq_b and shared experts FP8 128x128 blocks (1 B + fp32 scale per block), as the
             DeepSeek / NVIDIA ModelOpt releases ship them; embed, head, gate, compressors, weights_proj bf16;
             norms bf16; mHC, sinks, ape, gate bias fp32; tid2eid int32.
  nvfp4+bf16 routed experts NVFP4, every other linear bf16 (e.g. a transformers bf16 model converted with
             `megamoe convert --to nvfp4 --scope experts`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh

from megamoe_jax.model import config as cfgmod
from megamoe_jax.model.config import ModelConfig
from megamoe_jax.sharding.mesh import AXES
from megamoe_jax.sharding.rules import param_specs

GIB = 2**30
# HBM per card as nvidia-smi reports it (H100 SXM 81559 MiB, H200 143771 MiB).
CARDS = {"H100": 81559 * 2**20, "H200": 143771 * 2**20}


# ---- abstract weights ---------------------------------------------------------------------------------------

@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class _Abstract:
    """A weight's logical shape plus its stored leaves (ShapeDtypeStructs), enough for the partition rules."""
    shape: tuple
    leaves: list

    def tree_flatten(self):
        return self.leaves, self.shape

    @classmethod
    def tree_unflatten(cls, shape, leaves):
        return cls(shape, list(leaves))


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), np.dtype(dtype))


def _plain(shape, dtype):
    return _Abstract(tuple(shape), [_sds(shape, dtype)])


def _nvfp4(shape):
    """Stacked [E, N, K] NVFP4: codes, E4M3 block scales, per-expert global and input scales."""
    *lead, n, k = shape
    return _Abstract(tuple(shape), [_sds((*lead, n, k // 2), np.uint8), _sds((*lead, n, k // 16), np.uint8),
                                    _sds((*lead, 1), np.float32), _sds(tuple(lead), np.float32)])


def _fp8_block(shape):
    n, k = shape[-2:]
    return _Abstract(tuple(shape), [_sds(shape, np.uint8),
                                    _sds((*shape[:-2], -(-n // 128), -(-k // 128)), np.float32)])


def inventory(cfg: ModelConfig, recipe: str = "nvfp4+fp8") -> list[tuple[str, _Abstract]]:
    """(native name, abstract weight) for every weight of the main model in the given storage recipe."""
    if recipe not in ("nvfp4+fp8", "nvfp4+bf16"):
        raise ValueError(f"recipe must be 'nvfp4+fp8' or 'nvfp4+bf16', got {recipe!r}")
    bf16, f32, i32 = jax.numpy.bfloat16, np.float32, np.int32
    dense = _fp8_block if recipe == "nvfp4+fp8" else (lambda s: _plain(s, bf16))
    d, v, hd, h = cfg.hidden_size, cfg.vocab_size, cfg.head_dim, cfg.num_attention_heads
    e, i, k = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    nd = cfg.hc_mult * d
    out = [("embed.weight", _plain((v, d), bf16)), ("head.weight", _plain((v, d), bf16)),
           ("norm.weight", _plain((d,), bf16)), ("hc_head_fn", _plain((cfg.hc_mult, nd), f32)),
           ("hc_head_base", _plain((cfg.hc_mult,), f32)), ("hc_head_scale", _plain((1,), f32))]
    for li in range(cfg.num_hidden_layers):
        p = f"layers.{li}."
        m = cfg.compress_ratios[li]
        out += [(p + "attn_norm.weight", _plain((d,), bf16)), (p + "ffn_norm.weight", _plain((d,), bf16))]
        for blk in ("attn", "ffn"):
            out += [(p + f"hc_{blk}_fn", _plain((cfg.hc_mix_dim, nd), f32)),
                    (p + f"hc_{blk}_base", _plain((cfg.hc_mix_dim,), f32)),
                    (p + f"hc_{blk}_scale", _plain((3,), f32))]
        a = p + "attn."
        out += [(a + "wq_a.weight", dense((cfg.q_lora_rank, d))), (a + "q_norm.weight", _plain((cfg.q_lora_rank,), bf16)),
                (a + "wq_b.weight", dense((h * hd, cfg.q_lora_rank))), (a + "wkv.weight", dense((hd, d))),
                (a + "kv_norm.weight", _plain((hd,), bf16)),
                (a + "wo_a.weight", dense((cfg.o_groups * cfg.o_lora_rank, h * hd // cfg.o_groups))),
                (a + "wo_b.weight", dense((d, cfg.o_groups * cfg.o_lora_rank))), (a + "attn_sink", _plain((h,), f32))]
        if m > 0:
            coff = 2 if m == cfgmod.CSA_RATIO else 1
            out += _compressor(a + "compressor.", coff * hd, hd, m, d)
        if m == cfgmod.CSA_RATIO:
            di, hi = cfg.index_head_dim, cfg.index_n_heads
            out += [(a + "indexer.wq_b.weight", dense((hi * di, cfg.q_lora_rank))),
                    (a + "indexer.weights_proj.weight", _plain((hi, d), bf16))]
            out += _compressor(a + "indexer.compressor.", 2 * di, di, m, d)
        f = p + "ffn."
        out += [(f + "gate.weight", _plain((e, d), bf16))]
        out += [(f + "gate.tid2eid", _plain((v, k), i32))] if cfg.is_hash_layer(li) else \
               [(f + "gate.bias", _plain((e,), f32))]
        out += [(f + "experts.w1.weight", _nvfp4((e, i, d))), (f + "experts.w3.weight", _nvfp4((e, i, d))),
                (f + "experts.w2.weight", _nvfp4((e, d, i)))]
        if cfg.n_shared_experts:
            si = i * cfg.n_shared_experts
            out += [(f + "shared_experts.w1.weight", dense((si, d))), (f + "shared_experts.w3.weight", dense((si, d))),
                    (f + "shared_experts.w2.weight", dense((d, si)))]
    return out


def _compressor(p, width, head, m, d):
    bf16 = jax.numpy.bfloat16
    return [(p + "wkv.weight", _plain((width, d), bf16)), (p + "wgate.weight", _plain((width, d), bf16)),
            (p + "ape", _plain((m, width), np.float32)), (p + "norm.weight", _plain((head,), bf16))]


# ---- per-device bytes ---------------------------------------------------------------------------------------

def abstract_mesh(data: int, expert: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((data, expert, tensor), AXES,
                        axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _local_bytes(leaf, spec, mesh) -> int:
    n = 1
    for dim, axis in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
        axes = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        n *= dim // math.prod(mesh.shape[a] for a in axes)
    return n * leaf.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    model: str
    recipe: str
    hardware: str
    mesh: tuple[int, int, int]
    total_bytes: int            # the whole model, unsharded
    expert_bytes: int           # routed experts per device
    other_bytes: int            # everything else per device
    state_bytes: int            # decode state per device for `batch` sequences of `context` tokens
    capacity: int

    @property
    def per_device(self) -> int:
        return self.expert_bytes + self.other_bytes + self.state_bytes

    @property
    def fits(self) -> bool:
        return self.per_device <= 0.9 * self.capacity   # keep ~10% for activations, MoE buffers, XLA workspace


def decode_state_bytes(cfg: ModelConfig, batch: int, context: int) -> int:
    """bf16 KV state (window ring + compressed entries + indexer keys) of `batch` sequences of `context` tokens."""
    per_seq = 0
    for m in cfg.compress_ratios:
        per_seq += cfg.sliding_window * cfg.head_dim * 2
        if m > 0:
            per_seq += context // m * cfg.head_dim * 2
        if m == cfgmod.CSA_RATIO:
            per_seq += context // m * cfg.index_head_dim * 2
    return batch * per_seq


def memory_row(cfg: ModelConfig, model: str, recipe: str, hardware: str, mesh_shape, *, batch: int = 8,
               context: int = 65536) -> MemoryRow:
    mesh = abstract_mesh(*mesh_shape)
    total = expert = other = 0
    for name, w in inventory(cfg, recipe):
        specs = param_specs(name, w, mesh)
        local = sum(_local_bytes(leaf, s, mesh) for leaf, s in zip(w.leaves, specs))
        total += sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in w.leaves)
        if ".ffn.experts." in name:
            expert += local
        else:
            other += local
    # The decode state is split over "data" only (one shared K=V head: nothing to split over tensor).
    state = decode_state_bytes(cfg, batch, context) // mesh_shape[0]
    card = hardware.split("x")[1]
    return MemoryRow(model, recipe, hardware, tuple(mesh_shape), total, expert, other, state, CARDS[card])


# ---- communication per decoded token -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CommRow:
    model: str
    mesh: tuple[int, int, int]
    dispatch: float     # bytes a token's owner sends to other expert ranks, per MoE layer (expected, uniform routing)
    combine: float      # bytes that come back to it
    gather: float       # all-gather of the MoE output over "expert" (the residual stream is replicated there)
    tensor: float       # tensor-parallel all-reduces per layer (attention wo_b, shared w2, split expert hidden)
    once: float         # per token, not per layer: embedding all-reduce + logits all-gather over "tensor"
    layers: int

    @property
    def per_layer(self) -> float:
        return self.dispatch + self.combine + self.gather + self.tensor

    @property
    def per_token(self) -> float:
        return self.per_layer * self.layers + self.once


def comm_row(cfg: ModelConfig, model: str, mesh_shape, *, act_bytes: int = 2, combine_bytes: int = 4) -> CommRow:
    """Modelled bytes per decoded token sent by one device (not measured; issue 8 measures): ep = expert size,
    tp = tensor size.

    dispatch: k rows of (D activations + 4-byte routing weight), a fraction (ep-1)/ep of them to other ranks;
    combine: the same rows back in combine_bytes (fp32 default: exact); gather: the token's MoE output row
    (D activations) to the ep-1 other expert ranks; tensor: ring all-reduces, 2(tp-1)/tp of an fp32 D-vector,
    for wo_b, the shared expert's w2 and the split expert hidden dim; once per token: the vocab-split embedding
    lookup (an fp32 D-vector all-reduce) and the logits all-gather ((tp-1)/tp of V fp32).
    Each tensor rank repeats its expert group's exchange, so link traffic is tp times the per-device figure."""
    _, ep, tp = mesh_shape
    d, k, v = cfg.hidden_size, cfg.num_experts_per_tok, cfg.vocab_size
    remote = (ep - 1) / ep
    ring = 2 * (tp - 1) / tp
    return CommRow(model, tuple(mesh_shape),
                   dispatch=k * (d * act_bytes + 4) * remote,
                   combine=k * d * combine_bytes * remote,
                   gather=d * act_bytes * (ep - 1),
                   tensor=ring * d * 4 * 3,
                   once=ring * d * 4 + (tp - 1) / tp * v * 4,
                   layers=cfg.num_hidden_layers)


def ep_buffer_bytes(cfg: ModelConfig, tokens: int, mesh_shape, *, act_bytes: int = 2) -> int:
    """Transient bytes per device of one expert-parallel MoE call over `tokens` tokens of one data group.

    Static shapes sized for the worst case (nothing dropped): each rank's chunk C = ceil(tokens/ep) gives
    M = C*k rows to send and a receive buffer of R = ep*M rows; the experts then hold gate/up [R, I/tp] fp32,
    the down output [R, D] fp32, and the combine buffer [M, D] fp32."""
    _, ep, tp = mesh_shape
    d, k = cfg.hidden_size, cfg.num_experts_per_tok
    i = cfg.moe_intermediate_size // tp
    m = -(-tokens // ep) * k
    r = ep * m
    width = d + 4 // act_bytes
    return (m + r) * width * act_bytes + r * (2 * i + d) * 4 + m * d * 4


# ---- tables -------------------------------------------------------------------------------------------------

HARDWARE = {"2xH200": [(1, 2, 1), (1, 1, 2)], "4xH100": [(1, 4, 1), (1, 2, 2)],
            "8xH100": [(1, 8, 1), (1, 4, 2)], "8xH200": [(1, 8, 1), (1, 4, 2)]}
MODELS = {"V4-Flash": cfgmod.flash, "V4-Pro": cfgmod.pro}


def memory_table(*, batch: int = 8, context: int = 65536, recipes=("nvfp4+fp8", "nvfp4+bf16")) -> list[MemoryRow]:
    rows = []
    for model, make in MODELS.items():
        cfg = make()
        for recipe in recipes:
            for hw, meshes in HARDWARE.items():
                for ms in meshes:
                    rows.append(memory_row(cfg, model, recipe, hw, ms, batch=batch, context=context))
    return rows


def format_memory(rows: list[MemoryRow], batch: int, context: int) -> str:
    out = [f"| model | recipe | hardware | mesh (d,e,t) | model total GiB | experts GiB/dev | rest GiB/dev | "
           f"state GiB/dev (B={batch}, {context // 1024}K) | per device GiB | card GiB | fits (<=90%) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.model} | {r.recipe} | {r.hardware} | {r.mesh} | {r.total_bytes / GIB:.1f} | "
                   f"{r.expert_bytes / GIB:.1f} | {r.other_bytes / GIB:.1f} | {r.state_bytes / GIB:.2f} | "
                   f"{r.per_device / GIB:.1f} | {r.capacity / GIB:.1f} | {'yes' if r.fits else 'NO'} |")
    return "\n".join(out)


def format_comm(rows: list[CommRow]) -> str:
    kib = 1024
    out = ["| model | mesh (d,e,t) | dispatch KiB/layer | combine KiB/layer | output gather KiB/layer | "
           "tensor all-reduce KiB/layer | total KiB/layer | embed+logits KiB/token | MiB per token (all layers) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.model} | {r.mesh} | {r.dispatch / kib:.1f} | {r.combine / kib:.1f} | {r.gather / kib:.1f} | "
                   f"{r.tensor / kib:.1f} | {r.per_layer / kib:.1f} | {r.once / kib:.1f} | {r.per_token / 2**20:.2f} |")
    return "\n".join(out)


def comm_table() -> list[CommRow]:
    rows = []
    for model, make in MODELS.items():
        cfg = make()
        for ms in [(1, 2, 1), (1, 4, 1), (1, 8, 1), (1, 2, 2), (1, 4, 2)]:
            rows.append(comm_row(cfg, model, ms))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Memory plan and communication volume of DeepSeek-V4 on a mesh")
    ap.add_argument("--batch", type=int, default=8, help="sequences held in the decode state")
    ap.add_argument("--context", type=int, default=65536, help="tokens per sequence in the decode state")
    a = ap.parse_args(argv)
    print("## Memory per device\n")
    print(format_memory(memory_table(batch=a.batch, context=a.context), a.batch, a.context))
    print("\n## Communication per decoded token (bf16 activations, fp32 combine)\n")
    print(format_comm(comm_table()))
    print("\n## Transient expert-parallel buffers per device (one MoE layer, bf16 activations)\n")
    print("| model | mesh (d,e,t) | tokens per data group | GiB |")
    print("|---|---|---|---|")
    for model, make in MODELS.items():
        for ms in [(1, 8, 1), (1, 4, 2)]:
            for tokens in (64, 2048, 8192):
                print(f"| {model} | {ms} | {tokens} | {ep_buffer_bytes(make(), tokens, ms) / GIB:.2f} |")


if __name__ == "__main__":
    main()
