"""The DeepSeek-V4 network in flax.nnx ([R] `Transformer`, `Block`, `ParallelHead`).

  X = broadcast(embed[ids]) to n streams                      [B, T, n, D]   (compute dtype)
  per block:  x, post, comb = hc_pre(X);  X = hc_post(attn(attn_norm(x)), X, post, comb)
              x, post, comb = hc_pre(X);  X = hc_post(ffn(ffn_norm(x), ids), X, post, comb)
  h = norm(hc_head(X))                                        [B, T, D]
  logits = h @ head^T                                         fp32

Attribute names are the DeepSeek-native checkpoint names (`embed`, `layers[i].attn.wq_a`, `hc_head_fn`, ...),
so `params.py` maps "layers.3.attn.wq_a.weight" to `model.layers[3].attn.wq_a` by walking the name.
Every call appends tokens to a `DecodeState`: prefill is a call with an empty state, decode a call with T = 1.
Right padding: tokens t >= lengths[b] are padding; their outputs are garbage and they leave the state alone.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from megamoe_jax.model import mhc
from megamoe_jax.model.attention import Attention
from megamoe_jax.model.config import ModelConfig
from megamoe_jax.model.moe import MoE
from megamoe_jax.model.norms import rms_norm
from megamoe_jax.model.state import DecodeState
from pallas_kernels import dispatch


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def _const(shape, value, dtype=jnp.float32):
    return nnx.Param(jnp.full(shape, value, dtype))


class Block(nnx.Module):
    """One transformer block: mHC around attention and around the MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.layer_idx = layer_idx
        self.config = cfg
        self.eps = cfg.rms_norm_eps
        d, m, nd = cfg.hidden_size, cfg.hc_mix_dim, cfg.hc_mult * cfg.hidden_size
        self.attn = Attention(cfg, layer_idx, rngs=rngs, param_dtype=param_dtype)
        self.ffn = MoE(cfg, layer_idx, rngs=rngs, param_dtype=param_dtype)
        # Norm weights and mHC parameters stay fp32 (as DeepSeek keeps them at runtime).
        self.attn_norm = _const((d,), 1.0)
        self.ffn_norm = _const((d,), 1.0)
        self.hc_attn_fn = _normal(rngs, (m, nd), jnp.float32)
        self.hc_attn_base = _const((m,), 0.0)
        self.hc_attn_scale = _const((3,), 1.0)
        self.hc_ffn_fn = _normal(rngs, (m, nd), jnp.float32)
        self.hc_ffn_base = _const((m,), 0.0)
        self.hc_ffn_scale = _const((3,), 1.0)

    def _hc_pre(self, x, fn, scale, base):
        c = self.config
        return mhc.hc_pre(x, fn.get_value(), scale.get_value(), base.get_value(), hc_mult=c.hc_mult,
                          iters=c.hc_sinkhorn_iters, rms_eps=c.rms_norm_eps, hc_eps=c.hc_eps)

    def __call__(self, x: jax.Array, ids: jax.Array, attn_state, start_pos: jax.Array, lengths: jax.Array):
        """x [B, T, n, D], ids [B, T] -> (x [B, T, n, D], new attn_state)."""
        residual = x
        y, post, comb = self._hc_pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base)
        y, attn_state = self.attn(rms_norm(y, self.attn_norm.get_value(), self.eps), attn_state, start_pos, lengths)
        x = mhc.hc_post(y, residual, post, comb)

        residual = x
        y, post, comb = self._hc_pre(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base)
        y = self.ffn(rms_norm(y, self.ffn_norm.get_value(), self.eps), ids)
        return mhc.hc_post(y, residual, post, comb), attn_state


class DeepseekV4(nnx.Module):
    """DeepSeek-V4 causal LM. `dtype` is the compute / residual-stream dtype; `param_dtype` the dtype of the
    large weights (embed, head, linears, experts) when no quantized tensor replaces them."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16):
        self.config = cfg
        self.dtype = dtype
        v, d, n = cfg.vocab_size, cfg.hidden_size, cfg.hc_mult
        self.embed = _normal(rngs, (v, d), param_dtype)
        self.layers = nnx.List([Block(cfg, i, rngs=rngs, param_dtype=param_dtype)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = _const((d,), 1.0)
        self.head = None if cfg.tie_word_embeddings else _normal(rngs, (v, d), param_dtype)
        self.hc_head_fn = _normal(rngs, (n, n * d), jnp.float32)
        self.hc_head_base = _const((n,), 0.0)
        self.hc_head_scale = _const((1,), 1.0)

    # ---- state ------------------------------------------------------------------------------------------
    def init_state(self, batch: int, max_len: int) -> DecodeState:
        """An empty decode state for `batch` sequences of up to `max_len` tokens each."""
        if max_len <= 0 or batch <= 0:
            raise ValueError(f"init_state needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
        layers = tuple(blk.attn.init_state(batch, max_len, self.dtype) for blk in self.layers)
        return DecodeState(layers, jnp.zeros((batch,), jnp.int32), max_len)

    # ---- forward ----------------------------------------------------------------------------------------
    def __call__(self, ids: jax.Array, state: DecodeState, lengths: jax.Array | None = None):
        """Append ids [B, T] (right padded; `lengths` [B] real tokens, default T) to `state`.

        Returns (h [B, T, D] final-normed hidden states in the compute dtype, new state).
        """
        if ids.ndim != 2:
            raise ValueError(f"ids must be [batch, tokens], got shape {ids.shape}")
        b, t = ids.shape
        if b != state.batch:
            raise ValueError(f"ids batch {b} != decode state batch {state.batch}")
        ids = ids.astype(jnp.int32)
        lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
        start_pos = state.positions
        x = jnp.take(self.embed.get_value(), ids, axis=0).astype(self.dtype)              # [B, T, D]
        x = jnp.broadcast_to(x[:, :, None, :], (b, t, self.config.hc_mult, x.shape[-1]))
        new_layers = []
        for blk, layer_state in zip(self.layers, state.layers):
            x, layer_state = blk(x, ids, layer_state, start_pos, lengths)
            new_layers.append(layer_state)
        h = mhc.hc_head(x, self.hc_head_fn.get_value(), self.hc_head_scale.get_value(), self.hc_head_base.get_value(),
                        rms_eps=self.config.rms_norm_eps, hc_eps=self.config.hc_eps)
        h = rms_norm(h, self.norm.get_value(), self.config.rms_norm_eps)
        return h, state.advance(tuple(new_layers), lengths)

    def logits(self, h: jax.Array) -> jax.Array:
        """h [..., D] -> fp32 logits [..., V]. Products of the compute-dtype h and head weight accumulate in fp32,
        which equals [R]'s fp32 head on bf16-rounded inputs."""
        w = self.embed.get_value() if self.head is None else self.head.get_value()
        return dispatch.linear(h, w, out_dtype=jnp.float32, name="head")
