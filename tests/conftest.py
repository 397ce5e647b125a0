"""Shared test set-up.

Eight simulated CPU devices let the sharding tests build real meshes; every other test runs on device 0.
Must run before jax is imported anywhere, hence module level.
"""
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu" if os.environ.get("MEGAMOE_TEST_GPU") != "1" else "")
