"""DeepSeek-V4 model configuration: one frozen, hashable dataclass (usable as a jit static argument).

`ModelConfig.from_hf_config(d)` reads a checkpoint's config.json in both forms found in the wild:
  * transformers >= 5.23 (`layer_types`, `mlp_layer_types`, `compress_rates`, nested `rope_parameters`
    {"main": ..., "compress": ...}, `partial_rotary_factor`);
  * legacy / DeepSeek release (`compress_ratios` with one extra trailing MTP entry, `num_hash_layers`,
    `rope_scaling`, `qk_rope_head_dim`).
Per-layer attention is described by `compress_ratios[i]`: 0 = sliding window only, 4 = CSA (overlapping
compressor + lightning indexer), any other m > 0 = HCA (non-overlapping compressor, every entry attended).
As in DeepSeek's reference ([R] `Compressor`/`Attention`), overlap and the indexer are tied to m == 4.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
HASH_MOE = "hash_moe"
TOPK_MOE = "moe"
CSA_RATIO = 4
_SCORING = ("sqrtsoftplus", "softmax", "sigmoid")


class ConfigError(ValueError):
    """A config.json (or preset override) that this model cannot run; the message names the field."""


@dataclass(frozen=True)
class YarnConfig:
    """YaRN frequency interpolation ([R] `precompute_freqs_cis`); applied on compressed layers only, no mscale."""
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]          # [L]: 0 (SWA), 4 (CSA) or m (HCA)
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    mlp_layer_types: tuple[str, ...]          # [L]: "hash_moe" (tid2eid routing) or "moe" (top-k)
    routed_scaling_factor: float
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn: YarnConfig | None = None
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)
    tie_word_embeddings: bool = False

    def __post_init__(self):
        _validate(self)

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def hc_mix_dim(self) -> int:
        """Width of the mHC mixing projection: pre (n) + post (n) + comb (n*n)."""
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def num_hash_layers(self) -> int:
        return sum(t == HASH_MOE for t in self.mlp_layer_types)

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple(self.layer_type(i) for i in range(self.num_hidden_layers))

    def layer_type(self, i: int) -> str:
        m = self.compress_ratios[i]
        return SLIDING if m == 0 else CSA if m == CSA_RATIO else HCA

    def compress_ratio(self, i: int) -> int:
        return self.compress_ratios[i]

    def is_hash_layer(self, i: int) -> bool:
        return self.mlp_layer_types[i] == HASH_MOE

    def rope_base(self, i: int) -> float:
        """Rope base of layer i: compress_rope_theta on compressed layers, rope_theta on SWA-only ones."""
        return self.compress_rope_theta if self.compress_ratios[i] > 0 else self.rope_theta

    def rope_yarn(self, i: int) -> YarnConfig | None:
        """YaRN is applied on compressed layers only ([R]: 'disable YaRN in pure sliding-window attention')."""
        return self.yarn if self.compress_ratios[i] > 0 else None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---- reading config.json --------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, d: dict, *, source: str = "config.json") -> "ModelConfig":
        """Build from a parsed config.json (either form); raises ConfigError naming the field and `source`."""
        try:
            return _from_hf(cls, d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_config(self) -> dict:
        """config.json in transformers 5.23's form (what `DeepseekV4Config(**d)` accepts)."""
        rates = {CSA: CSA_RATIO}
        hca = sorted({m for m in self.compress_ratios if m not in (0, CSA_RATIO)})
        if len(hca) > 1:
            raise ConfigError(f"transformers' config allows one HCA ratio; this config has {hca}")
        rates[HCA] = hca[0] if hca else 128
        compress = {"rope_type": "default", "rope_theta": self.compress_rope_theta,
                    "partial_rotary_factor": self.qk_rope_head_dim / self.head_dim}
        if self.yarn is not None:
            compress.update(rope_type="yarn", factor=self.yarn.factor, attention_factor=1.0,
                            original_max_position_embeddings=self.yarn.original_max_position_embeddings,
                            beta_fast=self.yarn.beta_fast, beta_slow=self.yarn.beta_slow)
        eos = list(self.eos_token_ids)
        return dict(
            model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"],
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=1, head_dim=self.head_dim,
            partial_rotary_factor=self.qk_rope_head_dim / self.head_dim, q_lora_rank=self.q_lora_rank,
            o_groups=self.o_groups, o_lora_rank=self.o_lora_rank, sliding_window=self.sliding_window,
            layer_types=list(self.layer_types), compress_rates=rates, mlp_layer_types=list(self.mlp_layer_types),
            index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim, index_topk=self.index_topk,
            n_routed_experts=self.n_routed_experts, num_experts_per_tok=self.num_experts_per_tok,
            n_shared_experts=self.n_shared_experts, moe_intermediate_size=self.moe_intermediate_size,
            routed_scaling_factor=self.routed_scaling_factor, scoring_func=self.scoring_func,
            norm_topk_prob=self.norm_topk_prob, swiglu_limit=self.swiglu_limit, hc_mult=self.hc_mult,
            hc_sinkhorn_iters=self.hc_sinkhorn_iters, hc_eps=self.hc_eps, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, compress_rope_theta=self.compress_rope_theta,
            rope_parameters={"main": {"rope_type": "default", "rope_theta": self.rope_theta,
                                      "partial_rotary_factor": self.qk_rope_head_dim / self.head_dim},
                             "compress": compress},
            max_position_embeddings=self.max_position_embeddings,
            num_nextn_predict_layers=self.num_nextn_predict_layers, bos_token_id=self.bos_token_id,
            eos_token_id=eos[0] if len(eos) == 1 else (eos or None), tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
        )


# ---- presets -------------------------------------------------------------------------------------------

def _alternating(n_layers: int, head: tuple[int, ...]) -> tuple[int, ...]:
    # After the bootstrap layers: CSA (4) on even layer ids, HCA (128) on odd ones, as released.
    return head + tuple(CSA_RATIO if i % 2 == 0 else 128 for i in range(len(head), n_layers))


def flash(**overrides) -> ModelConfig:
    """DeepSeek-V4-Flash (284B total / 13B active)."""
    n = 43
    base = dict(
        vocab_size=129280, hidden_size=4096, num_hidden_layers=n, num_attention_heads=64, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128,
        compress_ratios=_alternating(n, (0, 0)), index_n_heads=64, index_head_dim=128, index_topk=512,
        n_routed_experts=256, num_experts_per_tok=6, n_shared_experts=1, moe_intermediate_size=2048,
        mlp_layer_types=(HASH_MOE,) * 3 + (TOPK_MOE,) * (n - 3), routed_scaling_factor=1.5,
        yarn=YarnConfig(16.0, 65536, 32.0, 1.0), num_nextn_predict_layers=1)
    base.update(overrides)
    return ModelConfig(**base)


def pro(**overrides) -> ModelConfig:
    """DeepSeek-V4-Pro (1.6T total / 49B active)."""
    n = 61
    base = dict(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=n, num_attention_heads=128, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=1536, o_groups=16, o_lora_rank=1024, sliding_window=128,
        compress_ratios=_alternating(n, (128, 128)), index_n_heads=64, index_head_dim=128, index_topk=1024,
        n_routed_experts=384, num_experts_per_tok=6, n_shared_experts=1, moe_intermediate_size=3072,
        mlp_layer_types=(HASH_MOE,) * 3 + (TOPK_MOE,) * (n - 3), routed_scaling_factor=2.5,
        yarn=YarnConfig(16.0, 65536, 32.0, 1.0), num_nextn_predict_layers=1)
    base.update(overrides)
    return ModelConfig(**base)


def tiny(**overrides) -> ModelConfig:
    """A test-sized model with every layer type (SWA, CSA, HCA) and MLP type (hash, top-k), YaRN on.

    HCA uses m = 16 so that sequences of a few dozen tokens already complete several compressed entries; the
    window (8) wraps and CSA produces more than `index_topk` (4) entries past 20 tokens. 16 indexer heads keep
    exact-zero indexer scores (all heads' relu(q.k) = 0, probability 2^-heads per entry) rare: such ties make the
    top-k choice depend on the top-k implementation (torch vs XLA), not on the model.
    """
    base = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
        qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8,
        compress_ratios=(0, 4, 16, 4), index_n_heads=16, index_head_dim=32, index_topk=4,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
        mlp_layer_types=(HASH_MOE, HASH_MOE, TOPK_MOE, TOPK_MOE), routed_scaling_factor=1.5,
        swiglu_limit=1.0, hc_sinkhorn_iters=20,
        yarn=YarnConfig(4.0, 64, 32.0, 1.0), max_position_embeddings=256, num_nextn_predict_layers=0)
    base.update(overrides)
    return ModelConfig(**base)


# ---- validation -----------------------------------------------------------------------------------------

def _validate(c: ModelConfig) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
              "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "n_routed_experts",
              "num_experts_per_tok", "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters",
              "max_position_embeddings"):
        v = getattr(c, f)
        need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{f} must be a positive int, got {v!r}")
    for f in ("index_n_heads", "index_head_dim", "index_topk", "n_shared_experts", "num_nextn_predict_layers"):
        v = getattr(c, f)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{f} must be an int >= 0, got {v!r}")
    need(isinstance(c.compress_ratios, tuple), "compress_ratios must be a tuple")
    need(isinstance(c.mlp_layer_types, tuple), "mlp_layer_types must be a tuple")
    need(isinstance(c.eos_token_ids, tuple), "eos_token_ids must be a tuple")
    n = c.num_hidden_layers
    need(len(c.compress_ratios) == n,
         f"compress_ratios has {len(c.compress_ratios)} entries for num_hidden_layers={n}")
    need(len(c.mlp_layer_types) == n,
         f"mlp_layer_types has {len(c.mlp_layer_types)} entries for num_hidden_layers={n}")
    for i, m in enumerate(c.compress_ratios):
        need(isinstance(m, int) and m >= 0, f"compress_ratios[{i}] must be an int >= 0, got {m!r}")
    for i, t in enumerate(c.mlp_layer_types):
        need(t in (HASH_MOE, TOPK_MOE), f"mlp_layer_types[{i}] must be 'hash_moe' or 'moe', got {t!r}")
    need(0 < c.qk_rope_head_dim <= c.head_dim and c.qk_rope_head_dim % 2 == 0,
         f"qk_rope_head_dim={c.qk_rope_head_dim} must be even and in (0, head_dim={c.head_dim}]")
    need(c.num_attention_heads % c.o_groups == 0,
         f"num_attention_heads={c.num_attention_heads} must be divisible by o_groups={c.o_groups}")
    if any(m == CSA_RATIO for m in c.compress_ratios):
        need(c.index_n_heads > 0 and c.index_head_dim > 0 and c.index_topk > 0,
             "CSA layers need index_n_heads, index_head_dim and index_topk > 0")
        need(c.qk_rope_head_dim <= c.index_head_dim,
             f"index_head_dim={c.index_head_dim} must hold the rope dims ({c.qk_rope_head_dim})")
    need(c.num_experts_per_tok <= c.n_routed_experts,
         f"num_experts_per_tok={c.num_experts_per_tok} > n_routed_experts={c.n_routed_experts}")
    need(c.scoring_func in _SCORING, f"scoring_func must be one of {_SCORING}, got {c.scoring_func!r}")
    for f in ("routed_scaling_factor", "rms_norm_eps", "rope_theta", "compress_rope_theta"):
        v = getattr(c, f)
        need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"{f} must be finite and > 0, got {v!r}")
    need(isinstance(c.hc_eps, (int, float)) and c.hc_eps >= 0, f"hc_eps must be >= 0, got {c.hc_eps!r}")
    need(isinstance(c.swiglu_limit, (int, float)) and c.swiglu_limit >= 0,
         f"swiglu_limit must be >= 0 (0 = no clamp), got {c.swiglu_limit!r}")
    if c.yarn is not None:
        y = c.yarn
        need(isinstance(y, YarnConfig), "yarn must be a YarnConfig or None")
        need(y.factor > 0 and y.original_max_position_embeddings > 0 and y.beta_fast > 0 and y.beta_slow > 0,
             f"invalid YaRN parameters {y}")


# ---- config.json parsing ---------------------------------------------------------------------------------

_TYPE_TO_RATIO_DEFAULT = {SLIDING: 0, CSA: CSA_RATIO, HCA: 128}


def _from_hf(cls, d: dict) -> ModelConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"expected a JSON object, got {type(d).__name__}")
    mt = d.get("model_type")
    if mt is not None and mt != "deepseek_v4":
        raise ConfigError(f"model_type is {mt!r}, expected 'deepseek_v4'")

    def req(key):
        if key not in d or d[key] is None:
            raise ConfigError(f"missing required field {key!r}")
        return d[key]

    def get(key, default):
        v = d.get(key)
        return default if v is None else v

    n = int(req("num_hidden_layers"))
    if get("num_key_value_heads", 1) != 1:
        raise ConfigError(f"num_key_value_heads must be 1 (one shared K=V head), got {d['num_key_value_heads']}")
    if get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act must be 'silu', got {d['hidden_act']!r}")
    for k in ("attention_bias", "mlp_bias"):
        if d.get(k):
            raise ConfigError(f"{k}=true is not part of DeepSeek-V4")
    head_dim = int(req("head_dim"))

    # Per-layer attention: transformers' layer_types + compress_rates, or legacy compress_ratios.
    if d.get("layer_types") is not None:
        rates = dict(_TYPE_TO_RATIO_DEFAULT)
        cr = d.get("compress_rates") or {}
        if not isinstance(cr, dict):
            raise ConfigError(f"compress_rates must be an object, got {cr!r}")
        for k, v in cr.items():
            if k not in (CSA, HCA):
                raise ConfigError(f"compress_rates has unknown layer type {k!r}")
            rates[k] = int(v)
        if d.get("compress_rate_csa") is not None:
            rates[CSA] = int(d["compress_rate_csa"])
        if d.get("compress_rate_hca") is not None:
            rates[HCA] = int(d["compress_rate_hca"])
        if rates[CSA] != CSA_RATIO:
            raise ConfigError(f"compress_rates[{CSA!r}]={rates[CSA]}: CSA (overlap + indexer) needs ratio 4")
        if rates[HCA] in (0, CSA_RATIO) or rates[HCA] < 0:
            raise ConfigError(f"compress_rates[{HCA!r}]={rates[HCA]} must be > 0 and != 4")
        types = list(d["layer_types"])
        if len(types) < n:
            raise ConfigError(f"layer_types has {len(types)} entries for num_hidden_layers={n}")
        bad = [t for t in types if t not in rates]
        if bad:
            raise ConfigError(f"layer_types entries must be one of {tuple(rates)}, got {bad}")
        ratios = tuple(rates[t] for t in types[:n])
    elif d.get("compress_ratios") is not None:
        r = list(d["compress_ratios"])
        # Releases list one extra trailing entry per MTP layer; only the first n are main layers.
        if len(r) < n:
            raise ConfigError(f"compress_ratios has {len(r)} entries for num_hidden_layers={n}")
        ratios = tuple(int(m) for m in r[:n])
        if any(m < 0 for m in ratios):
            raise ConfigError(f"compress_ratios entries must be >= 0, got {r}")
    else:
        raise ConfigError("needs either 'layer_types' (transformers) or 'compress_ratios' (legacy)")

    if d.get("mlp_layer_types") is not None:
        mlp = list(d["mlp_layer_types"])
        if len(mlp) < n:
            raise ConfigError(f"mlp_layer_types has {len(mlp)} entries for num_hidden_layers={n}")
        mlp = tuple(mlp[:n])
    else:
        nh = int(get("num_hash_layers", 3))   # transformers' default when the field is absent
        mlp = (HASH_MOE,) * min(n, nh) + (TOPK_MOE,) * max(0, n - nh)

    # Rope: partial_rotary_factor (transformers) or qk_rope_head_dim (legacy); yarn from nested
    # rope_parameters["compress"], a flat rope_parameters, or rope_scaling.
    if d.get("qk_rope_head_dim") is not None:
        rd = int(d["qk_rope_head_dim"])
    elif d.get("partial_rotary_factor") is not None:
        rd = int(round(head_dim * float(d["partial_rotary_factor"])))
    else:
        rd = 64 if head_dim == 512 else head_dim // 8
    rope_theta = float(get("rope_theta", 10000.0))
    compress_theta = float(get("compress_rope_theta", 160000.0))
    rp = d.get("rope_parameters")
    yarn_src = None
    if isinstance(rp, dict) and isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, comp = rp["main"], rp["compress"]
        if main.get("rope_type", main.get("type", "default")) != "default":
            raise ConfigError("rope_parameters['main'] must be plain rope (no YaRN on sliding-window layers)")
        rope_theta = float(main.get("rope_theta", rope_theta))
        compress_theta = float(comp.get("rope_theta", compress_theta))
        yarn_src = comp
    elif isinstance(rp, dict) and rp:
        yarn_src = rp
    elif isinstance(d.get("rope_scaling"), dict):
        yarn_src = d["rope_scaling"]
    yarn = None
    if yarn_src is not None:
        kind = yarn_src.get("rope_type", yarn_src.get("type", "default"))
        if kind == "yarn":
            af = yarn_src.get("attention_factor")
            if af is not None and float(af) != 1.0:
                raise ConfigError(f"rope attention_factor={af}: DeepSeek-V4 applies no YaRN mscale (needs 1.0)")
            for k in ("mscale", "mscale_all_dim"):
                if yarn_src.get(k) not in (None, 0, 0.0, 1, 1.0):
                    raise ConfigError(f"rope {k}={yarn_src[k]} is not supported (DeepSeek-V4 uses no mscale)")
            if "factor" not in yarn_src or "original_max_position_embeddings" not in yarn_src:
                raise ConfigError("YaRN rope parameters need 'factor' and 'original_max_position_embeddings'")
            yarn = YarnConfig(float(yarn_src["factor"]), int(yarn_src["original_max_position_embeddings"]),
                              float(yarn_src.get("beta_fast", 32.0)), float(yarn_src.get("beta_slow", 1.0)))
        elif kind != "default":
            raise ConfigError(f"rope type {kind!r} is not supported (only 'yarn' or 'default')")

    eos = d.get("eos_token_id")
    eos_ids = () if eos is None else (tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),))
    bos = d.get("bos_token_id")
    return cls(
        vocab_size=int(req("vocab_size")), hidden_size=int(req("hidden_size")), num_hidden_layers=n,
        num_attention_heads=int(req("num_attention_heads")), head_dim=head_dim, qk_rope_head_dim=rd,
        q_lora_rank=int(req("q_lora_rank")), o_groups=int(req("o_groups")), o_lora_rank=int(req("o_lora_rank")),
        sliding_window=int(req("sliding_window")), compress_ratios=ratios,
        index_n_heads=int(get("index_n_heads", 64)), index_head_dim=int(get("index_head_dim", 128)),
        index_topk=int(get("index_topk", 512)), n_routed_experts=int(req("n_routed_experts")),
        num_experts_per_tok=int(req("num_experts_per_tok")), n_shared_experts=int(get("n_shared_experts", 1)),
        moe_intermediate_size=int(req("moe_intermediate_size")), mlp_layer_types=mlp,
        routed_scaling_factor=float(get("routed_scaling_factor", 1.5)),
        scoring_func=str(get("scoring_func", "sqrtsoftplus")), norm_topk_prob=bool(get("norm_topk_prob", True)),
        swiglu_limit=float(get("swiglu_limit", 10.0)), hc_mult=int(get("hc_mult", 4)),
        hc_sinkhorn_iters=int(get("hc_sinkhorn_iters", 20)), hc_eps=float(get("hc_eps", 1e-6)),
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, compress_rope_theta=compress_theta,
        yarn=yarn, max_position_embeddings=int(get("max_position_embeddings", 1048576)),
        num_nextn_predict_layers=int(get("num_nextn_predict_layers", 1)),
        bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
    )
