"""The in-kernel table of each sorted row's group (`pallas_kernels/row_table.py`, ONE_ROW_TABLE = "smem").

The kernel code itself runs on the GPU only (tests/gpu/test_kernels_grouped.py runs the grouped matmul with it);
here the warp's algorithm, simulated lane by lane in the order the kernel emits it, must give the same table as
XLA's form of it (`row_groups_of_sizes`, ONE_ROW_TABLE = "xla") and as a numpy searchsorted, on awkward inputs: group counts that are not multiples of 32 (lanes
with fewer groups, lanes with none), more rows than lanes (a lane owns several tail rows), sizes past M and
negative sizes (clipped), empty groups everywhere, and every row in the tail.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import grouped_matmul as gm
from pallas_kernels import row_table

_xla_table = jax.jit(gm.row_groups_of_sizes, static_argnums=1)


def _want(sizes, m):
    sizes = np.asarray(sizes, np.int64)
    ends = np.cumsum(np.clip(sizes, 0, m))
    g = np.searchsorted(ends, np.arange(m), side="right")
    return np.where(g < len(sizes), g, -1)


CASES = [
    ([0, 1, 0, 0], 1),
    ([0, 1, 0, 0, 1, 1, 0, 1, 1, 1], 6),          # one token's experts, empty groups between
    ([2, 0, 3, 1], 6),                            # groups of several rows
    ([0, 0, 1, 2], 7),                            # 4 tail rows
    ([0, 0, 0], 3),                               # every row in the tail
    ([9, -2, 4], 5),                              # a size past M (clipped to M), a negative size (no rows)
    ([5], 5), ([7], 3), ([0], 2),                 # one group: a dense linear
]


@pytest.mark.parametrize("sizes,m", CASES)
def test_warp_table_matches_reference_on_small_cases(sizes, m):
    want = _want(sizes, m)
    np.testing.assert_array_equal(row_table.simulate_warp(sizes, m), want)
    np.testing.assert_array_equal(np.asarray(_xla_table(jnp.asarray(sizes, jnp.int32), m)), want)


@pytest.mark.parametrize("e", [1, 5, 31, 32, 33, 256, 300, 384, 1024])
@pytest.mark.parametrize("m", [1, 6, 16, 33, 70])
def test_warp_table_matches_reference_on_random_sizes(e, m):
    rng = np.random.default_rng(1000 * e + m)
    for trial in range(6):
        if trial == 0:      # one row per distinct group (a decode token's experts)
            sizes = np.zeros(e, np.int64)
            sizes[rng.choice(e, min(e, m), replace=False)] = 1
        elif trial == 1:    # all rows in one group somewhere in the middle
            sizes = np.zeros(e, np.int64)
            sizes[rng.integers(e)] = m
        else:               # skewed counts, some negative, sums below and above m
            sizes = rng.integers(-2, 4, e) * (rng.random(e) < rng.choice([0.02, 0.1, 0.5]))
        want = _want(sizes, m)
        np.testing.assert_array_equal(row_table.simulate_warp(sizes, m), want, err_msg=f"{sizes.tolist()}")
        np.testing.assert_array_equal(np.asarray(_xla_table(jnp.asarray(sizes, jnp.int32), m)), want)


def test_supported_limits():
    assert row_table.supported(6, 256) is None
    assert row_table.supported(16, row_table.MAX_GROUPS) is None
    assert "groups" in row_table.supported(6, row_table.MAX_GROUPS + 1)
    assert "rows" in row_table.supported(0, 256)
    assert row_table.groups_per_lane(256) == 8 and row_table.groups_per_lane(257) == 9
