"""GPU: the Mosaic GPU activation quantizer gives the same bytes as the exact XLA quantizer (megamoe_jax.quant).

The XLA path is itself bit-identical to compressed-tensors and to the CPU (tests/test_quant_nvfp4.py,
tests/gpu/test_quant_gpu.py), so equality here means the kernel is compressed-tensors bit for bit: packed
codes, scale bytes, row amax, and for the W4A4 "values" output the exact bf16 value(code) * s_b. Inputs cover
the awkward cases: rows and block counts that are not multiples of the kernel's 512 blocks per CTA, zero
blocks, subnormal and huge values, +-Inf, NaN, -0.0, exact rounding ties of the scaled value, and several
global scales (including stored compressed-tensors multipliers). Outputs are poisoned first.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megamoe_jax.quant import nvfp4
from pallas_kernels import act_quant, nvfp4_decode


def _poison(shape, dtype):
    jnp.full(shape, 0xAB if jnp.issubdtype(dtype, jnp.integer) else jnp.nan, dtype).block_until_ready().delete()


def _awkward(rng, t, k, mag):
    x = rng.standard_normal((t, k)) * np.exp(2 * rng.standard_normal((t, k))) * mag
    x = x.reshape(-1)
    n = x.size
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-39, -1e-39, 3e38, -3e38, 6.0, -6.0])
    x[rng.integers(0, n, 40)] = rng.choice(specials, 40)
    x = x.reshape(t, k)
    x[0, :16] = 0.0                                            # an all-zero block
    if t > 2:
        x[1, :16] = -0.0
        x[2, 16:32] *= 1e-30                                   # tiny block: subnormal scale byte
    return jnp.asarray(x, jnp.float32).astype(jnp.bfloat16)


def _ties(t, k, g):
    """Values whose scaled magnitude lands exactly on the E2M1 rounding points (0.25, 0.75, ..., 5) of a
    block whose max is 6 * s (so s_b = s exactly)."""
    G = float(np.float32(1.0) / np.float32(g))
    s = 2.0 ** np.round(np.log2(448 / 8))
    d = np.float32(s) / np.float32(G)
    pts = np.array([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.1, 4.9, 5.1, 0.3, -0.25, -5.0, -0.01, 2.0])
    row = np.tile(pts, k // 16) * d
    return jnp.asarray(np.tile(row, (t, 1)), jnp.float32).astype(jnp.bfloat16)


SHAPES = [(1, 16), (3, 48), (37, 4096), (130, 2064), (1024, 7168)]
SCALES = [0.004, 1.7e-5, 30.0]


@pytest.mark.parametrize("t,k", SHAPES)
@pytest.mark.parametrize("g", SCALES)
def test_codes_scales_amax_identical(t, k, g):
    rng = np.random.default_rng(t * 7 + k)
    x = _awkward(rng, t, k, g * 2688 / 4)
    if t >= 37:
        x = x.at[-1].set(_ties(1, k, g)[0])
    g = jnp.float32(g)
    G = nvfp4.multiplier_from_g(g)
    want_p, want_b = jax.jit(nvfp4.quantize_with_multiplier)(x, jnp.broadcast_to(G, (t,)))
    want_a = jax.jit(nvfp4.row_amax)(x)
    for shape, dt in (((t, k // 2), jnp.uint8), ((t, k // 16), jnp.uint8), ((t, k // 16), jnp.uint16)):
        _poison(shape, dt)
    assert act_quant.use_kernel(x)
    p, b, vmax = jax.jit(lambda v: act_quant._quantize_mgpu(v, G[None], None, "codes", True,
                                                            act_quant.Config()))(x)
    np.testing.assert_array_equal(np.asarray(p), np.asarray(want_p))
    np.testing.assert_array_equal(np.asarray(b), np.asarray(want_b))
    a = np.asarray(act_quant._row_amax(vmax))
    np.testing.assert_array_equal(np.isnan(a), np.isnan(np.asarray(want_a)))
    np.testing.assert_array_equal(np.nan_to_num(a), np.nan_to_num(np.asarray(want_a)))
    # The public entry point takes the kernel on Hopper and returns the same.
    p2, s2, a2 = jax.jit(lambda v: act_quant.quantize(v, g, with_amax=True))(x)
    np.testing.assert_array_equal(np.asarray(p2), np.asarray(want_p))
    np.testing.assert_array_equal(np.asarray(s2.view(jnp.uint8)), np.asarray(want_b))


@pytest.mark.parametrize("cfg", [act_quant.Config(1), act_quant.Config(4), act_quant.Config(8)])
def test_configs_agree(cfg):
    x = _awkward(np.random.default_rng(5), 257, 512, 1.0)
    G = nvfp4.multiplier_from_g(jnp.float32(0.01))[None]
    want = jax.jit(nvfp4.quantize_with_multiplier)(x, jnp.broadcast_to(G[0], (257,)))
    got = jax.jit(lambda v: act_quant._quantize_mgpu(v, G, None, "codes", False, cfg)[:2])(x)
    for w, g_ in zip(want, got):
        np.testing.assert_array_equal(np.asarray(g_), np.asarray(w))


@pytest.mark.parametrize("m,sizes", [(45, [7, 0, 1, 30, 0, 2, 0, 5]), (1, [0, 1, 0, 0, 0, 0, 0, 0]),
                                     (600, [300, 0, 0, 250, 40, 10, 0, 0])])
def test_grouped_values_identical(m, sizes):
    k = 1024
    rng = np.random.default_rng(m)
    e = len(sizes)
    ga = jnp.asarray(10.0 ** rng.uniform(-4, 0, e), jnp.float32)
    stored = jnp.asarray(np.float32(2688.0) / np.float32(10.0 ** rng.uniform(-2, 2, e)), jnp.float32)
    x = _awkward(rng, m, k, 1.0)
    gs = jnp.asarray(sizes, jnp.int32)
    ends = np.cumsum(sizes)
    gid = jnp.asarray(np.minimum(np.searchsorted(ends, np.arange(m), side="right"), e - 1), jnp.int32)
    for G in (nvfp4.multiplier_from_g(ga), stored):
        p, b = jax.jit(nvfp4.quantize_grouped_with_multiplier)(x, G, gid)
        want = np.asarray(nvfp4_decode.decode_jnp(p, b.view(jnp.float8_e4m3fn), nvfp4_decode.EXACT))
        _poison((m, k), jnp.bfloat16)
        got = np.asarray(jax.jit(lambda v: act_quant.quantize_dequantize_grouped(v, ga, gs, multiplier=G))(x))
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    # One shared scale (the dense W4A4 linear)
    G0 = nvfp4.multiplier_from_g(ga[:1])
    p, b = jax.jit(nvfp4.quantize_with_multiplier)(x, jnp.broadcast_to(G0[0], (m,)))
    want = np.asarray(nvfp4_decode.decode_jnp(p, b.view(jnp.float8_e4m3fn), nvfp4_decode.EXACT))
    got = np.asarray(jax.jit(lambda v: act_quant.quantize_dequantize_grouped(v, ga[0], gs))(x))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
