"""The mHC Sinkhorn kernel (pallas_kernels/sinkhorn.py) against its reference, in Mosaic GPU interpret mode, and
the dispatcher's choice. tests/gpu/test_sinkhorn_gpu.py runs the same comparison on a Hopper GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels import sinkhorn as sk


def _logits(shape, scale=3.0, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (3, 4, 4), (2, 130, 4, 4), (257, 4, 4), (5, 3, 3)])
def test_kernel_matches_reference_in_interpret_mode(shape):
    x = _logits(shape)
    got = np.asarray(sk.sinkhorn(x, 20, 1e-6, interpret=True))
    want = np.asarray(sk.reference(x, 20, 1e-6))
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)   # same steps, fp32 sums in another order
    np.testing.assert_allclose(got.sum(-2), 1.0, atol=1e-4)        # columns normalised last


def test_kernel_edge_cases_in_interpret_mode():
    # one iteration (softmax + one column normalisation), huge logits (the max subtraction keeps exp finite)
    x = _logits((2, 4, 4), scale=80.0, seed=1)
    for iters in (1, 3):
        got = np.asarray(sk.sinkhorn(x, iters, 1e-6, interpret=True))
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, np.asarray(sk.reference(x, iters, 1e-6)), rtol=1e-5, atol=1e-7)
    assert sk.sinkhorn(jnp.zeros((0, 4, 4)), 20, 1e-6).shape == (0, 4, 4)
    with pytest.raises(ValueError, match=r"\[\.\.\., n, n\]"):
        sk.sinkhorn(jnp.zeros((2, 4, 3)), 20, 1e-6)
    with pytest.raises(ValueError, match="iters"):
        sk.sinkhorn(jnp.zeros((2, 4, 4)), 0, 1e-6)


def test_kernel_lowers_for_cuda():
    text = jax.jit(lambda v: sk.sinkhorn(v, 20, 1e-6)).trace(_logits((2, 7, 4, 4))).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_dispatch_picks_the_kernel_for_prefill_and_xla_for_decode(monkeypatch):
    x = _logits((2, 5, 4, 4))
    want = np.asarray(sk.reference(x, 20, 1e-6))
    monkeypatch.delenv("MEGAMOE_SINKHORN_KERNEL", raising=False)
    np.testing.assert_array_equal(np.asarray(dispatch.sinkhorn(x, 20, 1e-6)), want)   # no Hopper: reference
    calls = []
    monkeypatch.setattr(dispatch, "kernels_enabled", lambda: True)
    monkeypatch.setattr(sk, "sinkhorn", lambda *a, **k: calls.append(a) or sk.reference(*a))
    dispatch.sinkhorn(x, 20, 1e-6, decode=True)
    assert not calls                                   # decode step on "Hopper": the XLA form
    dispatch.sinkhorn(x, 20, 1e-6)
    assert len(calls) == 1                             # prefill on "Hopper": the kernel
    monkeypatch.setenv("MEGAMOE_SINKHORN_KERNEL", "1")
    dispatch.sinkhorn(x, 20, 1e-6, decode=True)
    assert len(calls) == 2                             # forced on
    monkeypatch.setenv("MEGAMOE_SINKHORN_KERNEL", "0")
    dispatch.sinkhorn(x, 20, 1e-6)
    assert len(calls) == 2                             # forced off


def test_hc_pre_tells_decode_from_prefill(monkeypatch):
    from megamoe_jax.model import mhc
    seen = []
    monkeypatch.setattr(dispatch, "sinkhorn", lambda lg, it, eps, decode=False: seen.append(decode) or
                        sk.reference(lg, it, eps))
    fn = jnp.zeros((24, 4 * 8), jnp.float32)
    for t in (1, 3):
        mhc.hc_pre(jnp.ones((2, t, 4, 8), jnp.bfloat16), fn, jnp.ones((3,)), jnp.zeros((24,)), hc_mult=4, iters=2,
                   rms_eps=1e-6, hc_eps=1e-6)
    assert seen == [True, False]
