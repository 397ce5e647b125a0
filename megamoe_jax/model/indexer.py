"""DeepSeek-V4 lightning indexer ([R] `Indexer`): picks, per query, the top-k compressed entries of a CSA layer.

    qI = (qr @ wq_b^T).reshape(T, HI, dI);  qI[..., -rd:] = rope(qI[..., -rd:], pos)     # layer's frequencies
    w  = (x @ weights_proj^T) * dI^-0.5 * HI^-0.5                                          # [T, HI]
    I[t, s] = sum_h w[t, h] * relu(qI[t, h] . K[s])     K = the indexer's own compressed keys (ratio 4, width dI)
    visible: s < (pos_t + 1) // 4 (complete windows only); top-k over the visible entries.
Its compressor runs BEFORE scoring, so a window completed by the current token is already selectable ([R]
`Indexer.forward` calls `self.compressor(x, start_pos)` before the einsum). [R]'s Hadamard rotation of qI and K
is orthonormal and cancels in qI . K; with no FP4 round trip it is omitted (see compressor.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from megamoe_jax.model.compressor import CSA_RATIO, Compressor, CompressorState, _init
from megamoe_jax.model.rope import apply_rope
from pallas_kernels import dispatch


class Indexer(nnx.Module):
    def __init__(self, hidden_size: int, q_lora_rank: int, n_heads: int, head_dim: int, topk: int,
                 rms_norm_eps: float, *, name: str, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.topk = topk
        self.name = name                               # e.g. "layers.1.attn.indexer"
        self.wq_b = nnx.Param(_init(rngs, (n_heads * head_dim, q_lora_rank), param_dtype))   # [HI*dI, Rq]
        self.weights_proj = nnx.Param(_init(rngs, (n_heads, hidden_size), param_dtype))      # [HI, D]
        self.compressor = Compressor(hidden_size, head_dim, CSA_RATIO, rms_norm_eps, name=f"{name}.compressor",
                                     rngs=rngs, param_dtype=param_dtype)

    def init_state(self, batch: int, max_len: int, dtype) -> CompressorState:
        return self.compressor.init_state(batch, max_len, dtype)

    def __call__(self, x: jax.Array, qr: jax.Array, state: CompressorState, start_pos: jax.Array,
                 lengths: jax.Array, freqs):
        """x [B, T, D] attention input, qr [B, T, Rq] the normed query latent.

        Returns (idx [B, T, k] int32, selected [B, T, k] bool, new_state) with k = min(index_topk, #entries
        capacity). `selected` is False for picks that are not visible to the query (fewer than k complete
        windows yet: [R] marks those -1).
        """
        b, t, _ = x.shape
        state = self.compressor(x, state, start_pos, lengths, freqs)
        keys = state.entries                                                            # [B, S, dI]
        n_entries = keys.shape[1]
        k = min(self.topk, n_entries)
        if k == 0:
            empty = jnp.zeros((b, t, 0), jnp.int32)
            return empty, empty.astype(bool), state

        pos = start_pos[:, None] + jnp.arange(t, dtype=start_pos.dtype)                # [B, T]
        q = dispatch.linear(qr, self.wq_b.get_value(), name=f"{self.name}.wq_b")
        q = apply_rope(q.reshape(b, t, self.n_heads, self.head_dim), pos[..., None], freqs)
        w = dispatch.linear(x, self.weights_proj.get_value(), out_dtype=jnp.float32,
                            name=f"{self.name}.weights_proj")
        w = w * (self.head_dim ** -0.5 * self.n_heads ** -0.5)                          # [B, T, HI]
        dots = jnp.einsum("bthd,bsd->bths", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = jnp.einsum("bths,bth->bts", jax.nn.relu(dots), w)                     # [B, T, S]
        visible = jnp.arange(n_entries)[None, None, :] < ((pos + 1) // CSA_RATIO)[..., None]
        scores = jnp.where(visible, scores, -jnp.inf)
        _, idx = jax.lax.top_k(scores, k)                                              # [B, T, k]
        selected = idx < ((pos + 1) // CSA_RATIO)[..., None]
        return idx.astype(jnp.int32), selected, state
