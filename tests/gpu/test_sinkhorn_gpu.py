"""The mHC Sinkhorn kernel on a Hopper GPU (MEGAMOE_TEST_GPU=1 on the device machine). Passing this is the
condition for making the kernel the default on Hopper (pallas_kernels/sinkhorn.py, dispatch.sinkhorn)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sinkhorn as sk

_reference = jax.jit(sk.reference, static_argnums=(1, 2))


@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (3, 4, 4), (2, 130, 4, 4), (8, 4096, 4, 4), (5, 3, 3)])
@pytest.mark.parametrize("iters", [1, 20])
def test_kernel_matches_reference_on_gpu(shape, iters):
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape) * 3, jnp.float32)
    got = np.asarray(jax.jit(lambda v: sk.sinkhorn(v, iters, 1e-6))(x))
    want = np.asarray(_reference(x, iters, 1e-6))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_huge_logits_stay_finite_on_gpu():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(300, 4, 4)) * 80, jnp.float32)
    got = np.asarray(jax.jit(lambda v: sk.sinkhorn(v, 20, 1e-6))(x))
    np.testing.assert_allclose(got, np.asarray(_reference(x, 20, 1e-6)), rtol=1e-5, atol=1e-7)
