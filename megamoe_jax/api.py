"""The user-facing API: `megamoe_jax.load(path)` -> `Model` with `.logits(ids)` and `.generate(...)`."""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megamoe_jax.checkpoint.reader import open_checkpoint
from megamoe_jax.generate import Generator, Sampling
from megamoe_jax.model.config import ModelConfig
from megamoe_jax.model.model import DeepseekV4
from megamoe_jax.model.params import LoadReport, abstract_model, load_params


def default_dtype():
    """bf16 on accelerators (the residual stream of DeepSeek-V4 is bf16), fp32 on CPU (exact, and fast enough)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


class Model:
    """A loaded DeepSeek-V4 model.

    Attributes: `config` (ModelConfig), `module` (the flax.nnx DeepseekV4), `load_report` (what was loaded and
    skipped), `max_context` (longest prompt + continuation accepted; defaults to max_position_embeddings).
    """

    def __init__(self, module: DeepseekV4, *, max_context: int | None = None, load_report: LoadReport | None = None,
                 mesh=None):
        self.mesh = mesh      # jax.sharding.Mesh the parameters live on (None: one device)
        self.module = module
        self.config: ModelConfig = module.config
        self.load_report = load_report
        self.max_context = int(max_context or self.config.max_position_embeddings)
        if self.max_context > self.config.max_position_embeddings:
            raise ValueError(f"max_context={self.max_context} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        self._gen = Generator(module)
        if mesh is not None:
            self._gen.put_batch = self._put_ids

    # ---- inputs ------------------------------------------------------------------------------------------
    def _check_ids(self, arr: np.ndarray, what: str) -> None:
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
            bad = int(arr.min() if arr.min() < 0 else arr.max())
            raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def _as_batch(self, ids) -> tuple[list[list[int]], str]:
        """Normalise ids to a list of prompts; returns (prompts, form) with form in {'1d', '2d', 'ragged'}."""
        if isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], (list, tuple, np.ndarray, jax.Array)):
            prompts = [np.asarray(p).reshape(-1) for p in ids]
            form = "2d" if len({len(p) for p in prompts}) == 1 else "ragged"
        else:
            arr = np.asarray(ids)
            if arr.ndim == 1:
                prompts, form = [arr], "1d"
            elif arr.ndim == 2:
                prompts, form = list(arr), "2d"
            else:
                raise ValueError(f"ids must be [tokens], [batch, tokens] or a list of token lists; got shape "
                                 f"{arr.shape}")
        for p in prompts:
            if p.size == 0:
                raise ValueError("empty prompt: every sequence needs at least one token")
            if not np.issubdtype(p.dtype, np.integer):
                raise ValueError(f"ids must be integers, got dtype {p.dtype}")
            self._check_ids(p, "ids")
        return [p.astype(np.int32).tolist() for p in prompts], form

    # ---- API ---------------------------------------------------------------------------------------------
    def logits(self, ids) -> jax.Array:
        """int [B, T] -> float32 [B, T, vocab] (one prefill over the whole sequence)."""
        arr = np.asarray(ids)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"logits() needs integer ids of shape [batch, tokens], got {arr.dtype} {arr.shape}")
        if arr.shape[1] == 0:
            raise ValueError("logits() needs at least one token")
        if arr.shape[1] > self.max_context:
            raise ValueError(f"{arr.shape[1]} tokens exceed the model's context of {self.max_context} tokens")
        self._check_ids(arr, "ids")
        with self._on_mesh():
            return self._gen.logits_fn()(self._gen.params, self._put_ids(arr.astype(np.int32)))

    def _on_mesh(self):
        """Trace and run under the model's mesh: dispatch.moe_experts then goes expert-parallel (shard_map)."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _put_ids(self, arr: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(arr)
        from megamoe_jax.sharding import put_batch
        return put_batch(self.mesh, arr)

    def generate(self, ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, stop_tokens: Sequence[int] = (),
                 callback: Callable | None = None, *, ignore_eos: bool = False, pad_token_id: int | None = None):
        """Prompt + continuation, like transformers' `generate`.

        ids: [T], [B, T] or a list of B token lists of different lengths. Generation stops per sequence at any of
        `stop_tokens` or the config's eos ids (unless `ignore_eos`), and for the batch when all stopped or after
        `max_new_tokens`. Returns, for [T] input, an int array [T + n]; for [B, T] input, [B, T + n] with finished
        sequences padded by `pad_token_id` (default: the first stop token, else 0); for ragged input, a list of
        arrays, each its prompt + continuation up to and including its stop token.
        `callback(step, tokens [B], done [B])` is called on the host for every generated position, in order;
        the decode loop delivers them in bursts of up to `generate.DECODE_CHUNK` (8) positions.
        """
        prompts, form = self._as_batch(ids)
        stops = tuple(int(s) for s in stop_tokens)
        if not ignore_eos:
            stops += tuple(e for e in self.config.eos_token_ids if e not in stops)
        for s in stops:
            if not 0 <= s < self.config.vocab_size:
                raise ValueError(f"stop token {s} is outside the vocabulary [0, {self.config.vocab_size})")
        pad = int(pad_token_id if pad_token_id is not None else (stops[0] if stops else 0))
        sampling = Sampling(float(temperature), top_k, top_p)
        with self._on_mesh():
            new, lengths = self._gen.generate(prompts, int(max_new_tokens), sampling=sampling, seed=int(seed),
                                              stop_ids=stops, pad_id=pad, max_context=self.max_context,
                                              callback=callback)
        if form == "ragged":
            out = []
            for p, row in zip(prompts, new):
                hit = np.nonzero(np.isin(row, stops))[0] if stops else []
                n = int(hit[0]) + 1 if len(hit) else len(row)
                out.append(np.concatenate([np.asarray(p, np.int32), row[:n]]))
            return out
        full = np.concatenate([np.asarray(prompts, np.int32), new], axis=1)
        return full[0] if form == "1d" else full


def load(path: str | os.PathLike, *, dtype=None, param_dtype=None, max_context: int | None = None,
         progress: bool = False, mesh=None) -> Model:
    """Load a DeepSeek-V4 checkpoint directory (config.json + safetensors, sharded or not).

    dtype: compute / residual-stream dtype (default bf16 on GPU, fp32 on CPU); param_dtype: dtype of the plain
    large weights (default = dtype); quantized weights keep their format. max_context: longest prompt +
    continuation accepted (default max_position_embeddings). mesh: a `jax.sharding.Mesh` with axes among
    ("data", "expert", "tensor"), a (data, expert, tensor) tuple (see megamoe_jax.sharding.make_mesh) or a
    device count N (all N on "expert" when the experts divide): each tensor is read straight into its shards and
    generation runs expert/tensor parallel; None = one device.
    """
    path = Path(path)
    ckpt = open_checkpoint(path)
    cfg = ModelConfig.from_hf_config(ckpt.config, source=str(path / "config.json"))
    dtype = dtype or default_dtype()
    module = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype or dtype)
    place = None
    if mesh is not None:
        from megamoe_jax import sharding
        mesh = sharding.as_mesh(mesh, num_experts=cfg.n_routed_experts)
        place = functools.partial(sharding.place_param, mesh=mesh)
    report = load_params(module, ckpt, place=place, progress=progress)
    ckpt.close()
    return Model(module, max_context=max_context, load_report=report, mesh=mesh)


def random_model(cfg: ModelConfig, *, seed: int = 0, dtype=None, param_dtype=None,
                 max_context: int | None = None) -> Model:
    """A model with random weights (N(0, 0.02) matrices, unit norms, random hash tables) built in one compiled
    program (no per-tensor eager compiles): for benchmarks and experiments without a checkpoint."""
    dtype = dtype or default_dtype()
    param_dtype = param_dtype or dtype
    key = (cfg, jnp.dtype(dtype), jnp.dtype(param_dtype))
    make = _RANDOM_INIT.get(key)
    if make is None:
        make = _RANDOM_INIT[key] = nnx.jit(
            lambda k: DeepseekV4(cfg, rngs=nnx.Rngs(params=k), dtype=dtype, param_dtype=param_dtype))
    return Model(make(jax.random.key(seed)), max_context=max_context)


_RANDOM_INIT: dict = {}    # compiled initialisers per (config, dtypes); the seed is a runtime key
