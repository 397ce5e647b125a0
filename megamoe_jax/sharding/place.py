"""Put weights straight into their shards.

Each device's slice is cut from the host array (typically a zero-copy memory map of a safetensors file) by
`jax.make_array_from_callback`, so only the bytes of that shard are read and copied: no host buffer and no device
ever holds a whole tensor it does not own. The params builder calls `place_weight` once per weight while it walks
the checkpoint layer by layer, so host memory peaks at about one layer.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from megamoe_jax.sharding.rules import param_specs


def _put_leaf(a, spec: P, mesh: Mesh, dtype=None):
    sharding = NamedSharding(mesh, spec)
    if isinstance(a, jax.Array):
        return jax.device_put(a if dtype is None else a.astype(dtype), sharding)
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
    dtype = a.dtype if dtype is None else np.dtype(dtype)

    def shard(idx):
        # a[idx] on a memory map reads only that slice; the copy (and the cast) is just the shard.
        return np.ascontiguousarray(a[idx]).astype(dtype, copy=False)

    return jax.make_array_from_callback(a.shape, sharding, shard)


def put(w, leaf_specs: list[P], mesh: Mesh, dtype=None):
    """Place every leaf of `w` (array or quantized pytree; numpy or jax leaves) with its PartitionSpec.
    `dtype` casts a plain weight shard by shard (quantized leaves keep their dtypes)."""
    leaves, tree = jax.tree_util.tree_flatten(w)
    if len(leaves) != len(leaf_specs):
        raise ValueError(f"{len(leaf_specs)} specs for a weight with {len(leaves)} leaves")
    if hasattr(w, "dequantize"):
        dtype = None
    return jax.tree_util.tree_unflatten(tree, [_put_leaf(a, s, mesh, dtype) for a, s in zip(leaves, leaf_specs)])


def place_weight(name: str, w, mesh: Mesh, dtype=None):
    """Place weight `w` (host or device; plain or quantized) named `name` (native name or model param path, e.g.
    "layers.3.attn.wq_b") on `mesh` by the partition rules, casting a plain weight to `dtype` per shard."""
    return put(w, param_specs(name, w, mesh), mesh, dtype)


def place_param(path: str, value, dtype=None, *, mesh: Mesh):
    """The `place` hook of `model.params.load_params`: (param path, host value, dtype) -> placed value."""
    return place_weight(path, value, mesh, dtype)


def bytes_per_device(tree) -> dict:
    """{device: bytes of the shards it holds} for every jax.Array leaf of `tree` (a memory check)."""
    out: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
