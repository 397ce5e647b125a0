"""Jitted generation: one compiled prefill, one compiled decode loop (lax.while_loop of fixed-length chunks), no
retracing per token.

Batched prompts of different lengths are right padded to a bucketed length; each sequence carries its own
length and position, and a finished sequence feeds a zero-length step so its state stops changing. Sampling uses
an explicit PRNG key (`fold_in(key, step)` per step): greedy at temperature 0, otherwise temperature / top-k /
top-p. A streaming callback runs on the host from inside the loop via `jax.debug.callback(ordered=True)`.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megamoe_jax.model.model import DeepseekV4


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings. Only `greedy`, `top_k` and whether top-p is on shape the compiled program; the
    temperature and the top-p mass are runtime values (changing them does not recompile)."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer))
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def static(self) -> tuple:
        """The part of the settings that is baked into the compiled decode program."""
        if self.greedy:
            return (True, None, False)
        return (False, self.top_k, self.top_p is not None and self.top_p < 1.0)


def sample(logits: jax.Array, key: jax.Array, *, greedy: bool, top_k: int | None = None,
           temperature: jax.Array | float = 1.0, top_p: jax.Array | float | None = None) -> jax.Array:
    """logits [B, V] fp32 -> token ids [B] int32 (greedy argmax, or temperature / top-k / top-p sampling)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        # Keep the smallest prefix of tokens (by descending probability) whose mass reaches top_p; the top token
        # is always kept (transformers' TopPLogitsWarper semantics).
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def bucket(n: int) -> int:
    """Round a length up to a compile bucket: powers of two from 16 to 4096, then multiples of 1024."""
    if n <= 4096:
        return max(16, 1 << (max(n, 1) - 1).bit_length())
    return -(-n // 1024) * 1024


# ---- compiled programs ----------------------------------------------------------------------------------------
# Module-level and keyed by the (hashable) nnx GraphDef, so every model of the same structure shares them.

TRACES: collections.Counter = collections.Counter()   # how often each program was traced (tests: no retracing)
_streaming_callback: Callable | None = None           # the callback of the generate() call in progress
_JITTED: dict = {}


def _jit(name: str, fn, static: tuple[str, ...], donate: tuple[str, ...] = ()):
    """jax.jit built on first use (so importing this module does not initialise a backend); the decode state is
    donated where the backend implements donation (not on CPU)."""
    f = _JITTED.get(name)
    if f is None:
        donate = donate if jax.default_backend() != "cpu" else ()
        f = _JITTED[name] = jax.jit(fn, static_argnames=static, donate_argnames=donate)
    return f


def _prefill(graphdef, params, ids, lengths, *, max_len):
    """-> (next-token logits [B, V] fp32, decode state of capacity max_len)."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, params)
    state = model.init_state(ids.shape[0], max_len)
    h, state = model(ids, state, lengths)                                        # [B, T, D]
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]   # [B, D]
    return model.logits(last), state


def _logits(graphdef, params, ids):
    TRACES["logits"] += 1
    model = nnx.merge(graphdef, params)
    h, _ = model(ids, model.init_state(ids.shape[0], ids.shape[1]))
    return model.logits(h)


def _forward(graphdef, params, ids, state, lengths):
    TRACES["forward"] += 1
    model = nnx.merge(graphdef, params)
    h, state = model(ids, state, lengths)
    return model.logits(h), state


def _trampoline(step0, toks, dones, ran):
    """Host side of the streaming callback: one call per decode chunk, forwarded step by step."""
    if _streaming_callback is not None:
        toks, dones, ran = np.asarray(toks), np.asarray(dones), np.asarray(ran)
        for i in range(toks.shape[0]):
            if ran[i]:
                _streaming_callback(int(step0) + i, toks[i], dones[i])


DECODE_CHUNK = 8   # decode steps per inner loop of static trip count (see _decode)


def _decode(graphdef, params, state, first_logits, rng, max_new, stops, pad, temperature, top_p, *,
            out_cap, static_sampling, streaming):
    """The decode loop -> (tokens [B, out_cap] (pad after a sequence stops), steps run, final state).

    The body (one decode step of the whole model + sampling) is compiled once. It runs in chunks of
    `min(DECODE_CHUNK, out_cap)` steps: an inner loop of static trip count inside an outer while_loop that stops
    once every sequence is done or `max_new` tokens exist. Why chunks: XLA on GPU copies a while loop's predicate
    to the host before every iteration when the trip count is unknown, so a per-token stop test makes the host
    wait for each step before it may launch the next one's ~300 kernels; a loop of known trip count is launched
    ahead. A finished sequence (or a step past `max_new`) feeds a zero-length step, so its state stops changing
    and it emits pad; a chunk's last steps may therefore run the model without effect (at most chunk - 1 steps).
    With `streaming`, each chunk calls the host trampoline once (which forwards every step that ran, in order, to
    the current callback: a new callback does not recompile)."""
    TRACES["decode"] += 1
    model = nnx.merge(graphdef, params)
    greedy, top_k, use_top_p = static_sampling
    pick = functools.partial(sample, greedy=greedy, top_k=top_k, temperature=temperature,
                             top_p=top_p if use_top_p else None)
    chunk = min(DECODE_CHUNK, out_cap)

    b = first_logits.shape[0]
    tok = pick(first_logits, jax.random.fold_in(rng, 0))
    done = jnp.isin(tok, stops)
    out = jnp.full((b, out_cap), pad, jnp.int32).at[:, 0].set(tok)
    if streaming:
        jax.debug.callback(_trampoline, 0, tok[None], done[None], jnp.ones((1,), bool), ordered=True)

    def one_step(i, carry):
        step, tok, state, out, done, steps, *log = carry                       # log: only when streaming
        active = ~done & (step < max_new)                                      # [B]
        h, state = model(tok[:, None], state, active.astype(jnp.int32))
        nxt = pick(model.logits(h[:, 0]), jax.random.fold_in(rng, step))
        nxt = jnp.where(active, nxt, pad)
        out = out.at[:, step].set(nxt, mode="drop")                            # a step past out_cap: dropped
        done = done | ~active | jnp.isin(nxt, stops)
        ran = jnp.any(active)
        steps = jnp.where(ran, step + 1, steps)
        if streaming:
            log = [log[0].at[i].set(nxt), log[1].at[i].set(done), log[2].at[i].set(ran)]
        return step + 1, nxt, state, out, done, steps, *log

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        if not streaming:
            return jax.lax.fori_loop(0, chunk, one_step, carry)
        log = (jnp.zeros((chunk, b), jnp.int32), jnp.zeros((chunk, b), bool), jnp.zeros((chunk,), bool))
        *carry_out, t, d, r = jax.lax.fori_loop(0, chunk, one_step, (*carry, *log))
        jax.debug.callback(_trampoline, carry[0], t, d, r, ordered=True)
        return tuple(carry_out)

    init = (jnp.int32(1), tok, state, out, done, jnp.int32(1))
    _, _, state, out, _, steps = jax.lax.while_loop(cond, body, init)
    return out, steps, state


class Generator:
    """The compiled programs bound to one model's parameters.

    prefill_fn(max_len)(params, ids, lengths), logits_fn()(params, ids), forward_fn()(params, ids, state, lengths)
    and decode_fn(...) take `self.params` first; programs are shared by every model of the same structure and
    cached per (batch, bucketed lengths, static sampling settings).
    """

    def __init__(self, model: DeepseekV4):
        self.graphdef, self.params = nnx.split(model)
        self.config = model.config
        self.put_batch: Callable = jnp.asarray   # host [B, ...] -> device; a sharded model splits B over "data"

    @property
    def traces(self) -> collections.Counter:
        return TRACES

    def prefill_fn(self, max_len: int):
        """(params, ids [B, T], lengths [B]) -> (next-token logits [B, V] fp32, state of capacity max_len)."""
        f = _jit("prefill", _prefill, ("graphdef", "max_len"))
        return functools.partial(f, self.graphdef, max_len=max_len)

    def logits_fn(self):
        """(params, ids [B, T]) -> logits [B, T, V] fp32: one prefill from an empty state."""
        return functools.partial(_jit("logits", _logits, ("graphdef",)), self.graphdef)

    def forward_fn(self):
        """(params, ids [B, T], state, lengths [B]) -> (logits [B, T, V] fp32, new state): append any number of
        tokens per sequence (prefill, chunked prefill or one decode step). The state is donated on GPU."""
        return functools.partial(_jit("forward", _forward, ("graphdef",), ("state",)), self.graphdef)

    def decode_fn(self, out_cap: int, static_sampling: tuple, streaming: bool):
        """(params, state, first_logits, rng, max_new, stops, pad, temperature, top_p) -> (tokens, steps, state).

        The state is donated (and updated in place on GPU); the returned one is the state after the last step."""
        f = _jit("decode", _decode, ("graphdef", "out_cap", "static_sampling", "streaming"), ("state",))
        return functools.partial(f, self.graphdef, out_cap=out_cap, static_sampling=static_sampling,
                                 streaming=streaming)

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
        t_pad = min(bucket(longest), max_context)
        max_len = min(bucket(longest + max_new_tokens), max_context)
        ids = np.zeros((len(prompts), t_pad), np.int32)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        logits, state = self.prefill_fn(max_len)(self.params, self.put_batch(ids), self.put_batch(lengths))
        decode = self.decode_fn(bucket(max_new_tokens), sampling.static, callback is not None)
        stops = np.full((max(4, -(-len(stop_ids) // 4) * 4),), -1, np.int32)   # padded: no recompile per set
        stops[:len(stop_ids)] = stop_ids
        global _streaming_callback
        _streaming_callback = callback
        try:
            out, steps, _ = decode(self.params, state, logits, jax.random.key(seed), jnp.int32(max_new_tokens),
                                jnp.asarray(stops), jnp.int32(pad_id), jnp.float32(sampling.temperature or 1.0),
                                jnp.float32(sampling.top_p or 1.0))
            out = np.asarray(out)[:, : int(steps)]
            jax.effects_barrier()                      # every streamed token was delivered before we return
        finally:
            _streaming_callback = None
        return out, lengths
