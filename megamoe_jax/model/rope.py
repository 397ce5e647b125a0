"""DeepSeek-V4 rotary position embedding: interleaved (GPT-J) pairs on the LAST `rd` dims of a head.

Pairs are (2i, 2i+1) within x[..., hd-rd:]; the leading hd-rd ("nope") dims are left untouched. For pair i:
    e' = e cos(p*f_i) - o sin(p*f_i),    o' = o cos(p*f_i) + e sin(p*f_i)
and the inverse rotation (used on the attention output, whose V = K carries rope) flips the sign of sin.

Frequencies are per layer ([R] `Attention.__init__` / `precompute_freqs_cis`):
  * sliding-window-only layers (compress ratio 0): base `rope_theta`, no YaRN;
  * compressed layers (CSA / HCA): base `compress_rope_theta` with YaRN (no mscale: the attention scale
    stays hd^-0.5). Everything in such a layer (q, window kv, compressed entries, indexer q and keys, the inverse
    rotation of the output) uses the same frequencies.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inv_freq(rope_dim: int, base: float, yarn=None) -> np.ndarray:
    """Per-pair angular frequencies f_i, i in [0, rope_dim/2), float32 [rope_dim // 2].

    `yarn` is any object with `factor`, `original_max_position_embeddings`, `beta_fast`, `beta_slow`
    (e.g. `config.YarnConfig`) or None. Computed in float32 like [R] (torch float32 pow and ramp).
    """
    if rope_dim <= 0 or rope_dim % 2:
        raise ValueError(f"rope_dim must be a positive even number, got {rope_dim}")
    if not (math.isfinite(base) and base > 1.0):
        raise ValueError(f"rope base must be finite and > 1, got {base}")
    exps = np.arange(0, rope_dim, 2, dtype=np.float32) / np.float32(rope_dim)
    freqs = (np.float32(1.0) / np.power(np.float32(base), exps, dtype=np.float32)).astype(np.float32)
    if yarn is None:
        return freqs
    factor = float(yarn.factor)
    l0 = float(yarn.original_max_position_embeddings)

    def correction_dim(num_rotations):
        return rope_dim * math.log(l0 / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(float(yarn.beta_fast))), 0)
    high = min(math.ceil(correction_dim(float(yarn.beta_slow))), rope_dim - 1)
    if low == high:
        high += 0.001                                   # [R]: avoid a zero-width ramp
    ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    smooth = (np.float32(1.0) - ramp).astype(np.float32)
    # [R]: freqs / factor * (1 - smooth) + freqs * smooth
    return (freqs / np.float32(factor) * (np.float32(1.0) - smooth) + freqs * smooth).astype(np.float32)


def layer_inv_freq(cfg, layer_idx: int) -> np.ndarray:
    """Frequencies of layer `layer_idx` of a `ModelConfig`: theta and YaRN by the layer's compress ratio."""
    ratio = cfg.compress_ratios[layer_idx]
    base = cfg.compress_rope_theta if ratio > 0 else cfg.rope_theta
    yarn = cfg.yarn if ratio > 0 else None     # [R]: "disable YaRN ... in pure sliding-window attention"
    return inv_freq(cfg.qk_rope_head_dim, base, yarn)


def apply_rope(x: jax.Array, positions: jax.Array, freqs, *, inverse: bool = False) -> jax.Array:
    """Rotate the last 2*len(freqs) dims of x by angle positions*freqs (interleaved pairs).

    x [..., hd]; positions: integer array broadcastable to x.shape[:-1] (e.g. [B, T, 1] against [B, T, H, hd]);
    freqs [rd/2]. The rotation is computed in float32 and the result cast back to x.dtype ([R]
    `apply_rotary_emb`). `inverse=True` applies the conjugate rotation.
    """
    freqs = jnp.asarray(freqs, jnp.float32)
    half = freqs.shape[-1]
    rd = 2 * half
    hd = x.shape[-1]
    if rd > hd:
        raise ValueError(f"rope dims ({rd}) exceed the head dim ({hd})")
    angle = positions.astype(jnp.float32)[..., None] * freqs          # [..., rd/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    if inverse:
        sin = -sin
    rope = x[..., hd - rd:].astype(jnp.float32)
    rope = rope.reshape(*rope.shape[:-1], half, 2)
    e, o = rope[..., 0], rope[..., 1]
    rotated = jnp.stack([e * cos - o * sin, o * cos + e * sin], axis=-1)
    rotated = rotated.reshape(*rotated.shape[:-2], rd).astype(x.dtype)
    if rd == hd:
        return rotated
    return jnp.concatenate([x[..., : hd - rd], rotated], axis=-1)
