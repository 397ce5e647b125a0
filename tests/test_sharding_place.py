"""Partition rules, per-shard placement from host memory maps, the memory plan (8 simulated CPUs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from megamoe_jax import sharding
from megamoe_jax.model import config as cfgmod
from megamoe_jax.sharding import plan


class _Recording(np.ndarray):
    """An ndarray that records every slice read from it (a stand-in for a safetensors memory map)."""
    reads: list

    def __getitem__(self, idx):
        self.reads.append(idx)
        return np.asarray(super().__getitem__(idx))


def _recording(a):
    r = np.asarray(a).view(_Recording)
    r.reads = []
    return r


def test_each_device_reads_only_its_shard():
    mesh = sharding.make_mesh(1, 4, 2)
    host = np.arange(8 * 32 * 16, dtype=np.float32).reshape(8, 32, 16)
    rec = _recording(host)
    w = sharding.place_weight("layers.0.ffn.experts.w1.weight", rec, mesh, jnp.bfloat16)
    assert w.dtype == jnp.bfloat16 and w.sharding.spec == P("expert", "tensor", None)
    assert rec.reads and all(host[i].shape == (2, 16, 16) for i in rec.reads)    # never the whole tensor
    want = host.astype(jnp.bfloat16)                                              # cast shard by shard
    for shard in w.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    np.testing.assert_array_equal(np.asarray(w), want)


def test_nvfp4_leaves_placed_together():
    from megamoe_jax.quant import nvfp4
    mesh = sharding.make_mesh(1, 4, 2)
    rng = np.random.default_rng(0)
    q = nvfp4.quantize(jnp.asarray(rng.standard_normal((8, 64, 32)), jnp.float32), batch_dims=1,
                       input_scale=jnp.full((8,), 0.01, jnp.float32))
    host = jax.tree_util.tree_map(np.asarray, q)                                  # numpy leaves, as from disk
    w2 = sharding.place_weight("layers.1.ffn.experts.w2", host, mesh)            # [E, D, I]: I = 32 over tensor
    assert [leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(w2)] == [
        P("expert", None, "tensor"), P("expert", None, "tensor"), P("expert", None), P("expert")]
    assert w2.packed.addressable_shards[0].data.shape == (2, 64, 8)              # 16 codes = 8 bytes
    assert w2.block_scale.addressable_shards[0].data.shape == (2, 64, 1)         # one 16-block per shard
    np.testing.assert_array_equal(np.asarray(w2.dequantize()), np.asarray(q.dequantize()))
    # I = 32 over tensor = 4 would cut a 16-element scale block: the experts stay whole over tensor.
    w2r = sharding.place_weight("layers.1.ffn.experts.w2", host, sharding.make_mesh(1, 2, 4))
    assert w2r.packed.sharding.spec == P("expert", None, None)


def test_rule_table():
    mesh = jax.sharding.AbstractMesh((1, 2, 4), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    z = jax.ShapeDtypeStruct

    def spec(name, shape):
        return sharding.param_specs(name, z(shape, jnp.bfloat16), mesh)[0]

    assert spec("embed.weight", (256, 64)) == P("tensor", None)
    assert spec("head", (256, 64)) == P("tensor", None)
    assert spec("model.layers.3.attn.wq_b.weight", (128, 32)) == P("tensor", None)
    assert spec("layers.3.attn.wo_b", (64, 32)) == P(None, "tensor")
    assert spec("layers.3.attn.attn_sink", (4,)) == P("tensor")
    assert spec("layers.3.attn.attn_sink", (6,)) == P(None)                        # 6 heads over 4: replicated
    assert spec("layers.3.attn.wo_a", (32, 64)) == P(None, None)
    assert spec("layers.3.attn.indexer.wq_b", (64, 32)) == P(None, None)
    assert spec("layers.3.ffn.shared_experts.w2", (64, 32)) == P(None, "tensor")
    assert spec("layers.3.ffn.gate.weight", (8, 64)) == P(None, None)
    assert spec("layers.3.attn_norm", (64,)) == P(None)
    with pytest.raises(ValueError, match="do not split"):
        spec("layers.3.ffn.experts.w1", (3, 32, 64))
    assert "| `(embed\\|head)` | ('tensor', None) |" in sharding.rules.markdown_table()


def test_memory_plan_counts_every_byte():
    cfg = cfgmod.tiny()
    rows = [plan.memory_row(cfg, "tiny", "nvfp4+bf16", "8xH100", ms, batch=2, context=64)
            for ms in [(1, 1, 1), (1, 8, 1), (1, 4, 2)]]
    one, ep8, mixed = rows
    assert one.expert_bytes + one.other_bytes == one.total_bytes                   # nothing split on one device
    assert ep8.expert_bytes * 8 == one.expert_bytes                                # E/8 experts each
    assert one.expert_bytes <= mixed.expert_bytes * 8 < one.expert_bytes * 1.01    # E/4 x I/2 (scales: E/4)
    assert mixed.other_bytes < ep8.other_bytes == one.other_bytes                  # tensor splits the rest
    # V4-Flash in NVFP4 is ~160 GB: it does not fit one H100 but fits 4 of them.
    flash = cfgmod.flash()
    assert 150 * 2**30 < plan.memory_row(flash, "f", "nvfp4+fp8", "1xH100", (1, 1, 1)).total_bytes < 170 * 2**30
    assert not plan.memory_row(flash, "f", "nvfp4+fp8", "1xH100", (1, 1, 1)).fits
    assert plan.memory_row(flash, "f", "nvfp4+fp8", "4xH100", (1, 4, 1)).fits
    c = plan.comm_row(flash, "f", (1, 8, 1))
    assert c.dispatch == pytest.approx(6 * (4096 * 2 + 4) * 7 / 8) and c.tensor == 0


def test_mesh_helpers():
    m = sharding.as_mesh(8, num_experts=8)
    assert dict(m.shape) == {"data": 1, "expert": 8, "tensor": 1}
    assert sharding.batch_spec(sharding.make_mesh(2, 2, 1), 3) == P(None, None)    # 3 rows over 2: replicated
    assert sharding.batch_spec(sharding.make_mesh(2, 2, 1), 4) == P("data", None)
