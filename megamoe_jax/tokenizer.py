"""Tokenizers: the demo model's byte-level vocabulary, or a checkpoint's own Hugging Face `tokenizer.json`.

    tok = load_tokenizer(checkpoint_dir)
    ids = tok.encode("def f():")          # list[int]
    tok.decode(ids)                       # str
    stream = tok.stream()                 # incremental detokenizer for streaming output
    text = stream.push([id, ...]) + stream.flush()
    tok.apply_chat_template(messages)     # ids of a chat prompt (needs the checkpoint's chat template)

`ByteTokenizer` (no dependency): ids 0..255 are the UTF-8 bytes, 256 = <bos>, 257 = <eos>. The demo checkpoint
ships it as a standard byte-level BPE `tokenizer.json` without merges (`ByteTokenizer.hf_files()`), so Hugging Face
tooling reads the same vocabulary; `load_tokenizer` recognises that exact vocabulary and uses this class.
Any other `tokenizer.json` is run by the `tokenizers` package (installed with transformers; not a runtime
dependency of megamoe-jax, so its absence is reported as a clear error).
"""
from __future__ import annotations

import codecs
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence


class TokenizerError(ValueError):
    """A checkpoint's tokenizer files are missing, unreadable or unusable; the message names the file."""


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (used by byte-level BPE tokenizer.json files)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class _Utf8Stream:
    """Incremental detokenizer of the byte tokenizer: emits text as soon as its UTF-8 sequences are complete."""

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> str:
        return self._dec.decode(bytes(int(i) for i in ids if 0 <= int(i) < 256))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class _DiffStream:
    """Incremental detokenizer for any tokenizer: decode everything so far, emit the new suffix once it no longer
    ends in an incomplete character (U+FFFD)."""

    def __init__(self, tok: "Tokenizer"):
        self.tok, self.ids, self.sent = tok, [], ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids += [int(i) for i in ids]
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        new = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return new


class Tokenizer:
    """Common interface. Attributes: vocab_size, bos_id, eos_id (None when absent), chat_template (str | None),
    source (where it was read from)."""

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    chat_template: str | None = None
    source: str = ""
    bos_token: str | None = None
    eos_token: str | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def stream(self):
        return _DiffStream(self)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` ([{"role": ..., "content": ...}]) rendered with the checkpoint's template."""
        if not self.chat_template:
            raise TokenizerError(f"{self.source}: this checkpoint has no chat template (no 'chat_template' in "
                                 f"tokenizer_config.json and no chat_template.jinja): it is not an instruct/chat "
                                 f"checkpoint; use `megamoe generate` for plain text continuation")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise TokenizerError("chat templates need the jinja2 package (pip install jinja2)") from None
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")

        def raise_exception(msg):
            raise TokenizerError(f"{self.source}: chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "")
        return self.encode_special(text)

    def encode_special(self, text: str) -> list[int]:
        """Encode text in which special tokens appear literally (e.g. a rendered chat template)."""
        return self.encode(text)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, <bos> = 256, <eos> = 257 (vocab_size 258)."""

    VOCAB, BOS, EOS = 258, 256, 257
    BOS_TOKEN, EOS_TOKEN = "<bos>", "<eos>"

    def __init__(self, source: str = "byte-level", chat_template: str | None = None):
        self.vocab_size, self.bos_id, self.eos_id = self.VOCAB, self.BOS, self.EOS
        self.bos_token, self.eos_token = self.BOS_TOKEN, self.EOS_TOKEN
        self.source, self.chat_template = source, chat_template

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_special(self, text: str) -> list[int]:
        out: list[int] = []
        specials = {self.BOS_TOKEN: self.BOS, self.EOS_TOKEN: self.EOS}
        i = 0
        while i < len(text):
            hit = next((s for s in specials if text.startswith(s, i)), None)
            if hit:
                out.append(specials[hit])
                i += len(hit)
                continue
            j = min((k for k in (text.find(s, i) for s in specials) if k >= 0), default=len(text))
            out += self.encode(text[i:j])
            i = j
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes are decoded as UTF-8 (invalid sequences become U+FFFD); <bos>/<eos> are dropped."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def stream(self):
        return _Utf8Stream()

    @classmethod
    def hf_files(cls) -> dict[str, dict]:
        """tokenizer.json (byte-level BPE, no merges: one token per byte, id = byte value) and
        tokenizer_config.json, readable by the `tokenizers` package and transformers' AutoTokenizer."""
        b2u = _byte_to_unicode()
        vocab = {b2u[b]: b for b in range(256)}
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for i, t in ((cls.BOS, cls.BOS_TOKEN), (cls.EOS, cls.EOS_TOKEN))]
        tok = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                              "use_regex": False},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": []},
        }
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": cls.BOS_TOKEN,
               "eos_token": cls.EOS_TOKEN, "add_bos_token": False, "add_eos_token": False,
               "model_max_length": 4096, "clean_up_tokenization_spaces": False}
        return {"tokenizer.json": tok, "tokenizer_config.json": cfg}

    @classmethod
    def matches(cls, tokenizer_json: dict) -> bool:
        """True when a parsed tokenizer.json is exactly this byte vocabulary."""
        model = tokenizer_json.get("model") or {}
        if model.get("type") != "BPE" or model.get("merges"):
            return False
        b2u = _byte_to_unicode()
        if model.get("vocab") != {b2u[b]: b for b in range(256)}:
            return False
        added = {t.get("id"): t.get("content") for t in tokenizer_json.get("added_tokens") or []}
        return added == {cls.BOS: cls.BOS_TOKEN, cls.EOS: cls.EOS_TOKEN}


class HFTokenizer(Tokenizer):
    """A checkpoint's tokenizer.json run by the `tokenizers` package."""

    def __init__(self, file: Path, config: dict):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise TokenizerError(f"{file}: reading this tokenizer needs the 'tokenizers' package "
                                 f"(pip install tokenizers)") from None
        try:
            self._tok = _Tok.from_file(str(file))
        except Exception as e:       # the library raises a bare Exception on malformed JSON
            raise TokenizerError(f"{file}: cannot read the tokenizer: {e}") from None
        self.source = str(file)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.bos_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _token_str(t) -> str | None:
    if isinstance(t, dict):
        return t.get("content")
    return t if isinstance(t, str) else None


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{file}: cannot read: {e}") from None


def _chat_template(path: Path, config: dict) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = config.get("chat_template")
    if isinstance(t, list):           # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) and t else None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of checkpoint directory `path` (tokenizer.json + optional tokenizer_config.json)."""
    path = Path(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json in the checkpoint directory (pass token ids instead, "
                             f"or copy the model's tokenizer files there)")
    cfg_file = path / "tokenizer_config.json"
    config = _read_json(cfg_file) if cfg_file.is_file() else {}
    data = _read_json(file)
    if ByteTokenizer.matches(data):
        tok: Tokenizer = ByteTokenizer(source=str(file))
    else:
        tok = HFTokenizer(file, config)
    tok.chat_template = _chat_template(path, config)
    return tok
