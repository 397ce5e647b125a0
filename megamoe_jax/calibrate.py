"""Warmup calibration of NVFP4 activation global scales, and a finiteness check of the forward pass.

    calibrate(path, data)   # records input amax of every NVFP4 linear, writes the scales into the checkpoint

How (nvfp4_format.md §4.4):
  * The model is loaded weight-only (its activation scales, right or wrong, are dropped), and a jit-traced forward
    runs over the calibration batches under `pallas_kernels.dispatch.observe`: every named matmul reports the fp32
    amax of its input, returned as outputs of the compiled program; the host keeps a running max over batches.
  * Routed experts: the gate/up (w1/w3) input of a layer is one shared amax; the down (w2) input one amax per
    expert, and an expert that saw no token takes the max of its siblings (ModelOpt's export fallback). Modules
    that read the same input (wq_a/wkv, an expert's w1/w3) get one shared scale. MTP modules, which the model does
    not run, take the largest amax of the same module over the main layers.
  * g = amax / 2688 is written in the checkpoint's own convention (compressed-tensors stores 1/g), atomically
    (writer.update_checkpoint); the config is updated to declare static activation scales.
  * A table of old vs new scales is printed per layer, and a warning names every module whose stored scale was
    off by more than `warn_ratio` (4x).
`check_finite(model, ids)` runs one forward and names the first layer whose activations are not finite.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megamoe_jax.checkpoint import formats, writer
from megamoe_jax.checkpoint.convert import fused_key
from megamoe_jax.checkpoint.names import canonical_name
from megamoe_jax.checkpoint.reader import open_checkpoint
from megamoe_jax.checkpoint.validate import AMAX
from pallas_kernels import dispatch


class CalibrationError(ValueError):
    """Calibration cannot produce a scale (no NVFP4 module, no data, a module the model never runs, ...)."""


class NonFiniteError(FloatingPointError, ValueError):
    """The forward pass produced Inf/NaN; the message names the first layer (and module) where it appeared."""


@dataclasses.dataclass
class CalibrationResult:
    path: Path                         # the checkpoint written
    scales: dict[str, float]           # logical weight name (file naming) -> new activation dequant scale g
    old: dict[str, float | None]       # ... -> the checkpoint's previous g (None: had none)
    table: str                         # the printed old-vs-new table
    off: list[str]                     # modules whose stored scale was off by more than warn_ratio
    tokens: int                        # calibration tokens seen


# ---- data ---------------------------------------------------------------------------------------------------

def calibration_batches(data, *, tokenizer_path=None, batch_size: int = 4, seq_len: int = 128,
                        max_batches: int | None = None) -> list[np.ndarray]:
    """Token id batches [B, T] from token ids ([N], [B, T], a list of lists) or a text file (tokenized with the
    checkpoint's tokenizer). The stream is cut into rows of seq_len tokens; the last partial row is kept alone."""
    if isinstance(data, (str, os.PathLike)):
        ids = _tokenize_file(Path(data), tokenizer_path)
        rows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    elif isinstance(data, np.ndarray) and data.ndim == 2:
        rows = list(data)
    elif isinstance(data, (list, tuple)) and data and isinstance(data[0], (list, tuple, np.ndarray)):
        rows = [np.asarray(r).reshape(-1) for r in data]
    else:
        flat = np.asarray(data).reshape(-1)
        rows = [flat[i:i + seq_len] for i in range(0, len(flat), seq_len)]
    rows = [np.asarray(r) for r in rows if len(r)]
    if not rows:
        raise CalibrationError("calibration data is empty")
    for r in rows:
        if not np.issubdtype(r.dtype, np.integer):
            raise CalibrationError(f"calibration token ids must be integers, got {r.dtype}")
    by_len: dict[int, list[np.ndarray]] = defaultdict(list)
    for r in rows:
        by_len[len(r)].append(r.astype(np.int32))
    batches = []
    for n in sorted(by_len, reverse=True):
        rs = by_len[n]
        batches += [np.stack(rs[i:i + batch_size]) for i in range(0, len(rs), batch_size)]
    return batches[:max_batches] if max_batches else batches


def _tokenize_file(file: Path, tokenizer_path) -> np.ndarray:
    if not file.is_file():
        raise CalibrationError(f"{file}: calibration data file not found")
    if tokenizer_path is None:
        raise CalibrationError(f"{file}: a text file needs the checkpoint's tokenizer (pass token ids instead)")
    from megamoe_jax.tokenizer import TokenizerError, load_tokenizer
    try:
        tok = load_tokenizer(tokenizer_path)
    except TokenizerError as e:
        raise CalibrationError(f"{file}: cannot tokenize calibration text: {e}") from e
    return np.asarray(tok.encode(file.read_text()), np.int32)


# ---- observation ----------------------------------------------------------------------------------------------

_TRACE_ORDER: dict = {}        # graphdef -> names in the order the traced forward first called them


@functools.partial(jax.jit, static_argnums=0)
def _observed_forward(graphdef, params, ids):
    """(logits [B, T, V], {name: input amax}) of one prefill, the dispatch observer active while tracing.

    Module level with a static graphdef, so models of the same structure share the compiled program."""
    stats: dict[str, jax.Array] = {}
    order: list[str] = []

    def observe(name, amax):
        if name in stats:
            stats[name] = jnp.maximum(stats[name], amax)
        else:
            stats[name] = amax
            order.append(name)

    with dispatch.observe(observe):
        model = nnx.merge(graphdef, params)
        h, _ = model(ids, model.init_state(ids.shape[0], ids.shape[1]))
        logits = model.logits(h)
    _TRACE_ORDER[graphdef] = order
    return logits, stats


def collect_amax(module, batches, *, progress: bool | None = None) -> dict[str, np.ndarray]:
    """Running max over batches of every named matmul's input amax (scalar, or [E] for '<experts>.w2')."""
    graphdef, params = nnx.split(module)
    from megamoe_jax.checkpoint.reader import progress_bar
    bar = progress_bar(len(batches), "calibrating", progress)
    acc: dict[str, np.ndarray] = {}
    for ids in batches:
        _, stats = _observed_forward(graphdef, params, jnp.asarray(ids, jnp.int32))
        for k, v in stats.items():
            v = np.asarray(v, np.float32)
            acc[k] = v if k not in acc else np.fmax(acc[k], v)
        bar.update(1)
    bar.close()
    return acc


def check_finite(module_or_model, ids) -> np.ndarray:
    """Run one forward; raise NonFiniteError naming the first layer/module whose input is Inf/NaN. Returns logits."""
    module = getattr(module_or_model, "module", module_or_model)
    graphdef, params = nnx.split(module)
    logits, stats = _observed_forward(graphdef, params, jnp.asarray(np.atleast_2d(ids), jnp.int32))
    for name in _TRACE_ORDER[graphdef]:
        v = np.asarray(stats[name])
        if not np.all(np.isfinite(v)):
            m = re.match(r"^(layers|mtp)\.(\d+)\.", name)
            layer = f"layer {m.group(2)}" if m else "the model's top level"
            raise NonFiniteError(f"non-finite activations first appear at {layer}: the input of {name} is "
                                 f"{'NaN' if np.any(np.isnan(v)) else 'Inf'}")
    logits = np.asarray(logits)
    if not np.all(np.isfinite(logits)):
        raise NonFiniteError("non-finite logits: the final norm / head produced Inf or NaN")
    return logits


# ---- scales ---------------------------------------------------------------------------------------------------

_EXPERT = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")
_MTP = re.compile(r"^mtp\.\d+\.(.*)$")


def amax_for_modules(entries: dict[str, str], observed: dict[str, np.ndarray]) -> tuple[dict[str, float], list[str]]:
    """entries: logical name -> canonical name of every NVFP4 module. Returns (logical -> amax, notes)."""
    notes = []
    out: dict[str, float] = {}
    for name, c in entries.items():
        m = _EXPERT.match(c)
        if m:
            base, e, proj = m.group(1), int(m.group(2)), m.group(3)
            if proj in ("w1", "w3"):
                v = observed.get(base + ".w13")
                out[name] = None if v is None else float(v)
            else:
                v = observed.get(base + ".w2")
                if v is None:
                    out[name] = None
                else:
                    v = np.asarray(v).reshape(-1)
                    if e >= v.size:
                        raise CalibrationError(f"{name}: expert {e} but the model observed {v.size} experts")
                    out[name] = float(v[e]) if v[e] > 0 and np.isfinite(v[e]) else None
                    if out[name] is None:
                        seen = v[(v > 0) & np.isfinite(v)]
                        if seen.size:
                            out[name] = float(seen.max())
                            notes.append(f"{name}: expert {e} saw no tokens, using the max of its siblings")
            continue
        v = observed.get(c.removesuffix(".weight"))
        out[name] = None if v is None else float(np.max(v))
    # MTP modules are not run by the model: the largest amax of the same module over the main layers.
    by_suffix: dict[str, float] = {}
    for name, c in entries.items():
        m = re.match(r"^layers\.\d+\.(.*)$", c)
        if m and out.get(name) is not None:
            suffix = re.sub(r"experts\.\d+\.", "experts.*.", m.group(1))
            by_suffix[suffix] = max(by_suffix.get(suffix, 0.0), out[name])
    for name, c in entries.items():
        m = _MTP.match(c)
        if out.get(name) is None and m:
            suffix = re.sub(r"experts\.\d+\.", "experts.*.", m.group(1))
            if suffix in by_suffix:
                out[name] = by_suffix[suffix]
                notes.append(f"{name}: MTP module not run by the model, using the largest main-layer amax")
    missing = [n for n, v in out.items() if v is None or not (v > 0 and math.isfinite(v))]
    if missing:
        raise CalibrationError(f"no usable activation statistics for {len(missing)} NVFP4 module(s), e.g. "
                               f"{missing[0]!r} (the model never ran it or its input was zero/non-finite)")
    # Modules that read one input share one scale (the largest amax).
    groups: dict[str, list[str]] = defaultdict(list)
    for name, c in entries.items():
        k = fused_key(c)
        if k:
            groups[k].append(name)
    for members in groups.values():
        top = max(out[n] for n in members)
        for n in members:
            out[n] = top
    return out, notes


def input_scale_value(module: str, amax: float, *, convention: str) -> tuple[str, np.ndarray]:
    """(tensor name, stored value) of an activation global scale from its calibrated amax, computed as the
    convention's own tools do: compressed-tensors' generate_gparam G = 2688/amax (fp32, [1]); ModelOpt's
    input_scale g = amax/2688 (fp32, [])."""
    from megamoe_jax.quant import conventions
    if convention == formats.CT:
        return f"{module}.input_global_scale", conventions.ct_multiplier_from_amax(np.float32(amax)).reshape(1)
    if convention == formats.MODELOPT:
        return f"{module}.input_scale", conventions.modelopt_scale_from_amax(np.float32(amax)).reshape(())
    raise CalibrationError(f"{module}: cannot write activation scales in convention {convention!r}")


def _table(rows, warn_ratio) -> tuple[str, list[str]]:
    """rows: (logical name, canonical, old g or None, new g). One line per layer module; experts summarised."""
    grouped: dict[tuple[str, str], list] = defaultdict(list)
    for name, c, old, new in rows:
        m = re.match(r"^((?:layers|mtp)\.\d+)\.(.*)$", c)
        layer, mod = (m.group(1), m.group(2)) if m else ("", c)
        mod = re.sub(r"experts\.\d+\.", "experts.*.", mod).removesuffix(".weight")
        grouped[(layer, mod)].append((name, old, new))
    lines = [f"{'layer':<10} {'module':<34} {'n':>4} {'old amax':>12} {'new amax':>12} {'off by':>8}"]
    off = []
    for (layer, mod), items in sorted(grouped.items(), key=lambda kv: (_layer_key(kv[0][0]), kv[0][1])):
        olds = [o for _, o, _ in items if o is not None]
        news = [n for _, _, n in items]
        ratios = []
        for name, o, n in items:
            if o is None:
                continue
            r = (o / n) if (o > 0 and np.isfinite(o)) else math.inf
            r = max(r, 1 / r) if r > 0 else math.inf
            ratios.append(r)
            if r > warn_ratio:
                off.append(name)
        fmt = lambda vs: "-" if not vs else (f"{AMAX * min(vs):.4g}" if len(set(vs)) == 1 or len(vs) == 1
                                             else f"{AMAX * min(vs):.3g}..{AMAX * max(vs):.3g}")
        worst = f"{max(ratios):.3g}x" if ratios else "-"
        flag = "  <-- off by > %gx" % warn_ratio if ratios and max(ratios) > warn_ratio else ""
        lines.append(f"{layer or '-':<10} {mod:<34} {len(items):>4} {fmt(olds):>12} {fmt(news):>12} "
                     f"{worst:>8}{flag}")
    return "\n".join(lines), off


def _layer_key(layer: str):
    m = re.match(r"^(layers|mtp)\.(\d+)$", layer)
    return (0, 0) if not m else (1 if m.group(1) == "layers" else 2, int(m.group(2)))


# ---- the entry point ------------------------------------------------------------------------------------------

def load_model(path, *, activation_scales: str = "checkpoint", bad_scales: str = "raise", dtype=None):
    """(flax module, CheckpointFiles) of checkpoint `path` with the given read options (formats.set_read_options):
    activation_scales="drop" loads every NVFP4 weight weight-only; bad_scales="repair" / "allow" loads a checkpoint
    whose activation scales fail validation (dropping / keeping them) instead of raising."""
    from megamoe_jax.api import default_dtype
    from megamoe_jax.model.config import ModelConfig
    from megamoe_jax.model.params import abstract_model, load_params
    ckpt = open_checkpoint(path)
    formats.set_read_options(ckpt, activation_scales=activation_scales, bad_scales=bad_scales)
    cfg = ModelConfig.from_hf_config(ckpt.config, source=str(Path(path) / "config.json"))
    dtype = dtype or default_dtype()
    module = abstract_model(cfg, dtype=dtype, param_dtype=dtype)
    with warnings.catch_warnings():
        if bad_scales != "raise":
            warnings.simplefilter("ignore")      # the caller reports them (calibrate prints its table)
        load_params(module, ckpt)
    return module, ckpt


def load_for_calibration(path, *, dtype=None):
    """The model of checkpoint `path` with every NVFP4 weight weight-only (activation scales, right or wrong,
    dropped): calibration measures the activations of the unquantized-activation model."""
    return load_model(path, activation_scales="drop", bad_scales="repair", dtype=dtype)


def calibrate(path, data, *, out=None, batch_size: int = 4, seq_len: int = 128, max_batches: int | None = None,
              warn_ratio: float = 4.0, check: bool = False, dtype=None, file=None,
              progress: bool | None = None) -> CalibrationResult:
    """Compute NVFP4 activation global scales of checkpoint `path` from `data` and write them into it.

    data: token ids ([N], [B, T], list of lists) or a text file (tokenized with the checkpoint's tokenizer).
    out: write the calibrated checkpoint there instead of updating `path` in place (both atomic).
    check: afterwards reload the calibrated checkpoint (W4A4) and assert every layer's activations are finite
    (NonFiniteError names the first failing layer). file: where the table goes (default stdout; False: silent).
    """
    path = Path(path)
    module, ckpt = load_for_calibration(path, dtype=dtype)
    lay = formats.layout(ckpt)
    nv = {n: canonical_name(n) for n, e in lay.items() if e.kind == formats.NVFP4}
    if not nv:
        raise CalibrationError(f"{path}: no NVFP4 weights, nothing to calibrate")
    batches = calibration_batches(data, tokenizer_path=path, batch_size=batch_size, seq_len=seq_len,
                                  max_batches=max_batches)
    vocab = module.config.vocab_size
    for b in batches:
        if b.min() < 0 or b.max() >= vocab:
            raise CalibrationError(f"calibration token id {int(b.max() if b.max() >= vocab else b.min())} is "
                                   f"outside the vocabulary [0, {vocab})")
    observed = collect_amax(module, batches, progress=progress)
    del module
    amax, notes = amax_for_modules(nv, observed)

    updates: dict[str, np.ndarray] = {}
    rows, scales, old = [], {}, {}
    for name, c in nv.items():
        e = lay[name]
        t, value = input_scale_value(e.module, amax[name], convention=e.convention)
        if t in ckpt:
            value = value.reshape(ckpt.shape(t))
        v = np.float32(value.reshape(-1)[0])
        g = float(v if e.convention == formats.MODELOPT else np.float32(1) / v)
        prev = formats.global_scale(ckpt, e, "input_scale")
        old[name] = None if prev is None else float(np.max(prev))
        scales[name] = g
        rows.append((name, c, old[name], g))
        updates[t] = value
    table, off = _table(rows, warn_ratio)
    if file is not False:
        print(f"activation scales of {path} ({sum(b.size for b in batches)} calibration tokens):", file=file)
        print(table, file=file)
        for n in notes:
            print("note: " + n, file=file)
    if off:
        warnings.warn(f"{len(off)} activation scale(s) in {path} were off by more than {warn_ratio:g}x, e.g. "
                      f"{off[0]!r}; replaced by calibrated values", stacklevel=2)
    config, hf_quant = _declare_static_activations(ckpt)
    ckpt.close()
    written = writer.update_checkpoint(path, updates, config=config, hf_quant_config=hf_quant, dst=out)
    if check:
        from megamoe_jax.api import load
        check_finite(load(written, dtype=dtype), batches[0])
    return CalibrationResult(written, scales, old, table, off, int(sum(b.size for b in batches)))


def _declare_static_activations(ckpt) -> tuple[dict | None, dict | None]:
    """The config (and ModelOpt hf_quant_config) updated to promise static NVFP4 activation scales."""
    config = dict(ckpt.config)
    qc = dict(config.get("quantization_config") or {})
    hf = ckpt.hf_quant_config
    method = formats.quantization_info(ckpt)["method"]
    if method == "compressed-tensors":
        groups = {}
        for k, g in (qc.get("config_groups") or {}).items():
            g = dict(g)
            if (g.get("format") or qc.get("format")) == "nvfp4-pack-quantized" and not g.get("input_activations"):
                w = dict(g.get("weights") or {})
                g["input_activations"] = {**w, "dynamic": "local", "observer": "static_minmax",
                                          "actorder": None, "block_structure": None}
            groups[k] = g
        qc["config_groups"] = groups
        config["quantization_config"] = qc
        return config, None
    if method in ("modelopt", "modelopt_fp4"):
        if qc:
            qc["quant_algo"] = "NVFP4" if qc.get("quant_algo") in (None, "W4A16_NVFP4", "NVFP4") else qc["quant_algo"]
            for g in (qc.get("config_groups") or {}).values():
                if "weights" in g and not g.get("input_activations"):
                    g["input_activations"] = dict(g["weights"])
            config["quantization_config"] = qc
        if hf is not None:
            hf = {**hf, "quantization": {**hf.get("quantization", {}), "quant_algo": "NVFP4"}}
        return config, hf
    return None, None
