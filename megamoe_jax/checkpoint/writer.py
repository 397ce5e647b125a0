"""Atomic, sharded safetensors checkpoint writer, and the tensor encodings of each convention.

`CheckpointWriter(dst)` writes into a hidden temporary directory next to `dst` and only `commit()` moves it into
place (one rename; an existing `dst` is first renamed aside and removed only after the swap succeeded). Any
exception before that removes the temporary directory: a failure never leaves a half-written checkpoint and never
loses the previous one.

Encodings (`encode_weight`) map a decoded weight back to file tensors:
  compressed-tensors NVFP4: <m>.weight_packed U8, <m>.weight_scale F8_E4M3, <m>.weight_global_scale F32[1] = 1/g,
                            <m>.input_global_scale F32[1] = 1/g_a
  ModelOpt NVFP4:           <m>.weight U8, <m>.weight_scale F8_E4M3, <m>.weight_scale_2 F32[] = g, <m>.input_scale
  DeepSeek FP8 / MXFP4:     <m>.weight F8_E4M3 / I8 + <m>.scale F8_E8M0 (F32 when a scale is not a power of two)
  compressed-tensors FP8 block / MXFP4: <m>.weight + <m>.weight_scale F32, <m>.weight_packed + <m>.weight_scale U8
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import ml_dtypes
import numpy as np

from megamoe_jax.checkpoint.reader import INDEX_NAME, CheckpointError, progress_bar
from megamoe_jax.checkpoint.safetensors_io import write_file

DEFAULT_SHARD_BYTES = 5 * 1024 ** 3


class CheckpointWriter:
    """Collects tensors into shards of at most `max_shard_bytes` and publishes them atomically on `commit`."""

    def __init__(self, dst: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False, progress: bool | None = None):
        self.dst = Path(dst)
        if self.dst.exists() and not overwrite:
            raise CheckpointError(f"{self.dst}: already exists (pass overwrite=True to replace it)")
        if not self.dst.parent.is_dir():
            raise CheckpointError(f"{self.dst.parent}: destination's parent directory does not exist")
        self.max_shard_bytes = int(max_shard_bytes)
        self.tmp = self.dst.parent / f".{self.dst.name}.partial-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []      # (temp file name, tensor names)
        self._names: set[str] = set()
        self.total_bytes = 0
        self._bar = progress_bar(0, "writing", progress)
        self._done = False
        self._finished = False

    # -- tensors ---------------------------------------------------------------------------------------------
    def add(self, name: str, array) -> None:
        if self._done or self._finished:
            raise RuntimeError("writer already finished, committed or aborted")
        if name in self._names:
            raise CheckpointError(f"{self.dst}: tensor {name!r} written twice")
        a = np.asarray(array)
        self._names.add(name)
        if self._pending and self._pending_bytes + a.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = a
        self._pending_bytes += a.nbytes

    def add_all(self, tensors: dict[str, np.ndarray]) -> None:
        for k, v in tensors.items():
            self.add(k, v)

    def _flush(self) -> None:
        if not self._pending:
            return
        fname = f"shard-{len(self._shards):05d}.safetensors"
        n = write_file(self.tmp / fname, self._pending, {"format": "pt"})
        self.total_bytes += self._pending_bytes
        self._bar.update(n)
        self._shards.append((fname, sorted(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    # -- other files -----------------------------------------------------------------------------------------
    def write_json(self, filename: str, obj) -> None:
        (self.tmp / filename).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def copy_file(self, src: str | os.PathLike) -> None:
        shutil.copy2(src, self.tmp / Path(src).name)

    # -- publish ---------------------------------------------------------------------------------------------
    def commit(self, config: dict, *, hf_quant_config: dict | None = None) -> Path:
        """Finish the shards, write the index and config.json (and hf_quant_config.json), rename into place."""
        self.finish(config, hf_quant_config=hf_quant_config)
        return self.publish()

    def finish(self, config: dict, *, hf_quant_config: dict | None = None) -> Path:
        """Complete the checkpoint in the temporary directory (`self.tmp`, readable with open_checkpoint) without
        publishing it; `publish()` then moves it into place. Lets a caller post-process (calibrate) first."""
        try:
            self._flush()
            if not self._shards:
                raise CheckpointError(f"{self.dst}: no tensors written")
            files = self._final_names()
            weight_map = {}
            for (tmp_name, names), final in zip(self._shards, files):
                os.replace(self.tmp / tmp_name, self.tmp / final)
                weight_map.update({n: final for n in names})
            if len(files) > 1:
                self.write_json(INDEX_NAME, {"metadata": {"total_size": self.total_bytes},
                                             "weight_map": dict(sorted(weight_map.items()))})
            self.write_json("config.json", config)
            if hf_quant_config is not None:
                self.write_json("hf_quant_config.json", hf_quant_config)
        except BaseException:
            self.abort()
            raise
        finally:
            self._bar.close()
        self._finished = True
        return self.tmp

    def publish(self) -> Path:
        if not self._finished or self._done:
            raise RuntimeError("publish() needs finish() first (and only once)")
        try:
            _fsync_dir(self.tmp)
            replace_dir(self.tmp, self.dst)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.dst

    def _final_names(self) -> list[str]:
        n = len(self._shards)
        if n == 1:
            return ["model.safetensors"]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def abort(self) -> None:
        self._done = True
        self._pending = {}
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._done:
            self.abort()
        return False


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing an existing `dst` without ever losing it: the old one is renamed
    aside, restored if the move fails, and deleted only after the new one is in place."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- encodings ---------------------------------------------------------------------------------------------

def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _recip(x) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.float32(1.0) / _f32(x)


def nvfp4_tensors(module: str, packed, block_scale, g, g_input=None, *, convention: str) -> dict[str, np.ndarray]:
    """File tensors of one 2-D NVFP4 linear in `convention` ("compressed-tensors" | "modelopt")."""
    packed = np.asarray(packed).view(np.uint8)
    block_scale = np.asarray(block_scale)
    if block_scale.dtype != np.dtype(ml_dtypes.float8_e4m3fn):
        raise ValueError(f"{module}: NVFP4 block scale must be float8_e4m3fn, got {block_scale.dtype}")
    g = _f32(g)
    if g.size != 1:
        raise ValueError(f"{module}: expected one weight global scale, got shape {g.shape}")
    if convention == "compressed-tensors":
        out = {f"{module}.weight_packed": packed, f"{module}.weight_scale": block_scale,
               f"{module}.weight_global_scale": _recip(g).reshape(1)}
        if g_input is not None:
            out[f"{module}.input_global_scale"] = _recip(g_input).reshape(1)
    elif convention == "modelopt":
        out = {f"{module}.weight": packed, f"{module}.weight_scale": block_scale,
               f"{module}.weight_scale_2": g.reshape(())}
        if g_input is not None:
            out[f"{module}.input_scale"] = _f32(g_input).reshape(())
    else:
        raise ValueError(f"unknown convention {convention!r} (expected 'compressed-tensors' or 'modelopt')")
    return out


def fp8_block_tensors(module: str, weight, scale, *, convention: str) -> dict[str, np.ndarray]:
    """FP8 128x128-block weight: DeepSeek `.scale` (E8M0 when every scale is a power of two, else F32) or
    compressed-tensors `weight_scale` F32."""
    scale = _f32(scale)
    if convention == "compressed-tensors":
        return {f"{module}.weight": np.asarray(weight), f"{module}.weight_scale": scale}
    mant, exp = np.frexp(scale)
    if np.all(np.isfinite(scale)) and np.all(mant == 0.5) and np.all((exp - 1 >= -127) & (exp - 1 <= 127)):
        return {f"{module}.weight": np.asarray(weight),
                f"{module}.scale": (exp - 1 + 127).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)}
    return {f"{module}.weight": np.asarray(weight), f"{module}.scale": scale}


def mxfp4_tensors(module: str, packed, scale, *, convention: str) -> dict[str, np.ndarray]:
    packed = np.asarray(packed).view(np.uint8)
    scale = np.asarray(scale).view(np.uint8)
    if convention == "compressed-tensors":
        return {f"{module}.weight_packed": packed, f"{module}.weight_scale": scale}
    return {f"{module}.weight": packed.view(np.int8), f"{module}.scale": scale.view(ml_dtypes.float8_e8m0fnu)}


# ---- quantization_config blocks ----------------------------------------------------------------------------

def _ct_fp4_args(group_size: int, dynamic, observer: str, scale_dtype: str) -> dict:
    return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": group_size,
            "dynamic": dynamic, "actorder": None, "block_structure": None, "observer": observer,
            "observer_kwargs": {}, "scale_dtype": scale_dtype, "zp_dtype": scale_dtype}


def ct_quantization_config(*, nvfp4: list[str], nvfp4_activations: bool, fp8_block: list[str] = (),
                           mxfp4: list[str] = (), ignore: list[str] = ()) -> dict:
    """A compressed-tensors quantization_config whose groups name their modules exactly (targets are module
    names, so the config describes the file even where the model class is not a plain Linear)."""
    groups = {}
    if nvfp4:
        groups["group_0"] = {
            "targets": sorted(nvfp4), "format": "nvfp4-pack-quantized",
            "weights": _ct_fp4_args(16, False, "memoryless_minmax", "torch.float8_e4m3fn"),
            "input_activations": (_ct_fp4_args(16, "local", "static_minmax", "torch.float8_e4m3fn")
                                  if nvfp4_activations else None),
            "output_activations": None}
    if fp8_block:
        groups[f"group_{len(groups)}"] = {
            "targets": sorted(fp8_block), "format": "float-quantized",
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                        "block_structure": [128, 128], "dynamic": False, "group_size": None, "actorder": None,
                        "observer": "memoryless_minmax", "observer_kwargs": {}},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group",
                                  "group_size": 128, "dynamic": True, "observer": None, "observer_kwargs": {}},
            "output_activations": None}
    if mxfp4:
        groups[f"group_{len(groups)}"] = {
            "targets": sorted(mxfp4), "format": "mxfp4-pack-quantized",
            "weights": _ct_fp4_args(32, False, "memoryless_minmax", "torch.uint8") | {"strategy": "group"},
            "input_activations": None, "output_activations": None}
    formats = {g["format"] for g in groups.values()}
    return {"quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}, "ignore": sorted(ignore), "config_groups": groups}


def modelopt_configs(*, nvfp4_activations: bool, exclude: list[str]) -> tuple[dict, dict]:
    """(config.json quantization_config, hf_quant_config.json) for a ModelOpt NVFP4 checkpoint."""
    algo = "NVFP4" if nvfp4_activations else "W4A16_NVFP4"
    producer = {"name": "megamoe-jax", "version": "0.1.0"}
    hf = {"producer": producer, "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16,
                                                 "exclude_modules": sorted(exclude)}}
    fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    group = {"weights": fp4, "targets": ["Linear"]}
    if nvfp4_activations:
        group["input_activations"] = fp4
    qc = {"quant_method": "modelopt", "quant_algo": algo, "config_groups": {"group_0": group},
          "ignore": sorted(exclude), "kv_cache_scheme": None, "producer": producer}
    return qc, hf


# ---- in-place updates (calibration) ------------------------------------------------------------------------

def update_checkpoint(path: str | os.PathLike, tensors: dict[str, np.ndarray], *, config: dict | None = None,
                      hf_quant_config: dict | None = None, dst: str | os.PathLike | None = None,
                      new_shard: str = "model-calibration.safetensors") -> Path:
    """Replace and add tensors of a checkpoint, atomically.

    The updated checkpoint is assembled in a temporary directory: shards without a changed tensor are hard-linked
    (copied where links are impossible), shards holding a replaced tensor are rewritten, new tensors go to one new
    shard `new_shard` (and the index is created or extended); then it replaces `path` (or is published as `dst`)
    with `replace_dir`, so a failure at any point leaves the original untouched.
    """
    from megamoe_jax.checkpoint.reader import open_checkpoint
    path = Path(path)
    target = Path(dst) if dst is not None else path
    ckpt = open_checkpoint(path)
    if dst is not None and target.exists():
        raise CheckpointError(f"{target}: already exists")
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        new = {n: v for n, v in tensors.items() if n not in ckpt}
        changed = {n: v for n, v in tensors.items() if n in ckpt}
        weight_map = {n: s.name for n, s in ckpt.shard_of.items()}
        for shard, header in ckpt.headers.items():
            hit = [n for n in header.tensors if n in changed]
            if not hit:
                _link_or_copy(shard, tmp / shard.name)
                continue
            content = {n: (changed[n] if n in changed else stored_array(ckpt, n)) for n in header.tensors}
            write_file(tmp / shard.name, content, header.metadata or {"format": "pt"})
            ckpt.release(shard)
        if new:
            name = new_shard
            while (path / name).exists() or name in set(weight_map.values()):
                name = f"model-calibration-{uuid.uuid4().hex[:6]}.safetensors"
            write_file(tmp / name, new, {"format": "pt"})
            weight_map.update({n: name for n in new})
        if len(set(weight_map.values())) > 1:
            total = sum(os.path.getsize(tmp / f) for f in set(weight_map.values()))
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        for f in path.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_NAME \
                    and not f.name.startswith("."):
                _link_or_copy(f, tmp / f.name)
        if config is not None:
            _replace_json(tmp / "config.json", config)
        if hf_quant_config is not None:
            _replace_json(tmp / "hf_quant_config.json", hf_quant_config)
        ckpt.close()
        _fsync_dir(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def stored_array(ckpt, name: str) -> np.ndarray:
    """A tensor with the dtype it is stored with (the reader exposes F8_E8M0 as raw uint8 bytes)."""
    a = ckpt.get(name)
    return a.view(ml_dtypes.float8_e8m0fnu) if ckpt.dtype(name) == "F8_E8M0" else a


def _replace_json(file: Path, obj) -> None:
    if file.exists():
        file.unlink()                      # may be a hard link to the original: never write through it
    file.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
