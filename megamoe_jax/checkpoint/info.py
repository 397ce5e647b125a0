"""`describe(path)`: what a checkpoint holds (formats, conventions, declared quantization, scale health), without
loading any weight beyond the scale tensors. This is what `megamoe info PATH` prints."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from megamoe_jax.checkpoint import formats, validate
from megamoe_jax.checkpoint.reader import open_checkpoint


@dataclass
class CheckpointInfo:
    path: str
    shards: int
    total_bytes: int
    tensors: int
    weights: int                                       # logical weights (companions folded)
    kinds: dict[str, int] = field(default_factory=dict)   # "nvfp4 (compressed-tensors)" -> count
    quantization: dict = field(default_factory=dict)       # formats.quantization_info
    w4a4: int = 0                                      # NVFP4 weights with an activation scale
    scales: validate.ScaleReport | None = None

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.tensors} tensors in {self.shards} shard(s), {self.total_bytes / 2**20:.1f} MiB",
                 f"  declared quantization: {self.quantization.get('method') or 'none'}"
                 + (f", format {self.quantization['format']}" if self.quantization.get("format") else "")]
        lines.append(f"  {self.weights} weights:")
        for k, n in sorted(self.kinds.items()):
            lines.append(f"    {n:6d}  {k}")
        nv = sum(n for k, n in self.kinds.items() if k.startswith("nvfp4"))
        if nv:
            lines.append(f"  NVFP4: {self.w4a4} of {nv} with activation scales "
                         f"({'W4A4' if self.w4a4 == nv else 'W4A16' if self.w4a4 == 0 else 'mixed'})")
        if self.scales is not None:
            lines += ["  " + line for line in str(self.scales).splitlines()]
        return "\n".join(lines)


def describe(path: str | os.PathLike, *, block_scales: bool = True) -> CheckpointInfo:
    """Summarise checkpoint `path`. Raises CheckpointError for a corrupt/inconsistent checkpoint (the same errors
    a load would give); scale problems are reported in `.scales`, not raised."""
    ck = open_checkpoint(path)
    lay = formats.layout(ck)
    kinds = Counter(e.kind + (f" ({e.convention})" if e.convention else "") for e in lay.values())
    info = CheckpointInfo(
        path=str(path), shards=len(ck.headers), total_bytes=sum(os.path.getsize(p) for p in ck.headers),
        tensors=len(ck.keys()), weights=len(lay), kinds=dict(kinds), quantization=formats.quantization_info(ck),
        w4a4=sum(1 for e in lay.values() if e.kind == formats.NVFP4 and "input_scale" in e.parts))
    if any(e.kind == formats.NVFP4 for e in lay.values()):
        info.scales = validate.scale_report(ck, block_scales=block_scales)
    ck.close()
    return info
