"""Safetensors I/O, the checkpoint reader (bad files named precisely) and the atomic writer."""
import json

import ml_dtypes
import numpy as np
import pytest

from megamoe_jax.checkpoint import writer as W
from megamoe_jax.checkpoint.reader import CheckpointError, open_checkpoint
from megamoe_jax.checkpoint.safetensors_io import SafetensorsError, read_header, write_file
from tests.checkpoint_fixtures import E4M3, E8M0, save


def _tensors(rng):
    return {
        "a.weight": rng.standard_normal((5, 7)).astype(ml_dtypes.bfloat16),
        "b.weight": rng.standard_normal((3, 32)).astype(np.float32).astype(E4M3),
        "b.scale": np.array([[127, 130]], np.uint8)[:, :1].view(E8M0),
        "c": np.array(3.5, np.float32),
        "d": rng.integers(-9, 9, (4, 3)).astype(np.int64),
        "e": np.zeros((0, 4), np.float32),
    }


def test_roundtrip_all_dtypes_and_torch_interop(tmp_path, rng=np.random.default_rng(0)):
    t = _tensors(rng)
    save(tmp_path, t)
    ck = open_checkpoint(tmp_path)
    assert ck.keys() == sorted(t)
    assert ck.dtype("b.scale") == "F8_E8M0" and ck.dtype("b.weight") == "F8_E4M3" and ck.dtype("a.weight") == "BF16"
    assert ck.shape("c") == () and ck.get("c").shape == ()
    for k, v in t.items():
        got = ck.get(k)
        np.testing.assert_array_equal(got.view(np.uint8) if got.dtype == np.uint8 else got,
                                      v.view(np.uint8) if v.dtype == E8M0 else v)
    assert not ck.get("a.weight").flags.writeable             # memory-mapped, read-only
    # safetensors' own torch loader reads our files (dtype names and layout are standard).
    import torch
    from safetensors.torch import load_file
    tt = load_file(str(tmp_path / "model.safetensors"))
    assert tt["b.scale"].dtype == torch.float8_e8m0fnu and float(tt["b.scale"].float()[0, 0]) == 1.0
    assert tt["c"].shape == () and float(tt["c"]) == 3.5
    np.testing.assert_array_equal(tt["a.weight"].float().numpy(), t["a.weight"].astype(np.float32))


def test_truncated_shard_names_file_and_first_broken_tensor(tmp_path):
    rng = np.random.default_rng(1)
    save(tmp_path, {"x.weight": rng.standard_normal((8, 8)).astype(np.float32),
                    "y.weight": rng.standard_normal((8, 8)).astype(np.float32)})
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])                                 # cuts into the second tensor ("y", name order)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file: tensor 'y\.weight'"):
        open_checkpoint(tmp_path)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or empty"):
        open_checkpoint(tmp_path)


def test_corrupt_headers(tmp_path):
    rng = np.random.default_rng(2)
    save(tmp_path, {"x.weight": rng.standard_normal((4, 4)).astype(np.float32)})
    f = tmp_path / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    bad = data.copy()
    bad[8:12] = b"\xff\xfe{["                                   # garbage in the JSON
    f.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        open_checkpoint(tmp_path)
    hdr = json.loads(bytes(data[8:8 + n]))
    hdr["x.weight"]["shape"] = [4, 5]                           # shape disagrees with its byte span
    hb = json.dumps(hdr).encode()
    hb += b" " * (-len(hb) % 8)
    f.write_bytes(len(hb).to_bytes(8, "little") + hb + bytes(data[8 + n:]))
    with pytest.raises(CheckpointError, match=r"tensor 'x\.weight': F32\[4, 5\] needs 80 bytes"):
        open_checkpoint(tmp_path)
    f.write_bytes(bytes(data) + b"junk")
    with pytest.raises(CheckpointError, match="trailing bytes"):
        open_checkpoint(tmp_path)


def test_index_errors(tmp_path):
    rng = np.random.default_rng(3)
    t = {f"l{i}.weight": rng.standard_normal((2, 2)).astype(np.float32) for i in range(4)}
    save(tmp_path, t, shards=2)
    idx = tmp_path / "model.safetensors.index.json"
    good = json.loads(idx.read_text())
    ck = open_checkpoint(tmp_path)
    assert ck.keys() == sorted(t) and len(ck.headers) == 2
    np.testing.assert_array_equal(ck.get("l3.weight"), t["l3.weight"])

    bad = json.loads(json.dumps(good))
    bad["weight_map"]["l1.weight"] = "model-00009-of-00009.safetensors"
    idx.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"index\.json: tensor 'l1\.weight' points at missing shard "
                                              r"model-00009-of-00009"):
        open_checkpoint(tmp_path)
    bad = json.loads(json.dumps(good))
    bad["weight_map"]["ghost.weight"] = good["weight_map"]["l0.weight"]
    idx.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"tensor 'ghost\.weight' is listed in .*but that shard has no such"):
        open_checkpoint(tmp_path)
    bad = json.loads(json.dumps(good))
    del bad["weight_map"]["l2.weight"]
    idx.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"tensor 'l2\.weight' .* not in model\.safetensors\.index\.json"):
        open_checkpoint(tmp_path)
    idx.write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        open_checkpoint(tmp_path)


def test_iter_tensors_streams_in_storage_order(tmp_path):
    rng = np.random.default_rng(4)
    t = {f"l{i}.weight": rng.standard_normal((3, i + 1)).astype(np.float32) for i in range(6)}
    save(tmp_path, t, shards=3)
    ck = open_checkpoint(tmp_path)
    seen = []
    for name, a in ck.iter_tensors(progress=False):
        np.testing.assert_array_equal(a, t[name])
        assert len(ck._maps) <= 1                                # only the current shard is mapped
        seen.append(name)
    assert sorted(seen) == sorted(t)
    files = [ck.file_of(n).name for n in seen]
    assert files == sorted(files)                                # shard by shard


def test_writer_shards_index_and_atomic_failure(tmp_path):
    rng = np.random.default_rng(5)
    t = {f"m{i}.weight": rng.standard_normal((16, 16)).astype(np.float32) for i in range(5)}   # 1 KiB each
    dst = tmp_path / "out"
    with W.CheckpointWriter(dst, max_shard_bytes=2048, progress=False) as wr:
        wr.add_all(t)
        wr.commit({"model_type": "x"})
    ck = open_checkpoint(dst)
    assert len(ck.headers) == 3 and (dst / "model.safetensors.index.json").is_file()
    for k, v in t.items():
        np.testing.assert_array_equal(ck.get(k), v)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # A failure half way leaves neither a new directory nor a temporary one, and keeps the old output.
    with pytest.raises(RuntimeError, match="boom"):
        with W.CheckpointWriter(dst, max_shard_bytes=2048, overwrite=True, progress=False) as wr:
            wr.add_all({k: v + 1 for k, v in t.items()})        # flushes two shards to disk
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    np.testing.assert_array_equal(open_checkpoint(dst).get("m0.weight"), t["m0.weight"])
    with pytest.raises(CheckpointError, match="already exists"):
        W.CheckpointWriter(dst)
    with W.CheckpointWriter(dst, overwrite=True, progress=False) as wr:
        wr.add("only", np.ones(3, np.float32))
        wr.commit({"model_type": "x"})
    assert open_checkpoint(dst).keys() == ["only"] and (dst / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_update_checkpoint_replaces_adds_and_is_atomic(tmp_path):
    rng = np.random.default_rng(6)
    t = {f"m{i}.weight": rng.standard_normal((4, 4)).astype(np.float32) for i in range(4)}
    t["s.scale"] = np.array([[130]], np.uint8).view(E8M0)
    src = save(tmp_path / "ck", t, {"model_type": "x"}, shards=2)
    (src / "tokenizer.json").write_text("{}")
    before = {p.name: p.stat().st_ino for p in src.iterdir()}
    W.update_checkpoint(src, {"m1.weight": np.full((4, 4), 7, np.float32), "new.input_scale": np.float32(0.5)},
                        config={"model_type": "y"})
    ck = open_checkpoint(src)
    np.testing.assert_array_equal(ck.get("m1.weight"), 7)
    np.testing.assert_array_equal(ck.get("m0.weight"), t["m0.weight"])
    assert float(ck.get("new.input_scale")) == 0.5 and ck.dtype("s.scale") == "F8_E8M0"
    assert ck.config == {"model_type": "y"} and (src / "tokenizer.json").is_file()
    untouched = ck.file_of("m0.weight").name
    if ck.file_of("m1.weight").name != untouched:
        assert (src / untouched).stat().st_ino == before[untouched]   # unchanged shards are hard-linked
    # A failure (an array safetensors cannot store) leaves the checkpoint exactly as it was.
    with pytest.raises(SafetensorsError):
        W.update_checkpoint(src, {"m0.weight": np.zeros((4, 4), np.complex64)})
    ck2 = open_checkpoint(src)
    np.testing.assert_array_equal(ck2.get("m0.weight"), t["m0.weight"])
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["ck"]


def test_header_parser_rejects_holes(tmp_path):
    f = tmp_path / "x.safetensors"
    write_file(f, {"a": np.ones(4, np.float32), "b": np.ones(2, np.float32)})
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    hdr = json.loads(data[8:8 + n])
    hdr["b"]["data_offsets"] = [0, 8]                         # overlaps "a"
    hb = json.dumps(hdr).encode()
    hb += b" " * (-len(hb) % 8)
    f.write_bytes(len(hb).to_bytes(8, "little") + hb + data[8 + n:])
    with pytest.raises(SafetensorsError, match="overlaps|hole"):
        read_header(f)
