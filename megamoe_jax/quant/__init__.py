"""Exact number formats: NVFP4 (E2M1 + E4M3 per 16 + f32 global), MXFP4 (E2M1 + E8M0 per 32), FP8 block.

Every format is a registered pytree with `.shape`, `.ndim` and `.dequantize(dtype)`, usable inside jit.
See nvfp4.py for the global-scale convention (the dequant factor g) and the exactness guarantees.
"""
from megamoe_jax.quant.nvfp4 import NVFP4Tensor

__all__ = ["NVFP4Tensor"]
