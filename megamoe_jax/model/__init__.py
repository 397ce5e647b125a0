"""DeepSeek-V4 in flax.nnx: config, network, decode state and checkpoint parameter map."""
from megamoe_jax.model.config import ConfigError, ModelConfig, YarnConfig, flash, pro, tiny

__all__ = ["ConfigError", "ModelConfig", "YarnConfig", "flash", "pro", "tiny"]
