"""Perplexity of a loaded model on token ids or text.

    r = perplexity(model, ids, seq_len=256)          # ids: [N] token stream
    r.nll, r.ppl, r.tokens                           # mean negative log-likelihood (nats/token), exp(nll), count
    r = perplexity_text(model, tokenizer, text)      # adds r.bits_per_byte (comparable across tokenizers)

The stream is cut into consecutive, non-overlapping windows of `seq_len` tokens, each scored from an empty context
(its first token is not predicted, so every window scores seq_len - 1 tokens). Windows are batched; all batches
have one shape (the tail that does not fill a window is dropped when at least one full window exists, so only one
program is compiled). Scores are the model's fp32 logits through a log-softmax.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    nll: float                    # mean negative log-likelihood, nats per scored token
    tokens: int                   # tokens scored
    windows: int                  # windows of seq_len evaluated
    seq_len: int
    bytes: int | None = None      # UTF-8 bytes of the scored text (perplexity_text)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if self.nll < 700 else math.inf

    @property
    def bits_per_byte(self) -> float | None:
        """Total bits over the scored text's bytes (tokens * nll / ln 2 / bytes)."""
        if not self.bytes:
            return None
        return self.nll * self.tokens / math.log(2) / self.bytes

    def as_dict(self) -> dict:
        return dict(nll=self.nll, ppl=self.ppl, tokens=self.tokens, windows=self.windows, seq_len=self.seq_len,
                    bytes=self.bytes, bits_per_byte=self.bits_per_byte)


@jax.jit
def _window_nll(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """logits [B, T, V] fp32, ids [B, T] -> summed nll of predicting ids[:, 1:] ([B])."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked, axis=-1)


def windows(ids, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Cut a token stream into [N, seq_len] windows (tail dropped when a full window exists)."""
    ids = np.asarray(ids).reshape(-1)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got {ids.dtype}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a window scores seq_len - 1 tokens), got {seq_len}")
    if max_tokens is not None:
        ids = ids[: int(max_tokens)]
    if ids.size < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.size}")
    if ids.size < seq_len:
        return ids[None].astype(np.int32)
    n = ids.size // seq_len
    return ids[: n * seq_len].reshape(n, seq_len).astype(np.int32)


def perplexity(model, ids, *, seq_len: int = 256, batch_size: int = 8, max_tokens: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of `model` (a megamoe_jax Model) on the token stream `ids`.

    seq_len is capped at the model's context. `progress(done, total)` is called after every batch."""
    seq_len = min(int(seq_len), int(model.max_context))
    rows = windows(ids, seq_len, max_tokens)
    total_nll = 0.0
    n = rows.shape[0]
    for i in range(0, n, batch_size):
        batch = rows[i:i + batch_size]
        real = batch.shape[0]
        if real < batch_size and n > batch_size:
            # Pad the last batch with copies so every batch has one shape (one compiled program).
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - real, axis=0)])
        nll = np.asarray(_window_nll(model.logits(batch), jnp.asarray(batch)))[:real]
        total_nll += float(np.sum(nll, dtype=np.float64))
        if progress is not None:
            progress(min(i + batch_size, n), n)
    scored = n * (rows.shape[1] - 1)
    return PerplexityResult(nll=total_nll / scored, tokens=scored, windows=n, seq_len=rows.shape[1])


def perplexity_text(model, tokenizer, text: str, **kw) -> PerplexityResult:
    """Perplexity on `text` encoded with `tokenizer`; also reports bits per byte of the text actually scored."""
    ids = tokenizer.encode(text)
    r = perplexity(model, ids, **kw)
    # Bytes covered by the scored windows: decode the windows' tokens (exact for any tokenizer whose decode
    # inverts encode; for the byte tokenizer it is the window length).
    n_tok = r.windows * r.seq_len
    covered = tokenizer.decode(ids[:n_tok]).encode("utf-8")
    # The first token of each window is context, not scored: remove its bytes.
    firsts = sum(len(tokenizer.decode([ids[w * r.seq_len]]).encode("utf-8")) for w in range(r.windows))
    return dataclasses.replace(r, bytes=max(1, len(covered) - firsts))
