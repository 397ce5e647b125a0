"""CPU: which implementation the dispatcher picks (Hopper kernels vs the reference), that the calibration hook
still sees every named call, and the activation quantizer's jnp path against megamoe_jax.quant.nvfp4."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from megamoe_jax.quant import nvfp4
from pallas_kernels import act_quant, dispatch, fused_moe
from pallas_kernels import grouped_matmul as gm
from pallas_kernels import reference


def _nvfp4(key, shape, input_scale=None):
    t = nvfp4.quantize(jax.random.normal(key, shape), batch_dims=len(shape) - 2)
    return nvfp4.NVFP4Tensor(t.packed, t.block_scale, t.global_scale, input_scale)


def test_cpu_uses_the_reference():
    assert not dispatch.kernels_enabled()
    w = _nvfp4(jax.random.PRNGKey(0), (2, 128, 256))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 256))
    gs = jnp.asarray([4, 2], jnp.int32)
    np.testing.assert_array_equal(np.asarray(dispatch.grouped_linear(x, w, gs)),
                                  np.asarray(reference.grouped_linear(x, w, gs)))


def test_forcing_pallas_without_hopper_fails(monkeypatch):
    monkeypatch.setenv("MEGAMOE_KERNELS", "pallas")
    with pytest.raises(RuntimeError, match="Hopper"):
        dispatch.kernels_enabled()


def test_kernel_routing_on_hopper(monkeypatch):
    """With kernels on: NVFP4 weights of tileable shapes go to the kernels, everything else to the reference."""
    monkeypatch.setattr(dispatch, "kernels_enabled", lambda: True)
    calls = []

    def fake_grouped(x, w, gs, *, out_dtype=None, **kw):
        calls.append((x.shape, w.shape, tuple(np.asarray(gs)), None if w.input_scale is None else w.input_scale.shape))
        return jnp.zeros((x.shape[0], w.shape[1]), out_dtype or x.dtype)

    monkeypatch.setattr(gm, "grouped_linear", fake_grouped)
    w3 = _nvfp4(jax.random.PRNGKey(0), (2, 128, 256))
    dispatch.grouped_linear(jnp.ones((5, 256)), w3, jnp.asarray([3, 2], jnp.int32))
    assert calls[-1] == ((5, 256), (2, 128, 256), (3, 2), None)
    # A dense NVFP4 linear (W4A4, scalar input scale) is the one-group case: [N, K] -> [1, N, K], group = all rows.
    w2 = _nvfp4(jax.random.PRNGKey(1), (128, 256), input_scale=jnp.float32(0.01))
    y = dispatch.linear(jnp.ones((2, 3, 256)), w2)
    assert y.shape == (2, 3, 128) and calls[-1] == ((6, 256), (1, 128, 256), (6,), ())
    # Shapes the kernel does not tile, and other formats, stay on the reference.
    n = len(calls)
    small = _nvfp4(jax.random.PRNGKey(2), (2, 128, 128))
    dispatch.grouped_linear(jnp.ones((5, 128)), small, jnp.asarray([3, 2], jnp.int32))
    dispatch.linear(jnp.ones((3, 256)), w2.dequantize())
    assert len(calls) == n


def test_moe_routing_and_observer(monkeypatch):
    monkeypatch.setattr(dispatch, "kernels_enabled", lambda: True)
    seen, names = [], []
    monkeypatch.setattr(fused_moe, "moe_experts", lambda *a, **k: seen.append(1) or jnp.zeros_like(a[0]))
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    w1, w3 = _nvfp4(ks[0], (2, 256, 256)), _nvfp4(ks[1], (2, 256, 256))
    w2 = _nvfp4(ks[2], (2, 256, 256))
    x = jnp.ones((3, 256), jnp.bfloat16)
    idx, tw = jnp.asarray([[0, 1], [1, 0], [0, 1]], jnp.int32), jnp.full((3, 2), 0.5)
    with dispatch.observe(lambda name, amax: names.append(name)):
        dispatch.moe_experts(x, w1, w3, w2, idx, tw, 7.0, name="layers.0.ffn.experts")
    assert seen == [1] and names == ["layers.0.ffn.experts.w13", "layers.0.ffn.experts.w2"]


def test_act_quant_matches_nvfp4_quantize():
    x = (jax.random.normal(jax.random.PRNGKey(3), (7, 64)) * 5).astype(jnp.bfloat16)
    g = jnp.float32(0.004)
    packed, scale, amax = act_quant.quantize(x, g, with_amax=True)
    ref = nvfp4.quantize(x, g)
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(ref.packed))
    np.testing.assert_array_equal(np.asarray(scale.view(jnp.uint8)), np.asarray(ref.block_scale.view(jnp.uint8)))
    np.testing.assert_array_equal(np.asarray(amax), np.abs(np.asarray(x.astype(jnp.float32))).max(-1))
    # Grouped W4A4: rows quantized with their group's scale; the kernel sees x_hat / g_a (exact in bf16).
    ga = jnp.asarray([0.004, 0.02], jnp.float32)
    gs = jnp.asarray([3, 4], jnp.int32)
    xq = act_quant.quantize_dequantize_grouped(x, ga, gs).astype(jnp.float32)
    gid = np.array([0, 0, 0, 1, 1, 1, 1])
    want = reference.quantize_activation(x, ga[gid]) / ga[gid][:, None]
    np.testing.assert_allclose(np.asarray(xq), np.asarray(want), rtol=1e-6)
