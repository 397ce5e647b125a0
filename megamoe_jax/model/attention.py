"""DeepSeek-V4 attention layer ([R] `Attention`) for all three layer types, with its decode state.

One code path serves prefill, chunked prefill and decode: a call appends T tokens per sequence at absolute
positions start_pos[b] + t (t < lengths[b]; later tokens are padding) and attends causally over
    window (raw K=V of positions [p - W + 1, p]) U compressed entries U sink
exactly as [R]:
  * ratio 0 (sliding window only): the window.
  * ratio 4 (CSA): window U the indexer's top-k of the compressed entries visible to the query
    (entry s visible iff s < (p + 1) // 4).
  * ratio m != 4 (HCA): window U every visible compressed entry (s < (p + 1) // m).
Compressed entries completed by the current token are attendable (as in [R] decode: the compressors run before
`sparse_attn`). Shapes are static: the same compiled step serves every position, and batch rows may sit at
different positions.

Math (§2.3 of docs/deepseek_v4_architecture.md):
    qr = RMSNorm(x @ wq_a^T, q_norm);  q = (qr @ wq_b^T).reshape(H, hd);  q *= rsqrt(mean(q^2) + eps)
    kv = RMSNorm(x @ wkv^T, kv_norm);  rope on the last rd dims of q and kv (interleaved, per-layer freqs)
    o  = sum_j softmax_j(q . k_j / sqrt(hd) ; sink) k_j       (V = K; the sink only enlarges the denominator)
    o  = inverse rope of o at the query position;  out = wo_b(grouped wo_a(o))
[R]'s QAT simulation (FP8 round trip of the kv nope dims, FP4 indexer) is not reproduced (see compressor.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from megamoe_jax.model.compressor import CSA_RATIO, Compressor, CompressorState, _init, rms_norm
from megamoe_jax.model.indexer import Indexer
from megamoe_jax.model.rope import apply_rope, layer_inv_freq
from pallas_kernels import dispatch
from pallas_kernels.reference import is_quantized


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionState:
    """Decode state of one attention layer for B sequences (a pytree; all shapes static).

    For a sequence whose next position is n (= tokens seen so far):
      window     [B, W, hd]           raw K=V ring; slot s holds the latest position p < n with p % W == s.
      compressor CompressorState | None  (ratio m > 0), see compressor.py:
          .kv, .score [B, coff*m, coff*hd] float32  pending-token projections (partial window; with overlap
                                                    (m == 4, coff = 2) also the previous complete window)
          .entries    [B, max_len // m, hd]         compressed KV; entry i valid for i < n // m
      indexer    CompressorState | None  (ratio 4 only): the indexer's compressor,
          .kv, .score [B, 8, 2*dI] float32, .entries [B, max_len // 4, dI] = the indexer keys.
    """
    window: jax.Array
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None

    @property
    def compressed_kv(self) -> jax.Array | None:
        return None if self.compressor is None else self.compressor.entries

    @property
    def index_keys(self) -> jax.Array | None:
        return None if self.indexer is None else self.indexer.entries


class Attention(nnx.Module):
    """Attention of layer `layer_idx`; its type comes from cfg.compress_ratios[layer_idx]."""

    def __init__(self, cfg, layer_idx: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if not 0 <= layer_idx < len(cfg.compress_ratios):
            raise ValueError(f"layer_idx {layer_idx} out of range for {len(cfg.compress_ratios)} layers")
        d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        g, ro, rq = cfg.o_groups, cfg.o_lora_rank, cfg.q_lora_rank
        if h % g:
            raise ValueError(f"num_attention_heads={h} must be divisible by o_groups={g}")
        self.layer_idx = layer_idx
        self.name = f"layers.{layer_idx}.attn"
        self.hidden_size, self.n_heads, self.head_dim = d, h, hd
        self.rope_dim = cfg.qk_rope_head_dim
        self.o_groups, self.o_lora_rank = g, ro
        self.window_size = cfg.sliding_window
        self.ratio = cfg.compress_ratios[layer_idx]
        self.eps = cfg.rms_norm_eps
        # Per-layer rope frequencies (static, float32): compress theta + YaRN on compressed layers only.
        self.freqs = tuple(float(f) for f in layer_inv_freq(cfg, layer_idx))

        self.wq_a = nnx.Param(_init(rngs, (rq, d), param_dtype))                # [Rq, D]
        self.q_norm = nnx.Param(jnp.ones((rq,), jnp.float32))                    # [Rq]
        self.wq_b = nnx.Param(_init(rngs, (h * hd, rq), param_dtype))           # [H*hd, Rq]
        self.wkv = nnx.Param(_init(rngs, (hd, d), param_dtype))                 # [hd, D]
        self.kv_norm = nnx.Param(jnp.ones((hd,), jnp.float32))                   # [hd]
        self.wo_a = nnx.Param(_init(rngs, (g * ro, h * hd // g), param_dtype))  # [G*Ro, H*hd/G]
        self.wo_b = nnx.Param(_init(rngs, (d, g * ro), param_dtype))            # [D, G*Ro]
        self.attn_sink = nnx.Param(jnp.zeros((h,), jnp.float32))                 # [H]
        # Submodules exist only on the layer types that have them (None elsewhere, as in [R]).
        self.compressor = (Compressor(d, hd, self.ratio, self.eps, name=f"{self.name}.compressor", rngs=rngs,
                                      param_dtype=param_dtype) if self.ratio > 0 else None)
        self.indexer = (Indexer(d, rq, cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, self.eps,
                                name=f"{self.name}.indexer", rngs=rngs, param_dtype=param_dtype)
                        if self.ratio == CSA_RATIO else None)

    # ---- state ----------------------------------------------------------------------------------------------

    def init_state(self, batch: int, max_len: int, dtype=jnp.bfloat16) -> AttentionState:
        """Empty state for `batch` sequences of up to `max_len` positions; KV caches in `dtype`.

        Positions >= max_len are not supported: their compressed entries would be dropped (the caller checks the
        prompt length against its max_len before tracing).
        """
        for nm, v in (("batch", batch), ("max_len", max_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{self.name}.init_state: {nm} must be a positive int, got {v!r}")
        return AttentionState(
            window=jnp.zeros((batch, self.window_size, self.head_dim), dtype),
            compressor=None if self.compressor is None else self.compressor.init_state(batch, max_len, dtype),
            indexer=None if self.indexer is None else self.indexer.init_state(batch, max_len, dtype),
        )

    # ---- forward --------------------------------------------------------------------------------------------

    def __call__(self, x: jax.Array, state: AttentionState, start_pos: jax.Array, lengths: jax.Array):
        """x [B, T, D]; start_pos, lengths [B] int32. Returns (out [B, T, D] in x.dtype, new_state)."""
        self._check(x, state, start_pos, lengths)
        b, t, _ = x.shape
        h, hd, w = self.n_heads, self.head_dim, self.window_size
        start_pos = start_pos.astype(jnp.int32)
        lengths = jnp.clip(lengths.astype(jnp.int32), 0, t)
        pos = start_pos[:, None] + jnp.arange(t, dtype=jnp.int32)                      # [B, T]
        freqs = self.freqs

        qr = rms_norm(self._linear(x, self.wq_a, "wq_a"), self.q_norm.get_value(), self.eps)   # [B, T, Rq]
        q = self._linear(qr, self.wq_b, "wq_b").reshape(b, t, h, hd)
        qf = q.astype(jnp.float32)
        q = (qf * jax.lax.rsqrt(jnp.mean(qf * qf, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        q = apply_rope(q, pos[..., None], freqs)                                        # [B, T, H, hd]
        kv = rms_norm(self._linear(x, self.wkv, "wkv"), self.kv_norm.get_value(), self.eps)
        kv = apply_rope(kv, pos, freqs).astype(state.window.dtype)                     # [B, T, hd]
        # Padding tokens get zero keys, so even non-finite padding activations cannot leak into real queries
        # through 0 * inf in the probability-weighted sum.
        kv = jnp.where((jnp.arange(t) < lengths[:, None])[..., None], kv, 0)

        if t == 1:
            # Decode: the new key goes into its ring slot in place, and the query attends over the updated ring
            # itself: slot s then holds position p - ((p - s) mod W), exactly the window (p - W, p] (the softmax
            # does not depend on the key order). A row without a token leaves its ring as it was.
            # (An elementwise select over the small ring: one launch, written into the donated buffer.)
            s = jnp.arange(w, dtype=jnp.int32)
            hit = (s[None] == (start_pos % w)[:, None]) & (lengths > 0)[:, None]          # [B, W]
            window = jnp.where(hit[..., None], kv, state.window)                        # [B, W, hd]
            held = start_pos[:, None] - jnp.mod(start_pos[:, None] - s[None], w)
            seq, win_mask = window, (held >= 0)[:, None, :]                             # [B, W], [B, 1, W]
        else:
            # Window keys: the ring in position order (seq[j] has position start - W + j for j < W) followed by
            # the new tokens (seq[W + t] has position start + t). Query t sees seq[j] for t < j <= t + W,
            # position >= 0.
            ring_pos = start_pos[:, None] - w + jnp.arange(w, dtype=jnp.int32)         # [B, W]
            ring = jnp.take_along_axis(state.window, (ring_pos % w)[..., None], axis=1)
            seq = jnp.concatenate([ring, kv], axis=1)                                   # [B, W+T, hd]
            j = jnp.arange(w + t)
            tt = jnp.arange(t)
            win_mask = (j[None, :] > tt[:, None]) & (j[None, :] <= tt[:, None] + w)    # [T, W+T]
            win_mask = win_mask[None] & ((start_pos[:, None] - w + j[None]) >= 0)[:, None, :]   # [B, T, W+T]
            # New ring: slot s takes the latest position < end congruent to s (from seq; older ones stay).
            end = start_pos + lengths
            s = jnp.arange(w, dtype=jnp.int32)
            latest = end[:, None] - 1 - jnp.mod(end[:, None] - 1 - s[None], w)        # [B, W]
            window = jnp.take_along_axis(seq, (latest - start_pos[:, None] + w)[..., None], axis=1)

        comp_keys = comp_mask = None
        comp_state = idx_state = None
        if self.ratio > 0:
            if self.indexer is not None:
                # [R] order: the indexer (with its own compressor) picks top-k first, then the main compressor
                # runs; both before attention, so an entry completed by this token is already usable.
                idx, selected, idx_state = self.indexer(x, qr, state.indexer, start_pos, lengths, freqs)
            comp_state = self.compressor(x, state.compressor, start_pos, lengths, freqs)
            entries = comp_state.entries                                                # [B, S, hd]
            if entries.shape[1] > 0:
                if self.indexer is not None:
                    comp_keys = entries[jnp.arange(b)[:, None, None], idx]                      # [B, T, k, hd]
                    comp_mask = selected                                                         # [B, T, k]
                else:
                    comp_keys = entries
                    comp_mask = (jnp.arange(entries.shape[1])[None, None, :]
                                 < ((pos + 1) // self.ratio)[..., None])                        # [B, T, S]

        o = _sink_attention(q, seq, win_mask, comp_keys, comp_mask, self.attn_sink.get_value())  # [B, T, H, hd]
        o = apply_rope(o, pos[..., None], freqs, inverse=True)
        out = self._linear(self._grouped_wo_a(o), self.wo_b, "wo_b")                   # [B, T, D]
        return out, AttentionState(window=window, compressor=comp_state, indexer=idx_state)

    # ---- helpers --------------------------------------------------------------------------------------------

    def _linear(self, x, param, name):
        return dispatch.linear(x, param.get_value(), name=f"{self.name}.{name}")

    def _grouped_wo_a(self, o: jax.Array) -> jax.Array:
        """Grouped low-rank output projection: heads [g*H/G, (g+1)*H/G) go through rows [g*Ro, (g+1)*Ro) of
        wo_a ([R]: einsum('bsgd,grd->bsgr', o.view(b, s, G, -1), wo_a.view(G, Ro, -1))). o [B, T, H, hd]
        -> [B, T, G*Ro]. Runs as one grouped matmul with G equal groups so any weight format works."""
        b, t = o.shape[:2]
        g, ro = self.o_groups, self.o_lora_rank
        og = o.reshape(b, t, g, -1)                                                      # [B, T, G, H*hd/G]
        wg = _split_rows(self.wo_a.get_value(), g, f"{self.name}.wo_a")                  # [G, Ro, H*hd/G]
        z = dispatch.linear_per_group(og, wg, name=f"{self.name}.wo_a")                   # [B, T, G, Ro]
        return z.reshape(b, t, g * ro)

    def _check(self, x, state, start_pos, lengths):
        where = self.name
        if x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{where}: x must be [B, T, {self.hidden_size}], got {x.shape}")
        b, t, _ = x.shape
        if t == 0:
            raise ValueError(f"{where}: x has no tokens (T = 0)")
        for nm, v in (("start_pos", start_pos), ("lengths", lengths)):
            if getattr(v, "shape", None) != (b,) or not jnp.issubdtype(v.dtype, jnp.integer):
                raise ValueError(f"{where}: {nm} must be an int array of shape [{b}], got "
                                 f"{getattr(v, 'dtype', type(v))}{getattr(v, 'shape', '')}")
        if not isinstance(state, AttentionState):
            raise ValueError(f"{where}: state must be an AttentionState, got {type(state).__name__}")
        if state.window.shape != (b, self.window_size, self.head_dim):
            raise ValueError(f"{where}: state.window is {state.window.shape}, expected "
                             f"{(b, self.window_size, self.head_dim)} (batch, sliding_window, head_dim)")
        for nm, have, want in (("compressor", state.compressor, self.compressor),
                               ("indexer", state.indexer, self.indexer)):
            if (have is None) != (want is None):
                raise ValueError(f"{where}: state.{nm} is {'missing' if have is None else 'present'} but this "
                                 f"layer (compress ratio {self.ratio}) {'has' if want is not None else 'has no'} "
                                 f"{nm}; build the state with this layer's init_state")


def _sink_attention(q, seq, win_mask, comp_keys, comp_mask, sink):
    """One softmax over window U compressed U sink ([R] `sparse_attn`); V = K; the sink has no value.

    q [B, T, H, hd]; seq [B, N, hd] with win_mask [B, T, N]; comp_keys either [B, S, hd] (shared by all queries)
    with comp_mask [B, T, S], or [B, T, k, hd] (per-query picks) with comp_mask [B, T, k], or None.
    Logits and the softmax are float32; the probabilities meet V in V's dtype with float32 accumulation.
    """
    scale = q.shape[-1] ** -0.5
    lw = jnp.einsum("bthd,bnd->bthn", q, seq.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    lw = jnp.where(win_mask[:, :, None, :], lw, -jnp.inf)
    mx = jnp.maximum(jnp.max(lw, axis=-1), sink.astype(jnp.float32)[None, None, :])    # [B, T, H]
    lc = None
    if comp_keys is not None:
        spec = "bthd,bsd->bths" if comp_keys.ndim == 3 else "bthd,btsd->bths"
        lc = jnp.einsum(spec, q, comp_keys.astype(q.dtype), preferred_element_type=jnp.float32) * scale
        lc = jnp.where(comp_mask[:, :, None, :], lc, -jnp.inf)
        mx = jnp.maximum(mx, jnp.max(lc, axis=-1))
    pw = jnp.exp(lw - mx[..., None])
    den = jnp.sum(pw, axis=-1) + jnp.exp(sink.astype(jnp.float32)[None, None, :] - mx)
    o = jnp.einsum("bthn,bnd->bthd", pw.astype(seq.dtype), seq, preferred_element_type=jnp.float32)
    if lc is not None:
        pc = jnp.exp(lc - mx[..., None])
        den = den + jnp.sum(pc, axis=-1)
        spec = "bths,bsd->bthd" if comp_keys.ndim == 3 else "bths,btsd->bthd"
        o = o + jnp.einsum(spec, pc.astype(comp_keys.dtype), comp_keys, preferred_element_type=jnp.float32)
    return (o / den[..., None]).astype(q.dtype)


def _split_rows(w, groups: int, name: str):
    """View an [G*Ro, K] weight (plain or quantized pytree) as [G, Ro, K] for a grouped matmul.

    Every array leaf splits its leading (row) axis into [G, rows/G]; scalar leaves (per-tensor scales) stay, and
    leaves with one row (a per-tensor scale stored as [1]) get a leading 1. A leaf whose row count is not a
    multiple of G (e.g. FP8 128-row scale blocks straddling groups) cannot be split and raises."""
    def split(leaf):
        if leaf.ndim == 0:
            return leaf
        rows = leaf.shape[0]
        if rows == 1:
            return leaf[None]
        if rows % groups:
            raise ValueError(f"{name}: cannot split a weight leaf of shape {leaf.shape} into {groups} row groups")
        return leaf.reshape(groups, rows // groups, *leaf.shape[1:])
    if not is_quantized(w):
        return split(w)
    return jax.tree.map(split, w)
