"""Scale-out on a JAX device mesh: expert parallelism for the routed experts, tensor parallelism for the rest.

  mesh.py   make_mesh(data, expert, tensor), the default shape for N devices, batch placement
  rules.py  the partition table (one regex per parameter family) -> PartitionSpecs per leaf
  place.py  put weights straight into their shards (make_array_from_callback on memory maps)
  plan.py   the memory plan and communication volume (docs/scaling.md), `python -m megamoe_jax.sharding.plan`
The expert-parallel MoE itself is pallas_kernels/ep_moe.py (shard_map + all-to-all), reached through
`pallas_kernels.dispatch.moe_experts` whenever a mesh with an "expert" axis is set (`jax.set_mesh`).
"""
from pallas_kernels.ep_moe import DATA, EXPERT, TENSOR, moe_experts_ep
from megamoe_jax.sharding.mesh import AXES, as_mesh, batch_spec, describe, make_mesh, mesh_shape_for, put_batch
from megamoe_jax.sharding.place import bytes_per_device, place_param, place_weight, put
from megamoe_jax.sharding.rules import RULES, Rule, param_specs, rule_for

__all__ = ["DATA", "EXPERT", "TENSOR", "AXES", "make_mesh", "as_mesh", "mesh_shape_for", "batch_spec", "put_batch",
           "describe", "RULES", "Rule", "rule_for", "param_specs", "place_weight", "place_param", "put",
           "bytes_per_device", "moe_experts_ep"]
