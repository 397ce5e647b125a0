"""Jitted generation: one compiled prefill, one compiled decode loop (lax.while_loop), no retracing per token.

Batched prompts of different lengths are right padded to a bucketed length; each sequence carries its own
length and position, and a finished sequence feeds a zero-length step so its state stops changing. Sampling uses
an explicit PRNG key (`fold_in(key, step)` per step): greedy at temperature 0, otherwise temperature / top-k /
top-p. A streaming callback runs on the host from inside the loop via `jax.debug.callback(ordered=True)`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megamoe_jax.model.model import DeepseekV4
from megamoe_jax.model.state import DecodeState

BUCKET = 16   # prompt lengths and cache capacities are rounded up to this, to bound recompilation


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static sampling parameters (hashable: part of the compiled program's identity)."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """logits [B, V] fp32 -> token ids [B] int32."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p is not None and s.top_p < 1.0:
        # Keep the smallest prefix of tokens (by descending probability) whose mass reaches top_p; the top token
        # is always kept (transformers' TopPLogitsWarper semantics).
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < s.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Generator:
    """Compiled prefill / decode programs for one model; compiled programs are cached per shape and settings."""

    def __init__(self, model: DeepseekV4):
        self.graphdef, self.params = nnx.split(model)
        self.config = model.config
        self._cache: dict = {}
        # Donating the decode state lets XLA update caches in place; CPU does not implement donation.
        self._donate = jax.default_backend() != "cpu"
        self._callback: Callable | None = None   # the host callback of the generate() call in progress

    # ---- compiled programs ------------------------------------------------------------------------------
    def prefill_fn(self, max_len: int):
        key = ("prefill", max_len)
        if key not in self._cache:
            graphdef = self.graphdef

            def prefill(params, ids, lengths):
                model = nnx.merge(graphdef, params)
                state = model.init_state(ids.shape[0], max_len)
                h, state = model(ids, state, lengths)                             # [B, T, D]
                last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]   # [B, D]
                return model.logits(last), state

            self._cache[key] = jax.jit(prefill)
        return self._cache[key]

    def logits_fn(self):
        """(params, ids [B, T]) -> logits [B, T, V] fp32: one prefill from an empty state."""
        key = ("logits",)
        if key not in self._cache:
            graphdef = self.graphdef

            def logits(params, ids):
                model = nnx.merge(graphdef, params)
                h, _ = model(ids, model.init_state(ids.shape[0], ids.shape[1]))
                return model.logits(h)

            self._cache[key] = jax.jit(logits)
        return self._cache[key]

    def forward_fn(self):
        """(params, ids [B, T], state, lengths) -> (logits [B, T, V] fp32, state): any-length step."""
        key = ("forward",)
        if key not in self._cache:
            graphdef = self.graphdef

            def forward(params, ids, state, lengths):
                model = nnx.merge(graphdef, params)
                h, state = model(ids, state, lengths)
                return model.logits(h), state

            self._cache[key] = jax.jit(forward, donate_argnums=(2,) if self._donate else ())
        return self._cache[key]

    def decode_fn(self, max_new: int, sampling: Sampling, stop_ids: tuple[int, ...], pad_id: int,
                  streaming: bool):
        """The decode loop: (params, state, first_logits, key) -> (tokens [B, max_new], steps run).

        With `streaming`, every step calls the host trampoline, which forwards to the current callback (so a new
        callback does not recompile)."""
        key = ("decode", max_new, sampling, stop_ids, pad_id, streaming)
        if key in self._cache:
            return self._cache[key]
        graphdef = self.graphdef
        stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

        def emit(step, tok, done):
            if streaming:
                jax.debug.callback(self._trampoline, step, tok, done, ordered=True)

        def decode(params, state, first_logits, rng):
            model = nnx.merge(graphdef, params)
            b = first_logits.shape[0]
            tok = sample(first_logits, jax.random.fold_in(rng, 0), sampling)
            done = jnp.isin(tok, stops)
            out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
            emit(0, tok, done)

            def cond(carry):
                step, _, _, _, done = carry
                return (step < max_new) & ~jnp.all(done)

            def body(carry):
                step, tok, state, out, done = carry
                active = (~done).astype(jnp.int32)                       # finished sequences append nothing
                h, state = model(tok[:, None], state, active)
                logits = model.logits(h[:, 0])
                nxt = sample(logits, jax.random.fold_in(rng, step), sampling)
                nxt = jnp.where(done, pad_id, nxt)
                out = out.at[:, step].set(nxt)
                done = done | jnp.isin(nxt, stops)
                emit(step, nxt, done)
                return step + 1, nxt, state, out, done

            step, _, state, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, state, out, done))
            return out, step

        fn = jax.jit(decode, donate_argnums=(1,) if self._donate else ())
        self._cache[key] = fn
        return fn

    def _trampoline(self, step, tok, done):
        if self._callback is not None:
            self._callback(int(step), np.asarray(tok), np.asarray(done))

    # ---- host driver ------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, sampling: Sampling,
                 seed: int, stop_ids: tuple[int, ...], pad_id: int, max_context: int,
                 callback: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
        """prompts: B lists of token ids. Returns (new tokens [B, steps] padded with pad_id, prompt lengths)."""
        lengths = np.asarray([len(p) for p in prompts], np.int32)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        longest = int(lengths.max())
        if longest > max_context:
            raise ValueError(f"prompt of {longest} tokens exceeds the model's context of {max_context} tokens")
        if longest + max_new_tokens > max_context:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"context of {max_context} tokens; ask for at most {max_context - longest} new tokens")
        t_pad = min(_round_up(longest, BUCKET), max_context)
        max_len = min(_round_up(longest + max_new_tokens, BUCKET), max_context)
        ids = np.zeros((len(prompts), t_pad), np.int32)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        logits, state = self.prefill_fn(max_len)(self.params, jnp.asarray(ids), jnp.asarray(lengths))
        decode = self.decode_fn(max_new_tokens, sampling, stop_ids, pad_id, callback is not None)
        self._callback = callback
        try:
            out, steps = decode(self.params, state, logits, jax.random.key(seed))
            out = np.asarray(out)[:, : int(steps)]
            jax.effects_barrier()                      # every streamed token was delivered before we return
        finally:
            self._callback = None
        return out, lengths
