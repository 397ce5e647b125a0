"""Train the embedded demo model from scratch: a small DeepSeek-V4 on the Python standard library's source.

    python -m megamoe_jax.train_demo train   --out runs/demo-bf16 [--minutes 20] [--log runs/loss.tsv]
    python -m megamoe_jax.train_demo package --bf16 runs/demo-bf16 [--dest megamoe_jax/demo]
    python -m megamoe_jax.train_demo table   --bf16 runs/demo-bf16 --work runs/variants     # README table

The shipped demo was trained on one H100 with
    MEGAMOE_KERNELS=reference python -m megamoe_jax.train_demo train --out OUT --minutes 2.6 --batch 64 \
        --seq 256 --lr 3e-3 --log loss.tsv --max-shard-mb 12
(1016 steps in 156 s including 95 s of compilation; held-out loss 0.94 nats/byte on its evaluation windows).
On the shared 2-core CPU of this project a step of batch 16 took about 18 s, so train there only with small --steps.

`train` builds the real architecture at toy width (every attention type: sliding window, CSA with its lightning
indexer, HCA; hc_mult 4; hash-routed and top-k MoE layers), trains it with AdamW on byte sequences cut from the
`.py` files of the running interpreter's standard library (a deterministic ~4% of the files is held out for
perplexity, see `corpus`), logs the loss curve, and saves a bf16 checkpoint in DeepSeek-native names that
`megamoe_jax.load` reads. The same code runs on CPU or GPU (fp32 on CPU, bf16 compute on GPU).

`package` converts that checkpoint with `megamoe_jax.checkpoint.convert` to NVFP4 routed experts
(compressed-tensors convention) with activation scales calibrated on training text, exactly as
`megamoe convert SRC DST --to nvfp4 --calibrate DATA` does, and installs it (plus the tokenizer files) as the
package's embedded demo.

Training notes: the MoE gate's `bias` only steers expert selection and the indexer only selects entries (top-k),
so neither receives a gradient; the bias is kept balanced with DeepSeek's auxiliary-loss-free update
(bias += rate * sign(mean load - load)), the indexer keeps its random initialisation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

HELDOUT_MOD = 25          # a file is held out when crc32(relative path) % 25 == 0 (about 4% of the files)
BIAS_RATE = 1e-3          # gate bias update speed of the auxiliary-loss-free balancing (DeepSeek-V3's gamma)
SKIP_DIRS = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__")


# ---- data --------------------------------------------------------------------------------------------------

def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus(root: Path | None = None) -> tuple[list[str], list[str]]:
    """(train, heldout) relative paths of the stdlib's .py files, sorted; tests and vendored code excluded."""
    root = root or stdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for f in sorted(filenames):
            if f.endswith(".py"):
                files.append(str((Path(dirpath) / f).relative_to(root)))
    files.sort()
    held = [f for f in files if zlib.crc32(f.encode()) % HELDOUT_MOD == 0]
    train = [f for f in files if zlib.crc32(f.encode()) % HELDOUT_MOD != 0]
    return train, held


def read_bytes(files: list[str], root: Path | None = None, *, eos: int | None = None) -> np.ndarray:
    """Concatenated bytes of `files` as int32 token ids (byte value = id), `eos` after each file if given."""
    root = root or stdlib_dir()
    parts = []
    for f in files:
        p = root / f
        if not p.is_file():
            continue
        parts.append(np.frombuffer(p.read_bytes(), np.uint8).astype(np.int32))
        if eos is not None:
            parts.append(np.asarray([eos], np.int32))
    if not parts:
        raise ValueError(f"none of the {len(files)} corpus files exist under {root}")
    return np.concatenate(parts)


def heldout_text(max_bytes: int | None = None, root: Path | None = None) -> str:
    """The held-out files of the local standard library, concatenated (the demo's perplexity text)."""
    _, held = corpus(root)
    data = read_bytes(held, root).astype(np.uint8).tobytes()
    if max_bytes is not None:
        data = data[: int(max_bytes)]
    return data.decode("utf-8", errors="replace")


# ---- model ---------------------------------------------------------------------------------------------------

def demo_config(**overrides):
    """The demo architecture: 4 layers covering SWA, CSA (ratio 4 + indexer) and HCA (ratio 16); 2 hash-routed
    and 2 top-k MoE layers of 8 experts (top-2) plus a shared expert; hc_mult 4; byte vocabulary (+ bos, eos)."""
    from megamoe_jax.model.config import HASH_MOE, TOPK_MOE, ModelConfig
    from megamoe_jax.tokenizer import ByteTokenizer
    base = dict(
        vocab_size=ByteTokenizer.VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
        qk_rope_head_dim=16, q_lora_rank=128, o_groups=2, o_lora_rank=64, sliding_window=64,
        compress_ratios=(0, 4, 16, 4), index_n_heads=4, index_head_dim=32, index_topk=16,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=256,
        mlp_layer_types=(HASH_MOE, HASH_MOE, TOPK_MOE, TOPK_MOE), routed_scaling_factor=1.5,
        swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, max_position_embeddings=4096,
        num_nextn_predict_layers=0, bos_token_id=ByteTokenizer.BOS, eos_token_ids=(ByteTokenizer.EOS,))
    base.update(overrides)
    return ModelConfig(**base)


def _split_trainable(module):
    """(graphdef, trainable float params, frozen rest): tid2eid (int) and the gate bias are not trained by
    gradient descent."""
    import jax.numpy as jnp
    from flax import nnx

    def trainable(path, x):
        leaf = str(path[-1])
        return (isinstance(x, nnx.Param) and jnp.issubdtype(x.get_value().dtype, jnp.floating)
                and leaf != "bias")
    return nnx.split(module, trainable, ...)


@contextlib.contextmanager
def record_routing():
    """While active (at trace time), every MoE gate call records its selected expert ids [T, k] under its module
    name ("layers.N.ffn.gate"). An instrument for training (expert loads for the bias update) and inspection
    (notebook 1): it wraps `Gate.__call__` only while the `with` block traces, so inference code carries no hook.
    Use it around a fresh trace (inside a function you jit, or eagerly): an already compiled program does not
    call the gates again."""
    from megamoe_jax.model.moe import Gate
    routes: dict = {}
    orig = Gate.__call__

    def recording(self, x, ids):
        w, idx = orig(self, x, ids)
        routes[self.name] = idx
        return w, idx

    Gate.__call__ = recording
    try:
        yield routes
    finally:
        Gate.__call__ = orig


def train(out: Path, *, minutes: float, steps: int | None, batch: int, seq: int, lr: float, seed: int,
          log: Path | None, eval_every: int = 100, stdlib: Path | None = None,
          max_shard_mb: float | None = None) -> Path:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from megamoe_jax.model.model import DeepseekV4
    from megamoe_jax.tokenizer import ByteTokenizer

    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    cfg = demo_config()
    train_files, held_files = corpus(stdlib)
    data = read_bytes(train_files, stdlib, eos=ByteTokenizer.EOS)
    held = read_bytes(held_files, stdlib, eos=ByteTokenizer.EOS)
    print(f"corpus: {len(train_files)} train files ({data.size / 1e6:.2f} MB), {len(held_files)} held out "
          f"({held.size / 1e6:.2f} MB) from {stdlib or stdlib_dir()}", flush=True)

    module = DeepseekV4(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=jnp.float32)
    graphdef, params, frozen = _split_trainable(module)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {n_params / 1e6:.2f}M trainable parameters, backend {jax.default_backend()}, "
          f"compute {jnp.dtype(dtype).name}", flush=True)

    # The learning rate follows the run's progress (steps done, or wall time used when time-budgeted): linear
    # warmup over the first 5%, cosine decay to 10% at the end. It is fed to the compiled step each time.
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.95, weight_decay=0.01))
    opt_state = opt.init(params)

    def lr_at(progress: float) -> float:
        if progress < 0.05:
            return lr * progress / 0.05
        return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (progress - 0.05) / 0.95))))

    gate_layers = [i for i, t in enumerate(cfg.mlp_layer_types) if t == "moe"]

    def loss_fn(params, frozen, ids):
        model = nnx.merge(graphdef, params, frozen)
        with record_routing() as routes:
            h, _ = model(ids[:, :-1], model.init_state(ids.shape[0], ids.shape[1] - 1))
        logits = model.logits(h)                                                     # [B, T, V] fp32
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
        loads = {i: jnp.bincount(routes[f"layers.{i}.ffn.gate"].reshape(-1), length=cfg.n_routed_experts)
                 for i in gate_layers}
        return jnp.mean(nll), loads

    @jax.jit
    def step(params, frozen, opt_state, ids, rate):
        opt_state[1].hyperparams["learning_rate"] = rate
        (loss, loads), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, ids)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # DeepSeek's auxiliary-loss-free balancing: raise the selection bias of under-loaded experts.
        for i, load in loads.items():
            var = frozen["layers"][i]["ffn"]["gate"]["bias"]
            load = load.astype(jnp.float32)
            var.set_value(var.get_value() + BIAS_RATE * jnp.sign(jnp.mean(load) - load))
        return params, frozen, opt_state, loss, loads

    eval_fn = jax.jit(lambda p, f, ids: loss_fn(p, f, ids)[0])
    rng = np.random.default_rng(seed)
    held_rng = np.random.default_rng(seed + 1)
    held_batch = np.stack([held[o:o + seq + 1] for o in held_rng.integers(0, held.size - seq - 1, 16)])

    logf = open(log, "w") if log else None
    if logf:
        logf.write("step\tseconds\ttokens\ttrain_loss\theldout_loss\tlr\n")
    t0 = time.time()
    ema = None
    it = 0
    deadline = t0 + minutes * 60
    while True:
        offs = rng.integers(0, data.size - seq - 1, batch)
        ids = jnp.asarray(np.stack([data[o:o + seq + 1] for o in offs]))
        progress = it / steps if steps else (time.time() - t0) / (minutes * 60)
        rate = lr_at(progress)
        params, frozen, opt_state, loss, loads = step(params, frozen, opt_state, ids, jnp.float32(rate))
        it += 1
        if it == 1:
            print(f"first step (compile) {time.time() - t0:.1f}s", flush=True)
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {it}")
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        done = (steps is not None and it >= steps) or time.time() > deadline
        if it % eval_every == 0 or done or it in (1, 10, 50):
            hl = float(eval_fn(params, frozen, jnp.asarray(held_batch)))
            el = time.time() - t0
            line = f"{it}\t{el:.1f}\t{it * batch * seq}\t{ema:.4f}\t{hl:.4f}\t{rate:.2e}"
            load = " ".join("/".join(str(int(c)) for c in np.asarray(v)) for v in loads.values())
            print(f"step {it:6d}  {el:7.1f}s  train {ema:.3f}  heldout {hl:.3f} nats/byte "
                  f"({hl / math.log(2):.3f} bits)  expert load {load}", flush=True)
            if logf:
                logf.write(line + "\n")
                logf.flush()
        if done:
            break
    if logf:
        logf.close()
    module = nnx.merge(graphdef, params, frozen)
    shard = int(max_shard_mb * 1e6) if max_shard_mb else None
    path = export(module, out, max_shard_bytes=shard, meta=dict(steps=it, batch=batch, seq=seq, lr=lr, seed=seed,
                                         seconds=round(time.time() - t0, 1), backend=jax.default_backend(),
                                         final_train_loss=ema, python=sys.version.split()[0],
                                         heldout_files=len(held_files), train_files=len(train_files)))
    print(f"saved bf16 checkpoint to {path}", flush=True)
    return path


# ---- export ----------------------------------------------------------------------------------------------------

def state_dict(module) -> dict[str, np.ndarray]:
    """DeepSeek-native checkpoint tensors of a (plain-weight) model: linears/embeddings in bf16, the rest as kept
    at runtime (fp32 norms, mHC parameters, sinks, position biases, gate bias; int32 tid2eid). Stacked routed
    experts are written per expert ("layers.N.ffn.experts.E.w1.weight"), as DeepSeek releases them."""
    import ml_dtypes
    from flax import nnx
    out: dict[str, np.ndarray] = {}
    for path, node in nnx.iter_graph(module):
        if not isinstance(node, nnx.Param):
            continue
        name = ".".join(str(p) for p in path)
        v = np.asarray(node.get_value())
        last = name.rsplit(".", 1)[-1]
        big = v.ndim >= 2 and np.issubdtype(v.dtype, np.floating) and not last.startswith("hc_") and last != "ape"
        if big:
            v = v.astype(ml_dtypes.bfloat16)
        if re.search(r"\.ffn\.experts\.w[123]$", name):
            base, proj = name.rsplit(".", 1)
            for e in range(v.shape[0]):
                out[f"{base}.{e}.{proj}.weight"] = np.ascontiguousarray(v[e])
        elif last in ("attn_sink", "ape", "bias", "tid2eid", "weight") or last.startswith("hc_"):
            out[name] = v                              # already the checkpoint name (e.g. "ffn.gate.weight")
        else:
            out[name + ".weight"] = v
    return out


def export(module, out: Path, *, meta: dict | None = None, overwrite: bool = True,
           max_shard_bytes: int | None = None) -> Path:
    """Write `module` as a bf16 checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    from megamoe_jax.checkpoint.writer import CheckpointWriter
    from megamoe_jax.tokenizer import ByteTokenizer
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = module.config.to_hf_config()
    config["torch_dtype"] = "bfloat16"
    kw = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    with CheckpointWriter(out, overwrite=overwrite, **kw) as w:
        w.add_all(state_dict(module))
        for fname, obj in ByteTokenizer.hf_files().items():
            w.write_json(fname, obj)
        if meta:
            w.write_json("training.json", meta)
        w.commit(config)
    return out


# ---- packaging -------------------------------------------------------------------------------------------------

def calibration_ids(n_rows: int = 16, seq: int = 256, seed: int = 1234) -> np.ndarray:
    """Calibration token ids [n_rows, seq]: windows of the TRAINING files (never the held-out ones)."""
    train_files, _ = corpus()
    data = read_bytes(train_files)
    offs = np.random.default_rng(seed).integers(0, data.size - seq, n_rows)
    return np.stack([data[o:o + seq] for o in offs])


def package(bf16: Path, dest: Path) -> Path:
    """bf16 checkpoint -> NVFP4 experts with calibrated activation scales, installed at `dest`."""
    from megamoe_jax.checkpoint.convert import convert
    dest = Path(dest)
    convert(bf16, dest, to="nvfp4", scope="experts", calibrate=calibration_ids(), overwrite=True,
            calibrate_options=dict(batch_size=4, seq_len=256))
    for f in ("training.json",):
        if (Path(bf16) / f).is_file() and not (dest / f).is_file():
            (dest / f).write_text((Path(bf16) / f).read_text())
    size = sum(p.stat().st_size for p in dest.iterdir())
    print(f"installed the NVFP4 demo at {dest} ({size / 1e6:.2f} MB)")
    return dest


# ---- the seed bug and the perplexity table ---------------------------------------------------------------------

def seed_bug(src: Path, dst: Path, pattern: str = r"\.attn\.") -> list[str]:
    """Copy NVFP4 checkpoint `src` to `dst` with the seed's bug planted: the activation scales of the modules
    matching `pattern` stored in the wrong convention (the dequant factor g = amax/2688 written where
    compressed-tensors expects the multiplier G = 2688/amax, i.e. the stored value replaced by its reciprocal).
    Returns the tensors changed."""
    from megamoe_jax.checkpoint import formats
    from megamoe_jax.checkpoint.reader import open_checkpoint
    from megamoe_jax.checkpoint.writer import update_checkpoint
    ckpt = open_checkpoint(src)
    changed = {}
    for name, e in formats.layout(ckpt).items():
        t = e.parts.get("input_scale")
        if t is not None and re.search(pattern, name):
            changed[t] = (np.float32(1.0) / np.asarray(ckpt.get(t), np.float32)).astype(np.float32)
    ckpt.close()
    if not changed:
        raise ValueError(f"{src}: no activation scale matches {pattern!r}")
    update_checkpoint(src, changed, dst=dst)
    return sorted(changed)


def unvalidated_wrong_scales(model, pattern: str = r"\.attn\."):
    """What an engine WITHOUT scale validation runs for a `seed_bug` checkpoint: `model` (correctly calibrated)
    with each matching module's activation dequant factor g replaced by 1/g (the stored g read as a multiplier).
    Returns a new Model; used to show the garbage that validation prevents."""
    import dataclasses
    from flax import nnx
    from megamoe_jax.api import Model
    from megamoe_jax.quant import NVFP4Tensor
    module = model.module
    n = 0
    for path, node in nnx.iter_graph(module):
        if not isinstance(node, nnx.Param):
            continue
        name = ".".join(str(p) for p in path)
        t = node.get_value()
        if isinstance(t, NVFP4Tensor) and t.input_scale is not None and re.search(pattern, name + "."):
            wrong = 1.0 / t.input_scale
            kw = {"input_scale": wrong}
            if getattr(t, "input_multiplier", None) is not None:
                kw["input_multiplier"] = t.input_scale          # the multiplier an engine derives from the file
            node.set_value(dataclasses.replace(t, **kw))
            n += 1
    if not n:
        raise ValueError(f"no W4A4 module matches {pattern!r}")
    return Model(module, max_context=model.max_context)


def table(bf16: Path, work: Path, max_tokens: int = 32768) -> str:
    """Build every variant of the demo with the CLI and measure `megamoe perplexity` on the held-out stdlib
    files; returns the README's markdown table."""
    import contextlib as cl
    import datetime
    import io
    from megamoe_jax import cli
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)

    def megamoe(*args) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with cl.redirect_stdout(out), cl.redirect_stderr(err):
            rc = cli.main([*map(str, args)])
        print(f"$ megamoe {' '.join(map(str, args))}\n{out.getvalue()}{err.getvalue()}", flush=True)
        return rc, out.getvalue(), err.getvalue()

    def ppl(path, *extra) -> dict:
        rc, out, err = megamoe("perplexity", "-q", "-m", path, "--json", "--max-tokens", max_tokens, *extra)
        if rc:
            return {"error": err.strip().splitlines()[-1]}
        return json.loads(out)

    def build(name, *args):
        dst = work / name
        if not dst.exists():
            rc, _, err = megamoe(*args[:1], bf16 if args[1] == "BF16" else args[1], dst, *args[2:])
            if rc:
                raise RuntimeError(err)
        return dst

    from megamoe_jax.cli import DEMO_DIR
    w16 = build("experts-w4a16", "convert", "BF16", "--to", "nvfp4", "-q")
    a16 = build("all-w4a16", "convert", "BF16", "--to", "nvfp4", "--scope", "all-linear", "-q")
    a4 = build("all-w4a4", "convert", "BF16", "--to", "nvfp4", "--scope", "all-linear", "--calibrate", "stdlib",
               "-q")
    bug = work / "all-w4a4-seedbug"
    if not bug.exists():
        seed_bug(a4, bug)
    fixed = work / "all-w4a4-seedbug-repaired"
    if not fixed.exists():
        megamoe("calibrate", bug, "stdlib", "--out", fixed, "-q")

    rows = [
        ("bf16 (trained original)", "bf16", "bf16", "bf16", ppl(bf16)),
        ("NVFP4 W4A16, experts", "NVFP4", "bf16", "bf16", ppl(w16)),
        ("NVFP4 W4A4, experts, calibrated (the shipped demo)", "NVFP4", "bf16", "NVFP4 (experts)", ppl(DEMO_DIR)),
        ("NVFP4 W4A16, all linears", "NVFP4", "NVFP4", "bf16", ppl(a16)),
        ("NVFP4 W4A4, all linears, calibrated", "NVFP4", "NVFP4", "NVFP4", ppl(a4)),
        ("W4A4 all linears, seed bug: attention activation scales in the wrong convention", "NVFP4", "NVFP4",
         "NVFP4", ppl(bug)),
    ]
    # What an engine without validation would compute from the same file.
    import megamoe_jax
    from megamoe_jax.perplexity import perplexity_text
    from megamoe_jax.tokenizer import load_tokenizer
    forced = unvalidated_wrong_scales(megamoe_jax.load(a4))
    r = perplexity_text(forced, load_tokenizer(a4), heldout_text(), max_tokens=max_tokens)
    rows.append(("  ... the same file run without scale validation (what the seed did)", "NVFP4", "NVFP4", "NVFP4",
                 r.as_dict()))
    rows.append(("  ... repaired by warmup calibration (`megamoe calibrate`)", "NVFP4", "NVFP4", "NVFP4",
                 ppl(fixed)))
    date = datetime.date.today().isoformat()
    lines = ["| model | experts | attention + shared | activations | nats/byte | bits/byte | perplexity (per byte) |",
             "|---|---|---|---|---|---|---|"]
    for name, ex, other, acts, res in rows:
        if "error" in res:
            msg = res["error"].split(": error: ", 1)[-1]
            n = re.search(r"(\d+) problem\(s\)", msg)
            t = re.search(r"([\w.]+\.input_global_scale)[^:]*: ([a-z ]+)", msg)
            what = (f"{n.group(1) if n else 'the'} activation scales flagged, e.g. `{t.group(1)}`: {t.group(2)}"
                    if t else msg[:160])
            lines.append(f"| {name} | {ex} | {other} | {acts} | refused at load | | {what} |")
        else:
            lines.append(f"| {name} | {ex} | {other} | {acts} | {res['nll']:.4f} | {res['bits_per_byte']:.4f} | "
                         f"{math.exp(res['nll']):.4f} |")
    tokens = next((res["tokens"] for *_, res in rows if "tokens" in res), 0)
    lines.append("")
    lines.append(f"Measured {date} on the CPU (fp32 compute) with `megamoe perplexity --max-tokens {max_tokens}`: "
                 f"{tokens} scored bytes of the held-out Python {sys.version.split()[0]} standard library files, "
                 f"windows of 256 bytes.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megamoe_jax.train_demo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the demo model from scratch and save it in bf16")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget (default 20)")
    t.add_argument("--steps", type=int, default=None, help="stop after this many steps (and size the schedule)")
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seq", type=int, default=256, help="training sequence length (crosses the 64-token window "
                   "and many compression blocks)")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log", type=Path, default=None, help="loss curve (TSV)")
    t.add_argument("--stdlib", type=Path, default=None, help="read the corpus from this copy of the standard "
                   "library instead of the running interpreter's")
    t.add_argument("--max-shard-mb", type=float, default=None, help="split the saved safetensors into shards")
    k = sub.add_parser("package", help="convert a trained bf16 checkpoint to the embedded NVFP4 demo")
    k.add_argument("--bf16", type=Path, required=True)
    k.add_argument("--dest", type=Path, default=Path(__file__).parent / "demo")
    tb = sub.add_parser("table", help="the README's perplexity table (builds every variant with the CLI)")
    tb.add_argument("--bf16", type=Path, required=True)
    tb.add_argument("--work", type=Path, required=True, help="where the variants are written")
    tb.add_argument("--max-tokens", type=int, default=32768)
    a = p.parse_args(argv)
    if a.cmd == "table":
        print(table(a.bf16, a.work, a.max_tokens))
    elif a.cmd == "train":
        train(a.out, minutes=a.minutes, steps=a.steps, batch=a.batch, seq=a.seq, lr=a.lr, seed=a.seed,
              log=a.log, stdlib=a.stdlib, max_shard_mb=a.max_shard_mb)
    else:
        package(a.bf16, a.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
