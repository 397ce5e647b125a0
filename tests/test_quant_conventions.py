"""NVFP4 checkpoint conventions (compressed-tensors multiplier G vs ModelOpt dequant factor g): TV8, round trips."""
import jax.numpy as jnp
import numpy as np
import pytest

from megamoe_jax.quant import conventions, nvfp4
from megamoe_jax.quant.conventions import (from_compressed_tensors, from_modelopt, to_compressed_tensors,
                                           to_modelopt)


def tv8_codes(lead=()):
    packed = np.zeros(lead + (1, 8), np.uint8)
    packed[..., 0, 0] = 0xC2                                     # [1.0, -2.0]
    scale = np.full(lead + (1, 1), 0x40, np.uint8)               # E4M3 2.0
    return packed, scale


def test_tv8_both_flavours_dequantize_alike():
    packed, scale = tv8_codes()
    ct = from_compressed_tensors(packed, scale, np.array([4.0], np.float32))
    mo = from_modelopt(packed, scale.view(jnp.float8_e4m3fn), np.float32(0.25))
    for t in (ct, mo):
        assert np.asarray(t.global_scale) == np.float32(0.25) and t.global_scale.shape == ()
        np.testing.assert_array_equal(np.asarray(t.dequantize())[0, :2], [0.5, -1.0])
    # MO input_scale 2.5141e-4 <=> CT input_global_scale 3977.57 <=> implied amax 0.67579
    G = conventions.reciprocal(np.float32(2.5141e-4))
    np.testing.assert_allclose(G, 3977.57, rtol=1e-6)
    np.testing.assert_allclose(2688 * np.float32(2.5141e-4), 0.67579, rtol=1e-5)
    t = from_compressed_tensors(packed, scale, np.array([4.0], np.float32), np.array([3977.57], np.float32))
    np.testing.assert_allclose(np.asarray(t.input_scale), 2.5141e-4, rtol=1e-6)


def test_round_trips():
    rng = np.random.default_rng(31)
    w = jnp.asarray(rng.standard_normal((3, 16, 64)).astype(np.float32))
    t = nvfp4.quantize(w, batch_dims=1, input_scale=np.array([2.5e-4, 3e-4, 1e-3], np.float32))
    ct = to_compressed_tensors(t)
    assert ct["weight_global_scale"].shape == (3,) and ct["input_global_scale"].shape == (3,)
    assert ct["weight_packed"].dtype == np.uint8 and ct["weight_scale"].dtype == jnp.float8_e4m3fn
    back = from_compressed_tensors(**ct)
    mo = to_modelopt(back)
    assert mo["weight_scale_2"].shape == (3,) and mo["input_scale"].shape == (3,)
    again = from_modelopt(**mo)
    for u in (back, again):
        np.testing.assert_array_equal(np.asarray(u.packed), np.asarray(t.packed))
        np.testing.assert_array_equal(np.asarray(u.block_scale).view(np.uint8), np.asarray(t.block_scale).view(np.uint8))
        assert u.global_scale.shape == (3, 1) and u.input_scale.shape == (3,)
        # g -> G -> g: exact or one ulp (the f32 reciprocal is not an involution)
        np.testing.assert_array_max_ulp(np.asarray(u.global_scale), np.asarray(t.global_scale), maxulp=1)
        np.testing.assert_array_max_ulp(np.asarray(u.input_scale), np.asarray(t.input_scale), maxulp=1)
    # ModelOpt -> NVFP4Tensor -> ModelOpt is the identity (g is stored as is)
    packed, scale = tv8_codes((2,))
    mo = {"weight": packed, "weight_scale": scale.view(jnp.float8_e4m3fn),
          "weight_scale_2": np.array([0.25, 3e-3], np.float32), "input_scale": np.array([1e-4, 2e-4], np.float32)}
    out = to_modelopt(from_modelopt(**mo))
    for k in mo:
        np.testing.assert_array_equal(np.asarray(out[k]).view(np.uint8) if k == "weight_scale" else out[k],
                                      np.asarray(mo[k]).view(np.uint8) if k == "weight_scale" else mo[k])
    # CT values that survive the reciprocal pair come back exactly; 3584 (a typical bf16 G) moves by one ulp
    for G, exact in ((4.0, True), (3977.57, True), (3584.0, False)):
        ct = to_compressed_tensors(from_compressed_tensors(*tv8_codes(), np.array([G], np.float32)))
        assert (ct["weight_global_scale"][0] == np.float32(G)) == exact
        np.testing.assert_array_max_ulp(ct["weight_global_scale"], np.array([G], np.float32), maxulp=1)


def test_data_multiplier_is_compressed_tensors_global_scale():
    import torch
    from compressed_tensors.quantization.utils.helpers import generate_gparam
    x = np.random.default_rng(32).standard_normal((16, 64)).astype(np.float32) * 0.37
    for dt in (jnp.float32, jnp.bfloat16):
        xj = jnp.asarray(x).astype(dt)
        w = torch.from_numpy(np.array(xj.astype(jnp.float32))).to(torch.float32 if dt == jnp.float32 else
                                                                    torch.bfloat16)
        assert float(nvfp4.data_multiplier(xj)) == float(generate_gparam(w.amin(), w.amax())[0])
    assert conventions.ct_multiplier_from_amax(6.0) == 448.0
    assert conventions.modelopt_scale_from_amax(2688.0) == 1.0


def test_bad_scales_and_shapes():
    packed, scale = tv8_codes()
    for bad, kind in ((0.0, "zero"), (-2.0, "negative"), (np.nan, "NaN"), (np.inf, "Inf")):
        with pytest.raises(ValueError, match=f"weight_global_scale is {kind}"):
            from_compressed_tensors(packed, scale, np.array([bad], np.float32))
        with pytest.raises(ValueError, match=f"input_scale is {kind}"):
            from_modelopt(packed, scale, np.float32(1.0), np.float32(bad))
    with pytest.raises(ValueError, match="do not fit"):
        from_modelopt(packed, scale, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="does not match packed shape"):
        from_modelopt(packed, np.zeros((1, 2), np.uint8), np.float32(1.0))
    t = nvfp4.NVFP4Tensor(jnp.asarray(packed), jnp.asarray(scale).view(jnp.float8_e4m3fn),
                          jnp.asarray([3.0], jnp.float32))
    assert to_modelopt(t)["weight_scale_2"].shape == ()


def test_ct_activation_multiplier_is_used_exactly():
    """W4A4 with a compressed-tensors input_global_scale: activations are quantized with the stored G itself
    (bit-exact to compressed-tensors), not with fl32(1/fl32(1/G)), which differs for G = 3584."""
    import torch
    from tests.test_quant_nvfp4 import ct_quantize
    packed, scale = tv8_codes()
    packed = np.tile(packed, (1, 8))                               # K = 128
    scale = np.tile(scale, (1, 8))
    G = np.float32(3584.0)
    t = from_compressed_tensors(packed, scale, np.array([4.0], np.float32), np.array([G], np.float32))
    assert np.asarray(t.input_multiplier) == G and to_compressed_tensors(t)["input_global_scale"][0] == G
    x = jnp.asarray(np.random.default_rng(33).standard_normal((64, 128)).astype(np.float32) * 0.3)
    xb = x.astype(jnp.bfloat16)
    y = np.asarray(t.prepare_activation(xb))
    p_ct, s_ct, _ = ct_quantize(torch.from_numpy(np.array(xb.astype(jnp.float32))).to(torch.bfloat16),
                                torch.tensor([G]))
    exact = nvfp4.quantize(xb, multiplier=G, input_scale=None)
    np.testing.assert_array_equal(np.asarray(exact.packed), p_ct)
    np.testing.assert_array_equal(np.asarray(exact.block_scale).view(np.uint8), s_ct)
    want = np.asarray(nvfp4.NVFP4Tensor(exact.packed, exact.block_scale, t.input_scale).dequantize())
    np.testing.assert_array_equal(y, want)
    via_g = np.asarray(nvfp4.fake_quantize(xb, t.input_scale))   # G' = fl32(1/g_a) = 3583.9998
    assert (via_g != y).any()
    with pytest.raises(ValueError, match="input_multiplier"):
        nvfp4.NVFP4Tensor(t.packed, t.block_scale, t.global_scale, None, t.input_multiplier)
