"""Decode a checkpoint's tensors into weights: plain arrays or quantized pytrees from `megamoe_jax.quant`.

Contract used by the model's params builder:
  weight_names(ckpt) -> the logical weight names in the file's own naming: quantization companions (`.scale`,
                        `weight_scale`, `weight_scale_2`, `weight_global_scale`, `input_scale`, ...) are folded into
                        "<module>.weight"; every other tensor keeps its own name;
  read_weight(ckpt, name) -> np.ndarray (memory-mapped, read-only) or a quantized tensor for that name.

Each module's format is decided from tensor-name suffixes and dtypes only (never from values such as the block
scales of all-zero blocks, whose stored value is producer-specific):

  <m>.weight_packed U8 + <m>.weight_scale F8_E4M3 + <m>.weight_global_scale   compressed-tensors NVFP4  (g = 1/G)
      [+ <m>.input_global_scale]
  <m>.weight U8 + <m>.weight_scale F8_E4M3 + <m>.weight_scale_2               ModelOpt NVFP4            (g stored)
      [+ <m>.input_scale]
  <m>.weight_packed U8 + <m>.weight_scale U8/F8_E8M0                         compressed-tensors MXFP4
  <m>.weight I8/U8 + <m>.scale F8_E8M0/U8   (per 32 along K)                 DeepSeek MXFP4 experts
  <m>.weight F8_E4M3 + <m>.scale F8_E8M0/F32   (per 128x128)                 DeepSeek FP8 block (F32: "-Base")
  <m>.weight F8_E4M3 + <m>.weight_scale F32/BF16/F16 (per 128x128)           compressed-tensors FP8 block
  anything else (BF16 / F16 / F32 / ints)                                    plain tensor

Global scales are normalised here, once, to the dequant factor g (ModelOpt convention, see nvfp4_format.md §2),
and checked by `validate.py` before the first weight is returned (`scale_report`). A mixed file (NVFP4 experts,
FP8 attention, bf16 norms) simply yields a mix of tensor types.
"""
from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from megamoe_jax.checkpoint.reader import CheckpointError, CheckpointFiles

# Kinds of logical weights.
PLAIN, NVFP4, MXFP4, FP8_BLOCK = "plain", "nvfp4", "mxfp4", "fp8_block"
# Conventions (who wrote the companions).
CT, MODELOPT, DEEPSEEK = "compressed-tensors", "modelopt", "deepseek"

NVFP4_BLOCK, MXFP4_BLOCK, FP8_BLOCK_SIZE = 16, 32, 128

_COMPANIONS = ("weight_packed", "weight_scale", "weight_scale_2", "weight_global_scale", "input_scale",
               "input_global_scale", "scale", "weight_zero_point", "input_zero_point", "weight_shape")
_FLOATS = ("BF16", "F16", "F32", "F64")


@dataclass(frozen=True)
class Entry:
    """How one logical weight is stored: its kind, convention and the file tensors that make it up."""
    name: str                                   # logical name, "<module>.weight" for quantized modules
    kind: str                                   # PLAIN | NVFP4 | MXFP4 | FP8_BLOCK
    convention: str | None = None               # CT | MODELOPT | DEEPSEEK (None for plain)
    parts: dict[str, str] = field(default_factory=dict)   # role -> file tensor name
    # roles: "weight" (plain / packed / fp8 codes), "block_scale", "global_scale", "input_scale"

    @property
    def module(self) -> str:
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name


# ---- layout detection ------------------------------------------------------------------------------------

def layout(ckpt: CheckpointFiles) -> dict[str, Entry]:
    """logical name -> Entry for the whole checkpoint (cached on the CheckpointFiles)."""
    cached = getattr(ckpt, "_layout", None)
    if cached is None:
        cached = _detect(ckpt)
        _check_against_config(ckpt, cached)
        ckpt._layout = cached
    return cached


def _err(ckpt: CheckpointFiles, tensor: str, msg: str) -> CheckpointError:
    where = ckpt.file_of(tensor) if tensor in ckpt else ckpt.path
    return CheckpointError(f"{where}: tensor {tensor!r}: {msg}")


def _detect(ckpt: CheckpointFiles) -> dict[str, Entry]:
    names = set(ckpt.keys())
    by_module: dict[str, dict[str, str]] = {}
    for n in names:
        module, _, leaf = n.rpartition(".")
        if module and leaf in _COMPANIONS:
            by_module.setdefault(module, {})[leaf] = n
    out: dict[str, Entry] = {}
    claimed: set[str] = set()
    for module, comp in sorted(by_module.items()):
        wname = module + ".weight"
        has_w = wname in names
        if "weight_packed" in comp:
            if has_w:
                raise _err(ckpt, wname, f"both {module}.weight and {module}.weight_packed exist")
            e = _packed_entry(ckpt, module, comp)
        elif has_w and ckpt.dtype(wname) not in _FLOATS:
            e = _quant_weight_entry(ckpt, module, wname, comp)
        else:
            # A float weight (or none) with quantization companions other than a stray ".scale" parameter.
            stray = {k: v for k, v in comp.items() if k != "scale"}
            if stray:
                leaf, t = sorted(stray.items())[0]
                if has_w:
                    raise _err(ckpt, wname, f"is {ckpt.dtype(wname)} but has the quantization tensor {t!r}: a "
                                            f"quantized weight must be U8 (packed FP4) or F8_E4M3")
                raise _err(ckpt, t, f"quantization tensor without a weight ({wname!r} is missing)")
            if "scale" in comp and has_w:
                raise _err(ckpt, wname, f"is {ckpt.dtype(wname)} but has a block scale {comp['scale']!r}: "
                                        f"expected F8_E4M3 or packed FP4 (I8/U8)")
            continue                                        # e.g. "layers.0.attn_hc.scale": a plain parameter
        out[e.name] = e
        claimed.update(e.parts.values())
        unused = set(comp.values()) - claimed
        if unused:
            t = sorted(unused)[0]
            raise _err(ckpt, t, f"unexpected tensor for a {e.kind} ({e.convention}) weight of module {module!r}")
    for n in sorted(names - claimed):
        dt = ckpt.dtype(n)
        if dt in ("F8_E4M3", "F8_E5M2", "F8_E8M0") or (dt in ("U8", "I8") and n.endswith(".weight")):
            raise _err(ckpt, n, f"is {dt} but has no scale companion (expected {n.rpartition('.')[0]}.scale "
                                f"or .weight_scale)")
        out[n] = Entry(n, PLAIN, None, {"weight": n})
    return dict(sorted(out.items()))


def _packed_entry(ckpt, module, comp) -> Entry:
    packed = comp["weight_packed"]
    if ckpt.dtype(packed) != "U8":
        raise _err(ckpt, packed, f"weight_packed must be U8, found {ckpt.dtype(packed)}")
    if "weight_scale" not in comp:
        raise _err(ckpt, packed, f"missing {module}.weight_scale")
    bs = comp["weight_scale"]
    if ckpt.dtype(bs) == "F8_E4M3":
        if "weight_global_scale" not in comp:
            raise _err(ckpt, packed, f"NVFP4 weight without {module}.weight_global_scale")
        parts = {"weight": packed, "block_scale": bs, "global_scale": comp["weight_global_scale"]}
        if "input_global_scale" in comp:
            parts["input_scale"] = comp["input_global_scale"]
        e = Entry(module + ".weight", NVFP4, CT, parts)
    elif ckpt.dtype(bs) in ("U8", "F8_E8M0"):
        e = Entry(module + ".weight", MXFP4, CT, {"weight": packed, "block_scale": bs})
    else:
        raise _err(ckpt, bs, f"block scale of a packed FP4 weight must be F8_E4M3 (NVFP4) or U8/F8_E8M0 (MXFP4), "
                             f"found {ckpt.dtype(bs)}")
    _check_shapes(ckpt, e)
    return e


def _quant_weight_entry(ckpt, module, wname, comp) -> Entry:
    dt = ckpt.dtype(wname)
    if dt == "U8" and "weight_scale_2" in comp:
        if "weight_scale" not in comp:
            raise _err(ckpt, wname, f"ModelOpt NVFP4 weight without {module}.weight_scale")
        if ckpt.dtype(comp["weight_scale"]) != "F8_E4M3":
            raise _err(ckpt, comp["weight_scale"], f"NVFP4 block scale must be F8_E4M3, found "
                                                   f"{ckpt.dtype(comp['weight_scale'])}")
        parts = {"weight": wname, "block_scale": comp["weight_scale"], "global_scale": comp["weight_scale_2"]}
        if "input_scale" in comp:
            parts["input_scale"] = comp["input_scale"]
        e = Entry(wname, NVFP4, MODELOPT, parts)
    elif dt == "U8" and "weight_scale" in comp:
        raise _err(ckpt, wname, f"U8 (packed FP4) weight with {module}.weight_scale but no weight_scale_2 "
                                f"(ModelOpt NVFP4) global scale")
    elif dt in ("U8", "I8") and "scale" in comp:
        s = comp["scale"]
        if ckpt.dtype(s) not in ("F8_E8M0", "U8"):
            raise _err(ckpt, s, f"MXFP4 scale must be F8_E8M0, found {ckpt.dtype(s)}")
        e = Entry(wname, MXFP4, DEEPSEEK, {"weight": wname, "block_scale": s})
    elif dt == "F8_E4M3" and ("scale" in comp or "weight_scale" in comp):
        conv = DEEPSEEK if "scale" in comp else CT
        s = comp["scale" if conv == DEEPSEEK else "weight_scale"]
        if ckpt.dtype(s) not in ("F8_E8M0", "U8", "F32", "BF16", "F16"):
            raise _err(ckpt, s, f"FP8 block scale must be F8_E8M0 or a float, found {ckpt.dtype(s)}")
        e = Entry(wname, FP8_BLOCK, conv, {"weight": wname, "block_scale": s})
    else:
        raise _err(ckpt, wname, f"{dt} weight without a recognised scale companion "
                                f"(found {sorted(comp) or 'none'})")
    _check_shapes(ckpt, e)
    return e


def _check_shapes(ckpt, e: Entry) -> None:
    w = e.parts["weight"]
    ws = ckpt.shape(w)
    if len(ws) < 2:
        raise _err(ckpt, w, f"quantized weight must have at least 2 dims, has shape {list(ws)}")
    bs_name = e.parts["block_scale"]
    bs = ckpt.shape(bs_name)
    if e.kind in (NVFP4, MXFP4):
        group = NVFP4_BLOCK if e.kind == NVFP4 else MXFP4_BLOCK
        k = ws[-1] * 2
        want = ws[:-1] + (k // group,)
        if k % group or bs != want:
            raise _err(ckpt, bs_name, f"shape {list(bs)} does not match packed weight {w!r} {list(ws)} "
                                      f"(expected {list(want)}: one scale per {group} of K={k})")
    else:
        n, k = ws[-2], ws[-1]
        want = ws[:-2] + (-(-n // FP8_BLOCK_SIZE), -(-k // FP8_BLOCK_SIZE))
        if bs != want:
            raise _err(ckpt, bs_name, f"shape {list(bs)} does not match FP8 weight {w!r} {list(ws)} "
                                      f"(expected {list(want)}: one scale per 128x128 block)")
    for role in ("global_scale", "input_scale"):
        t = e.parts.get(role)
        if t is None:
            continue
        if ckpt.dtype(t) not in _FLOATS:
            raise _err(ckpt, t, f"{role.replace('_', ' ')} must be a float tensor, found {ckpt.dtype(t)}")
        s = ckpt.shape(t)
        size = int(np.prod(s, dtype=np.int64))
        lead = ws[:-2]
        if size != 1 and not (lead and tuple(d for d in s if d != 1) in (lead, ())) :
            raise _err(ckpt, t, f"shape {list(s)}: expected a single value per weight"
                                + (f" (or one per expert, {list(lead)})" if lead else ""))


# ---- config cross-checks ---------------------------------------------------------------------------------

def quantization_info(ckpt: CheckpointFiles) -> dict:
    """The checkpoint's declared quantization: {"method", "ignore", "activations"} from config.json /
    hf_quant_config.json (ModelOpt). "activations" is True (static input scales promised), False, or None."""
    qc = ckpt.config.get("quantization_config") or {}
    mo = (ckpt.hf_quant_config or {}).get("quantization") if ckpt.hf_quant_config else None
    method = qc.get("quant_method")
    if mo is not None and method is None:
        method = "modelopt"
    info = {"method": method, "ignore": [], "activations": None, "format": qc.get("format")}
    if method == "compressed-tensors":
        info["ignore"] = list(qc.get("ignore") or [])
        groups = qc.get("config_groups") or {}
        acts = [g.get("input_activations") for g in groups.values()
                if (g.get("format") or qc.get("format")) == "nvfp4-pack-quantized"]
        if acts:
            info["activations"] = any(a is not None and a.get("dynamic") in (False, "local") for a in acts)
    elif method in ("modelopt", "modelopt_fp4"):
        algo = (mo or qc).get("quant_algo")
        info["ignore"] = list((mo or {}).get("exclude_modules") or qc.get("ignore") or [])
        if algo == "NVFP4":
            info["activations"] = True
        elif algo in ("W4A16_NVFP4", "NVFP4_W4A16"):
            info["activations"] = False
    return info


def matches(module: str, patterns) -> bool:
    """compressed-tensors ignore semantics ("re:<regex>" or an exact module name / suffix) plus ModelOpt's
    fnmatch wildcards ("model.layers.*.mlp.gate")."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], module):
                return True
        elif any(c in p for c in "*?["):
            if fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module, p + ".*"):
                return True
        elif module == p or module.endswith("." + p):
            return True
    return False


def _check_against_config(ckpt: CheckpointFiles, entries: dict[str, Entry]) -> None:
    info = quantization_info(ckpt)
    quant = [e for e in entries.values() if e.kind != PLAIN]
    cfg_file = ckpt.path / "config.json"
    if not quant:
        if info["method"] in ("compressed-tensors", "modelopt", "modelopt_fp4"):
            raise CheckpointError(f"{cfg_file}: quantization_config declares {info['method']} but no tensor of the "
                                  f"checkpoint is quantized")
        return
    if info["method"] is None:
        e = quant[0]
        raise _err(ckpt, e.parts["weight"], f"is {e.kind} ({e.convention}) but {cfg_file.name} has no "
                                            f"quantization_config")
    nv = [e for e in quant if e.kind == NVFP4]
    if info["method"] == "compressed-tensors":
        wrong = [e for e in nv if e.convention != CT]
    elif info["method"] in ("modelopt", "modelopt_fp4"):
        wrong = [e for e in nv if e.convention != MODELOPT]
    elif info["method"] == "fp8":       # DeepSeek's own config; the fork's NVFP4 releases keep it
        wrong = []
    else:
        wrong = []
    if wrong:
        e = wrong[0]
        raise _err(ckpt, e.parts["global_scale"], f"{e.convention} NVFP4 tensors, but {cfg_file.name} declares "
                                                  f"quant_method {info['method']!r}")
    for e in nv:
        if info["ignore"] and matches(e.module, info["ignore"]):
            raise _err(ckpt, e.parts["weight"], f"module {e.module!r} is NVFP4 but the checkpoint's ignore list "
                                                f"excludes it from quantization")
    if info["activations"] is True:
        missing = [e for e in nv if "input_scale" not in e.parts]
        if missing:
            e = missing[0]
            suffix = "input_global_scale" if e.convention == CT else "input_scale"
            raise _err(ckpt, e.parts["weight"], f"{cfg_file.name} declares static NVFP4 activation scales but "
                                                f"{e.module}.{suffix} is missing ({len(missing)} modules)")
    elif info["activations"] is False:
        extra = [e for e in nv if "input_scale" in e.parts]
        if extra:
            e = extra[0]
            raise _err(ckpt, e.parts["input_scale"], f"{cfg_file.name} declares weight-only NVFP4 (no activation "
                                                     f"scales) but this activation scale is present")


# ---- public API ------------------------------------------------------------------------------------------

def weight_names(ckpt: CheckpointFiles) -> list[str]:
    return list(layout(ckpt))


def entry(ckpt: CheckpointFiles, name: str) -> Entry:
    try:
        return layout(ckpt)[name]
    except KeyError:
        raise CheckpointError(f"{ckpt.path}: no weight {name!r} in the checkpoint") from None


def global_scale(ckpt: CheckpointFiles, e: Entry, role: str = "global_scale") -> np.ndarray | None:
    """The normalised dequant factor g (float32) of an NVFP4 entry's weight or input global scale."""
    t = e.parts.get(role)
    if t is None:
        return None
    v = np.asarray(ckpt.get(t), np.float32)
    if e.convention == CT:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            v = np.float32(1.0) / v
    return v


def _weight_scale_shape(v: np.ndarray, lead: tuple[int, ...]) -> np.ndarray:
    """g as NVFP4Tensor.global_scale: packed.ndim-1 dims, each 1 or equal ([1] for a 2-D weight, [E, 1] per expert).

    Keeping the row dim (rather than a 0-d scalar) lets the params builder stack per-expert weights into the
    [E, 1] per-expert layout with a plain tree-wide stack."""
    if v.size == 1:
        return v.reshape((1,) * (len(lead) + 1))
    return v.reshape(lead + (1,))


def read_weight(ckpt: CheckpointFiles, name: str, *, activation_scales: str | None = None):
    """Decode one logical weight.

    activation_scales: "checkpoint" (default) attaches NVFP4 input scales (W4A4); "drop" returns every NVFP4
    weight without them (W4A16). The default can be set per checkpoint with `set_read_options`.
    Before the first weight is returned, the checkpoint's scales are validated (`validate.scale_report`).
    """
    opts = read_options(ckpt)
    activation_scales = activation_scales or opts["activation_scales"]
    e = entry(ckpt, name)
    if e.kind == PLAIN:
        return ckpt.get(e.parts["weight"])
    _ensure_validated(ckpt)
    from megamoe_jax import quant
    w = ckpt.get(e.parts["weight"])
    bs = ckpt.get(e.parts["block_scale"])
    if e.kind == NVFP4:
        lead = w.shape[:-2]
        g = _weight_scale_shape(global_scale(ckpt, e), lead)
        ga = gm = None
        if activation_scales == "checkpoint" and "input_scale" in e.parts and name not in opts["bad_input_scales"]:
            # (a scale refused by validation and left for calibration is dropped: the module runs W4A16)
            ga = global_scale(ckpt, e, "input_scale")
            shape = () if ga.size == 1 else lead
            ga = ga.reshape(shape)
            if e.convention == CT:      # the stored multiplier G_a itself, so W4A4 codes match CT / vLLM exactly
                gm = np.asarray(ckpt.get(e.parts["input_scale"]), np.float32).reshape(shape)
        return quant.NVFP4Tensor(w, bs, g, ga, gm)
    try:
        if e.kind == MXFP4:
            return quant.MXFP4Tensor(w.view(np.uint8), bs.view(np.uint8))
        # FP8 block: E8M0 exponent bytes, or the fp32 / bf16 scales of "-Base" and compressed-tensors.
        if ckpt.dtype(e.parts["block_scale"]) in ("F8_E8M0", "U8"):
            return quant.FP8BlockTensor.from_e8m0(w, bs)
        return quant.FP8BlockTensor.from_float(w, bs)
    except ValueError as err:
        raise _err(ckpt, e.parts["block_scale"], str(err)) from err


def iter_weights(ckpt: CheckpointFiles, names: list[str] | None = None, *, progress: bool | None = None,
                 **kw) -> Iterator[tuple[str, object]]:
    """Stream (logical name, weight) in storage order, unmapping each shard once it is consumed.

    Peak host memory is one shard's pages plus what the caller keeps, as long as the caller places each weight on
    its device (or drops it) before asking for the next.
    """
    from megamoe_jax.checkpoint.reader import progress_bar
    lay = layout(ckpt)
    names = list(lay) if names is None else names
    files = {n: [p for p in entry(ckpt, n).parts.values()] for n in names}
    order = sorted(names, key=lambda n: min((str(ckpt.file_of(t)), ckpt.headers[ckpt.file_of(t)].tensors[t].begin)
                                            for t in files[n]))
    bar = progress_bar(sum(ckpt.nbytes(t) for n in names for t in files[n]), "loading", progress)
    current = None
    try:
        for n in order:
            shard = ckpt.file_of(files[n][0])
            if current is not None and shard != current:
                ckpt.release(current)
            current = shard
            yield n, read_weight(ckpt, n, **kw)
            bar.update(sum(ckpt.nbytes(t) for t in files[n]))
    finally:
        bar.close()
        ckpt.release()


# ---- per-checkpoint options and validation state ---------------------------------------------------------

def read_options(ckpt: CheckpointFiles) -> dict:
    opts = getattr(ckpt, "_read_options", None)
    if opts is None:
        opts = ckpt._read_options = {"activation_scales": "checkpoint", "bad_scales": "raise",
                                     "bad_input_scales": set()}
    return opts


def set_read_options(ckpt: CheckpointFiles, *, activation_scales: str | None = None,
                     bad_scales: str | None = None) -> CheckpointFiles:
    """activation_scales: "checkpoint" | "drop".
    bad_scales: "raise" (default) | "repair": wrong activation scales are reported as a warning and the affected
    modules run W4A16 until calibration rewrites them | "allow": reported, but used as stored (experiments: the
    saturating quantizer keeps the forward finite). Bad *weight* scales always raise."""
    opts = read_options(ckpt)
    if activation_scales is not None:
        if activation_scales not in ("checkpoint", "drop"):
            raise ValueError(f"activation_scales must be 'checkpoint' or 'drop', not {activation_scales!r}")
        opts["activation_scales"] = activation_scales
    if bad_scales is not None:
        if bad_scales not in ("raise", "repair", "allow"):
            raise ValueError(f"bad_scales must be 'raise', 'repair' or 'allow', not {bad_scales!r}")
        opts["bad_scales"] = bad_scales
        ckpt._scale_report = None
    return ckpt


def _ensure_validated(ckpt: CheckpointFiles) -> None:
    if getattr(ckpt, "_scale_report", None) is not None:
        return
    from megamoe_jax.checkpoint import validate
    report = validate.scale_report(ckpt)
    opts = read_options(ckpt)
    if opts["bad_scales"] in ("repair", "allow"):
        report.raise_if_bad(allow_repairable=True)
        if opts["bad_scales"] == "repair":
            opts["bad_input_scales"] = {i.weight for i in report.issues if i.repairable}
        if report.issues:
            warnings.warn(str(report), stacklevel=3)
    else:
        report.raise_if_bad()
    ckpt._scale_report = report
