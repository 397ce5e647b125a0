"""Cross-check against compressed-tensors 0.20 itself: a tiny transformers DeepSeek-V4 compressed by its own NVFP4
compressor (apply_quantization_config + ModelCompressor.compress_model, scales from its generate_gparam /
calculate_qparams as llm-compressor's min-max observers produce them) loads here with the dequantized weights of
its own decompression, and gives the logits of the decompressed transformers model."""
import json

import ml_dtypes
import numpy as np
import pytest
import torch

import jax.numpy as jnp

from megamoe_jax.checkpoint import formats
from megamoe_jax.checkpoint.reader import open_checkpoint
from tests.helpers_tiny import TINY_CONFIGS, hf_logits, make_hf_model, rel_err

# Seed 2: no router / indexer top-k decision of these ids sits within float noise of a tie after quantization.
# (With seed 1 one token has such a tie: two correct fp32 implementations pick different entries and that
# token's logits differ by ~10%; every other token agrees to the bf16 weight rounding, ~4e-3.)
SEED = 2


def ct_compress(model, ignore):
    """Quantize every nn.Linear of `model` (bf16) to NVFP4 with compressed-tensors' own code, in place."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import NVFP4A16
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    scheme = QuantizationScheme(targets=["Linear"], **NVFP4A16)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    for _, mod in model.named_modules():
        if getattr(mod, "quantization_scheme", None) is None:
            continue
        w = mod.weight.data
        gs = generate_gparam(w.min(), w.max())                     # memoryless min-max observer
        wb = w.reshape(w.shape[0], -1, 16)
        scale, _ = calculate_qparams(wb.amin(-1), wb.amax(-1), mod.quantization_scheme.weights, global_scale=gs)
        mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape).to(mod.weight_scale.dtype))
        mod.weight_global_scale.data.copy_(gs)
    comp = ModelCompressor.from_pretrained_model(model, "nvfp4-pack-quantized")
    comp.compress_model(model)
    return comp


@pytest.fixture(scope="module")
def ct_checkpoint(tmp_path_factory):
    from safetensors.torch import save_file
    cfg = TINY_CONFIGS["all_types"]
    model = make_hf_model(cfg, SEED).to(torch.bfloat16)
    # The router and lm_head stay bf16 (llm-compressor's usual ignore list); o_a_proj is a grouped linear.
    comp = ct_compress(model, ["lm_head", r"re:.*mlp\.gate$", r"re:.*o_a_proj$"])
    path = tmp_path_factory.mktemp("ct")
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    comp.update_config(str(path))                                 # writes quantization_config
    packed = {k: v.clone() for k, v in sd.items()}
    comp.decompress_model(model)                                  # compressed-tensors' own dequantization
    return path, packed, model


def test_ct_checkpoint_decodes_to_ct_decompression(ct_checkpoint):
    path, packed, decompressed = ct_checkpoint
    ck = open_checkpoint(path)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format"] == "nvfp4-pack-quantized"
    lay = formats.layout(ck)
    nv = [n for n, e in lay.items() if e.kind == formats.NVFP4]
    assert len(nv) == 42 and all(lay[n].convention == formats.CT for n in nv)
    ref_params = dict(decompressed.named_parameters())
    for n in nv:
        t = formats.read_weight(ck, n)
        m = lay[n].module
        # codes and block scales pass through bit for bit; g is 1/weight_global_scale
        np.testing.assert_array_equal(np.asarray(t.packed), packed[m + ".weight_packed"].numpy())
        np.testing.assert_array_equal(np.asarray(t.block_scale).view(np.uint8),
                                      packed[m + ".weight_scale"].view(torch.uint8).numpy())
        assert np.float32(t.global_scale) == np.float32(1) / packed[m + ".weight_global_scale"].numpy()[0]
        ours = np.asarray(t.dequantize(jnp.float32))
        ref = ref_params[m + ".weight"].detach()
        assert ref.dtype == torch.bfloat16
        # compressed-tensors decompresses to the model dtype: identical after the same rounding
        np.testing.assert_array_equal(ours.astype(ml_dtypes.bfloat16).astype(np.float32), ref.float().numpy())
        # in fp32 it computes code * (s / G) where we compute (code * s) * (1/G): two roundings apart at most
        p = packed[m + ".weight_packed"]
        from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
        codes = unpack_fp4_from_uint8(p, p.shape[0], 2 * p.shape[1], dtype=torch.float32)
        s = packed[m + ".weight_scale"].float() / packed[m + ".weight_global_scale"]
        ref32 = (codes.reshape(p.shape[0], -1, 16) * s[..., None]).reshape(codes.shape).numpy()
        np.testing.assert_array_max_ulp(ours, ref32, maxulp=2)


def test_ct_checkpoint_logits_match_decompressed_transformers(ct_checkpoint):
    import megamoe_jax
    path, _, decompressed = ct_checkpoint
    ids = np.random.default_rng(0).integers(0, TINY_CONFIGS["all_types"].vocab_size, (2, 24))
    ref = hf_logits(decompressed.float(), ids)
    ours = np.asarray(megamoe_jax.load(path).logits(ids))
    # transformers runs the bf16-rounded decompressed weights, we the exact fp32 ones: ~4e-3 apart
    assert rel_err(ours, ref) < 1e-2
