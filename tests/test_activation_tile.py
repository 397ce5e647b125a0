"""CPU: the lane -> column map and the SMEM layout that activation_tile documents, and its math (`reference`).

The kernel emits the same formulas as hand-simplified MLIR integer ops (emitting them through `lane_pairs` and
`smem_byte_offset` cost ~15 more PTX lines per kernel); that code itself is checked on the GPU, against the XLA
path and the reference (tests/gpu/test_kernels_fused.py::test_fused_moe_in_kernel_activations_on_gpu)."""
import numpy as np

import jax
import jax.numpy as jnp

from pallas_kernels import activation_tile as at
from pallas_kernels import nvfp4_decode, reference


def test_lane_pairs_cover_the_permuted_tile_once():
    perm = nvfp4_decode.k_permutation(at.TILE_K)
    seen = []
    for lane in range(32):
        for col, (lo, hi) in at.lane_pairs(lane):
            assert col % 2 == 0
            assert (perm[col], perm[col + 1]) == (lo, hi)      # operand pair (col, col + 1) <- natural (lo, hi)
            seen.append(col)
    assert sorted(seen) == list(range(0, at.TILE_K, 2))


def test_smem_offsets_are_the_swizzled_tiling():
    offs = np.array([[at.smem_byte_offset(r, c) for c in range(at.TILE_K)] for r in range(at.TILE_ROWS)])
    assert sorted(offs.ravel().tolist()) == list(range(0, 2 * at.TILE_K * at.TILE_ROWS, 2))   # a bijection
    # 16-byte chunks stay whole, and chunk c of row r lands on chunk c ^ r of its 128-byte row
    for r in range(at.TILE_ROWS):
        for c in range(0, at.TILE_K, 8):
            assert list(offs[r, c:c + 8] - offs[r, c]) == list(range(0, 16, 2))
            ct, chunk = divmod(c // 8, 8)
            assert offs[r, c] == ct * 1024 + r * 128 + (chunk ^ r) * 16


def test_reference_gather_is_the_permuted_row():
    x = jax.random.normal(jax.random.PRNGKey(0), (at.TILE_K,)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(at.reference(x, "gather")),
                                  np.asarray(x)[nvfp4_decode.k_permutation(at.TILE_K)])


def test_reference_swiglu_sums_the_splits_then_clamps():
    inter, limit = 512, 1.5
    p = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (3, 4, 2 * inter))          # [S, rows, 2I]
    got = at.reference(p[:, 2, 256:], "swiglu", inter=inter, limit=limit)   # the tile at columns 256..511, row 2
    g, u = p[:, 2, 256:512].sum(0), p[:, 2, inter + 256:inter + 512].sum(0)
    want = reference.swiglu(g, u, limit).astype(jnp.bfloat16)[nvfp4_decode.k_permutation(at.TILE_K)]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -8)
    assert float(jnp.abs(g).max()) > limit             # the clamp was exercised
