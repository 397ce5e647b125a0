"""DeepSeek-V4 mixture of experts ([R] `Gate`, `Expert`, `MoE`).

  s    = score(x @ gate^T)        in fp32; score = sqrt(softplus) (V4), sigmoid or softmax
  idx  = tid2eid[token id]        hash-routed layers (no bias)
       = top_k(s + bias)          other layers: the bias steers the SELECTION only
  w    = s[idx] / sum(s[idx])     renormalised over the k picked ([R]: for every score function but softmax)
  w   *= routed_scaling_factor
  out  = sum_k w_k Expert_{idx_k}(x) + SharedExpert(x)
Expert(v) = W2 (silu(min(W1 v, L)) * clip(W3 v, -L, L)) with L = swiglu_limit (0 = no clamp).
Routed experts are stacked [E, N, K] and run through `dispatch.moe_experts` (grouped / fused kernels), never a
per-expert loop. Every matmul goes through `pallas_kernels.dispatch`, so weights may be quantized tensors.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from megamoe_jax.model.config import ModelConfig
from pallas_kernels import dispatch, reference


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def score_fn(logits: jax.Array, kind: str) -> jax.Array:
    if kind == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits))
    if kind == "sigmoid":
        return jax.nn.sigmoid(logits)
    if kind == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    raise ValueError(f"unknown scoring_func {kind!r}")


class Gate(nnx.Module):
    """Router. Attributes: weight [E, D]; bias [E] fp32 (top-k layers) or tid2eid [V, k] int32 (hash layers)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.name = f"layers.{layer_idx}.ffn.gate"
        self.is_hash = cfg.is_hash_layer(layer_idx)
        self.top_k = cfg.num_experts_per_tok
        self.scoring_func = cfg.scoring_func
        self.route_scale = cfg.routed_scaling_factor
        e, d = cfg.n_routed_experts, cfg.hidden_size
        self.weight = _normal(rngs, (e, d), param_dtype)
        if self.is_hash:
            # A random table with k distinct experts per token (the checkpoint provides the real one).
            perm = jnp.argsort(jax.random.uniform(rngs.params(), (cfg.vocab_size, e)), axis=-1)
            self.tid2eid = nnx.Param(perm[:, : self.top_k].astype(jnp.int32))
        else:
            self.bias = nnx.Param(jnp.zeros((e,), jnp.float32))

    def __call__(self, x: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [T, D], ids [T] -> (weights [T, k] fp32, indices [T, k] int32)."""
        # bf16 x bf16 products with fp32 accumulation equal [R]'s linear(x.float(), weight.float()).
        logits = dispatch.linear(x, self.weight.get_value(), out_dtype=jnp.float32, name=self.name)   # [T, E]
        scores = score_fn(logits.astype(jnp.float32), self.scoring_func)
        if self.is_hash:
            idx = jnp.take(self.tid2eid.get_value(), ids, axis=0).astype(jnp.int32)                   # [T, k]
        else:
            _, idx = jax.lax.top_k(scores + self.bias.get_value().astype(jnp.float32), self.top_k)
        w = jnp.take_along_axis(scores, idx, axis=-1)
        if self.scoring_func != "softmax":
            # [R] renormalises for sigmoid/sqrtsoftplus only; transformers 5.23 always does (+1e-20).
            w = w / jnp.sum(w, axis=-1, keepdims=True)
        return w * self.route_scale, idx.astype(jnp.int32)


class Experts(nnx.Module):
    """Routed experts stacked per projection: w1, w3 [E, I, D]; w2 [E, D, I] (plain arrays or quant tensors)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.name = f"layers.{layer_idx}.ffn.experts"
        self.swiglu_limit = cfg.swiglu_limit
        e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.w1 = _normal(rngs, (e, i, d), param_dtype)
        self.w3 = _normal(rngs, (e, i, d), param_dtype)
        self.w2 = _normal(rngs, (e, d, i), param_dtype)

    def __call__(self, x: jax.Array, idx: jax.Array, weights: jax.Array) -> jax.Array:
        """x [T, D], idx/weights [T, k] -> [T, D] fp32."""
        return dispatch.moe_experts(x, self.w1.get_value(), self.w3.get_value(), self.w2.get_value(), idx, weights,
                                    self.swiglu_limit, out_dtype=jnp.float32, name=self.name)


class SharedExpert(nnx.Module):
    """The always-on expert: w1, w3 [I*n_shared, D], w2 [D, I*n_shared], same clamped SwiGLU, no routing weight."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.name = f"layers.{layer_idx}.ffn.shared_experts"
        self.swiglu_limit = cfg.swiglu_limit
        d, i = cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        self.w1 = _normal(rngs, (i, d), param_dtype)
        self.w3 = _normal(rngs, (i, d), param_dtype)
        self.w2 = _normal(rngs, (d, i), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [T, D] -> [T, D] fp32."""
        g = dispatch.linear(x, self.w1.get_value(), name=self.name + ".w1").astype(jnp.float32)
        u = dispatch.linear(x, self.w3.get_value(), name=self.name + ".w3").astype(jnp.float32)
        h = reference.swiglu(g, u, self.swiglu_limit).astype(x.dtype)
        # [R] rounds the expert's output to the activation dtype before adding it to the fp32 sum
        return dispatch.linear(h, self.w2.get_value(), name=self.name + ".w2").astype(jnp.float32)


class MoE(nnx.Module):
    """ffn of one block: gate, experts (stacked), shared_experts."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.gate = Gate(cfg, layer_idx, rngs=rngs, param_dtype=param_dtype)
        self.experts = Experts(cfg, layer_idx, rngs=rngs, param_dtype=param_dtype)
        self.shared_experts = (SharedExpert(cfg, layer_idx, rngs=rngs, param_dtype=param_dtype)
                               if cfg.n_shared_experts > 0 else None)

    def __call__(self, x: jax.Array, ids: jax.Array) -> jax.Array:
        """x [B, T, D] (normed), ids [B, T] -> [B, T, D] in x.dtype."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        weights, idx = self.gate(flat, ids.reshape(b * t))
        y = self.experts(flat, idx, weights)                                # [B*T, D] fp32
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.astype(x.dtype).reshape(b, t, d)
