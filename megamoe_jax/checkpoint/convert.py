"""Convert a checkpoint in any readable format to NVFP4 (compressed-tensors or ModelOpt convention) or to bf16.

    convert(src, dst, to="nvfp4", scope="experts", ignore=(), calibrate=None, convention="compressed-tensors")

Streaming: one layer's tensors are read, converted and handed to the sharded writer at a time, so host memory is
about one output shard plus one layer. The output appears atomically (see writer.CheckpointWriter); with
`calibrate` the activation scales are computed on the staged output before it is published.

What happens to each weight (names keep the source's own convention; only companions change):
  * to="nvfp4": weights in scope and not ignored (plain, FP8 block or MXFP4) are quantized to NVFP4. Shards of one
    fused GEMM (an expert's w1/w3, the shared expert's w1/w3, attention wq_a/wkv) share one weight global scale,
    as llm-compressor and ModelOpt export them and as vLLM's fused loaders require. transformers' stacked experts
    (`mlp.experts.gate_up_proj` / `down_proj`) are split into per-expert modules. NVFP4 weights are kept
    bit-exact (re-encoded when the convention changes: G = 1/g in fp32, as compressed-tensors' own ModelOpt
    converter does). Other quantized weights stay as they are; everything else is copied.
  * to="bf16": every quantized weight is dequantized (fp32, rounded once to bf16); the rest is copied.
"""
from __future__ import annotations

import functools
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from megamoe_jax.checkpoint import formats, writer as W
from megamoe_jax.checkpoint.names import canonical_name
from megamoe_jax.checkpoint.reader import CheckpointFiles, open_checkpoint

SCOPES = ("experts", "all-linear")
CONVENTIONS = (formats.CT, formats.MODELOPT)

_EXPERTS = re.compile(r"^(layers|mtp)\.\d+\.ffn\.experts\.(\d+\.(w1|w2|w3)|w13|w2)\.weight$")
# Every linear the model runs through `dispatch.linear` with a quantization-aware name (the router `ffn.gate`, the
# grouped `attn.wo_a`, `embed` and `head` stay in high precision, as in every published NVFP4 release).
_LINEARS = re.compile(r"^(layers|mtp)\.\d+\.(attn\.(wq_a|wq_b|wkv|wo_b|compressor\.(wkv|wgate)"
                      r"|indexer\.(wq_b|weights_proj)|indexer\.compressor\.(wkv|wgate))"
                      r"|ffn\.shared_experts\.(w1|w2|w3)|e_proj|h_proj)\.weight$")
_LAYER = re.compile(r"^((layers|mtp)\.\d+)\.")


def in_scope(canonical: str, scope: str) -> bool:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    return bool(_EXPERTS.match(canonical) or (scope == "all-linear" and _LINEARS.match(canonical)))


def fused_key(canonical: str) -> str | None:
    """Modules that one fused GEMM reads from the same input share a weight global scale."""
    m = re.match(r"^(.*\.(experts\.\d+|shared_experts))\.(w1|w3)\.weight$", canonical)
    if m:
        return m.group(1) + ".w13"
    m = re.match(r"^(.*\.attn)\.(wq_a|wkv)\.weight$", canonical)
    if m:
        return m.group(1) + ".qkv_a"
    return None


@dataclass
class _Out:
    """Where the converted checkpoint's modules ended up, for its quantization_config."""
    nvfp4: list[str]
    fp8: list[str]
    mxfp4: list[str]
    plain_linear: list[str]
    with_input: int = 0


def convert(src, dst, to: str = "nvfp4", scope: str = "experts", ignore=(), calibrate=None,
            convention: str = formats.CT, *, max_shard_bytes: int = W.DEFAULT_SHARD_BYTES, overwrite: bool = False,
            progress: bool | None = None, calibrate_options: dict | None = None) -> Path:
    """Convert checkpoint `src` into a new checkpoint directory `dst`; returns dst.

    to: "nvfp4" | "bf16". scope: "experts" (routed experts only) | "all-linear" (also attention, shared experts,
    compressor/indexer projections). ignore: module patterns left untouched ("re:<regex>", fnmatch wildcards or
    exact names, matched against both the file's and the DeepSeek-native module names). calibrate: calibration data
    (token ids or a text file, see megamoe_jax.calibrate) to compute NVFP4 activation scales (W4A4); without it the
    new NVFP4 weights are weight-only (W4A16). convention: "compressed-tensors" | "modelopt" for NVFP4 tensors.
    """
    if to not in ("nvfp4", "bf16"):
        raise ValueError(f"to must be 'nvfp4' or 'bf16', not {to!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, not {convention!r}")
    in_scope("", scope)
    ignore = list(ignore or ())
    if calibrate is not None and to != "nvfp4":
        raise ValueError("calibrate only applies to to='nvfp4' (bf16 has no activation scales)")
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: destination must differ from the source")
    ckpt = open_checkpoint(src)
    if calibrate is not None:
        # Activation scales are recomputed anyway: a wrong one in the source must not stop the conversion.
        formats.set_read_options(ckpt, bad_scales="repair")
    lay = formats.layout(ckpt)
    groups: dict[str, list[str]] = defaultdict(list)
    for name in lay:
        m = _LAYER.match(canonical_name(name))
        groups[m.group(1) if m else ""].append(name)
    order = sorted(groups, key=_group_order)
    targets = {n for n, e in lay.items() if to == "nvfp4" and _targets(e, ckpt, scope, ignore)}
    keep_inputs = to == "nvfp4" and calibrate is None and _all_nvfp4_keep_inputs(lay, targets)
    out = _Out([], [], [], [])
    with W.CheckpointWriter(dst, max_shard_bytes=max_shard_bytes, overwrite=overwrite, progress=progress) as wr:
        for g in order:
            tensors = _convert_group(ckpt, [lay[n] for n in groups[g]], to, targets, convention, keep_inputs, out)
            wr.add_all(tensors)
            ckpt.release()
        for f in ckpt.extra_files():
            wr.copy_file(f)
        config, hf_quant = _output_config(ckpt.config, to, convention, out)
        if calibrate is not None:
            wr.finish(config, hf_quant_config=hf_quant)
            from megamoe_jax.calibrate import calibrate as run_calibration
            run_calibration(wr.tmp, calibrate, **(calibrate_options or {}))
            wr.publish()
        else:
            wr.commit(config, hf_quant_config=hf_quant)
    ckpt.close()
    return dst


def _group_order(g: str):
    m = re.match(r"^(layers|mtp)\.(\d+)$", g)
    if not m:
        return (0, 0)
    return (1 if m.group(1) == "layers" else 2, int(m.group(2)))


def _ignored(e: formats.Entry, ignore) -> bool:
    return bool(ignore) and (formats.matches(e.module, ignore)
                             or formats.matches(canonical_name(e.name).removesuffix(".weight"), ignore))


def _targets(e: formats.Entry, ckpt, scope, ignore) -> bool:
    """Should this entry be (re)quantized to NVFP4?"""
    if e.kind == formats.NVFP4 or _ignored(e, ignore) or not in_scope(canonical_name(e.name), scope):
        return False
    shape = ckpt.shape(e.parts["weight"])
    k = shape[-1] * (2 if e.kind == formats.MXFP4 else 1)
    if e.kind == formats.PLAIN and ckpt.dtype(e.parts["weight"]) not in ("BF16", "F16", "F32", "F64"):
        return False
    if len(shape) not in (2, 3) or k % formats.NVFP4_BLOCK:
        warnings.warn(f"{e.name}: shape {list(shape)} is not a matrix with K divisible by 16; left unquantized")
        return False
    return True


def _all_nvfp4_keep_inputs(lay, targets) -> bool:
    """Keep the source's activation scales only when every NVFP4 module of the output will have one."""
    nv = [e for e in lay.values() if e.kind == formats.NVFP4]
    new = targets
    with_in = [e for e in nv if "input_scale" in e.parts]
    if with_in and (new or len(with_in) != len(nv)):
        warnings.warn(f"{len(with_in)} source activation scales dropped: the new NVFP4 modules have none, so the "
                      f"output is weight-only (W4A16). Pass calibrate=DATA to compute activation scales for all.")
        return False
    return bool(with_in)


def _convert_group(ckpt: CheckpointFiles, entries, to, targets, convention, keep_inputs, out: _Out) -> dict:
    tensors: dict[str, np.ndarray] = {}
    fresh: list[tuple[str, str, np.ndarray]] = []     # (file module, canonical, weight) to quantize
    for e in entries:
        if to == "bf16":
            if e.kind == formats.PLAIN:
                tensors[e.name] = ckpt.get(e.name)
            else:
                w = formats.read_weight(ckpt, e.name, activation_scales="drop")
                tensors[e.name] = np.asarray(w.dequantize(jnp.float32)).astype(ml_dtypes.bfloat16)
                out.plain_linear.append(e.module)
            continue
        if e.name in targets:
            x = _source(ckpt, e)
            c = canonical_name(e.name)
            if x.ndim == 3:
                fresh += _split_stacked(e, c, x)
            else:
                fresh.append((e.module, c, x))
            continue
        if e.kind == formats.NVFP4:
            tensors.update(_reencode_nvfp4(ckpt, e, convention, keep_inputs))
            out.nvfp4.append(e.module)
            out.with_input += int(keep_inputs and "input_scale" in e.parts)
        elif e.kind == formats.FP8_BLOCK:
            w = formats.read_weight(ckpt, e.name)
            tensors.update(W.fp8_block_tensors(e.module, np.asarray(w.weight), np.asarray(w.scale),
                                               convention=_keep_conv(convention)))
            out.fp8.append(e.module)
        elif e.kind == formats.MXFP4:
            tensors.update(W.mxfp4_tensors(e.module, ckpt.get(e.parts["weight"]), ckpt.get(e.parts["block_scale"]),
                                           convention=_keep_conv(convention)))
            out.mxfp4.append(e.module)
        else:
            tensors[e.name] = ckpt.get(e.name)
            if e.name.endswith(".weight") and len(ckpt.shape(e.name)) == 2:
                out.plain_linear.append(e.module)
    for module, t in quantize_group(fresh).items():
        tensors.update(W.nvfp4_tensors(module, t.packed, t.block_scale, t.global_scale, convention=convention))
        out.nvfp4.append(module)
    return tensors


def _keep_conv(convention):
    # Kept FP8 / MXFP4 weights: compressed-tensors naming for a compressed-tensors output, DeepSeek's otherwise.
    return formats.CT if convention == formats.CT else formats.DEEPSEEK


def _source(ckpt, e) -> np.ndarray:
    """The weight to quantize: a plain tensor in its own dtype (so that its global scale is computed as
    quantize-in-memory would), a quantized one dequantized to fp32."""
    if e.kind == formats.PLAIN:
        x = ckpt.get(e.name)
        return x if x.dtype in (np.float32, np.float16, ml_dtypes.bfloat16) else np.asarray(x, np.float32)
    return np.asarray(formats.read_weight(ckpt, e.name, activation_scales="drop").dequantize(jnp.float32))


def _split_stacked(e, canonical, x):
    """transformers' stacked experts -> per-expert modules named like the fork / llm-compressor exports."""
    base = e.name.rsplit(".", 1)[0]                       # "model.layers.N.mlp.experts"
    cbase = canonical.rsplit(".", 2)[0]                   # "layers.N.ffn.experts"
    out = []
    if canonical.endswith(".w13.weight"):
        i = x.shape[1] // 2
        for k in range(x.shape[0]):
            out.append((f"{base}.{k}.gate_proj", f"{cbase}.{k}.w1.weight", x[k, :i]))
            out.append((f"{base}.{k}.up_proj", f"{cbase}.{k}.w3.weight", x[k, i:]))
    else:
        for k in range(x.shape[0]):
            out.append((f"{base}.{k}.down_proj", f"{cbase}.{k}.w2.weight", x[k]))
    return out


def quantize_group(items) -> dict:
    """NVFP4-quantize (module, canonical name, weight) items -> {module: NVFP4Tensor}.

    A lone weight gets exactly `nvfp4.quantize(x)` (its global scale computed from its amax in its own dtype, as
    compressed-tensors does); the shards of a fused group share the global scale of their largest amax.
    """
    by_key: dict[str, list] = defaultdict(list)
    for module, c, x in items:
        by_key[fused_key(c) or module].append((module, x))
    out = {}
    for members in by_key.values():
        g = shared_global_scale([x for _, x in members])
        for module, x in members:
            out[module] = quantize_blocks(x, g)
    return out


def shared_global_scale(xs) -> np.float32:
    """The dequant global scale g that `nvfp4.quantize` derives from data, over all of `xs` (largest finite
    amax, so no member overflows): G from compressed-tensors' generate_gparam in the inputs' dtype, g = 1/G."""
    from megamoe_jax.quant import nvfp4
    amax = np.float32(0)
    for x in xs:
        a = np.abs(np.asarray(x, np.float32))
        amax = max(amax, np.float32(np.max(np.where(np.isfinite(a), a, 0), initial=0)))
    bf16 = all(np.asarray(x).dtype == ml_dtypes.bfloat16 for x in xs)
    G = np.float32(nvfp4.multiplier_from_amax(jnp.float32(amax), jnp.bfloat16 if bf16 else jnp.float32))
    return np.float32(1.0) / G                           # correctly rounded, as nvfp4.quantize's div_rn


_MIN_ROWS = 1 << 12


def quantize_blocks(x, g):
    """`nvfp4.quantize(x, global_scale=g)` for a 2-D weight, bit for bit, at a bounded compile cost.

    NVFP4 blocks are independent given the global scale, so the weight is quantized as rows of 16 elements,
    zero-padded to a power-of-two row count: one compiled program per size bucket instead of per weight shape.
    """
    from megamoe_jax.quant import nvfp4
    x = np.asarray(x)
    n, k = x.shape
    rows = x.size // nvfp4.BLOCK
    bucket = max(_MIN_ROWS, 1 << (rows - 1).bit_length())
    flat = np.zeros((bucket, nvfp4.BLOCK), x.dtype)
    flat[:rows] = x.reshape(rows, nvfp4.BLOCK)
    t = _quantize_program()(jnp.asarray(flat), jnp.float32(g))
    packed = np.asarray(t.packed)[:rows].reshape(n, k // 2)
    scale = np.asarray(t.block_scale)[:rows].reshape(n, k // nvfp4.BLOCK)
    return nvfp4.NVFP4Tensor(packed, scale, np.asarray(g, np.float32).reshape(()))


@functools.cache
def _quantize_program():
    import jax
    from megamoe_jax.quant import nvfp4
    return jax.jit(lambda x, g: nvfp4.quantize(x, global_scale=g))


def _reencode_nvfp4(ckpt, e: formats.Entry, convention, keep_inputs) -> dict:
    """Copy an NVFP4 module, renaming/reciprocating its global scales only when the convention changes."""
    parts = e.parts
    module = e.module
    if e.convention == convention:
        out = {t: ckpt.get(t) for role, t in parts.items() if role != "input_scale" or keep_inputs}
        return out
    def conv(t):            # CT <-> ModelOpt: 1/x in fp32 (compressed-tensors' ModelOptNvfp4Converter does the same)
        with np.errstate(divide="ignore"):
            return np.float32(1.0) / np.asarray(ckpt.get(t), np.float32)
    packed, bs = ckpt.get(parts["weight"]), ckpt.get(parts["block_scale"])
    g = conv(parts["global_scale"])
    gi = conv(parts["input_scale"]) if keep_inputs and "input_scale" in parts else None
    if convention == formats.CT:
        out = {f"{module}.weight_packed": packed, f"{module}.weight_scale": bs,
               f"{module}.weight_global_scale": g.reshape(1)}
        if gi is not None:
            out[f"{module}.input_global_scale"] = gi.reshape(1)
    else:
        out = {f"{module}.weight": packed, f"{module}.weight_scale": bs, f"{module}.weight_scale_2": g.reshape(())}
        if gi is not None:
            out[f"{module}.input_scale"] = gi.reshape(())
    return out


def _output_config(src_config: dict, to: str, convention: str, out: _Out) -> tuple[dict, dict | None]:
    config = {k: v for k, v in src_config.items() if k != "quantization_config"}
    if to == "bf16":
        config["torch_dtype"] = "bfloat16"
        return config, None
    acts = out.with_input > 0
    if convention == formats.CT:
        config["quantization_config"] = W.ct_quantization_config(
            nvfp4=out.nvfp4, nvfp4_activations=acts, fp8_block=out.fp8, mxfp4=out.mxfp4, ignore=out.plain_linear)
        return config, None
    qc, hf = W.modelopt_configs(nvfp4_activations=acts, exclude=out.plain_linear + out.fp8 + out.mxfp4)
    config["quantization_config"] = qc
    return config, hf
