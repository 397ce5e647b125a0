"""Exact number formats: NVFP4 (E2M1 + E4M3 per 16 + f32 global), MXFP4 (E2M1 + E8M0 per 32), FP8 block.

Every format is a registered pytree with `.shape`, `.ndim` and `.dequantize(dtype)`, usable inside jit.
  nvfp4.py        NVFP4Tensor, quantize / dequantize / fake_quantize; the global scale is the dequant factor g
  conventions.py  compressed-tensors (G = 1/g) and ModelOpt (g) checkpoint fields <-> NVFP4Tensor
  mxfp4.py        MXFP4Tensor, quantize (compressed-tensors / OCP / DeepSeek-ceil scale rules) / dequantize
  fp8_block.py    FP8BlockTensor (128 x 128 scales), quantize (ue8m0 or fp32 scales) / dequantize
  e2m1.py         E2M1 code table, encode, pack / unpack (pure jnp, no float4 dtype)
  floatbits.py    exactly rounded arithmetic from integer ops (identical on CPU and GPU)
"""
from megamoe_jax.quant import conventions, e2m1, fp8_block, mxfp4, nvfp4
from megamoe_jax.quant.fp8_block import FP8BlockTensor
from megamoe_jax.quant.mxfp4 import MXFP4Tensor
from megamoe_jax.quant.nvfp4 import NVFP4Tensor

__all__ = ["NVFP4Tensor", "MXFP4Tensor", "FP8BlockTensor", "nvfp4", "mxfp4", "fp8_block", "conventions", "e2m1"]
