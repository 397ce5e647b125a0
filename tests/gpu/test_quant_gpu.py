"""On a Hopper GPU the jitted quantizers give the same bytes as on the CPU (same process, jax.devices('cpu')).

What could make them differ, and is avoided by construction (megamoe_jax/quant/floatbits.py):
  * XLA's GPU f32 division is `div.full.f32` (~2 ulp), not correctly rounded;
  * `--xla_allow_excess_precision` drops f32 -> f8/bf16 -> f32 round trips inside a jit on GPU;
  * the CPU runtime flushes subnormals, the GPU does not.
Run on the device machine: MEGAMOE_TEST_GPU=1 python -m pytest -q tests/gpu/test_quant_gpu.py
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from megamoe_jax.quant import floatbits, fp8_block, mxfp4, nvfp4


@pytest.fixture(scope="module")
def devices():
    return jax.devices("cpu")[0], jax.devices("gpu")[0]


def run_on(dev, fn, *args):
    """jit(fn) with its arguments committed to `dev`; results as numpy."""
    args = [jax.device_put(a, dev) for a in args]
    return jax.tree.map(np.asarray, jax.jit(fn)(*args))


def assert_same(cpu_out, gpu_out, what):
    for c, g in zip(jax.tree.leaves(cpu_out), jax.tree.leaves(gpu_out)):
        c, g = np.asarray(c), np.asarray(g)
        assert c.dtype == g.dtype and c.shape == g.shape, what
        np.testing.assert_array_equal(c.reshape(-1).view(np.uint8), g.reshape(-1).view(np.uint8), err_msg=what)


def weights(rng, shape, mag=1.0):
    x = rng.standard_normal(shape) * np.exp(rng.standard_normal(shape)) * mag
    flat = x.reshape(-1, shape[-1])
    flat[0, :16] = 0.0
    flat[1, 16:32] *= 1e-6
    return x.astype(np.float32)


CASES = [  # (shape, dtype, magnitude, batch_dims)
    ((512, 4096), "bfloat16", 1.0, 0),
    ((3, 200, 512), "float32", 30.0, 1),
    ((256, 1024), "bfloat16", 1e-3, 0),
    ((64, 2048), "float32", 1e-30, 0),       # subnormal block maxima
    ((8, 64), "float16", 100.0, 0),
]


@pytest.mark.parametrize("shape,dtype,mag,batch_dims", CASES)
def test_nvfp4_quantize_identical_bytes(devices, shape, dtype, mag, batch_dims):
    cpu, gpu = devices
    x = jnp.asarray(weights(np.random.default_rng(hash(shape) % 2**32), shape, mag)).astype(dtype)
    fn = lambda v: nvfp4.quantize(v, batch_dims=batch_dims)          # noqa: E731
    c, g = run_on(cpu, fn, x), run_on(gpu, fn, x)
    assert_same(c, g, f"nvfp4.quantize {shape} {dtype} {mag}")
    assert (np.asarray(c.block_scale).view(np.uint8) != 0x20).mean() > 0.5


def test_nvfp4_activation_path_identical(devices):
    """Saturating activations with a stored multiplier, exact E2M1 ties and E4M3 midpoints, and the fused
    quantize-dequantize (the pattern XLA's excess precision would silently elide if it were written as casts)."""
    cpu, gpu = devices
    rng = np.random.default_rng(5)
    G = np.float32(448.0)
    x = (rng.standard_normal((1024, 4096)) * 3).astype(np.float32)
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], np.float32)
    x[0, :16] = np.concatenate([ties, -ties])
    x[1, :16] = np.concatenate([ties, -ties]) * np.float32(384 / 448 * 1.0625)
    xb = jnp.asarray(x).astype(jnp.bfloat16)
    q = lambda v: nvfp4.quantize(v, multiplier=G)                      # noqa: E731
    assert_same(run_on(cpu, q, xb), run_on(gpu, q, xb), "quantize with a multiplier")
    qdq = lambda v: nvfp4.fake_quantize(v, jnp.float32(1 / 3977.57))   # noqa: E731
    c, g = run_on(cpu, qdq, xb), run_on(gpu, qdq, xb)
    assert_same(c, g, "fake_quantize (fused QDQ)")
    gid = jnp.asarray(np.repeat(np.arange(4), 256))
    grouped = lambda v, i: nvfp4.fake_quantize_grouped(v, jnp.asarray([1e-4, 3e-4, 1e-3, 3e-3], jnp.float32), i)  # noqa
    assert_same(run_on(cpu, grouped, xb, gid), run_on(gpu, grouped, xb, gid), "fake_quantize_grouped")
    # and the QDQ really rounds on the GPU: every value is code * scale * g
    t = run_on(cpu, lambda v: nvfp4.quantize(v, global_scale=jnp.float32(1 / 3977.57)), xb)
    np.testing.assert_array_equal(g, np.asarray(t.dequantize()))


def test_exact_helpers_on_gpu(devices):
    cpu, gpu = devices
    rng = np.random.default_rng(6)
    a = rng.integers(0, 0x7F800000, 1 << 20, dtype=np.uint32).view(np.float32)
    b = rng.integers(1, 0x7F800000, 1 << 20, dtype=np.uint32).view(np.float32)
    with np.errstate(over="ignore", under="ignore"):
        want = a / b
    got = run_on(gpu, floatbits.div_rn, a, b)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    plain = run_on(gpu, lambda u, v: u / v, a, b)
    print(f"plain XLA-GPU f32 division differs from IEEE on {(plain.view(np.uint32) != want.view(np.uint32)).sum()}"
          f" of {a.size} random inputs; div_rn on 0")
    s = np.concatenate([np.geomspace(1e-5, 448, 100000), np.arange(0, 448.25, 0.25)]).astype(np.float32)
    v, byte = run_on(gpu, floatbits.round_to_e4m3, s)
    ref = s.astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(byte, ref.view(np.uint8))
    np.testing.assert_array_equal(v, ref.astype(np.float32))
    np.testing.assert_array_equal(run_on(gpu, floatbits.round_to_bf16, s),
                                  s.astype(ml_dtypes.bfloat16).astype(np.float32))
    Gs = np.array([448.0, 3977.57, 1.75, 2.5141e-4, 1e30], np.float32)
    assert_same(run_on(cpu, nvfp4.code_thresholds, Gs), run_on(gpu, nvfp4.code_thresholds, Gs), "code_thresholds")


def test_naive_cast_round_trip_is_what_we_avoid(devices):
    """Documents the trap (not a requirement): astype(f8).astype(f32) inside a GPU jit may not round at all."""
    _, gpu = devices
    s = np.array([440.0, 1e6, 0.3], np.float32)
    naive = run_on(gpu, lambda v: v.astype(jnp.float8_e4m3fn).astype(jnp.float32), s)
    print("naive f32->f8->f32 inside a GPU jit:", naive.tolist(), "(CPU: [448, nan, 0.3125])")
    v, _ = run_on(gpu, lambda u: floatbits.round_to_e4m3(jnp.minimum(u, 448.0)), s)
    assert v.tolist() == [448.0, 448.0, 0.3125]


def test_mxfp4_and_fp8_identical(devices):
    cpu, gpu = devices
    rng = np.random.default_rng(7)
    x = jnp.asarray(weights(rng, (2, 300, 640), 0.05)).astype(jnp.bfloat16)
    for fn, what in ((mxfp4.quantize, "mxfp4"), (lambda v: fp8_block.quantize(v), "fp8 ue8m0"),
                     (lambda v: fp8_block.quantize(v, scale_fmt="float32"), "fp8 float32")):
        c, g = run_on(cpu, fn, x), run_on(gpu, fn, x)
        assert_same(c, g, what)
        assert_same(run_on(cpu, lambda t: t.dequantize(), c), run_on(gpu, lambda t: t.dequantize(), c),
                     what + " dequantize")
