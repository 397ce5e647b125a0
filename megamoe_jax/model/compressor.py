"""DeepSeek-V4 KV compressor ([R] `Compressor`): gated pooling of every `m` consecutive tokens into one entry.

Per token (projections in float32, as [R] does: "compression need fp32"):
    Cv = x @ wkv^T                      # [coff*d]
    Z  = x @ wgate^T + ape[pos % m]     # [coff*d], position bias by slot in the window
Entry i summarises window i = positions [i*m, (i+1)*m) and exists once that window is complete:
  * m == 4 (CSA, overlap, coff = 2): candidates are window i-1's FIRST halves (Cv[:, :d], Z[:, :d]) and window
    i's SECOND halves (Cv[:, d:], Z[:, d:]): 2m rows; window -1 contributes nothing (C = 0, Z = -inf).
  * any other m (HCA, coff = 1): the m rows of window i.
    c_i = sum_rows softmax_rows(Z) * Cv            (softmax per channel over the candidate rows)
    c_i = rope(RMSNorm(c_i, norm), position i*m)   (rope at the window START, on the last rd dims)
The indexer's compressor is the same module at head width index_head_dim. [R]'s QAT simulation (FP8 round trip of
the entry's nope dims; for the indexer a Hadamard rotation + FP4 round trip) is not reproduced: the Hadamard
cancels in the indexer's q.k, and the rounding is optional numerics ([R] itself notes the cache "could also use
fp8"). Outputs therefore match an unquantized [R] / transformers.

Decode state (`CompressorState`, [R] `kv_state` / `score_state` / `kv_cache`): a ring of rows = coff * m slots;
slot s holds the pending token at the latest position p < next_pos with p % rows == s. The positions a call can
still need (the previous complete window with overlap, the current partial one) are the last < rows positions,
so each has its own slot; older contents are stale and never read (every read is masked by position). A decode
step (one token) therefore writes one slot in place instead of rebuilding the rows, and a row that receives only
padding keeps its state bit-identical. (Without overlap rows = m and the ring is the window in order.)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from megamoe_jax.model.rope import apply_rope
from pallas_kernels import dispatch
from pallas_kernels.reference import is_quantized

CSA_RATIO = 4   # [R]: overlap (and the indexer) <=> compress ratio 4


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """[R] RMSNorm: normalise in float32, multiply by the (float32) weight, cast back to x.dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * xf).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressorState:
    """Per-layer compressor state for B sequences (a pytree; all shapes static)."""
    kv: jax.Array        # [B, coff*m, coff*d] float32: Cv of the pending tokens (slot = position % (coff*m))
    score: jax.Array     # [B, coff*m, coff*d] float32: Z + ape of the same tokens
    entries: jax.Array   # [B, max_len // m, d] cache dtype: compressed entry i (valid for i < next_pos // m)


def _init(rngs: nnx.Rngs, shape, dtype):
    # Random normal scaled by 1/sqrt(fan_in); real weights come from a checkpoint.
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * shape[-1] ** -0.5).astype(dtype)


def _masked_softmax(score: jax.Array, valid: jax.Array, axis: int) -> jax.Array:
    """Softmax over `axis` where invalid rows get weight 0; an all-invalid slice gives zeros (never NaN)."""
    s = jnp.where(valid, score, -jnp.inf)
    mx = jnp.max(s, axis=axis, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.exp(s - mx)
    den = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(den > 0, den, 1.0)


class Compressor(nnx.Module):
    """Gated-pooling compressor with ratio m and output head width d (see the module docstring)."""

    def __init__(self, hidden_size: int, head_dim: int, ratio: int, rms_norm_eps: float, *, name: str,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        if ratio <= 0:
            raise ValueError(f"{name}: compress ratio must be > 0, got {ratio}")
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.ratio = ratio
        self.overlap = ratio == CSA_RATIO
        self.eps = rms_norm_eps
        self.name = name                      # DeepSeek-native module path, e.g. "layers.1.attn.compressor"
        coff = 2 if self.overlap else 1
        self.wkv = nnx.Param(_init(rngs, (coff * head_dim, hidden_size), param_dtype))     # [coff*d, D]
        self.wgate = nnx.Param(_init(rngs, (coff * head_dim, hidden_size), param_dtype))   # [coff*d, D]
        self.ape = nnx.Param(jnp.zeros((ratio, coff * head_dim), jnp.float32))             # [m, coff*d]
        self.norm = nnx.Param(jnp.ones((head_dim,), jnp.float32))                          # [d]

    @property
    def state_rows(self) -> int:
        return (2 if self.overlap else 1) * self.ratio

    def init_state(self, batch: int, max_len: int, dtype) -> CompressorState:
        coff = 2 if self.overlap else 1
        rows = self.state_rows
        return CompressorState(
            kv=jnp.zeros((batch, rows, coff * self.head_dim), jnp.float32),
            score=jnp.zeros((batch, rows, coff * self.head_dim), jnp.float32),
            entries=jnp.zeros((batch, max_len // self.ratio, self.head_dim), dtype),
        )

    def __call__(self, x: jax.Array, state: CompressorState, start_pos: jax.Array, lengths: jax.Array,
                 freqs) -> CompressorState:
        """Append tokens x [B, T, D] at positions start_pos[b] + t (t < lengths[b]); return the new state.

        Every entry whose window completes among the new tokens is written to `entries`; tokens t >= lengths[b]
        are ignored. `freqs` are the layer's rope frequencies (rope at each entry's window start).
        """
        b, t, _ = x.shape
        m, d = self.ratio, self.head_dim
        ov = 1 if self.overlap else 0
        coff = 1 + ov
        rows = coff * m
        if state.kv.shape != (b, rows, coff * d) or state.entries.shape[::2] != (b, d):
            raise ValueError(f"{self.name}: state shapes kv {state.kv.shape}, entries {state.entries.shape} do not "
                             f"match batch {b}, ratio {m}, head_dim {d}")

        pos = start_pos[:, None] + jnp.arange(t, dtype=start_pos.dtype)                # [B, T]
        wkv, wgate = self.wkv.get_value(), self.wgate.get_value()
        # [R] computes x.float() @ w.float(). When x and the (plain) weights share a dtype, every product is exact
        # in fp32, so the operands go in as they are with fp32 accumulation: the same math without an fp32 copy
        # of both weights on every decode step.
        same = not is_quantized(wkv) and wkv.dtype == x.dtype and wgate.dtype == x.dtype
        xin = x if same else x.astype(jnp.float32)
        kv = dispatch.linear(xin, wkv, out_dtype=jnp.float32, name=f"{self.name}.wkv")
        score = dispatch.linear(xin, wgate, out_dtype=jnp.float32, name=f"{self.name}.wgate")
        score = score + self.ape.get_value().astype(jnp.float32)[pos % m]                # [B, T, coff*d]

        # A window-aligned "extended" sequence per row: positions base .. base + U - 1, taken from the state
        # rows (positions < start) and the new tokens (positions >= start). It covers every window that can
        # complete in this call and the rows of the next state.
        n_emit = (m - 1 + t) // m                        # most entries one call can complete (static)
        u_len = (n_emit + coff) * m
        end = start_pos + lengths                                                       # [B]
        base = (start_pos // m) * m - ov * m                                            # [B]
        taken = start_pos - base                                                        # [B] rows from the state
        u = jnp.arange(u_len, dtype=start_pos.dtype)
        # Positions < start come from their ring slot, the others from the new tokens (concatenated after the ring).
        src = jnp.where(u[None] < taken[:, None], jnp.mod(base[:, None] + u[None], rows),
                        rows + u[None] - taken[:, None])
        src = jnp.clip(src, 0, rows + t - 1)                                            # [B, U]
        pos_u = base[:, None] + u[None]                                                 # [B, U]
        valid = (pos_u >= 0) & (pos_u < end[:, None])
        ext_kv = jnp.take_along_axis(jnp.concatenate([state.kv, kv], 1), src[..., None], 1)
        ext_sc = jnp.take_along_axis(jnp.concatenate([state.score, score], 1), src[..., None], 1)
        ext_kv = jnp.where(valid[..., None], ext_kv, 0.0)                               # [B, U, coff*d]
        ext_sc = jnp.where(valid[..., None], ext_sc, 0.0)

        # Candidates of the n_emit entries that may complete: entry i = start // m + j uses extended window
        # ov + j (its own tokens) and, with overlap, window j (the previous one).
        wkv = ext_kv.reshape(b, n_emit + coff, m, coff * d)
        wsc = ext_sc.reshape(b, n_emit + coff, m, coff * d)
        wok = valid.reshape(b, n_emit + coff, m, 1)
        if self.overlap:
            cand_kv = jnp.concatenate([wkv[:, :n_emit, :, :d], wkv[:, 1:1 + n_emit, :, d:]], axis=2)
            cand_sc = jnp.concatenate([wsc[:, :n_emit, :, :d], wsc[:, 1:1 + n_emit, :, d:]], axis=2)
            cand_ok = jnp.concatenate([wok[:, :n_emit], wok[:, 1:1 + n_emit]], axis=2)  # [B, n_emit, 2m, 1]
        else:
            cand_kv, cand_sc, cand_ok = wkv[:, :n_emit], wsc[:, :n_emit], wok[:, :n_emit]
        weights = _masked_softmax(cand_sc, cand_ok, axis=2)
        comp = jnp.sum(weights * cand_kv, axis=2)                                       # [B, n_emit, d] f32
        dtype = state.entries.dtype
        comp = rms_norm(comp.astype(dtype), self.norm.get_value(), self.eps)
        entry = start_pos[:, None] // m + jnp.arange(n_emit, dtype=start_pos.dtype)     # [B, n_emit]
        comp = apply_rope(comp, entry * m, freqs)
        done = (entry + 1) * m <= end[:, None]
        n_entries = state.entries.shape[1]
        slot = jnp.where(done, entry, n_entries)          # out of range -> dropped
        rows_b = jnp.broadcast_to(jnp.arange(b)[:, None], slot.shape)
        entries = state.entries.at[rows_b, slot].set(comp.astype(dtype), mode="drop")

        # Next state: every new token goes to its ring slot; the other slots keep what they hold.
        return CompressorState(kv=_ring_write(state.kv, kv, start_pos, lengths),
                               score=_ring_write(state.score, score, start_pos, lengths), entries=entries)


def _ring_write(ring: jax.Array, new: jax.Array, start: jax.Array, lengths: jax.Array) -> jax.Array:
    """ring [B, R, C] with slot = position % R; new [B, T, C] at positions start + t, t < lengths -> updated ring.

    Each slot takes the latest new position congruent to it, or keeps what it holds. For one token (decode) this is
    a single elementwise select over the small ring (XLA writes it into the donated buffer; a scatter would lower
    to a dynamic-update-slice plus a separate read of the old row, two launches)."""
    b, r, _ = ring.shape
    t = new.shape[1]
    s = jnp.arange(r, dtype=start.dtype)
    if t == 1:
        hit = (s[None] == (start % r)[:, None]) & (lengths > 0)[:, None]              # [B, R]
        return jnp.where(hit[..., None], new, ring)
    end = start + lengths
    latest = end[:, None] - 1 - jnp.mod(end[:, None] - 1 - s[None], r)                  # [B, R]
    fresh = latest >= start[:, None]
    idx = jnp.clip(latest - start[:, None], 0, t - 1)
    taken = jnp.take_along_axis(new, idx[..., None], axis=1)
    return jnp.where(fresh[..., None], taken, ring)
