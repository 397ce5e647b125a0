"""The sharded path on GPUs (run on the device machine with MEGAMOE_TEST_GPU=1).

One GPU: a (1, 1, 1) mesh runs the expert-parallel shard_map (ragged_all_to_all over a one-device axis, the
per-shard Hopper kernels through dispatch.grouped_linear) and matches the single-device path. With several GPUs
(issue 8), the same checks run with the experts split over all of them.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import megamoe_jax
from megamoe_jax import sharding
from megamoe_jax.model.config import HASH_MOE, TOPK_MOE, tiny
from pallas_kernels import ep_moe, reference

_reference = jax.jit(reference.moe_experts, static_argnums=(6,))


def _gpus():
    return [d for d in jax.devices() if d.platform == "gpu"]


def _meshes():
    n = len(_gpus())
    shapes = [(1, 1, 1)]
    if n >= 2:
        shapes += [(1, n, 1), (1, n // 2, 2)]
    return shapes


def _problem(rng, t, d, i, e, k, dtype):
    x = jnp.asarray(rng.standard_normal((t, d)), dtype)
    ws = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-1]), jnp.float32) for s in ((e, i, d), (e, i, d), (e, d, i))]
    idx = jnp.asarray(np.stack([rng.choice(e // 2, k, replace=False) for _ in range(t)]), jnp.int32)  # half idle
    wt = jnp.asarray(rng.random((t, k)), jnp.float32)
    return x, ws, idx, wt


@pytest.mark.parametrize("shape", _meshes())
@pytest.mark.parametrize("exchange", ["ragged", "dense"])
@pytest.mark.parametrize("fmt", ["bf16", "nvfp4"])
def test_ep_moe_on_gpu_matches_reference(shape, exchange, fmt):
    from megamoe_jax.quant import nvfp4
    rng = np.random.default_rng(0)
    t, d, i, e, k = 37, 256, 512, 16, 4
    x, ws, idx, wt = _problem(rng, t, d, i, e, k, jnp.bfloat16)
    if fmt == "nvfp4":
        w1, w3, w2 = (nvfp4.quantize(w, batch_dims=1) for w in ws)
    else:
        w1, w3, w2 = (w.astype(jnp.bfloat16) for w in ws)
    mesh = sharding.make_mesh(*shape, devices=_gpus()[: int(np.prod(shape))])
    fn = jax.jit(lambda *a: ep_moe.moe_experts_ep(*a, 10.0, mesh=mesh, exchange=exchange))
    out = np.asarray(fn(x, w1, w3, w2, idx, wt), np.float32)
    ref = np.asarray(_reference(x, w1, w3, w2, idx, wt, 10.0), np.float32)
    assert np.all(np.isfinite(out))
    # bf16 output; the per-shard kernels may sum in another order than the jnp reference.
    np.testing.assert_allclose(out, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    # The GPU machine's transformers may predate DeepseekV4: a checkpoint built here by
    # `python -m tests.gpu.test_sharding_gpu DIR` can be carried there and named by MEGAMOE_TINY_CKPT.
    if os.environ.get("MEGAMOE_TINY_CKPT"):
        return os.environ["MEGAMOE_TINY_CKPT"]
    from tests.helpers_tiny import tiny_checkpoint
    cfg = tiny(num_hidden_layers=2, compress_ratios=(4, 16), mlp_layer_types=(HASH_MOE, TOPK_MOE))
    path, _ = tiny_checkpoint(tmp_path_factory.mktemp("tiny_gpu_sharding"), cfg, seed=3)
    return path


_PROMPTS = [[5, 17, 200, 3, 99, 42, 7, 8, 250, 1, 64, 33, 18], [11, 12, 13, 14, 15]]
_IDS = np.asarray([[5, 17, 200, 3, 99, 42, 7, 8, 250, 1, 64, 33, 18, 91, 120, 6]] * 2, np.int32)


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    """(dtype, mesh shape) -> loaded model, loaded once per module (each compile of the tiny model took 35-50 s
    on an H200, so the three tests below share the programs they can)."""
    cache = {}

    def get(dtype, shape=None):
        if (dtype, shape) not in cache:
            mesh = None if shape is None else sharding.make_mesh(*shape, devices=_gpus()[: int(np.prod(shape))])
            cache[dtype, shape] = megamoe_jax.load(tiny_ckpt, dtype=dtype, mesh=mesh)
        return cache[dtype, shape]
    return get


@pytest.mark.parametrize("shape", _meshes())
def test_model_on_mesh_logits_fp32(models, shape):
    # fp32: the comparison is tight.
    ref, got = np.asarray(models(jnp.float32).logits(_IDS)), np.asarray(models(jnp.float32, shape).logits(_IDS))
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-3


@pytest.mark.parametrize("shape", _meshes())
def test_model_on_mesh_greedy_tokens_fp32(models, shape):
    one, shard = models(jnp.float32), models(jnp.float32, shape)
    for a, b in zip(one.generate(_PROMPTS, 8, ignore_eos=True), shard.generate(_PROMPTS, 8, ignore_eos=True)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", _meshes())
def test_model_on_mesh_logits_bf16(models, shape):
    # bf16 (the production dtype): same logits within bf16 rounding.
    ref16 = np.asarray(models(jnp.bfloat16).logits(_IDS))
    got16 = np.asarray(models(jnp.bfloat16, shape).logits(_IDS))
    assert np.all(np.isfinite(got16))
    assert np.max(np.abs(got16 - ref16)) / np.max(np.abs(ref16)) < 3e-2


if __name__ == "__main__":
    import sys
    from tests.helpers_tiny import tiny_checkpoint
    tiny_checkpoint(sys.argv[1], tiny(num_hidden_layers=2, compress_ratios=(4, 16),
                                      mlp_layer_types=(HASH_MOE, TOPK_MOE)), seed=3)
