"""Open a safetensors checkpoint directory (single file or sharded with an index) without loading it.

`open_checkpoint(path)` returns a `CheckpointFiles`: the parsed config.json, the tensor-name -> shard map,
and memory-mapped access to one tensor at a time. Format decoding (FP8 / MXFP4 / NVFP4 companions) and
name normalisation are layered on top of this in `formats.py` and `names.py`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or inconsistent; the message names the file and tensor."""


@dataclass
class CheckpointFiles:
    path: Path
    config: dict
    shard_of: dict[str, Path]                      # tensor name -> shard file
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)

    def keys(self) -> list[str]:
        return sorted(self.shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def _handle(self, shard: Path):
        h = self._handles.get(shard)
        if h is None:
            try:
                h = safe_open(str(shard), framework="np")
            except Exception as e:  # safetensors raises its own error types for truncated headers
                raise CheckpointError(f"{shard}: cannot read safetensors header ({e})") from e
            self._handles[shard] = h
        return h

    def dtype(self, name: str) -> str:
        return self._handle(self._shard(name)).get_slice(name).get_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._shard(name)).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        shard = self._shard(name)
        try:
            return self._handle(shard).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{shard}: tensor {name!r} cannot be read ({e})") from e

    def _shard(self, name: str) -> Path:
        try:
            return self.shard_of[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint") from None

    def close(self) -> None:
        self._handles.clear()


def open_checkpoint(path: str | os.PathLike) -> CheckpointFiles:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing config.json")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e

    index = path / "model.safetensors.index.json"
    shard_of: dict[str, Path] = {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        for name, fname in weight_map.items():
            shard = path / fname
            if not shard.is_file():
                raise CheckpointError(f"{index}: tensor {name!r} points at missing shard {fname}")
            shard_of[name] = shard
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
        for shard in shards:
            try:
                with safe_open(str(shard), framework="np") as h:
                    for name in h.keys():
                        if name in shard_of:
                            raise CheckpointError(f"{shard}: tensor {name!r} also in {shard_of[name].name}")
                        shard_of[name] = shard
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{shard}: cannot read safetensors header ({e})") from e
    return CheckpointFiles(path=path, config=config, shard_of=shard_of)
