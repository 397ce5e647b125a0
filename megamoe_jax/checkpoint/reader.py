"""Open a safetensors checkpoint directory (single file or sharded with an index) without loading it.

`open_checkpoint(path)` returns a `CheckpointFiles`: the parsed config.json (and ModelOpt's hf_quant_config.json),
the tensor-name -> shard map, and memory-mapped access to one tensor at a time. Every shard header is parsed and
checked against the file size at open, so a truncated/corrupt shard or an index that disagrees with its shards is
reported (file and tensor named) before any weight is read. Format decoding (FP8 / MXFP4 / NVFP4 companions) and
name normalisation are layered on top of this in `formats.py` and `names.py`.

Memory: `get` returns a read-only view into the shard's memory map; nothing is copied until the caller converts or
places it on a device. `iter_tensors` streams in file order and unmaps each shard once it has been consumed, so host
memory stays near one shard plus what the caller keeps.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from megamoe_jax.checkpoint.safetensors_io import Header, MappedFile, SafetensorsError, read_header

INDEX_NAME = "model.safetensors.index.json"
MODELOPT_CONFIG_NAME = "hf_quant_config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or inconsistent; the message names the file and tensor."""


@dataclass
class CheckpointFiles:
    path: Path
    config: dict
    shard_of: dict[str, Path]                      # tensor name -> shard file
    headers: dict[Path, Header] = field(default_factory=dict, repr=False)
    hf_quant_config: dict | None = None            # ModelOpt's hf_quant_config.json, when present
    _maps: dict[Path, MappedFile] = field(default_factory=dict, repr=False)

    def keys(self) -> list[str]:
        return sorted(self.shard_of)

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def _info(self, name: str):
        shard = self._shard(name)
        return self._header(shard).tensors[name]

    def _header(self, shard: Path) -> Header:
        h = self.headers.get(shard)
        if h is None:
            h = self.headers[shard] = _read_header(shard)
        return h

    def dtype(self, name: str) -> str:
        """The safetensors dtype string ("BF16", "F32", "F8_E4M3", "F8_E8M0", "U8", "I8", ...)."""
        return self._info(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def nbytes(self, name: str) -> int:
        return self._info(name).nbytes

    def file_of(self, name: str) -> Path:
        return self._shard(name)

    def get(self, name: str) -> np.ndarray:
        """Read-only, memory-mapped view of one tensor (F8_E8M0 comes back as its raw uint8 exponent bytes)."""
        shard = self._shard(name)
        m = self._maps.get(shard)
        if m is None:
            try:
                m = self._maps[shard] = MappedFile(self._header(shard))
            except OSError as e:
                raise CheckpointError(f"{shard}: cannot memory-map ({e})") from e
        return m.array(name)

    def release(self, shard: Path | None = None) -> None:
        """Drop the memory map of one shard (all when None); arrays still referenced stay valid."""
        if shard is None:
            self._maps.clear()
        else:
            self._maps.pop(shard, None)

    def iter_tensors(self, names: Iterable[str] | None = None, *, progress: bool | None = None,
                     desc: str = "reading") -> Iterator[tuple[str, np.ndarray]]:
        """Yield (name, array) in storage order (shard by shard, by offset), unmapping each finished shard."""
        names = self.keys() if names is None else list(names)
        order = sorted(names, key=lambda n: (str(self._shard(n)), self._info(n).begin))
        bar = progress_bar(sum(self.nbytes(n) for n in order), desc, progress)
        current = None
        try:
            for name in order:
                shard = self._shard(name)
                if current is not None and shard != current:
                    self.release(current)
                current = shard
                yield name, self.get(name)
                bar.update(self.nbytes(name))
        finally:
            bar.close()
            if current is not None:
                self.release(current)

    def _shard(self, name: str) -> Path:
        try:
            return self.shard_of[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint") from None

    def extra_files(self) -> list[Path]:
        """Files besides the weights, index and configs (tokenizer, generation config, ...), for writers to copy."""
        skip = {INDEX_NAME, "config.json", MODELOPT_CONFIG_NAME} | {p.name for p in set(self.shard_of.values())}
        return sorted(p for p in self.path.iterdir() if p.is_file() and p.name not in skip
                      and not p.name.endswith(".safetensors") and not p.name.startswith("."))

    def close(self) -> None:
        self._maps.clear()


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str, enabled: bool | None):
    """A tqdm byte counter on stderr; `enabled=None` shows it only on an interactive terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _read_header(shard: Path) -> Header:
    try:
        return read_header(shard)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def open_checkpoint(path: str | os.PathLike) -> CheckpointFiles:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing config.json")
    config = _read_json(cfg_file)
    mo_file = path / MODELOPT_CONFIG_NAME
    hf_quant_config = _read_json(mo_file) if mo_file.is_file() else None

    index = path / INDEX_NAME
    shard_of: dict[str, Path] = {}
    headers: dict[Path, Header] = {}
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map' object)")
        for name, fname in weight_map.items():
            shard = path / fname
            if shard not in headers:
                if not shard.is_file():
                    raise CheckpointError(f"{index}: tensor {name!r} points at missing shard {fname}")
                headers[shard] = _read_header(shard)
            if name not in headers[shard].tensors:
                raise CheckpointError(f"{index}: tensor {name!r} is listed in {fname}, but that shard has no such "
                                      f"tensor")
            shard_of[name] = shard
        for shard, h in headers.items():
            extra = sorted(set(h.tensors) - {n for n, s in shard_of.items() if s == shard})
            if extra:
                raise CheckpointError(f"{shard}: tensor {extra[0]!r} (and {len(extra) - 1} more) is in the shard but "
                                      f"not in {INDEX_NAME}")
    else:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_NAME}")
        for shard in shards:
            headers[shard] = h = _read_header(shard)
            for name in h.tensors:
                if name in shard_of:
                    raise CheckpointError(f"{shard}: tensor {name!r} also in {shard_of[name].name}")
                shard_of[name] = shard
    return CheckpointFiles(path=path, config=config, shard_of=shard_of, headers=headers,
                           hf_quant_config=hf_quant_config)
