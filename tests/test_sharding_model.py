"""The whole model on a device mesh (8 simulated CPUs) equals the single-device model: logits and greedy tokens.

A 2-layer tiny checkpoint covers both attention kinds with a compressor (CSA with its indexer, HCA; every layer
has the sliding window) and both MoE kinds (hash, top-k). Meshes (data, expert, tensor) from the issue.
"""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import megamoe_jax
from megamoe_jax import sharding
from megamoe_jax.model.config import HASH_MOE, TOPK_MOE, tiny
from pallas_kernels import ep_moe
from tests.helpers_tiny import tiny_checkpoint

CFG = tiny(num_hidden_layers=2, compress_ratios=(4, 16), mlp_layer_types=(HASH_MOE, TOPK_MOE))
PROMPTS = [[5, 17, 200, 3, 99, 42, 7, 8, 250, 1, 64, 33, 18, 91, 120, 6, 77, 2, 140, 19, 23, 230],
           [11, 12, 13, 14, 15, 16, 17, 18, 19]]          # ragged: 22 and 9 tokens
NEW = 6


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path, _ = tiny_checkpoint(tmp_path_factory.mktemp("tiny_sharding"), CFG, seed=3)
    model = megamoe_jax.load(path)
    ids = np.asarray([PROMPTS[0][:16], PROMPTS[0][6:]], np.int32)        # [2, 16]
    return path, ids, np.asarray(model.logits(ids)), model.generate(PROMPTS, NEW, ignore_eos=True)


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 4, 1), (1, 4, 2), (1, 2, 4)])
def test_sharded_model_equals_single_device(single, shape, monkeypatch):
    path, ids, ref_logits, ref_tokens = single
    # Spy: the MoE layers must trace through the expert-parallel shard_map (GSPMD on the plain reference would
    # also give the right numbers, so equal logits alone would not show it).
    traced = []
    real = ep_moe.moe_experts_ep
    monkeypatch.setattr(ep_moe, "moe_experts_ep", lambda *a, **kw: traced.append(kw["mesh"].shape) or real(*a, **kw))
    model = megamoe_jax.load(path, mesh=shape)
    data, expert, tensor = shape

    # placement: experts E/ep per device (hidden dim over tensor), vocab and heads over tensor, norms replicated.
    layer = model.module.layers[1]
    w1 = layer.ffn.experts.w1.get_value()
    assert w1.sharding.spec == P("expert", "tensor" if tensor > 1 else None, None)
    e, i, d = w1.shape
    assert {s.data.shape for s in w1.addressable_shards} == {(e // expert, i // tensor, d)}
    assert model.module.embed.get_value().sharding.spec == P("tensor" if tensor > 1 else None, None)
    assert model.module.layers[0].attn.wq_b.get_value().sharding.spec == P("tensor" if tensor > 1 else None, None)
    assert model.module.layers[0].attn.wo_a.get_value().sharding.is_fully_replicated
    assert model.module.layers[0].attn_norm.get_value().sharding.is_fully_replicated
    # routed experts: each device holds exactly 1/(ep*tp) of them; the model as a whole is split evenly.
    experts = [lyr.ffn.experts for lyr in model.module.layers]
    per_dev = sharding.bytes_per_device(experts)
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(experts))
    assert len(per_dev) == data * expert * tensor
    assert set(per_dev.values()) == {total // (expert * tensor)}
    everything = sharding.bytes_per_device(model.module)
    full = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.module) if isinstance(x, jax.Array))
    assert len(set(everything.values())) == 1 and max(everything.values()) < full

    logits = np.asarray(model.logits(ids))
    assert len(traced) == CFG.num_hidden_layers and dict(traced[0]) == dict(zip(sharding.AXES, shape))
    assert logits.shape == ref_logits.shape
    err = np.max(np.abs(logits - ref_logits)) / np.max(np.abs(ref_logits))
    assert err < 2e-5, err
    tokens = model.generate(PROMPTS, NEW, ignore_eos=True)
    for got, want in zip(tokens, ref_tokens):
        np.testing.assert_array_equal(got, want)


def test_mesh_arguments_are_checked(single):
    path = single[0]
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(2, 8, 1)
    with pytest.raises(ValueError, match="positive int"):
        sharding.make_mesh(0, 2, 1)
    with pytest.raises(ValueError, match="mesh must be"):
        megamoe_jax.load(path, mesh="8")
    # tiny has 8 experts: 3 expert-parallel devices cannot hold equal shares.
    with pytest.raises(ValueError, match="8 routed experts do not split over 3"):
        megamoe_jax.load(path, mesh=(1, 3, 1))
    assert sharding.mesh_shape_for(8, 256) == (1, 8, 1)
    assert sharding.mesh_shape_for(8, 6) == (1, 2, 4)
