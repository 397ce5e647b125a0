"""Scale validation: the guard against the seed bug (an activation scale read in the wrong convention).

Both checkpoint conventions are normalised once (formats.global_scale) to the dequant factor g = amax / 2688
(nvfp4_format.md §2). Then, for every NVFP4 module:
  * weight and input global scales must be finite and positive;
  * plausible: the implied amax 2688*g lies within [1e-4, 1e4]. A value read in the wrong convention (a dequant
    factor stored where a multiplier belongs, or the reverse) implies an amax near 1e7 or 1e-8; when the other
    reading is plausible the issue says so;
  * the largest block scale of the weights that share one global scale (fused q/kv, gate/up shards carry the same
    stored value) is near 448, or 256 for ModelOpt's four-over-six recipe (nvfp4_format.md §2, §5 item 1).
Bad activation scales are "repairable" (calibration recomputes them); bad weight scales are not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from megamoe_jax.checkpoint import formats
from megamoe_jax.checkpoint.reader import CheckpointFiles

FP4_MAX, E4M3_MAX, FOUR_OVER_SIX_MAX = 6.0, 448.0, 256.0
AMAX = FP4_MAX * E4M3_MAX                        # 2688: g = amax / AMAX
AMAX_RANGE = (1e-4, 1e4)
BLOCK_MAX_RANGE = (0.5 * E4M3_MAX, E4M3_MAX)     # contains 256 (four-over-six) and 416/448 (bf16-rounded G)


class ScaleError(ValueError):
    """Global scales that cannot be right; `.issues` lists every one (tensor names included)."""

    def __init__(self, message: str, issues: list["ScaleIssue"]):
        super().__init__(message)
        self.issues = issues


@dataclass(frozen=True)
class ScaleIssue:
    weight: str          # logical weight name ("<module>.weight")
    tensor: str          # the stored tensor at fault
    file: str
    role: str            # "weight global scale" | "input scale" | "block scales"
    problem: str         # short cause
    stored: float        # the value as stored in the file (largest block scale for "block scales")
    message: str

    @property
    def repairable(self) -> bool:
        return self.role == "input scale"

    def __str__(self) -> str:
        return self.message


@dataclass
class ScaleReport:
    checked: int = 0                                       # NVFP4 modules checked
    issues: list[ScaleIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues

    def __str__(self) -> str:
        if self.ok:
            return f"scales: {self.checked} NVFP4 modules checked, all plausible"
        lines = [f"scales: {len(self.issues)} problem(s) in {self.checked} NVFP4 modules:"]
        lines += ["  " + i.message for i in self.issues[:20]]
        if len(self.issues) > 20:
            lines.append(f"  ... and {len(self.issues) - 20} more")
        return "\n".join(lines)

    def raise_if_bad(self, *, allow_repairable: bool = False) -> None:
        bad = [i for i in self.issues if not (allow_repairable and i.repairable)]
        if not bad:
            return
        msg = str(ScaleReport(self.checked, bad))
        if any(i.repairable for i in bad):
            msg += ("\nActivation scales can be recomputed from data: megamoe_jax.calibrate.calibrate(path, data) "
                    "(CLI: megamoe calibrate PATH DATA)")
        raise ScaleError(msg, bad)


def implied_amax(g) -> np.ndarray:
    return np.float64(AMAX) * np.asarray(g, np.float64)


def check_global_scale(g, *, stored, convention: str, weight: str, tensor: str, file: str,
                       role: str) -> list[ScaleIssue]:
    """Checks one normalised global scale g (any shape) whose stored value(s) are `stored`."""
    g = np.asarray(g, np.float64).reshape(-1)
    stored = np.asarray(stored, np.float64).reshape(-1)
    lo, hi = AMAX_RANGE
    out = []
    for i in range(g.size):
        gi, si = g[i], stored[i]
        where = f"{tensor}" + (f"[{i}]" if g.size > 1 else "")
        if not np.isfinite(gi) or not np.isfinite(si):
            problem, detail = "not finite", ""
        elif gi <= 0:
            problem, detail = "not positive", ""
        else:
            amax = AMAX * gi
            if lo <= amax <= hi:
                continue
            # The other convention's reading of the same stored number.
            other = AMAX * (si if convention == formats.CT else 1.0 / si)
            if lo <= other <= hi:
                what = ("a dequant factor (amax/2688) stored where compressed-tensors expects the multiplier "
                        "2688/amax" if convention == formats.CT else
                        "a multiplier (2688/amax) stored where ModelOpt expects the dequant factor amax/2688")
                problem = "wrong convention"
                detail = f"; implied amax {amax:.3g} is implausible, read the other way it is {other:.4g}: {what}"
            else:
                problem = "implausible"
                detail = f"; implied amax {amax:.3g} outside [{lo:g}, {hi:g}]"
        out.append(ScaleIssue(weight, tensor, file, role, problem, float(si),
                              f"{file}: {where} ({role}, {convention}) = {si:.6g}: {problem}{detail}"))
    return out


def scale_report(ckpt: CheckpointFiles, *, block_scales: bool = True) -> ScaleReport:
    """Validate every NVFP4 module's global scales (and, with block_scales, the block-scale normalisation)."""
    report = ScaleReport()
    groups: dict[tuple[str, bytes], list[tuple[formats.Entry, float]]] = {}
    for name, e in formats.layout(ckpt).items():
        if e.kind != formats.NVFP4:
            continue
        report.checked += 1
        for role, label in (("global_scale", "weight global scale"), ("input_scale", "input scale")):
            t = e.parts.get(role)
            if t is None:
                continue
            report.issues += check_global_scale(formats.global_scale(ckpt, e, role), stored=ckpt.get(t),
                                                convention=e.convention, weight=name, tensor=t,
                                                file=str(ckpt.file_of(t)), role=label)
        if block_scales:
            bs = ckpt.get(e.parts["block_scale"])
            g = np.asarray(formats.global_scale(ckpt, e), np.float32)
            if g.size > 1:          # per-expert global scales: each expert is its own group
                per = bs.reshape(bs.shape[0], -1)
                for i, gi in enumerate(g.reshape(-1)):
                    groups.setdefault((f"{name}[{i}]", gi.tobytes()), []).append((e, block_scale_max(per[i])))
            else:
                # Shards of one fused GEMM share a stored global scale: group by (layer prefix, value bits).
                layer = _layer_prefix(e.module)
                groups.setdefault((layer, g.reshape(-1)[0].tobytes()), []).append((e, block_scale_max(bs)))
    lo, hi = BLOCK_MAX_RANGE
    for members in groups.values():
        top = max(m for _, m in members)
        if lo <= top <= hi:
            continue
        e, _ = max(members, key=lambda em: em[1])
        if top == 0 or _all_zero_codes(ckpt, e):
            continue                # an all-zero weight has no scale to normalise; its stored filler is arbitrary
        t = e.parts["block_scale"]
        shared = f" (largest over {len(members)} tensors sharing this global scale)" if len(members) > 1 else ""
        problem = "NaN or negative" if not np.isfinite(top) else "block scales not normalised"
        report.issues.append(ScaleIssue(
            e.name, t, str(ckpt.file_of(t)), "block scales", problem, top,
            f"{ckpt.file_of(t)}: {t} (block scales): largest block scale {top:g}{shared}, expected about 448 (or "
            f"256 for four-over-six): the block scales do not belong to the global scale "
            f"{e.parts['global_scale']!r}"))
    return report


def block_scale_max(bs) -> float:
    """Largest E4M3 block scale, NaN if any scale is NaN or negative. Works on the raw bytes: a non-negative E4M3
    value orders like its byte, so this is one fast uint8 max over what may be gigabytes of scales."""
    b = np.asarray(bs).view(np.uint8).reshape(-1)
    if b.size == 0:
        return 0.0
    top = int(b.max())
    if top >= 0x80:                         # sign bits: -0 (0x80) is harmless, anything above is not
        if np.any(b > 0x80):
            return float("nan")
        top = int(np.max(b & 0x7F))
    if top == 0x7F:                         # E4M3's NaN
        return float("nan")
    return float(np.array(top, np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32))


def _layer_prefix(module: str) -> str:
    parts = module.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "mtp") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return ""


def _all_zero_codes(ckpt: CheckpointFiles, e: formats.Entry) -> bool:
    codes = np.asarray(ckpt.get(e.parts["weight"])).view(np.uint8)
    return not np.any(codes & 0x77)            # magnitude bits of both nibbles
