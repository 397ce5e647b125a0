"""The embedded demo model as a fresh machine meets it: `megamoe generate --prompt "def "` in a new process, the
shipped files, the byte tokenizer against Hugging Face `tokenizers`, and the exporter's round trip."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megamoe_jax.cli import DEMO_DIR
from megamoe_jax.tokenizer import ByteTokenizer, load_tokenizer


@pytest.fixture(scope="session")
def demo_compile_cache(tmp_path_factory):
    """One JAX persistent compilation cache for the demo model's subprocesses and notebook kernels of this run
    (the same path from test_demo.py and test_notebooks.py): the demo's programs are compiled once."""
    d = tmp_path_factory.getbasetemp() / "megamoe-jax-cache"
    d.mkdir(exist_ok=True)
    return d


def test_demo_files_are_the_convert_format_and_small():
    files = {p.name: p.stat().st_size for p in DEMO_DIR.iterdir()}
    assert sum(files.values()) <= 20 * 2**20
    for f in ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"):
        assert f in files
    cfg = json.loads((DEMO_DIR / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and cfg["model_type"] == "deepseek_v4"
    assert [g["format"] for g in qc["config_groups"].values()] == ["nvfp4-pack-quantized"]
    # the real architecture: every attention type, hc_mult 4, hash and top-k MoE layers
    assert set(cfg["layer_types"]) == {"sliding_attention", "compressed_sparse_attention",
                                       "heavily_compressed_attention"}
    assert cfg["hc_mult"] == 4 and set(cfg["mlp_layer_types"]) == {"hash_moe", "moe"}
    from megamoe_jax.checkpoint import formats
    from megamoe_jax.checkpoint.reader import open_checkpoint
    from megamoe_jax.checkpoint.validate import scale_report
    ck = open_checkpoint(DEMO_DIR)
    kinds = {n: e.kind for n, e in formats.layout(ck).items()}
    experts = [n for n in kinds if re.search(r"\.ffn\.experts\.\d+\.w[123]\.weight$", n)]
    assert len(experts) == 3 * 8 * 4 and all(kinds[n] == "nvfp4" for n in experts)
    assert all("input_scale" in formats.layout(ck)[n].parts for n in experts)          # W4A4, calibrated
    assert scale_report(ck).ok


def test_fresh_process_generates_plausible_python(demo_compile_cache, tmp_path):
    env = dict(os.environ, MEGAMOE_CACHE_DIR=str(demo_compile_cache), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "megamoe_jax.cli", "generate", "--prompt", "def ", "-n", "60"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "using the embedded demo model" in r.stderr
    out = r.stdout
    assert out.startswith("def ")
    # a function name and its parameter list, in printable source text
    assert re.match(r"def [A-Za-z_]\w*\(", out), out
    assert all(c.isprintable() or c in "\n\t" for c in out), out


def test_byte_tokenizer_matches_hf_tokenizers():
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))
    tok = load_tokenizer(DEMO_DIR)
    assert isinstance(tok, ByteTokenizer)
    text = "def f(x):\n\treturn x ** 2  # café ☃ 🎉\r\n\x00\x7f"
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids == list(text.encode())
    assert tok.decode(ids) == hf.decode(ids) == text
    # streaming detokenization emits whole characters only, and all of them
    s = tok.stream()
    pieces = [s.push([i]) for i in ids] + [s.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert tok.encode_special("<bos>ab<eos>") == [256, 97, 98, 257]


def test_hf_tokenizer_path(tmp_path):
    """A non-byte tokenizer.json runs through the `tokenizers` package (here: a tiny word-level vocabulary)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    t = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "f": 2, "(": 3, ")": 4, "</s>": 5},
                                              unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": "{{ x }}"}))
    tok = load_tokenizer(tmp_path)
    assert type(tok).__name__ == "HFTokenizer" and tok.eos_id == 5 and tok.vocab_size == 6
    assert tok.encode("def f ( )") == [1, 2, 3, 4] and tok.encode("class") == [0]
    assert tok.chat_template == "{{ x }}"
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: cannot read"):
        load_tokenizer(tmp_path)


def test_export_names_match_transformers(tmp_path):
    """Every tensor name the demo exporter writes is the DeepSeek-native name of the same tensor in a checkpoint
    saved by transformers' DeepseekV4ForCausalLM for the same config (and nothing is missing)."""
    import jax.numpy as jnp
    from flax import nnx
    from megamoe_jax.checkpoint.names import canonical_name
    from megamoe_jax.checkpoint.reader import open_checkpoint
    from megamoe_jax.model.config import tiny
    from megamoe_jax.model.model import DeepseekV4
    from megamoe_jax.train_demo import state_dict
    from tests.helpers_tiny import tiny_checkpoint
    cfg = tiny(num_hidden_layers=3, compress_ratios=(0, 4, 16), mlp_layer_types=("hash_moe", "moe", "moe"))
    tiny_checkpoint(tmp_path, cfg, 0)
    ck = open_checkpoint(tmp_path)
    hf = {canonical_name(n): ck.shape(n) for n in ck.keys()}
    mine = state_dict(DeepseekV4(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32))
    assert set(mine) == set(hf)
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v) for k, v in hf.items()}


def test_export_round_trip(tmp_path):
    """train_demo.export writes DeepSeek-native names that megamoe_jax.load reads back to the same logits."""
    import jax.numpy as jnp
    from flax import nnx
    import megamoe_jax
    from megamoe_jax.model.config import tiny
    from megamoe_jax.model.model import DeepseekV4
    from megamoe_jax.train_demo import export, state_dict
    cfg = tiny(num_hidden_layers=2, compress_ratios=(0, 4), mlp_layer_types=("hash_moe", "moe"))
    module = DeepseekV4(cfg, rngs=nnx.Rngs(1), dtype=jnp.float32, param_dtype=jnp.float32)
    sd = state_dict(module)
    assert "layers.1.ffn.experts.7.w2.weight" in sd and "layers.0.ffn.shared_experts.w1.weight" in sd
    assert sd["layers.0.ffn.gate.tid2eid"].dtype == np.int32 and sd["hc_head_fn"].dtype == np.float32
    export(module, tmp_path / "ck")
    ids = np.arange(3, 43, dtype=np.int32)[None] % cfg.vocab_size
    got = np.asarray(megamoe_jax.load(tmp_path / "ck", dtype=jnp.float32).logits(ids))
    # The reference: the same module with the weights the exporter writes in bf16 rounded to bf16.
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param):
            last, v = str(path[-1]), node.get_value()
            if v.ndim >= 2 and jnp.issubdtype(v.dtype, jnp.floating) and not last.startswith("hc_") and last != "ape":
                node.set_value(v.astype(jnp.bfloat16).astype(jnp.float32))
    ref = np.asarray(megamoe_jax.api.Model(module).logits(ids))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.max(np.abs(ref)))
