"""Small synthetic checkpoints for the checkpoint / convert / calibrate tests (no model needed)."""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from megamoe_jax.checkpoint.safetensors_io import write_file

E4M3 = ml_dtypes.float8_e4m3fn
E8M0 = ml_dtypes.float8_e8m0fnu


def save(directory, tensors: dict, config: dict | None = None, *, hf_quant_config: dict | None = None,
         shards: int = 1) -> Path:
    """Write `tensors` as a checkpoint directory (`shards` > 1: round-robin shards plus an index)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config if config is not None else {"model_type": "deepseek_v4"}))
    if hf_quant_config is not None:
        (path / "hf_quant_config.json").write_text(json.dumps(hf_quant_config))
    names = sorted(tensors)
    if shards == 1:
        write_file(path / "model.safetensors", tensors)
        return path
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        write_file(path / fname, part)
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def nvfp4_parts(rng, n: int, k: int, amax: float = 1.0, block_max: float = 448.0):
    """(packed uint8 [n, k/2], block scales e4m3 [n, k/16] whose largest is block_max, g = amax/2688)."""
    packed = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    bs = rng.uniform(1.0, block_max, (n, k // 16)).astype(np.float32)
    bs.flat[rng.integers(bs.size)] = block_max
    return packed, bs.astype(E4M3), np.float32(amax) / np.float32(2688.0)


def ct_module(module, packed, bs, g, g_in=None) -> dict:
    out = {f"{module}.weight_packed": packed, f"{module}.weight_scale": bs,
           f"{module}.weight_global_scale": (np.float32(1) / np.float32(g)).reshape(1)}
    if g_in is not None:
        out[f"{module}.input_global_scale"] = (np.float32(1) / np.float32(g_in)).reshape(1)
    return out


def mo_module(module, packed, bs, g, g_in=None) -> dict:
    out = {f"{module}.weight": packed, f"{module}.weight_scale": bs,
           f"{module}.weight_scale_2": np.asarray(g, np.float32).reshape(())}
    if g_in is not None:
        out[f"{module}.input_scale"] = np.asarray(g_in, np.float32).reshape(())
    return out


CT_CONFIG = {"model_type": "deepseek_v4", "quantization_config": {
    "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {"targets": ["Linear"], "format": "nvfp4-pack-quantized",
                                  "weights": {"num_bits": 4, "type": "float", "group_size": 16},
                                  "input_activations": {"num_bits": 4, "type": "float", "group_size": 16,
                                                        "dynamic": "local"}}}}}
CT_CONFIG_W4A16 = json.loads(json.dumps(CT_CONFIG))
CT_CONFIG_W4A16["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
MO_CONFIG = {"model_type": "deepseek_v4", "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}}
MO_HF_QUANT = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                                  "exclude_modules": ["head"]}}
FP8_CONFIG = {"model_type": "deepseek_v4", "quantization_config": {
    "quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}}
