"""Whole-model decode state: one AttentionState per layer plus each sequence's position.

A registered pytree, so it flows through jit, lax.while_loop and donation. Per-layer states come from
`Attention.init_state` (sliding-window ring, compressed KV, indexer keys, compressor partial windows); this
module only adds the bookkeeping shared by all layers.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DecodeState:
    layers: tuple[Any, ...]   # per-layer AttentionState (pytrees owned by model/attention.py)
    positions: jax.Array      # [B] int32: tokens already in the state = absolute position of the next token
    max_len: int              # static: the capacity every per-layer state was allocated for

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    def advance(self, layers: tuple[Any, ...], lengths: jax.Array) -> "DecodeState":
        """The state after appending `lengths[b]` tokens to sequence b."""
        return DecodeState(tuple(layers), self.positions + lengths.astype(jnp.int32), self.max_len)


jax.tree_util.register_dataclass(DecodeState, data_fields=["layers", "positions"], meta_fields=["max_len"])
