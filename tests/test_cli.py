"""The `megamoe` CLI end to end on tiny random checkpoints (in process, through `megamoe_jax.cli.main`).

A tiny DeepSeek-V4 of every layer type with the byte tokenizer (vocab 258) is written with the demo exporter;
its NVFP4 variants come from `megamoe convert`. Each test checks real outputs: generated ids against the Python
API, JSON fields against the tokenizer, perplexity against a direct computation, one-line errors.
"""
from __future__ import annotations

import io
import json
import math
import re
import sys

import numpy as np
import pytest

from megamoe_jax import cli
from megamoe_jax.model.config import tiny
from megamoe_jax.tokenizer import ByteTokenizer

# Two layers (CSA + hash MoE, HCA + top-k MoE) keep compilation short; the model's own tests cover every layer type.
CFG = tiny(vocab_size=ByteTokenizer.VOCAB, bos_token_id=ByteTokenizer.BOS, eos_token_ids=(ByteTokenizer.EOS,),
           num_hidden_layers=2, compress_ratios=(4, 16), mlp_layer_types=("hash_moe", "moe"))
TEXT = ("def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
        "        self.y = y\n") * 3


def run(capsys, *args, stdin: str | None = None, monkeypatch=None):
    """cli.main(args) -> (rc, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(autouse=True, scope="module")
def no_persistent_cache():
    # In process the CLI must not switch on JAX's on-disk cache (a global setting) for the rest of the suite.
    # Module scope and autouse: in place before the module's checkpoint fixtures run the CLI.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGAMOE_CACHE_DIR", "off")
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import jax.numpy as jnp
    from flax import nnx
    from megamoe_jax.model.model import DeepseekV4
    from megamoe_jax.train_demo import export
    d = tmp_path_factory.mktemp("cli") / "tiny-bf16"
    module = DeepseekV4(CFG, rngs=nnx.Rngs(7), dtype=jnp.float32, param_dtype=jnp.float32)
    # Larger-than-default weights so that logits are far from uniform (greedy ties would make outputs fragile).
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param) and node.get_value().ndim >= 2 and jnp.issubdtype(node.get_value().dtype,
                                                                                             jnp.floating):
            node.set_value(node.get_value() * 20.0)
    export(module, d)
    (d.parent / "calib.txt").write_text(TEXT * 4)
    return d


@pytest.fixture(scope="module")
def tiny_nvfp4(tiny_dir):
    """Tiny checkpoint converted by the CLI: NVFP4 experts, calibrated (W4A4) on a text file."""
    dst = tiny_dir.parent / "tiny-nvfp4"
    assert cli.main(["convert", str(tiny_dir), str(dst), "--to", "nvfp4", "--calibrate",
                     str(tiny_dir.parent / "calib.txt"), "--seq-len", "64", "-q"]) == 0
    return dst


def test_help_everywhere(capsys):
    for cmd in ([], ["generate"], ["chat"], ["perplexity"], ["convert"], ["calibrate"], ["bench"], ["info"]):
        with pytest.raises(SystemExit) as e:
            cli.main([*cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: megamoe") and "--debug" in out, cmd


def test_generate_json_matches_api(capsys, tiny_dir):
    import megamoe_jax
    rc, out, err = run(capsys, "generate", "-m", tiny_dir, "--prompt", "def f(x):", "-n", 12, "--json")
    assert rc == 0, err
    r = json.loads(out)
    tok = ByteTokenizer()
    prompt = tok.encode("def f(x):")
    ref = megamoe_jax.load(tiny_dir).generate(np.asarray(prompt), 12, stop_tokens=[ByteTokenizer.EOS])
    ref_new = [int(t) for t in ref[len(prompt):]]
    if ref_new and ref_new[-1] == ByteTokenizer.EOS:
        assert r["finish_reason"] == "stop"
        ref_new = ref_new[:-1]
    else:
        assert r["finish_reason"] == "length" and len(ref_new) == 12
    assert r["token_ids"] == ref_new
    assert r["completion"] == tok.decode(ref_new) and r["text"] == "def f(x):" + r["completion"]
    assert r["prompt_tokens"] == len(prompt) and r["completion_tokens"] == len(ref_new)
    assert r["temperature"] == 0.0 and r["max_new_tokens"] == 12


def test_generate_streams_stdin_prompt_like_json(capsys, monkeypatch, tiny_dir):
    rc, out, _ = run(capsys, "generate", "-m", tiny_dir, "-n", 12, "--json", "--prompt", "class A:")
    expected = json.loads(out)["text"]
    rc, out, err = run(capsys, "generate", "-m", tiny_dir, "-n", 12, stdin="class A:", monkeypatch=monkeypatch)
    assert rc == 0, err
    assert out == expected + "\n"
    # sampling options reach the sampler: a different seed at high temperature gives different tokens
    outs = {run(capsys, "generate", "-m", tiny_dir, "-n", 16, "-t", "5", "--top-k", 50, "--seed", s, "--json",
                "--prompt", "x")[1] for s in (0, 1, 2)}
    assert len({json.loads(o)["completion"] for o in outs}) > 1


def _one_error_line(err: str, cmd: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"megamoe {cmd}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_errors_are_one_line(capsys, tiny_dir, tmp_path):
    rc, _, err = run(capsys, "generate", "-m", tmp_path / "missing", "--prompt", "x")
    assert rc == 1 and "missing: no such model directory" in _one_error_line(err, "generate")
    rc, _, err = run(capsys, "generate", "-m", tmp_path, "--prompt", "x")            # a directory, not a model
    assert rc == 1 and "no tokenizer.json" in _one_error_line(err, "generate")
    long = "x" * (CFG.max_position_embeddings + 5)
    rc, _, err = run(capsys, "generate", "-m", tiny_dir, "--prompt", long, "-q")
    assert rc == 1 and "context of 256 tokens" in _one_error_line(err, "generate")
    rc, _, err = run(capsys, "generate", "-m", tiny_dir, "--prompt", "x", "--top-p", "1.5", "-q")
    assert rc == 1 and "top_p" in _one_error_line(err, "generate")
    rc, _, err = run(capsys, "perplexity", "-m", tiny_dir, "-f", tmp_path / "nope.txt", "-q")
    assert rc == 1 and "nope.txt: no such text file" in _one_error_line(err, "perplexity")
    rc, _, err = run(capsys, "convert", tiny_dir, tmp_path / "o", "--to", "nvfp4", "--calibrate", tmp_path / "x")
    assert rc == 1 and "no such calibration data file" in _one_error_line(err, "convert")
    # --debug (before or after the command) shows the traceback
    for args in (["--debug", "generate"], ["generate", "--debug"]):
        rc, _, err = run(capsys, *args, "-m", tmp_path / "missing", "--prompt", "x")
        assert rc == 1 and "Traceback" in err and "no such model directory" in err


def test_chat_needs_a_template(capsys, tiny_dir, tmp_path):
    rc, _, err = run(capsys, "chat", "--message", "hi", "-q")                     # the demo: not an instruct model
    assert rc == 1 and "has no chat template" in _one_error_line(err, "chat")
    # The same weights with a chat template: one turn, the reply stops at <eos> or the token limit.
    import shutil
    d = tmp_path / "tiny-chat"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}<bos>assistant: {% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    rc, out, err = run(capsys, "chat", "-m", d, "--message", "hello", "--system", "be brief", "-n", 8, "-q")
    assert rc == 0, err
    from megamoe_jax.tokenizer import load_tokenizer
    ids = load_tokenizer(d).apply_chat_template([{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "hello"}])
    assert ids[0] == ByteTokenizer.BOS and ids[-len(b"assistant: "):] == list(b"assistant: ")
    import megamoe_jax
    ref = megamoe_jax.load(d).generate(np.asarray(ids), 8, stop_tokens=[ByteTokenizer.EOS])[len(ids):]
    ref = [int(t) for t in ref if t != ByteTokenizer.EOS]
    assert out == ByteTokenizer().decode(ref) + "\n"


def test_perplexity_matches_direct_computation(capsys, tiny_dir, tmp_path):
    import jax
    import megamoe_jax
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    ids = np.asarray(ByteTokenizer().encode(TEXT), np.int32)
    n = len(ids) // 64
    rc, out, err = run(capsys, "perplexity", "-m", tiny_dir, "-f", f, "--seq-len", 64, "--batch-size", n, "--json",
                       "-q")
    assert rc == 0, err
    r = json.loads(out)
    rows = ids[: n * 64].reshape(n, 64)
    logits = np.asarray(megamoe_jax.load(tiny_dir).logits(rows), np.float64)
    logp = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1))
    nll = -np.take_along_axis(logp, rows[:, 1:, None], axis=-1).mean()
    assert r["tokens"] == n * 63 and r["windows"] == n
    assert r["nll"] == pytest.approx(nll, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2), rel=1e-5)    # one token per byte


def test_convert_info_and_w4a16(capsys, tiny_dir, tiny_nvfp4, tmp_path):
    rc, out, err = run(capsys, "info", tiny_nvfp4, "--json")
    assert rc == 0, err
    s = json.loads(out)
    assert s["quantization"]["method"] == "compressed-tensors" and s["quantization"]["activations"] is True
    experts = [t for t in s["tensors"] if re.fullmatch(r"layers\.\d+\.ffn\.experts\.\*\.w[123]\.weight", t["name"])]
    assert len(experts) == 3 * CFG.num_hidden_layers
    for t in experts:
        assert t["kind"] == "nvfp4" and t["count"] == CFG.n_routed_experts
        assert t["dtypes"] == {"weight": "U8", "block_scale": "F8_E4M3", "global_scale": "F32",
                               "input_scale": "F32"}
        assert 0 < t["input_scale"]["amax_min"] <= t["input_scale"]["amax_max"] < 1e4
    assert s["scales"]["issues"] == []
    rc, out, _ = run(capsys, "info", tiny_nvfp4, "--tensors")
    assert rc == 0 and "layers.0.ffn.experts.*.w1.weight" in out and "F8_E4M3" in out and "all plausible" in out
    # W4A4 (calibrated), W4A16 and bf16 all score the text; quantization costs little on this model.
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    res = {}
    for name, args in (("bf16", ["-m", tiny_dir]), ("w4a4", ["-m", tiny_nvfp4]),
                       ("w4a16", ["-m", tiny_nvfp4, "--w4a16"])):
        rc, out, err = run(capsys, "perplexity", *args, "-f", f, "--seq-len", 64, "--batch-size", 4, "--json",
                           "-q")
        assert rc == 0, err
        res[name] = json.loads(out)["nll"]
    assert all(math.isfinite(v) for v in res.values())
    assert res["w4a4"] != res["w4a16"] != res["bf16"]
    assert abs(res["w4a16"] - res["bf16"]) < 0.05 * res["bf16"]
    assert abs(res["w4a4"] - res["bf16"]) < 0.05 * res["bf16"]


def test_seed_bug_refused_then_repaired(capsys, tiny_nvfp4, tmp_path):
    from megamoe_jax.train_demo import seed_bug
    bug = tmp_path / "bug"
    changed = seed_bug(tiny_nvfp4, bug, pattern=r"layers\.1\.ffn\.experts\.")
    assert len(changed) == 3 * CFG.n_routed_experts
    rc, _, err = run(capsys, "generate", "-m", bug, "--prompt", "x", "-q")
    line = _one_error_line(err, "generate")
    assert rc == 1 and "wrong convention" in line and "layers.1.ffn.experts" in line and "megamoe calibrate" in line
    rc, out, err = run(capsys, "info", bug)
    assert rc == 0 and f"{len(changed)} problem(s)" in out
    fixed = tmp_path / "fixed"
    rc, out, err = run(capsys, "calibrate", bug, tiny_nvfp4.parent / "calib.txt", "--out", fixed, "--seq-len", 64,
                       "-q")
    assert rc == 0, err
    assert f"{len(changed)} were off by more than 4x" in out
    rc, out, err = run(capsys, "info", fixed, "--json")
    assert json.loads(out)["scales"]["issues"] == []
    rc, out, err = run(capsys, "generate", "-m", fixed, "--prompt", "x", "-n", 4, "--json")
    assert rc == 0, err


def test_bench_json(capsys, tiny_dir):
    rc, out, err = run(capsys, "bench", "-m", tiny_dir, "--batch", 1, "--prompt-len", 9, "--new-tokens", 12,
                       "--repeats", 2, "--json", "-q")
    assert rc == 0, err
    r = json.loads(out)
    import jax
    assert r["batch"] == 1 and r["prompt_len"] == 9 and r["new_tokens"] == 12
    assert r["device"].startswith(jax.devices()[0].platform)
    assert r["prefill_ms"] > 0 and r["decode_ms_per_step"] >= 0 and r["compile_s"] > 0
    assert r["prefill_tokens_per_s"] == pytest.approx(9 / (r["prefill_ms"] / 1e3), rel=0.01)
    rc, _, err = run(capsys, "bench", "-m", tiny_dir, "--prompt-len", 250, "--new-tokens", 10, "-q")
    assert rc == 1 and "exceeds the model's context of 256" in _one_error_line(err, "bench")


def test_generate_on_two_devices_matches_one(capsys, tiny_dir):
    import jax
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (tests/conftest.py simulates 8 on the CPU)")
    rc1, out1, err1 = run(capsys, "generate", "-m", tiny_dir, "--prompt", "def g(", "-n", 8, "--json")
    rc2, out2, err2 = run(capsys, "generate", "-m", tiny_dir, "--prompt", "def g(", "-n", 8, "--json",
                          "--devices", 2)
    assert rc1 == 0 and rc2 == 0, err1 + err2
    assert json.loads(out1)["token_ids"] == json.loads(out2)["token_ids"]
    rc, out, err = run(capsys, "info", tiny_dir, "--devices", 2, "--json")
    assert rc == 0, err
    per = json.loads(out)["memory_per_device"]
    assert len(per) == 2 and all(v > 0 for v in per.values())
    import jax
    n = jax.device_count()
    rc, _, err = run(capsys, "generate", "-m", tiny_dir, "--prompt", "x", "--devices", n + 1)
    assert rc == 1 and f"only {n} {jax.default_backend()} device(s) available" in _one_error_line(err, "generate")
