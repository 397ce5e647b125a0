"""megamoe-jax: NVFP4 mixture-of-experts inference for DeepSeek-V4-class models in JAX."""
__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a checkpoint directory; see `megamoe_jax.api.load`."""
    from megamoe_jax.api import load as _load
    return _load(path, **kwargs)
