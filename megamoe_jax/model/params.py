"""Fill a DeepSeek-V4 model from a checkpoint: canonical tensor name -> module attribute (bonsai style).

The model's attribute names are the DeepSeek-native names, so the map is a walk:
  "layers.3.attn.wq_a.weight"  -> model.layers[3].attn.wq_a     (a trailing ".weight" ends at a Param)
  "layers.3.ffn.gate.bias"     -> model.layers[3].ffn.gate.bias
  "hc_head_fn"                 -> model.hc_head_fn
with two expert rules:
  "layers.N.ffn.experts.E.w1.weight" (per expert)   -> row E of the stacked model.layers[N].ffn.experts.w1 [E, I, D]
  "layers.N.ffn.experts.w13.weight"  (HF stacked)   -> split into experts.w1 and experts.w3
The model is built abstractly (nnx.eval_shape, no memory), then filled layer by layer from
`checkpoint.formats.read_weight`, so quantized weights arrive as quant tensors and replace the abstract arrays
without the model branching on formats. Missing, unexpected, duplicated and misshapen tensors raise
CheckpointError naming the tensor and its file. `mtp.*` tensors (the multi-token-prediction block) are not part
of the main model and are skipped (reported in `LoadReport.skipped`).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megamoe_jax.checkpoint import formats
from megamoe_jax.checkpoint.names import canonical_name, expert_of, is_mtp, layer_of
from megamoe_jax.checkpoint.reader import CheckpointError, CheckpointFiles
from megamoe_jax.model.config import ModelConfig
from megamoe_jax.model.model import DeepseekV4


@dataclasses.dataclass
class LoadReport:
    loaded: list[str]                 # canonical names filled into the model
    skipped: list[str]                # canonical names present in the file but deliberately not loaded (mtp.*)


def abstract_model(cfg: ModelConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16) -> DeepseekV4:
    """The model with ShapeDtypeStruct parameters (no memory, no random init)."""
    return nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))


def resolve(model: nnx.Module, canonical: str) -> nnx.Variable:
    """The Param a canonical name denotes; KeyError when the model has no such tensor."""
    obj: Any = model
    comps = canonical.split(".")
    for i, c in enumerate(comps):
        if isinstance(obj, nnx.Variable):
            if comps[i:] == ["weight"]:
                return obj
            raise KeyError(canonical)
        if c.isdigit() and isinstance(obj, (list, tuple, nnx.List)):
            k = int(c)
            if k >= len(obj):
                raise KeyError(canonical)
            obj = obj[k]
        else:
            obj = getattr(obj, c, None)
            if obj is None or not isinstance(obj, (nnx.Module, nnx.Variable, nnx.List, list, tuple)):
                raise KeyError(canonical)
    if isinstance(obj, nnx.Variable):
        return obj
    raise KeyError(canonical)


def _logical_shape(w) -> tuple[int, ...]:
    return tuple(w.shape)


def _is_quant(w) -> bool:
    return not isinstance(w, (np.ndarray, jax.Array)) and hasattr(w, "dequantize")


def _stack(ws: list) -> Any:
    """Stack per-expert weights along a new leading axis (plain arrays or quant tensors of one type)."""
    if not _is_quant(ws[0]):
        return np.stack([np.asarray(w) for w in ws])
    cls = type(ws[0])
    if any(type(w) is not cls for w in ws):
        raise CheckpointError(f"experts mix weight formats: {sorted({type(w).__name__ for w in ws})}")
    if hasattr(cls, "stack"):            # lets a format lift per-expert scalar scales to [E, 1, ...]
        return cls.stack(ws)
    try:
        # formats.read_weight gives per-expert global scales shape [1] so that this stacks to [E, 1]
        return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *ws)
    except ValueError as e:              # e.g. some experts W4A4 (input scale), others W4A16
        raise CheckpointError(f"experts of one projection differ in their quantization fields ({e})") from None


def _convert(value, like: jax.ShapeDtypeStruct, name: str, where: str, put: Callable):
    """Check a checkpoint value against the abstract param and place it on device in the param's dtype."""
    shape = _logical_shape(value)
    if shape != tuple(like.shape):
        raise CheckpointError(f"{where}: tensor {name!r} has shape {shape}, the model expects {tuple(like.shape)}")
    if _is_quant(value):
        if not jnp.issubdtype(like.dtype, jnp.floating):
            raise CheckpointError(f"{where}: tensor {name!r} is quantized but the model expects {like.dtype}")
        if isinstance(put, _BoundPlacer):
            return put(value, None)
        return jax.tree.map(lambda a: put(jnp.asarray(a)), value)
    arr = np.asarray(value)
    if jnp.issubdtype(like.dtype, jnp.integer):
        if not np.issubdtype(arr.dtype, np.integer):
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {arr.dtype}, expected an integer table")
    elif not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == jnp.bfloat16):
        raise CheckpointError(f"{where}: tensor {name!r} has dtype {arr.dtype}, expected floating point "
                              "(or a quantized format known to megamoe_jax.checkpoint.formats)")
    if isinstance(put, _BoundPlacer):
        return put(arr, like.dtype)
    return put(jnp.asarray(arr).astype(like.dtype))


class _BoundPlacer:
    """`load_params(place=...)` for one Param: place(param_path, host_value, dtype) gets the checkpoint value still
    on the host (numpy / memory map, or a quant tensor of them), so it can cut each device's shard itself."""

    def __init__(self, place: Callable, path: str):
        self.place, self.path = place, path

    def __call__(self, value, dtype):
        return self.place(self.path, value, dtype)


class _Placer:
    def __init__(self, place: Callable, paths: dict[int, str]):
        self.place, self.paths = place, paths

    def bind(self, var: nnx.Variable) -> _BoundPlacer:
        return _BoundPlacer(self.place, self.paths[id(var)])


def load_params(model: DeepseekV4, ckpt: CheckpointFiles, *, put: Callable = jax.device_put,
                place: Callable | None = None, progress: bool = False) -> LoadReport:
    """Fill every Param of `model` (usually `abstract_model(...)`) from `ckpt`, one layer at a time.

    `place(param_path, host_value, dtype)`, when given, replaces `put` (sharded loading, see
    megamoe_jax.sharding.place_weight): it receives each value on the host with the Param's path, e.g.
    "layers.3.attn.wq_b", and the dtype for plain weights (None for quantized ones)."""
    cfg = model.config
    if place is not None:
        put = _Placer(place, {id(v): p for p, v in _params(model)})    # bound to each Param in _fill
    by_canonical: dict[str, str] = {}
    skipped: list[str] = []
    for fname in formats.weight_names(ckpt):
        c = canonical_name(fname)
        if is_mtp(c):
            skipped.append(c)
            continue
        if c in by_canonical:
            raise CheckpointError(f"{ckpt.path}: tensors {by_canonical[c]!r} and {fname!r} both map to {c!r}")
        by_canonical[c] = fname

    def where(fname: str) -> str:
        return str(ckpt.shard_of.get(fname, ckpt.path))

    # Group by main layer (None = top level) so host memory holds about one layer at a time.
    groups: dict[int | None, list[str]] = defaultdict(list)
    for c in by_canonical:
        groups[layer_of(c)].append(c)
    for layer in groups:
        if layer is not None and layer >= cfg.num_hidden_layers:
            bad = sorted(groups[layer])[0]
            raise CheckpointError(f"{where(by_canonical[bad])}: unexpected tensor {by_canonical[bad]!r}: "
                                  f"layer {layer} >= num_hidden_layers={cfg.num_hidden_layers}")

    filled: set[int] = set()
    loaded: list[str] = []
    order = sorted(groups, key=lambda k: -1 if k is None else k)
    it = order
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(order, desc="loading layers", unit="layer")
    for layer in it:
        experts: dict[tuple[int, str], dict[int, str]] = defaultdict(dict)
        for c in sorted(groups[layer]):
            fname = by_canonical[c]
            ex = expert_of(c)
            if ex is not None:
                experts[(ex[0], ex[2])][ex[1]] = c
                continue
            if c.endswith(".ffn.experts.w13.weight"):
                _fill_w13(model, c, fname, ckpt, where(fname), put, filled)
                loaded.append(c)
                continue
            try:
                var = resolve(model, c)
            except KeyError:
                raise CheckpointError(f"{where(fname)}: unexpected tensor {fname!r} (as {c!r}): the model "
                                      f"({_describe(cfg)}) has no such parameter") from None
            value = formats.read_weight(ckpt, fname)
            if c.endswith(".ffn.gate.tid2eid"):
                _check_tid2eid(value, cfg.n_routed_experts, fname, where(fname))
            _fill(var, value, fname, where(fname), put, filled)
            loaded.append(c)
        for (li, proj), per_expert in sorted(experts.items()):
            var = resolve(model, f"layers.{li}.ffn.experts.{proj}.weight")
            n = cfg.n_routed_experts
            missing = [e for e in range(n) if e not in per_expert]
            extra = sorted(e for e in per_expert if e >= n)
            if extra:
                fname = by_canonical[per_expert[extra[0]]]
                raise CheckpointError(f"{where(fname)}: unexpected tensor {fname!r}: expert {extra[0]} >= "
                                      f"n_routed_experts={n}")
            if missing:
                raise CheckpointError(f"{ckpt.path}: missing tensor 'layers.{li}.ffn.experts.{missing[0]}.{proj}"
                                      f".weight' ({len(missing)} of {n} experts of layers.{li} {proj} missing)")
            ws = [formats.read_weight(ckpt, by_canonical[per_expert[e]]) for e in range(n)]
            for e, w in enumerate(ws):
                exp_shape = tuple(var.get_value().shape[1:])
                if _logical_shape(w) != exp_shape:
                    fname = by_canonical[per_expert[e]]
                    raise CheckpointError(f"{where(fname)}: tensor {fname!r} has shape {_logical_shape(w)}, the "
                                          f"model expects {exp_shape}")
            _fill(var, _stack(ws), f"layers.{li}.ffn.experts.*.{proj}.weight", str(ckpt.path), put, filled)
            loaded.extend(per_expert[e] for e in range(n))
            del ws

    missing = [p for p, v in _params(model) if id(v) not in filled]
    if missing:
        raise CheckpointError(f"{ckpt.path}: missing tensor(s) for {missing[:8]}"
                              f"{' and %d more' % (len(missing) - 8) if len(missing) > 8 else ''} "
                              f"(e.g. {_expected_name(missing[0])!r})")
    return LoadReport(loaded=loaded, skipped=sorted(skipped))


def _fill(var: nnx.Variable, value, name: str, where: str, put, filled: set[int]) -> None:
    if id(var) in filled:
        raise CheckpointError(f"{where}: tensor {name!r} fills a parameter that was already loaded")
    like = var.get_value()
    if isinstance(put, _Placer):
        put = put.bind(var)
    var.set_value(_convert(value, like, name, where, put))
    filled.add(id(var))


def _check_tid2eid(value, n_experts: int, name: str, where: str) -> None:
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer):
        raise CheckpointError(f"{where}: tensor {name!r} has dtype {arr.dtype}, expected an integer table")
    if arr.size and (arr.min() < 0 or arr.max() >= n_experts):
        raise CheckpointError(f"{where}: tensor {name!r}: expert ids must be in [0, {n_experts}), found "
                              f"{int(arr.min())}..{int(arr.max())}")


def _fill_w13(model, c, fname, ckpt, where, put, filled):
    """transformers' fused experts.gate_up_proj [E, 2I, D] = w1 rows [0, I) then w3 rows [I, 2I)."""
    li = layer_of(c)
    w1 = resolve(model, f"layers.{li}.ffn.experts.w1.weight")
    w3 = resolve(model, f"layers.{li}.ffn.experts.w3.weight")
    w = formats.read_weight(ckpt, fname)
    if _is_quant(w):
        raise CheckpointError(f"{where}: fused expert tensor {fname!r} is quantized; only plain fused experts "
                              "are supported (quantized experts come per expert)")
    w = np.asarray(w)
    e, i, d = w1.get_value().shape
    if w.shape != (e, 2 * i, d):
        raise CheckpointError(f"{where}: tensor {fname!r} has shape {w.shape}, the model expects {(e, 2 * i, d)}")
    _fill(w1, w[:, :i], fname, where, put, filled)
    _fill(w3, w[:, i:], fname, where, put, filled)


def _params(model) -> list[tuple[str, nnx.Variable]]:
    out = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            out.append((".".join(str(p) for p in path), node))
    return out


def _expected_name(path: str) -> str:
    """Checkpoint name expected for a Param path (linears and norms take a '.weight' suffix)."""
    last = path.rsplit(".", 1)[-1]
    if last in ("attn_sink", "ape", "bias", "tid2eid") or last.startswith("hc_"):
        return path
    if path.endswith(("experts.w1", "experts.w2", "experts.w3")):
        return path[:-3] + "0." + path[-2:] + ".weight"
    return path + ".weight"


def _describe(cfg: ModelConfig) -> str:
    return f"{cfg.num_hidden_layers} layers, compress_ratios={list(cfg.compress_ratios)}"
