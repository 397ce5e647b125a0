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


def _put_leaf(a, spec: P, mesh: Mesh):
    sharding = NamedSharding(mesh, spec)
    if isinstance(a, jax.Array):
        return jax.device_put(a, sharding)
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
    # a[idx] on a memory map reads only that slice; ascontiguousarray copies just the shard.
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: np.ascontiguousarray(a[idx]))


def put(w, leaf_specs: list[P], mesh: Mesh):
    """Place every leaf of `w` (array or quantized pytree; numpy or jax leaves) with its PartitionSpec."""
    leaves, tree = jax.tree_util.tree_flatten(w)
    if len(leaves) != len(leaf_specs):
        raise ValueError(f"{len(leaf_specs)} specs for a weight with {len(leaves)} leaves")
    return jax.tree_util.tree_unflatten(tree, [_put_leaf(a, s, mesh) for a, s in zip(leaves, leaf_specs)])


def place_weight(name: str, w, mesh: Mesh):
    """Place weight `w` named `name` (DeepSeek-native) on `mesh` by the partition rules."""
    return put(w, param_specs(name, w, mesh), mesh)


def bytes_per_device(tree) -> dict:
    """{device: bytes of the shards it holds} for every jax.Array leaf of `tree` (a memory check)."""
    out: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
