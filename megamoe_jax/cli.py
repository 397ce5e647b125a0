"""The `megamoe` command line.

    megamoe generate   [--model DIR] [--prompt TEXT | stdin] [sampling options] [--json] [--devices N]
    megamoe chat       [--model DIR] [--message TEXT | interactive]     (needs the checkpoint's chat template)
    megamoe perplexity [--model DIR] [--file TEXT ...]                  (default text: held-out stdlib files)
    megamoe convert    SRC DST --to nvfp4|bf16 [--scope experts|all-linear] [--ignore P ...] [--calibrate DATA]
    megamoe calibrate  DIR DATA [--out DIR] [--check]
    megamoe bench      [--model DIR] [--batch B] [--prompt-len T] [--new-tokens N]
    megamoe info       [DIR] [--tensors] [--devices N] [--json]

Without --model, generate / chat / perplexity / bench use the embedded demo model (megamoe_jax/demo: a small
DeepSeek-V4 trained on the Python standard library, NVFP4 experts). Errors print as one line
("megamoe <command>: error: ..."); --debug shows the traceback. Progress bars appear on an interactive terminal.
Compiled programs are cached on disk (MEGAMOE_CACHE_DIR, default ~/.cache/megamoe/jax; set it to "off" to disable),
so a second run skips XLA compilation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEFAULT_HELDOUT_TOKENS = 32768  # the default text is scored up to this many tokens (the README's table), unless -f
DATA_STDLIB = "stdlib"          # calibration DATA keyword: windows of the stdlib training files (as the demo used)


class CLIError(ValueError):
    """A user error detected by the CLI itself (bad arguments, missing files)."""


# ---- shared helpers --------------------------------------------------------------------------------------------

def _eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _progress(a) -> bool:
    return sys.stderr.isatty() and not getattr(a, "quiet", False)


def _model_dir(a, attr: str = "model") -> Path:
    """The checkpoint directory named on the command line, or the embedded demo."""
    p = getattr(a, attr, None)
    if p is None:
        if not getattr(a, "quiet", False) and not getattr(a, "json", False):
            _eprint("megamoe: no --model given, using the embedded demo model (a 4-layer DeepSeek-V4 trained on "
                    "Python's standard library, NVFP4 experts)")
        return DEMO_DIR
    p = Path(p).expanduser()
    if not p.exists():
        raise CLIError(f"{p}: no such model directory")
    if not p.is_dir():
        raise CLIError(f"{p}: not a directory (a model is a checkpoint directory with config.json and "
                       f"*.safetensors)")
    return p


def _dtype(name: str | None):
    import jax.numpy as jnp
    return {None: None, "auto": None, "bf16": jnp.bfloat16, "fp32": jnp.float32}[name]


def _read_config(path: Path):
    from megamoe_jax.checkpoint.reader import open_checkpoint
    from megamoe_jax.model.config import ModelConfig
    ckpt = open_checkpoint(path)
    return ModelConfig.from_hf_config(ckpt.config, source=str(path / "config.json"))


def _mesh_for(a, path: Path):
    """The mesh for --devices N (all on "expert" when the expert count allows, see sharding.mesh_shape_for)."""
    n = getattr(a, "devices", None)
    if not n:
        return None
    import jax
    avail = jax.device_count()
    if n > avail:
        raise CLIError(f"--devices {n}: only {avail} {jax.default_backend()} device(s) available")
    from megamoe_jax import sharding
    cfg = _read_config(path)
    return sharding.make_mesh(*sharding.mesh_shape_for(n, cfg.n_routed_experts))


def load_model(a, path: Path):
    """Load the model of `path` as the command's options ask (dtype, context, --w4a16, --devices)."""
    import megamoe_jax
    dtype = _dtype(getattr(a, "dtype", None))
    max_context = getattr(a, "max_context", None)
    if getattr(a, "w4a16", False):
        if getattr(a, "devices", None):
            raise CLIError("--w4a16 cannot be combined with --devices")
        # Every NVFP4 weight without its activation scale: weight-only NVFP4 (bf16 activations).
        from megamoe_jax.api import Model
        from megamoe_jax.calibrate import load_for_calibration
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module, ckpt = load_for_calibration(path, dtype=dtype)
        ckpt.close()
        return Model(module, max_context=max_context)
    mesh = _mesh_for(a, path)
    kw = {"mesh": mesh} if mesh is not None else {}
    return megamoe_jax.load(path, dtype=dtype, max_context=max_context, progress=_progress(a), **kw)


def _tokenizer(path: Path):
    from megamoe_jax.tokenizer import load_tokenizer
    return load_tokenizer(path)


def _stop_ids(a, tok, cfg) -> list[int]:
    stops = list(getattr(a, "stop_token", None) or [])
    if not getattr(a, "ignore_eos", False):
        for e in list(cfg.eos_token_ids) + ([tok.eos_id] if tok.eos_id is not None else []):
            if e not in stops:
                stops.append(e)
    return stops


def _sampling(a) -> dict:
    return dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)


class _Streamer:
    """Generation callback: prints each new token's text as soon as it is complete; stops printing at a stop
    token. Works for batch 1 (the CLI generates one sequence)."""

    def __init__(self, tok, stops, out=None):
        self.stream, self.stops, self.out = tok.stream(), set(stops), out or sys.stdout
        self.finished = False
        self.tokens: list[int] = []

    def __call__(self, step, tokens, done):
        if self.finished:
            return
        t = int(tokens[0])
        if t in self.stops:
            self.finished = True
            return
        self.tokens.append(t)
        text = self.stream.push([t])
        if text:
            self.out.write(text)
            self.out.flush()

    def close(self):
        text = self.stream.flush()
        if text:
            self.out.write(text)
        self.out.flush()


def _read_prompt(a) -> str:
    if a.prompt is not None:
        return a.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise CLIError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
    return sys.stdin.read()


# ---- generate -----------------------------------------------------------------------------------------------------

def cmd_generate(a) -> int:
    import numpy as np
    path = _model_dir(a)
    prompt = _read_prompt(a)
    tok = _tokenizer(path)
    ids = tok.encode(prompt)
    if a.bos:
        if tok.bos_id is None:
            raise CLIError(f"--bos: the tokenizer of {path} has no bos token")
        ids = [tok.bos_id] + ids
    if not ids:
        raise CLIError("empty prompt: give at least one character")
    model = load_model(a, path)
    if len(ids) >= model.max_context:
        raise CLIError(f"prompt of {len(ids)} tokens does not fit the model's context of {model.max_context} "
                       f"tokens")
    new = min(a.max_new_tokens, model.max_context - len(ids))
    stops = _stop_ids(a, tok, model.config)
    t0 = time.perf_counter()
    if a.json:
        out = model.generate(np.asarray(ids, np.int32), new, stop_tokens=stops, ignore_eos=True,
                             **_sampling(a))
        seconds = time.perf_counter() - t0
        gen = [int(t) for t in out[len(ids):]]
        reason = "length"
        if gen and gen[-1] in stops:
            gen, reason = gen[:-1], "stop"
        print(json.dumps({
            "model": str(path), "prompt": prompt, "completion": tok.decode(gen), "text": prompt + tok.decode(gen),
            "prompt_tokens": len(ids), "completion_tokens": len(gen), "token_ids": gen, "finish_reason": reason,
            "seconds": round(seconds, 4), **_sampling(a), "max_new_tokens": new,
        }, ensure_ascii=False))
        return 0
    if a.echo:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    streamer = _Streamer(tok, stops)
    model.generate(np.asarray(ids, np.int32), new, stop_tokens=stops, ignore_eos=True, callback=streamer,
                   **_sampling(a))
    streamer.close()
    sys.stdout.write("\n")
    if a.verbose:
        dt = time.perf_counter() - t0
        _eprint(f"[{len(streamer.tokens)} tokens in {dt:.2f}s (compilation included)]")
    return 0


# ---- chat ---------------------------------------------------------------------------------------------------------

def cmd_chat(a) -> int:
    import numpy as np
    path = _model_dir(a)
    tok = _tokenizer(path)
    if not tok.chat_template:
        raise CLIError(f"{path} has no chat template (no 'chat_template' in tokenizer_config.json and no "
                       f"chat_template.jinja): it is not an instruct checkpoint; use `megamoe generate` for plain "
                       f"text continuation")
    model = load_model(a, path)
    stops = _stop_ids(a, tok, model.config)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    interactive = a.message is None
    if interactive and (sys.stdin is None or sys.stdin.isatty()):
        _eprint("megamoe chat: type a message and press Enter; Ctrl-D ends the conversation")
    turns = [a.message] if not interactive else None

    def next_turn():
        if turns is not None:
            return turns.pop(0) if turns else None
        if sys.stdin.isatty():
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        return None if not line else line.rstrip("\n")

    while True:
        user = next_turn()
        if user is None:
            break
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        room = model.max_context - len(ids)
        if room < 1:
            raise CLIError(f"the conversation ({len(ids)} tokens) no longer fits the model's context of "
                           f"{model.max_context} tokens")
        streamer = _Streamer(tok, stops)
        model.generate(np.asarray(ids, np.int32), min(a.max_new_tokens, room), stop_tokens=stops, ignore_eos=True,
                       callback=streamer, **_sampling(a))
        streamer.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": tok.decode(streamer.tokens)})
    return 0


# ---- perplexity ---------------------------------------------------------------------------------------------------

def cmd_perplexity(a) -> int:
    from megamoe_jax.perplexity import perplexity_text
    path = _model_dir(a)
    if a.file:
        texts = []
        for f in a.file:
            p = Path(f)
            if not p.is_file():
                raise CLIError(f"{p}: no such text file")
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
        text, source = "".join(texts), ", ".join(a.file)
    else:
        from megamoe_jax.train_demo import corpus, heldout_text
        text = heldout_text()
        source = f"held-out Python {sys.version.split()[0]} standard library files ({len(corpus()[1])} files)"
        if a.max_tokens is None:
            a.max_tokens = DEFAULT_HELDOUT_TOKENS
    if not text:
        raise CLIError("the text to score is empty")
    tok = _tokenizer(path)
    model = load_model(a, path)
    bar = None
    if _progress(a):
        from tqdm.auto import tqdm
        bar = tqdm(desc="perplexity", unit="window", leave=False)

    def progress(done, total):
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    r = perplexity_text(model, tok, text, seq_len=a.seq_len, batch_size=a.batch_size, max_tokens=a.max_tokens,
                        progress=progress)
    if bar is not None:
        bar.close()
    if not math.isfinite(r.nll):
        raise CLIError(f"non-finite perplexity ({r.nll}): the model produced Inf/NaN logits")
    if a.json:
        print(json.dumps({"model": str(path), "text": source, "w4a16": bool(a.w4a16), **r.as_dict()}))
    else:
        print(f"{path}: perplexity {r.ppl:.4f}  ({r.nll:.4f} nats/token, {r.bits_per_byte:.4f} bits/byte) on "
              f"{r.tokens} tokens of {source}, windows of {r.seq_len}")
    return 0


# ---- convert / calibrate ------------------------------------------------------------------------------------------

def _calibration_data(data: str, tokenizer_dir: Path):
    """DATA on the command line -> token ids: 'stdlib', a .npy of ids, or a text file (checkpoint tokenizer)."""
    import numpy as np
    if data == DATA_STDLIB:
        from megamoe_jax.train_demo import calibration_ids
        return calibration_ids()
    p = Path(data)
    if not p.is_file():
        raise CLIError(f"{p}: no such calibration data file (give a text file, a .npy of token ids, or "
                       f"'{DATA_STDLIB}')")
    if p.suffix == ".npy":
        return np.load(p)
    ids = _tokenizer(tokenizer_dir).encode(p.read_text(encoding="utf-8", errors="replace"))
    if not ids:
        raise CLIError(f"{p}: the calibration text is empty")
    return np.asarray(ids, np.int32)


def cmd_convert(a) -> int:
    from megamoe_jax.checkpoint.convert import convert
    src = _model_dir(a, "src")
    dst = Path(a.dst)
    calib = _calibration_data(a.calibrate, src) if a.calibrate else None
    t0 = time.perf_counter()
    convert(src, dst, to=a.to, scope=a.scope, ignore=a.ignore or (), calibrate=calib, convention=a.convention,
            overwrite=a.overwrite, progress=_progress(a),
            calibrate_options=dict(seq_len=a.seq_len, batch_size=a.batch_size, max_batches=a.max_batches,
                                   progress=_progress(a)))
    size = sum(f.stat().st_size for f in dst.iterdir() if f.is_file())
    what = f"NVFP4 ({a.scope}, {a.convention}{', calibrated W4A4' if calib is not None else ', W4A16'})" \
        if a.to == "nvfp4" else "bf16"
    print(f"wrote {dst}: {what}, {size / 1e6:.2f} MB in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_calibrate(a) -> int:
    from megamoe_jax.calibrate import calibrate
    path = _model_dir(a, "path")
    ids = _calibration_data(a.data, path)
    r = calibrate(path, ids, out=a.out, batch_size=a.batch_size, seq_len=a.seq_len, max_batches=a.max_batches,
                  warn_ratio=a.warn_ratio, check=a.check, dtype=_dtype(a.dtype), progress=_progress(a))
    print(f"wrote calibrated activation scales for {len(r.scales)} NVFP4 modules to {r.path} ({r.tokens} tokens"
          f"{'; ' + str(len(r.off)) + ' were off by more than %gx' % a.warn_ratio if r.off else ''})")
    return 0


# ---- bench --------------------------------------------------------------------------------------------------------

def cmd_bench(a) -> int:
    import jax
    import numpy as np
    path = _model_dir(a)
    t0 = time.perf_counter()
    model = load_model(a, path)
    load_s = time.perf_counter() - t0
    cfg = model.config
    if a.prompt_len + a.new_tokens > model.max_context:
        raise CLIError(f"--prompt-len + --new-tokens = {a.prompt_len + a.new_tokens} exceeds the model's context "
                       f"of {model.max_context}")
    if a.new_tokens < 2:
        raise CLIError("--new-tokens must be >= 2 (decode time is measured between the first and last token)")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (a.batch, a.prompt_len)).astype(np.int32)

    def run(n):
        t = time.perf_counter()
        out = model.generate(ids, n, ignore_eos=True)
        np.asarray(out)
        return time.perf_counter() - t

    t = time.perf_counter()
    run(1)
    run(a.new_tokens)
    compile_s = time.perf_counter() - t
    prefill = min(run(1) for _ in range(a.repeats))
    total = min(run(a.new_tokens) for _ in range(a.repeats))
    # Decode time = (N tokens - 1 token) / (N - 1): the prefill and the first sample cancel out. Clamped at 0 when
    # timing noise exceeds the decode time (tiny models).
    decode = max(total - prefill, 0.0) / (a.new_tokens - 1)
    dev = jax.devices()[0]
    res = {
        "model": str(path), "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
        "devices": a.devices or 1, "batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
        "load_s": round(load_s, 3), "compile_s": round(compile_s, 3),
        "prefill_ms": round(prefill * 1e3, 3), "prefill_tokens_per_s": round(a.batch * a.prompt_len / prefill, 1),
        "decode_ms_per_step": round(decode * 1e3, 4),
        "decode_tokens_per_s": round(a.batch / decode, 1) if decode > 0 else None,
        "repeats": a.repeats,
    }
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{path} on {res['device']} x{res['devices']}: batch {a.batch}, prompt {a.prompt_len}, "
              f"{a.new_tokens} new tokens (best of {a.repeats})")
        print(f"  prefill  {res['prefill_ms']:10.2f} ms   {res['prefill_tokens_per_s']:12.1f} tokens/s "
              f"(prompt + first token)")
        rate = "n/a" if res["decode_tokens_per_s"] is None else f"{res['decode_tokens_per_s']:.1f}"
        print(f"  decode   {res['decode_ms_per_step']:10.2f} ms/step {rate:>10} tokens/s")
        print(f"  load {load_s:.2f}s, compile {compile_s:.2f}s")
    return 0


# ---- info ---------------------------------------------------------------------------------------------------------

def _fmt_range(vs) -> str:
    vs = [v for v in vs if v is not None]
    if not vs:
        return "-"
    lo, hi = min(vs), max(vs)
    return f"{lo:.4g}" if lo == hi else f"{lo:.4g}..{hi:.4g}"


def checkpoint_summary(path: Path) -> dict:
    """Config, quantization, per-weight formats/dtypes/scales and byte counts of a checkpoint (no model load)."""
    import numpy as np
    from megamoe_jax.checkpoint import formats
    from megamoe_jax.checkpoint.names import canonical_name
    from megamoe_jax.checkpoint.reader import open_checkpoint
    from megamoe_jax.checkpoint.validate import AMAX, scale_report
    from megamoe_jax.model.config import ModelConfig
    ckpt = open_checkpoint(path)
    cfg = ModelConfig.from_hf_config(ckpt.config, source=str(path / "config.json"))
    lay = formats.layout(ckpt)
    groups: dict[str, dict] = {}
    by_kind: dict[str, dict] = {}
    for name, e in lay.items():
        c = canonical_name(name)
        key = re.sub(r"experts\.\d+\.", "experts.*.", c)
        nbytes = sum(ckpt.nbytes(t) for t in e.parts.values())
        shape = list(ckpt.shape(e.parts["weight"]))
        if e.kind in (formats.NVFP4, formats.MXFP4):
            shape[-1] *= 2                                      # packed two FP4 codes per byte
        g = formats.global_scale(ckpt, e) if e.kind == formats.NVFP4 else None
        gi = formats.global_scale(ckpt, e, "input_scale") if e.kind == formats.NVFP4 else None
        row = groups.setdefault(key, {"name": key, "kind": e.kind, "convention": e.convention, "count": 0,
                                      "shape": shape, "dtypes": {r: ckpt.dtype(t) for r, t in e.parts.items()},
                                      "bytes": 0, "weight_scale": [], "input_scale": []})
        row["count"] += 1
        row["bytes"] += nbytes
        if g is not None:
            row["weight_scale"] += [float(v) for v in np.asarray(g).reshape(-1)]
        if gi is not None:
            row["input_scale"] += [float(v) for v in np.asarray(gi).reshape(-1)]
        k = by_kind.setdefault(f"{e.kind}" + (f" ({e.convention})" if e.convention else ""), {"weights": 0, "bytes": 0})
        k["weights"] += 1
        k["bytes"] += nbytes
    report = scale_report(ckpt)
    info = formats.quantization_info(ckpt)
    ckpt.close()
    for row in groups.values():
        for s in ("weight_scale", "input_scale"):
            vs = row[s]
            row[s] = None if not vs else {"g_min": min(vs), "g_max": max(vs), "amax_min": AMAX * min(vs),
                                           "amax_max": AMAX * max(vs)}
    return {
        "path": str(path), "config": cfg, "quantization": info, "by_kind": by_kind,
        "tensors": sorted(groups.values(), key=lambda r: _natural(r["name"])),
        "total_bytes": sum(k["bytes"] for k in by_kind.values()),
        "scales": {"checked": report.checked, "issues": [str(i) for i in report.issues]},
    }


def _natural(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def cmd_info(a) -> int:
    path = _model_dir(a, "path") if a.path is not None else DEMO_DIR
    s = checkpoint_summary(path)
    cfg = s["config"]
    per_device = None
    if a.devices:
        model = load_model(a, path)
        from megamoe_jax.sharding import bytes_per_device
        per_device = {str(d): b for d, b in sorted(bytes_per_device(model._gen.params).items(),
                                                    key=lambda kv: kv[0].id)}
    layer_names = {0: "SWA", 4: "CSA"}
    layers = [f"{layer_names.get(m, f'HCA/{m}')}+{'hash' if t == 'hash_moe' else 'topk'}"
              for m, t in zip(cfg.compress_ratios, cfg.mlp_layer_types)]
    if a.json:
        out = dict(s)
        out["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()
                         if k != "yarn"} | {"yarn": None if cfg.yarn is None else vars(cfg.yarn)}
        out["memory_per_device"] = per_device
        print(json.dumps(out, default=str))
        return 0
    q = s["quantization"]
    print(f"{path}")
    print(f"  model     DeepSeek-V4: {cfg.num_hidden_layers} layers [{', '.join(layers)}], hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads x {cfg.head_dim}, window {cfg.sliding_window}, hc_mult {cfg.hc_mult}")
    print(f"  experts   {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, intermediate "
          f"{cfg.moe_intermediate_size}) + {cfg.n_shared_experts} shared; vocab {cfg.vocab_size}; context "
          f"{cfg.max_position_embeddings}")
    acts = {True: "static activation scales (W4A4)", False: "weight-only", None: "-"}[q["activations"]]
    print(f"  quant     {q['method'] or 'none'}; NVFP4 activations: {acts}; ignore: {len(q['ignore'])} pattern(s)")
    for kind, k in sorted(s["by_kind"].items()):
        print(f"  format    {kind:<32} {k['weights']:6d} weights {k['bytes'] / 2**20:10.2f} MiB")
    print(f"  memory    {s['total_bytes'] / 2**20:.2f} MiB of weights in the files")
    if per_device:
        for d, b in per_device.items():
            print(f"            {d}: {b / 2**20:.2f} MiB placed")
    issues = s["scales"]["issues"]
    print(f"  scales    {s['scales']['checked']} NVFP4 modules checked: "
          + ("all plausible" if not issues else f"{len(issues)} problem(s)"))
    for i in issues[:10]:
        print(f"            {i}")
    if a.tensors:
        print()
        print(f"  {'tensor (experts.* = all experts)':<44} {'n':>4} {'kind':<10} {'shape':<16} {'stored dtypes':<44} "
              f"{'weight amax':>14} {'input amax':>14}")
        for r in s["tensors"]:
            dt = ",".join(f"{k.replace('_scale', '')}:{v}" for k, v in r["dtypes"].items())
            wa = "-" if not r["weight_scale"] else _fmt_range([r["weight_scale"]["amax_min"],
                                                              r["weight_scale"]["amax_max"]])
            ia = "-" if not r["input_scale"] else _fmt_range([r["input_scale"]["amax_min"],
                                                             r["input_scale"]["amax_max"]])
            print(f"  {r['name']:<44} {r['count']:>4} {r['kind']:<10} {str(tuple(r['shape'])):<16} {dt:<44} "
                  f"{wa:>14} {ia:>14}")
    return 0


# ---- parser and entry point ---------------------------------------------------------------------------------------

def _positive(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    # --debug / --quiet are accepted before or after the command; the command's copy must not reset the value
    # given before it, hence SUPPRESS defaults there.
    top = argparse.ArgumentParser(add_help=False)
    top.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    top.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or notes on stderr")

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("-m", "--model", default=None, help="checkpoint directory (default: the embedded demo)")
    model.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                       help="compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    model.add_argument("--max-context", type=_positive, default=None,
                       help="longest prompt + continuation (default: the config's max_position_embeddings)")
    model.add_argument("--w4a16", action="store_true",
                       help="ignore NVFP4 activation scales: run every NVFP4 weight weight-only (bf16 activations)")

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("-n", "--max-new-tokens", type=_positive, default=100)
    sampling.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-k", type=_positive, default=None)
    sampling.add_argument("--top-p", type=float, default=None)
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--stop-token", type=int, action="append", help="extra stop token id (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")

    p = argparse.ArgumentParser(prog="megamoe", parents=[top],
                                description="NVFP4 mixture-of-experts inference for DeepSeek-V4-class models in JAX.",
                                epilog="Run `megamoe COMMAND --help` for a command's options.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", parents=[common, model, sampling], help="continue a prompt (streams the text)",
                       description="Continue a prompt with the model. The prompt comes from --prompt or stdin; "
                                   "the continuation is printed as it is generated.")
    g.add_argument("-p", "--prompt", default=None, help="prompt text (default: read stdin)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--no-echo", dest="echo", action="store_false", help="do not print the prompt before the output")
    g.add_argument("--bos", action="store_true", help="prepend the tokenizer's bos token")
    g.add_argument("--devices", type=_positive, default=None,
                   help="spread the model over N devices (expert parallel; see docs/scaling.md)")
    g.add_argument("-v", "--verbose", action="store_true", help="report token count and time on stderr")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", parents=[common, model, sampling], help="chat with an instruct checkpoint",
                       description="Chat using the checkpoint's chat template (tokenizer_config.json "
                                   "'chat_template' or chat_template.jinja). Without --message, reads one user "
                                   "message per line from stdin.")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--message", default=None, help="one user message (default: interactive)")
    c.add_argument("--devices", type=_positive, default=None)
    c.set_defaults(func=cmd_chat, max_new_tokens=256)

    pp = sub.add_parser("perplexity", parents=[common, model], help="perplexity on text",
                        description="Perplexity on text files (default: the held-out files of the local Python "
                                    "standard library, never seen by the demo model in training).")
    pp.add_argument("-f", "--file", action="append", help="text file to score (repeatable)")
    pp.add_argument("--seq-len", type=_positive, default=256, help="window length in tokens (default 256)")
    pp.add_argument("--batch-size", type=_positive, default=8)
    pp.add_argument("--max-tokens", type=_positive, default=None,
                    help=f"score at most this many tokens (default: all of -f, {DEFAULT_HELDOUT_TOKENS} of the "
                         f"held-out stdlib text)")
    pp.add_argument("--devices", type=_positive, default=None)
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(func=cmd_perplexity)

    cv = sub.add_parser("convert", parents=[common], help="convert a checkpoint to NVFP4 or bf16",
                        description="Convert a checkpoint (bf16/fp32, DeepSeek FP8+MXFP4, ModelOpt or "
                                    "compressed-tensors NVFP4) to NVFP4 or bf16. The output is written atomically.")
    cv.add_argument("src", help="source checkpoint directory")
    cv.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    cv.add_argument("--to", choices=("nvfp4", "bf16"), required=True)
    cv.add_argument("--scope", choices=("experts", "all-linear"), default="experts",
                    help="what to quantize (default: routed experts)")
    cv.add_argument("--ignore", action="append", metavar="PATTERN",
                    help="module pattern to leave untouched ('re:<regex>', wildcards or exact names; repeatable)")
    cv.add_argument("--calibrate", metavar="DATA", default=None,
                    help=f"calibrate activation scales (W4A4) on DATA: a text file, a .npy of token ids, or "
                         f"'{DATA_STDLIB}'")
    cv.add_argument("--convention", choices=("compressed-tensors", "modelopt"), default="compressed-tensors")
    cv.add_argument("--overwrite", action="store_true")
    cv.add_argument("--seq-len", type=_positive, default=256, help="calibration window (default 256)")
    cv.add_argument("--batch-size", type=_positive, default=4, help="calibration batch (default 4)")
    cv.add_argument("--max-batches", type=_positive, default=None)
    cv.set_defaults(func=cmd_convert)

    cb = sub.add_parser("calibrate", parents=[common], help="recompute NVFP4 activation scales from data",
                        description="Warmup calibration: run the model over DATA, record the input amax of every "
                                    "NVFP4 linear, and write the activation scales into the checkpoint (in place, "
                                    "or into --out), with a table of old vs new scales.")
    cb.add_argument("path", help="NVFP4 checkpoint directory")
    cb.add_argument("data", help=f"a text file, a .npy of token ids, or '{DATA_STDLIB}'")
    cb.add_argument("--out", default=None, help="write the calibrated checkpoint here instead of in place")
    cb.add_argument("--seq-len", type=_positive, default=256)
    cb.add_argument("--batch-size", type=_positive, default=4)
    cb.add_argument("--max-batches", type=_positive, default=None)
    cb.add_argument("--warn-ratio", type=float, default=4.0, help="warn when a stored scale is off by more")
    cb.add_argument("--check", action="store_true", help="reload and check every layer's activations are finite")
    cb.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    cb.set_defaults(func=cmd_calibrate)

    b = sub.add_parser("bench", parents=[common, model], help="time prefill and decode on this device",
                       description="Time prefill (prompt + first token) and decode steps of `generate` on the "
                                   "current device, after a warm-up that compiles both.")
    b.add_argument("--batch", type=_positive, default=1)
    b.add_argument("--prompt-len", type=_positive, default=128)
    b.add_argument("--new-tokens", type=_positive, default=32)
    b.add_argument("--repeats", type=_positive, default=3)
    b.add_argument("--devices", type=_positive, default=None)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", parents=[common], help="config, formats, dtypes, scales and memory of a checkpoint",
                       description="Describe a checkpoint without running it: config, quantization formats, "
                                   "per-tensor stored dtypes and global/activation scales, bytes; with --devices, "
                                   "load it on N devices and report the bytes placed on each.")
    i.add_argument("path", nargs="?", default=None, help="checkpoint directory (default: the embedded demo)")
    i.add_argument("--tensors", action="store_true", help="per-tensor table (experts collapsed)")
    i.add_argument("--devices", type=_positive, default=None)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info, dtype="auto", max_context=None, w4a16=False)
    return p


def _setup_compilation_cache() -> None:
    """Persist compiled XLA programs across runs (the model's prefill/decode take seconds to compile)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return                                            # the user configured JAX's cache themselves
    d = os.environ.get("MEGAMOE_CACHE_DIR", str(Path("~/.cache/megamoe/jax").expanduser()))
    if d.lower() in ("", "off", "0", "none"):
        return
    try:
        Path(d).mkdir(parents=True, exist_ok=True)
    except OSError:
        return                                            # read-only home: run without the cache
    import jax
    jax.config.update("jax_compilation_cache_dir", d)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _one_line(e: BaseException) -> str:
    """One line: a multi-line message (e.g. a scale report listing every bad tensor) keeps its first two lines
    and its last (the remedy), the rest is counted."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 4:
        lines = lines[:2] + [f"... ({len(lines) - 3} more lines) ..."] + lines[-1:]
    msg = " ".join(lines) or type(e).__name__
    if not isinstance(e, (ValueError, OSError, KeyError)):
        msg = f"{type(e).__name__}: {msg}"
    return msg


def _warning_line(message, category, filename, lineno, file=None, line=None):
    # Library warnings (e.g. a scale off by > 4x) as one line each, without source location noise.
    first = " ".join(str(message).split())
    print(f"megamoe: warning: {first}", file=file or sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    old_show = warnings.showwarning
    if not a.debug:
        warnings.showwarning = _warning_line
    try:
        _setup_compilation_cache()
        return int(a.func(a) or 0)
    except KeyboardInterrupt:
        _eprint("megamoe: interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error. Point stdout at devnull so the interpreter's exit
        # flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - the CLI's one place that turns every failure into one line
        if a.debug:
            import traceback
            traceback.print_exc()
        hint = "" if a.debug or isinstance(e, ValueError) else " (run with --debug for the traceback)"
        _eprint(f"megamoe {a.cmd}: error: {_one_line(e)}{hint}")
        return 1
    finally:
        warnings.showwarning = old_show


if __name__ == "__main__":
    sys.exit(main())
