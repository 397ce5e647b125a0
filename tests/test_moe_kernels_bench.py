"""CPU: benchmarks/moe_kernels.py's chunked lax.ragged_dot baseline computes what one call does."""
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import moe_kernels


def test_chunked_ragged_dot_equals_one_call():
    rng = np.random.default_rng(0)
    e, k, n, m = 8, 64, 32, 50
    gs = jnp.asarray([7, 0, 13, 1, 0, 20, 4, 0], jnp.int32)        # sum 45 < 50: five zero tail rows
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((e, k, n)), jnp.float32)
    one = jax.lax.ragged_dot(x, w, gs)
    for chunk in (12, 13, 50, 64):          # groups cut by chunk edges, a chunk in the tail, one chunk
        np.testing.assert_allclose(np.asarray(moe_kernels.chunked_ragged_dot(chunk)(x, gs, w)), np.asarray(one),
                                   rtol=1e-6, atol=1e-5)
