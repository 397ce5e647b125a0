"""The device mesh: three named axes ("data", "expert", "tensor"); the model never names devices.

  data   : independent replicas; the batch is split over it (prompts, decode state).
  expert : routed experts split over it (E/ep per device); tokens are exchanged with all-to-all.
  tensor : attention heads, dense layers, vocab and the experts' hidden dim split over it.

Axes are `AxisType.Auto`: jit propagates shardings from the placed parameters (GSPMD) and only the routed experts
run as an explicit `shard_map` (pallas_kernels/ep_moe.py).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels.ep_moe import DATA, EXPERT, TENSOR, axis_size

AXES = (DATA, EXPERT, TENSOR)


def make_mesh(data: int = 1, expert: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, expert, tensor) mesh over `devices` (default: the first data*expert*tensor of `jax.devices()`)."""
    for name, v in (("data", data), ("expert", expert), ("tensor", tensor)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"mesh size {name}={v!r} must be a positive int")
    n = data * expert * tensor
    if devices is None:
        avail = jax.devices()
        if len(avail) < n:
            raise ValueError(f"mesh ({data}, {expert}, {tensor}) needs {n} devices; {len(avail)} available "
                             f"({avail[0].platform})")
        devices = avail[:n]
    devices = list(np.asarray(devices, dtype=object).reshape(-1))
    if len(devices) != n:
        raise ValueError(f"mesh ({data}, {expert}, {tensor}) needs {n} devices, got {len(devices)}")
    if len({d.id for d in devices}) != n:
        raise ValueError("mesh devices must be distinct")
    # jax.make_mesh orders the devices for the physical topology (NVLink/ICI neighbours on the fast axes).
    return jax.make_mesh((data, expert, tensor), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def as_mesh(mesh, *, num_experts: int | None = None) -> Mesh:
    """A Mesh from a Mesh (axes checked), a (data, expert, tensor) tuple, or a device count N (the default shape
    `mesh_shape_for(N, num_experts)`, as `megamoe generate --devices N` uses)."""
    if isinstance(mesh, Mesh):
        bad = [a for a in mesh.axis_names if a not in AXES]
        if bad:
            raise ValueError(f"mesh axes must be among {AXES}, got {mesh.axis_names}")
        return mesh
    if isinstance(mesh, (int, np.integer)) and not isinstance(mesh, bool):
        if num_experts is None:
            raise ValueError("a device count as mesh needs num_experts to choose the mesh shape")
        return make_mesh(*mesh_shape_for(int(mesh), num_experts))
    if isinstance(mesh, (tuple, list)) and len(mesh) == 3:
        return make_mesh(*mesh)
    raise ValueError(f"mesh must be a jax.sharding.Mesh, a (data, expert, tensor) tuple or a device count, "
                     f"got {mesh!r}")


def mesh_shape_for(n_devices: int, num_experts: int) -> tuple[int, int, int]:
    """The default (data, expert, tensor) for `--devices N`: all devices on "expert" (the experts are ~95% of a
    DeepSeek-V4 model, and EP moves only the k routed rows per token); when E does not divide, the largest
    divisor of N that divides E goes to "expert" and the rest to "tensor"."""
    if n_devices < 1:
        raise ValueError(f"--devices must be >= 1, got {n_devices}")
    ep = max(d for d in range(1, n_devices + 1) if n_devices % d == 0 and num_experts % d == 0)
    return 1, ep, n_devices // ep


def batch_spec(mesh: Mesh, batch: int, ndim: int = 2) -> P:
    """Spec for a [B, ...] array: B over "data" when it divides, else replicated."""
    dp = axis_size(mesh, DATA)
    lead = DATA if dp > 1 and batch % dp == 0 else None
    return P(lead, *([None] * (ndim - 1)))


def put_batch(mesh: Mesh, a):
    """Place a host [B, ...] array (e.g. token ids) on the mesh, batch over "data" when it divides."""
    a = np.asarray(a)
    return jax.device_put(a, NamedSharding(mesh, batch_spec(mesh, a.shape[0], a.ndim)))


def describe(mesh: Mesh) -> str:
    return (f"mesh data={axis_size(mesh, DATA)} expert={axis_size(mesh, EXPERT)} tensor={axis_size(mesh, TENSOR)} "
            f"on {mesh.devices.size} x {mesh.devices.flat[0].device_kind}")
