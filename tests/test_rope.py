"""RoPE of DeepSeek-V4 (megamoe_jax/model/rope.py) against transformers 5.23 and DeepSeek's reference formulas."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

from megamoe_jax.model import config as C
from megamoe_jax.model.rope import apply_rope, inv_freq, layer_inv_freq


def _hf_rotary(cfg):
    hf = DeepseekV4Config(**cfg.to_hf_config())
    return hf_v4.DeepseekV4RotaryEmbedding(hf)


@pytest.mark.parametrize("preset", ["tiny", "flash"])
def test_inv_freq_matches_transformers_main_and_compress(preset):
    cfg = C.tiny() if preset == "tiny" else C.flash()
    rot = _hf_rotary(cfg)
    swa = cfg.compress_ratios.index(0)
    comp = next(i for i, m in enumerate(cfg.compress_ratios) if m > 0)
    np.testing.assert_allclose(layer_inv_freq(cfg, swa), rot.main_inv_freq.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(layer_inv_freq(cfg, comp), rot.compress_inv_freq.numpy(), rtol=1e-6, atol=0)
    # YaRN really changed the compressed layers' low frequencies, and only theirs.
    plain = inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta)
    assert not np.allclose(layer_inv_freq(cfg, comp), plain)
    np.testing.assert_allclose(layer_inv_freq(cfg, swa), inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta), rtol=0)


def test_yarn_ramp_matches_reference_formula_for_flash():
    # [R] precompute_freqs_cis with Flash's numbers: base 160000, rd 64, L0 65536, factor 16, beta 32/1 gives
    # low = 15, high = 25 (docs §2.3.3): pairs < 15 keep f, pairs >= 25 use f / 16, a linear ramp between.
    f = inv_freq(64, 160000.0, C.YarnConfig(16.0, 65536, 32.0, 1.0))
    plain = 1.0 / 160000.0 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(f[:15], plain[:15], rtol=1e-6)
    np.testing.assert_allclose(f[25:], plain[25:] / 16, rtol=1e-6)
    i = 20
    ramp = (i - 15) / (25 - 15)
    np.testing.assert_allclose(f[i], plain[i] / 16 * ramp + plain[i] * (1 - ramp), rtol=1e-6)


def test_apply_rope_matches_transformers_interleaved_tail():
    rng = np.random.default_rng(0)
    cfg = C.tiny()
    rot = _hf_rotary(cfg)
    b, t, h, hd = 2, 9, 3, cfg.head_dim
    x = rng.standard_normal((b, t, h, hd)).astype(np.float32)
    pos = np.array([[0, 1, 2, 7, 50, 63, 64, 200, 1000]] * b) + np.array([[0], [3]])
    xt = torch.from_numpy(x)
    cos, sin = rot(xt, torch.from_numpy(pos), layer_type="compress")
    want = hf_v4.apply_rotary_pos_emb(xt.transpose(1, 2), cos, sin).transpose(1, 2).numpy()
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos)[..., None], layer_inv_freq(cfg, 1)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    rd = cfg.qk_rope_head_dim
    np.testing.assert_array_equal(got[..., : hd - rd], x[..., : hd - rd])      # nope dims untouched
    # Pairs are adjacent channels (GPT-J): rotating a single pair by p * f_0 with f_0 = 1.
    one = np.zeros((1, hd), np.float32)
    one[0, hd - rd] = 1.0
    r = np.asarray(apply_rope(jnp.asarray(one), jnp.array([2]), layer_inv_freq(cfg, 1)))
    np.testing.assert_allclose(r[0, hd - rd: hd - rd + 2], [math.cos(2.0), math.sin(2.0)], rtol=1e-6)


def test_inverse_rope_undoes_rope_and_keeps_dtype():
    rng = np.random.default_rng(1)
    freqs = inv_freq(16, 10000.0)
    x = jnp.asarray(rng.standard_normal((4, 5, 32)), jnp.float32)
    pos = jnp.arange(20).reshape(4, 5) * 37
    back = apply_rope(apply_rope(x, pos, freqs), pos, freqs, inverse=True)
    np.testing.assert_allclose(np.asarray(back), np.asarray(x), rtol=1e-5, atol=1e-5)
    assert apply_rope(x.astype(jnp.bfloat16), pos, freqs).dtype == jnp.bfloat16


def test_bad_rope_arguments_raise():
    with pytest.raises(ValueError, match="even"):
        inv_freq(15, 10000.0)
    with pytest.raises(ValueError, match="base"):
        inv_freq(16, 1.0)
    with pytest.raises(ValueError, match="exceed"):
        apply_rope(jnp.zeros((2, 8)), jnp.zeros((2,), jnp.int32), inv_freq(16, 10000.0))
