"""NVFP4: bit-exact against compressed-tensors 0.20, the test vectors of nvfp4_format.md §8, safety, bad input."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.quant_scheme import NVFP4 as CT_NVFP4
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

from megamoe_jax.quant import e2m1, nvfp4
from megamoe_jax.quant.nvfp4 import NVFP4Tensor

SCHEME = QuantizationScheme(targets=["Linear"], **CT_NVFP4)


def ct_quantize(w: torch.Tensor, gs: torch.Tensor | None = None):
    """compressed-tensors 0.20 on a 2-D weight: (packed uint8, scale bytes uint8, multiplier G f32[1]).

    Scales as llm-compressor's min-max observers produce them (group min/max in the weight dtype), then the
    library's own NVFP4 compressor."""
    if gs is None:
        gs = generate_gparam(w.amin(), w.amax())
    n, k = w.shape
    wg = w.unflatten(-1, (k // 16, 16))
    scale, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), SCHEME.weights, global_scale=gs)
    sd = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": gs}, SCHEME)
    return sd["weight_packed"].numpy(), sd["weight_scale"].view(torch.uint8).numpy(), gs.numpy()


def ct_decompress(packed, scale_bytes, gs) -> np.ndarray:
    sd = NVFP4PackedCompressor.decompress(
        {"weight_packed": torch.from_numpy(packed), "weight_scale": torch.from_numpy(scale_bytes).view(
            torch.float8_e4m3fn), "weight_global_scale": torch.from_numpy(gs)}, SCHEME)
    return sd["weight"].float().numpy()


def scale_bytes(t: NVFP4Tensor) -> np.ndarray:
    return np.asarray(t.block_scale).view(np.uint8)


def random_weight(rng, shape, mag):
    """Log-normal magnitudes (outlier rows), an all-zero block, a few exact zeros and negative tiny values."""
    x = rng.standard_normal(shape) * np.exp(rng.standard_normal(shape)) * mag
    x = x.reshape(-1, shape[-1])
    x[0, :16] = 0.0                       # all-zero block
    x[1, 16:32] *= 1e-6                   # block whose scale underflows E4M3
    x[2, 5] = 0.0
    return x.reshape(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Bit-exact against compressed-tensors
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bit_exact_against_compressed_tensors(dtype):
    rng = np.random.default_rng(1)
    tdt = getattr(torch, dtype)
    # one shape per dtype keeps compiles down; magnitudes from tiny to huge, and 1e-37 where compressed-tensors'
    # G overflows to Inf and falls back to 1.0 (all blocks then underflow; tiny negatives keep the sign code 0x8)
    for mag in (1.0, 3e-3, 250.0, 1e-30, 1e30, 1e-37):
        x = random_weight(rng, (40, 96), mag)
        w = torch.from_numpy(x).to(tdt)
        p_ct, s_ct, G_ct = ct_quantize(w)
        t = nvfp4.quantize(jnp.asarray(w.float().numpy()).astype(dtype))
        np.testing.assert_array_equal(scale_bytes(t), s_ct, err_msg=f"scale bytes, mag {mag}")
        np.testing.assert_array_equal(np.asarray(t.packed), p_ct, err_msg=f"packed codes, mag {mag}")
        assert nvfp4.dequantize(t).dtype == jnp.float32
        # the stored dequant factor is the correctly rounded reciprocal of compressed-tensors' multiplier
        assert np.asarray(t.global_scale) == np.float32(1) / G_ct[0]
        # dequantization in bf16 is identical to compressed-tensors' decompression
        deq = np.asarray(t.dequantize(jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_array_equal(deq, ct_decompress(p_ct, s_ct, G_ct), err_msg=f"dequant, mag {mag}")


def test_bit_exact_with_given_multiplier_and_ties():
    """A stored multiplier G (e.g. a checkpoint's input_global_scale): saturating activations (amax beyond the
    calibrated one) and values placed exactly on the E2M1 ties and E4M3 midpoints."""
    rng = np.random.default_rng(2)
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], np.float32)
    for G in (3977.57, 448.0, 1.75):            # 448 and 1.75: fl(1/fl(1/G)) != G, so G must be used as is
        Gt = torch.tensor([G], dtype=torch.float32)
        x = (rng.standard_normal((40, 96)) * 3 * 2688 / G / 6).astype(np.float32)   # many blocks saturate
        x[3, :16] = np.concatenate([ties, -ties]) * (np.float32(448) / np.float32(G))
        x[4, :16] = np.concatenate([ties, -ties]) * (np.float32(384) / np.float32(G)) * np.float32(1.0625)
        for dtype, tdt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            w = torch.from_numpy(x).to(tdt)
            p_ct, s_ct, _ = ct_quantize(w, Gt)
            t = nvfp4.quantize(jnp.asarray(w.float().numpy()).astype(dtype), multiplier=np.float32(G))
            np.testing.assert_array_equal(scale_bytes(t), s_ct, err_msg=f"G={G} {dtype}")
            np.testing.assert_array_equal(np.asarray(t.packed), p_ct, err_msg=f"G={G} {dtype}")
            assert (s_ct == 0x7E).mean() > 0.3                               # really saturated


def test_stacked_experts_per_expert_scale():
    rng = np.random.default_rng(3)
    x = np.stack([random_weight(rng, (24, 64), m) for m in (1.0, 40.0, 1e-3)])   # [E, N, K]
    t = nvfp4.quantize(jnp.asarray(x), batch_dims=1)
    assert t.shape == (3, 24, 64) and t.global_scale.shape == (3, 1)
    for e in range(3):
        p_ct, s_ct, G_ct = ct_quantize(torch.from_numpy(x[e]))
        np.testing.assert_array_equal(np.asarray(t.packed[e]), p_ct)
        np.testing.assert_array_equal(scale_bytes(t)[e], s_ct)
        assert np.asarray(t.global_scale)[e, 0] == np.float32(1) / G_ct[0]
    # one shared global scale when batch_dims=0: dequant equals quantizing the flat [E*N, K] matrix
    t0 = nvfp4.quantize(jnp.asarray(x))
    p_ct, s_ct, _ = ct_quantize(torch.from_numpy(x.reshape(-1, 64)))
    np.testing.assert_array_equal(np.asarray(t0.packed).reshape(-1, 32), p_ct)
    np.testing.assert_array_equal(scale_bytes(t0).reshape(-1, 4), s_ct)


def test_jit_equals_eager():
    rng = np.random.default_rng(4)
    x = jnp.asarray(random_weight(rng, (40, 96), 2.0)).astype(jnp.bfloat16)
    eager = nvfp4.quantize(x)
    jitted = jax.jit(nvfp4.quantize)(x)
    np.testing.assert_array_equal(np.asarray(jitted.packed), np.asarray(eager.packed))
    np.testing.assert_array_equal(scale_bytes(jitted), scale_bytes(eager))
    np.testing.assert_array_equal(np.asarray(jitted.global_scale), np.asarray(eager.global_scale))
    # a constant global scale folded into the jit (XLA rewrites x / const as x * (1/const)) changes nothing
    g = np.float32(1 / 1234.5)
    const = jax.jit(lambda v: nvfp4.quantize(v, global_scale=g).packed)(x)
    np.testing.assert_array_equal(np.asarray(const), np.asarray(nvfp4.quantize(x, global_scale=g).packed))
    deq_j = jax.jit(lambda t: t.dequantize())(eager)
    np.testing.assert_array_equal(np.asarray(deq_j), np.asarray(eager.dequantize()))


def test_ahead_of_time_compile_with_quantized_arguments():
    # jax's Compiled rebuilds the argument pytree from ArgInfo leaves (shape and dtype, no ndim): the tensors'
    # structure checks must let that through (this once raised AttributeError in decode_profile --hlo).
    from megamoe_jax.quant import fp8_block, mxfp4
    x = jnp.asarray(np.random.default_rng(5).standard_normal((128, 128)), jnp.float32)
    for t in (nvfp4.quantize(x), mxfp4.quantize(x), fp8_block.quantize(x)):
        compiled = jax.jit(lambda w: w.dequantize()).lower(t).compile()
        assert "HloModule" in compiled.as_text()
        np.testing.assert_array_equal(np.asarray(compiled(t)), np.asarray(t.dequantize()))


# ---------------------------------------------------------------------------------------------------------
# Test vectors (nvfp4_format.md §8)
# ---------------------------------------------------------------------------------------------------------

def one_block(values, G):
    """One block quantized with the exact multiplier G (the test vectors are stated for exact G)."""
    x = jnp.asarray(np.asarray(values, np.float32)[None])                # [1, 16]
    return nvfp4.quantize(x, multiplier=np.float32(G))


def test_tv1_code_table():
    vals = np.asarray(e2m1.e2m1_decode(jnp.arange(16, dtype=jnp.uint8)))
    np.testing.assert_array_equal(vals, [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
    assert np.signbit(vals[8]) and not np.signbit(vals[0])


def test_tv2_packing():
    codes = e2m1.e2m1_encode(jnp.asarray([1.0, -2.0, 0.5, 6.0, -0.0, 3.0]))
    np.testing.assert_array_equal(np.asarray(e2m1.pack(codes)), [0xC2, 0x71, 0x58])
    np.testing.assert_array_equal(np.asarray(e2m1.e2m1_decode(e2m1.unpack(jnp.asarray([0xC2], jnp.uint8)))),
                                  [1.0, -2.0])
    # agrees with JAX's native float4 packing (bitcast of pairs) on all 256 bytes
    b = jnp.arange(256, dtype=jnp.uint8)
    native = jax.lax.bitcast_convert_type(b, jnp.float4_e2m1fn).astype(jnp.float32)   # [256, 2]
    np.testing.assert_array_equal(np.asarray(e2m1.e2m1_decode(e2m1.unpack(b))).reshape(256, 2), np.asarray(native))


def test_tv3_e2m1_rounding():
    x = [0.25, 0.2500001, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.0000005, 6.5, 100.0, -0.25, np.inf, np.nan]
    want = [0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -0.0, 6.0, -0.0]
    codes = e2m1.e2m1_encode(jnp.asarray(x, jnp.float32))
    got = np.asarray(e2m1.e2m1_decode(codes))
    np.testing.assert_array_equal(got, want)
    assert np.asarray(codes)[11] == 0x8 and np.asarray(codes)[13] == 0x8
    # same as ml_dtypes' float4 cast on a dense sweep (ties included)
    sweep = np.linspace(-7, 7, 2801, dtype=np.float32)
    ref = sweep.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(e2m1.e2m1_decode(e2m1.e2m1_encode(jnp.asarray(sweep)))), ref)


def test_tv4_block_amax_6():
    x = [0, 0.1, -0.2, 0.3, 0.5, -0.75, 1, 1.5, -2, 2.5, 3, -3.5, 4, 5, -6, 6]
    t = one_block(x, 448)
    assert scale_bytes(t).tolist() == [[0x7E]]
    codes = np.asarray(e2m1.unpack(t.packed))[0]
    np.testing.assert_array_equal(codes, [0, 0, 8, 1, 1, 0xA, 2, 3, 0xC, 4, 5, 0xE, 6, 6, 0xF, 7])
    assert np.asarray(t.packed)[0].tolist() == [0x00, 0x18, 0xA1, 0x32, 0x4C, 0xE5, 0x66, 0x7F]
    # g = fl32(1/448) is not exactly 1/448, so dequantized values are within one f32 ulp (exact in bf16)
    want = np.array([0, 0, -0., .5, .5, -1, 1, 1.5, -2, 2, 3, -4, 4, 4, -6, 6], np.float32)
    deq = np.asarray(t.dequantize())[0]
    np.testing.assert_allclose(deq, want, rtol=1.2e-7, atol=0)
    np.testing.assert_array_equal(np.signbit(deq), np.signbit(want))
    np.testing.assert_array_equal(np.asarray(t.dequantize(jnp.bfloat16).astype(jnp.float32))[0], want)


def test_tv5_block_scale_rounding():
    x = [10, -7, 3, 1, 0.5, -0.25, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    t = one_block(x, 224)
    assert scale_bytes(t).tolist() == [[0x7C]]                        # 373.33 -> 384
    assert np.asarray(t.packed)[0].tolist() == [0xE7, 0x14, 0x81, 0x00, 0x00, 0x00, 0x00, 0x20]
    want = np.array([6, -4, 2, 0.5, 0.5, -0., 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], np.float32) * (384 / 224)
    np.testing.assert_allclose(np.asarray(t.dequantize())[0], want, rtol=1e-6)
    from megamoe_jax.quant.floatbits import round_to_e4m3
    assert float(round_to_e4m3(jnp.float32(1.6667))[0]) == 1.625


def test_tv6_zero_block():
    t = one_block(np.zeros(16), 3.0)
    assert np.asarray(t.packed)[0].tolist() == [0] * 8
    # compressed-tensors stores 0.125 (its FP8 eps) for a zero block scale; vLLM's runtime writes 0x00.
    assert scale_bytes(t).tolist() == [[0x20]]
    np.testing.assert_array_equal(np.asarray(t.dequantize()), np.zeros((1, 16)))
    # a stored zero-block scale of 0.125 (CT), 1.0 (ModelOpt) or 0 (vLLM) dequantizes to 0 alike
    for byte in (0x20, 0x38, 0x00):
        tt = NVFP4Tensor(t.packed, jnp.full((1, 1), byte, jnp.uint8).view(jnp.float8_e4m3fn), t.global_scale)
        np.testing.assert_array_equal(np.asarray(tt.dequantize()), np.zeros((1, 16)))


def test_tv7_e4m3_cast_edges():
    from megamoe_jax.quant.floatbits import e4m3_decode, round_to_e4m3
    x = np.array([440, 460, 464, 465, 1e6, np.inf, 9.765625e-4, 9.7657e-4, 1e-3, 2.8e-5], np.float32)
    clipped = jnp.minimum(jnp.asarray(x), 448.0)
    val, byte = round_to_e4m3(clipped)
    assert np.asarray(byte).tolist() == [0x7E] * 6 + [0x00, 0x01, 0x01, 0x00]
    np.testing.assert_array_equal(np.asarray(val), [448] * 6 + [0, 2 ** -9, 2 ** -9, 0])
    # the integer rounding equals ml_dtypes' RNE cast on every value the cast does not overflow
    sweep = np.concatenate([np.geomspace(1e-5, 448, 20000), np.arange(1, 449, 0.25)]).astype(np.float32)
    ref = sweep.astype(ml_dtypes.float8_e4m3fn)
    v, b = round_to_e4m3(jnp.asarray(sweep))
    np.testing.assert_array_equal(np.asarray(b), ref.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(v), ref.astype(np.float32))
    dec = np.asarray(e4m3_decode(jnp.asarray([0x38, 0x40, 0x08, 0x80, 0x7F, 0x01], jnp.uint8)))
    assert dec[:3].tolist() == [1.0, 2.0, 2 ** -6] and dec[3] == 0 and np.signbit(dec[3])
    assert np.isnan(dec[4]) and dec[5] == 2 ** -9
    all_bytes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(e4m3_decode(jnp.asarray(all_bytes))),
                                  all_bytes.view(ml_dtypes.float8_e4m3fn).astype(np.float32))


def test_tv9_seed_bug_scale_never_nan():
    """The wrong-convention activation scale: G = 2.5141e-4 (g = 3977.6). Every block underflows: zeros."""
    x = np.full(16, 0.5, np.float32)
    x[0] = 1.0
    t = one_block(x, 2.5141e-4)
    assert scale_bytes(t).tolist() == [[0x20]]                        # raw s = 4.19e-5 -> 0 -> CT eps
    assert np.asarray(t.packed).tolist() == [[0] * 8]
    y = nvfp4.fake_quantize(jnp.asarray(np.stack([x, np.zeros(16, np.float32)])), jnp.float32(1 / 2.5141e-4))
    assert np.all(np.asarray(y) == 0)


def test_tv10_activation_beyond_calibrated_amax_saturates():
    x = np.full(16, 0.1, np.float32)
    x[0] = 0.75
    t = one_block(x, 3977.57)
    assert scale_bytes(t).tolist() == [[0x7E]]                        # raw 497.2 clipped, not NaN
    assert np.asarray(t.packed)[0].tolist() == [0x27] + [0x22] * 7
    deq = np.asarray(t.dequantize())[0]
    np.testing.assert_allclose(deq, [0.67579] + [0.112632] * 15, rtol=2e-5)


def test_tv12_global_scale_from_amax():
    G = nvfp4.multiplier_from_amax
    assert float(G(jnp.float32(6.0))) == 448.0 and float(G(jnp.float32(12.0))) == 224.0
    for bad in (0.0, np.nan, 1e-39, -1.0):
        assert float(G(jnp.float32(bad))) == 1.0
    # bf16 statistics give bf16-rounded multipliers, exactly as generate_gparam
    for amax in (0.75, 0.6758, 3.3e-3, 1234.5):
        ref = generate_gparam(torch.tensor(-amax, dtype=torch.bfloat16), torch.tensor(amax, dtype=torch.bfloat16))
        got = G(jnp.asarray(amax, jnp.bfloat16).astype(jnp.float32), jnp.bfloat16)
        assert float(got) == float(ref[0]), amax
        ref32 = generate_gparam(torch.tensor(-amax), torch.tensor(amax))
        assert float(G(jnp.float32(amax))) == float(ref32[0])


# ---------------------------------------------------------------------------------------------------------
# Exactness machinery
# ---------------------------------------------------------------------------------------------------------

def test_div_rn_matches_ieee_division():
    from megamoe_jax.quant.floatbits import div_rn
    rng = np.random.default_rng(5)
    a = rng.integers(0, 0x7F800000, 200000, dtype=np.uint32).view(np.float32)
    b = rng.integers(1, 0x7F800000, 200000, dtype=np.uint32).view(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        want = a / b
    np.testing.assert_array_equal(np.asarray(div_rn(jnp.asarray(a), jnp.asarray(b))).view(np.uint32),
                                  want.view(np.uint32))
    # near-ties of the 24-bit significand: products of small integers
    a = (rng.integers(1, 1 << 12, 50000) * rng.integers(1, 1 << 12, 50000)).astype(np.float32)
    b = rng.integers(1, 1 << 13, 50000).astype(np.float32) * np.float32(3.0)
    np.testing.assert_array_equal(np.asarray(div_rn(jnp.asarray(a), jnp.asarray(b))), a / b)


def test_code_thresholds_are_exact():
    """X_i is the smallest f32 whose IEEE quotient reaches the code; its predecessor does not."""
    rng = np.random.default_rng(6)
    Gs = np.concatenate([[448.0, 224.0, 3977.57, 1.0, 2.5141e-4, 1e30, 3e-30],
                         np.exp(rng.uniform(-20, 20, 5))]).astype(np.float32)
    table = np.asarray(nvfp4.code_thresholds(jnp.asarray(Gs)))                  # [n, 128, 8]
    from megamoe_jax.quant.floatbits import e4m3_decode
    s = np.array(e4m3_decode(jnp.arange(128, dtype=jnp.uint8)))
    s[0] = 0.125
    ts = np.array(e2m1.THRESHOLDS + (0.0,), np.float32)
    strict = np.array(e2m1.STRICT + (True,))
    with np.errstate(over="ignore", under="ignore"):
        d = s[None, :127] / Gs[:, None]                                            # [n, 127]
        X = table[:, :127, :]                                                      # [n, 127, 8]
        prev = np.nextafter(X, np.float32(0))
        q, qp = X / d[..., None], prev / d[..., None]
        reach = np.where(strict, q > ts, q >= ts)
        reach_prev = np.where(strict, qp > ts, qp >= ts)
    finite = np.isfinite(X)
    assert reach[finite].all() and not reach_prev[finite & (X > 0)].any()
    assert np.isnan(table[:, 127]).all()


# ---------------------------------------------------------------------------------------------------------
# Safety and special values
# ---------------------------------------------------------------------------------------------------------

def test_never_nan_from_finite_input():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((16, 64)) * np.exp(3 * rng.standard_normal((16, 64)))).astype(np.float32)
    x[0, :16] = 0
    x[1] = np.float32(3e38) * np.sign(x[1])
    for g in (1e-30, 1 / 2.5141e-4, 2.5141e-4, 1e-6, 1.0, 1e30):
        y = np.asarray(nvfp4.fake_quantize(jnp.asarray(x), jnp.float32(g)))
        assert np.isfinite(y).all(), g
        t = nvfp4.quantize(jnp.asarray(x), global_scale=np.float32(g))
        assert not (scale_bytes(t) == 0x7F).any()
    t = nvfp4.quantize(jnp.asarray(x))
    assert np.isfinite(np.asarray(t.dequantize())).all()


def test_inf_and_nan_inputs():
    x = np.tile(np.linspace(-1, 1, 16, dtype=np.float32), (3, 2))              # [3, 32]
    x[0, 3], x[0, 20] = np.inf, -np.inf
    x[1, 7] = np.nan
    t = nvfp4.quantize(jnp.asarray(x))
    # the global scale ignores the non-finite values: same as for the finite data
    assert np.asarray(t.global_scale) == np.asarray(nvfp4.quantize(jnp.asarray(np.nan_to_num(x, posinf=0,
                                                                                              neginf=0))).global_scale)
    sb = scale_bytes(t)
    codes = np.asarray(e2m1.unpack(t.packed))
    assert sb[0, 0] == 0x7E and sb[0, 1] == 0x7E                               # Inf saturates the block scale
    assert codes[0, 3] == 0x7 and codes[0, 20] == 0xF                          # and the element to +-6
    assert sb[1, 0] == 0x7F and (codes[1, :16] == 0).all()                     # NaN: NaN scale, zero codes
    deq = np.asarray(t.dequantize())
    assert np.isnan(deq[1, :16]).all() and np.isfinite(deq[1, 16:]).all()
    assert np.isfinite(deq[0]).all() and np.isfinite(deq[2]).all()
    # -0.0 gives code 0 (compressed-tensors), a negative value rounding to zero gives 0x8
    y = np.zeros(16, np.float32)
    y[0], y[1], y[2] = 6.0, -0.0, -0.01
    c = np.asarray(e2m1.unpack(one_block(y, 448).packed))[0]
    assert c[1] == 0x0 and c[2] == 0x8


# ---------------------------------------------------------------------------------------------------------
# The tensor: pytree, hooks, bad input
# ---------------------------------------------------------------------------------------------------------

def test_pytree_and_hooks():
    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.standard_normal((2, 24, 32)).astype(np.float32))
    t = nvfp4.quantize(w, batch_dims=1, input_scale=np.array([0.01, 0.02], np.float32))
    assert t.shape == (2, 24, 32) and t.ndim == 3
    leaves = jax.tree_util.tree_leaves(t)
    assert len(leaves) == 4
    t2 = jax.jit(lambda a: a)(t)
    assert isinstance(t2, NVFP4Tensor)
    np.testing.assert_array_equal(np.asarray(t2.dequantize()), np.asarray(t.dequantize()))
    x = jnp.asarray(rng.standard_normal((5, 32)).astype(np.float32))
    gid = jnp.asarray([0, 0, 1, 1, 1])
    y = np.asarray(t.prepare_grouped_activation(x, gid))
    np.testing.assert_array_equal(y[:2], np.asarray(nvfp4.fake_quantize(x, jnp.float32(0.01)))[:2])
    np.testing.assert_array_equal(y[2:], np.asarray(nvfp4.fake_quantize(x, jnp.float32(0.02)))[2:])
    assert NVFP4Tensor(t.packed, t.block_scale, t.global_scale).prepare_activation(x) is x
    with pytest.raises(ValueError, match="prepare_grouped_activation"):
        t.prepare_activation(x)


def test_bad_input_errors():
    x = jnp.ones((4, 32), jnp.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize(jnp.ones((4, 24)))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        nvfp4.quantize(jnp.ones((4, 32), jnp.int32))
    for bad, kind in ((0.0, "zero"), (-1.0, "negative"), (np.nan, "NaN"), (np.inf, "Inf")):
        with pytest.raises(ValueError, match=f"global_scale is {kind}"):
            nvfp4.quantize(x, global_scale=np.float32(bad))
    with pytest.raises(ValueError, match="input_scale is zero"):
        nvfp4.quantize(x, input_scale=np.float32(0))
    t = nvfp4.quantize(x)
    with pytest.raises(ValueError, match="packed must be uint8"):
        NVFP4Tensor(t.packed.astype(jnp.int8), t.block_scale, t.global_scale)
    with pytest.raises(ValueError, match="block_scale must be float8_e4m3fn"):
        NVFP4Tensor(t.packed, t.block_scale.astype(jnp.float32), t.global_scale)
    with pytest.raises(ValueError, match="does not match packed shape"):
        NVFP4Tensor(t.packed, t.block_scale[:, :1], t.global_scale)
    with pytest.raises(ValueError, match="global_scale must be float32"):
        NVFP4Tensor(t.packed, t.block_scale, t.global_scale.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="global_scale shape"):
        NVFP4Tensor(t.packed, t.block_scale, jnp.ones((3,), jnp.float32))
    with pytest.raises(ValueError, match="global_scale is NaN"):
        NVFP4Tensor(t.packed, t.block_scale, jnp.float32(np.nan)).validate("w")
