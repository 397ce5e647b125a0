"""GPU tests: run on the device machine with MEGAMOE_TEST_GPU=1; skipped anywhere without a Hopper GPU."""
import pytest


def _has_hopper() -> bool:
    try:
        import jax
        devs = jax.devices("gpu")
    except Exception:
        return False
    return any(getattr(d, "compute_capability", "0") >= "9.0" for d in devs)


def pytest_collection_modifyitems(config, items):
    if _has_hopper():
        return
    skip = pytest.mark.skip(reason="needs a Hopper GPU (run on the device machine with MEGAMOE_TEST_GPU=1)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
