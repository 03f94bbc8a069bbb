"""Corrupt and hostile checkpoints: every reader fails with one line that names the file.

Small valid files (safetensors, torch ``.bin``, GGUF, shard indexes) are built here, then broken
by seeded random bit flips, truncations and overwrites, and by targeted edits (huge declared
sizes, wrong types, bad offsets). Each must load, or fail with the project's own error in one
line naming the file. The worst cases (memory bombs, headers that crashed ``mx.load``) run end to
end through ``convert`` in a subprocess whose address space is capped.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, run_cli
from test_gguf import FFN, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, hf_weights, to_gguf
from test_torch_bin import (
    Storage,
    Tensor,
    TorchGlobal,
    TorchPickler,
    contiguous,
    load_sharded_bin,
    random_values,
    write_checkpoint,
    write_zip,
)

from mlx_sharedllm.convert.files import CheckpointError
from mlx_sharedllm.convert.gguf import read_gguf, save_gguf_tokenizer
from mlx_sharedllm.convert.gguf_header import _SCALARS
from mlx_sharedllm.convert.safetensors_reader import load_safetensors
from mlx_sharedllm.convert.tables import ConversionError
from mlx_sharedllm.convert.torch_bin import load_torch_bin

ERRORS = (CheckpointError, ConversionError)
RANDOM_CASES = 150  # random corruptions per format
RELEASED = FIXTURES / "n1_gqa" / "checkpoint"


def assert_rejected(load: Callable[[Path], Any], path: Path) -> str:
    with pytest.raises(ERRORS) as excinfo:
        load(path)
    return assert_one_line(str(excinfo.value), path)


def assert_one_line(message: str, path: Path) -> str:
    assert "\n" not in message and "\r" not in message, message
    assert str(path) in message, message
    return message


def loads_or_is_rejected(load: Callable[[Path], Any], path: Path) -> bool:
    """Whether ``load`` accepted the file; a refusal must be the one-line error."""
    try:
        load(path)
    except ERRORS as e:
        assert_one_line(str(e), path)
        return False
    return True


def corruptions(data: bytes, header_end: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """Seeded random corruptions: bit flips (mostly in the header), truncations, and 8-byte
    overwrites with huge or random values."""
    rng = random.Random(seed)
    for i in range(RANDOM_CASES):
        raw = bytearray(data)
        kind = ("flip", "truncate", "overwrite")[i % 3]
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                end = header_end if rng.random() < 0.8 else len(raw)
                raw[rng.randrange(end)] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            del raw[rng.randrange(len(raw)) :]
        else:
            at = rng.randrange(max(1, header_end - 8))
            value = rng.choice([2**64 - 1, 2**63, 2**60, 2**31, 2**32 - 1, rng.getrandbits(64)])
            raw[at : at + 8] = value.to_bytes(8, "little")
        yield f"{kind}-{i}", bytes(raw)


def fuzz(load: Callable[[Path], Any], data: bytes, header_end: int, folder: Path, suffix: str):
    """Run ``load`` on every random corruption of ``data``."""
    accepted = rejected = 0
    for name, raw in corruptions(data, header_end, seed=len(data)):
        path = folder / f"{name}{suffix}"
        path.write_bytes(raw)
        if loads_or_is_rejected(load, path):
            accepted += 1
        else:
            rejected += 1
        path.unlink()
    print(f"{suffix}: {accepted} corruptions loaded, {rejected} refused in one line")
    assert rejected >= RANDOM_CASES // 3  # the corruptions do reach the checks


# --- safetensors --------------------------------------------------------------------------------


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def small_safetensors() -> tuple[dict, bytes]:
    data = np.arange(6, dtype="<f4").tobytes() + np.ones(4, "<f2").tobytes() + bytes(8)
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
        "c": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [32, 40]},
    }
    return header, data


def load_safetensors_eagerly(path: Path) -> None:
    mx.eval(list(load_safetensors(path).values()))


def test_safetensors_random_corruptions(tmp_path):
    header, data = small_safetensors()
    raw = safetensors_bytes(header, data)
    path = tmp_path / "ok.safetensors"
    path.write_bytes(raw)
    load_safetensors_eagerly(path)
    fuzz(load_safetensors_eagerly, raw, len(raw) - len(data), tmp_path, ".safetensors")


def _edit(path: list, value: Any) -> Callable[[dict], None]:
    def edit(header: dict) -> None:
        target = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


SAFETENSORS_EDITS = {
    "unknown-dtype": _edit(["a", "dtype"], "F64"),
    "dtype-not-string": _edit(["a", "dtype"], 4),
    "negative-dim": _edit(["a", "shape"], [-2, -3]),
    "float-dim": _edit(["a", "shape"], [2.0, 3]),
    "huge-dim": _edit(["a", "shape"], [2**40, 0]),
    "shape-not-list": _edit(["a", "shape"], "2x3"),
    "span-mismatch": _edit(["a", "shape"], [3, 3]),
    "offsets-past-end": _edit(["c", "data_offsets"], [32, 2**62]),
    "offsets-reversed": _edit(["b", "data_offsets"], [32, 24]),
    "offsets-three": _edit(["b", "data_offsets"], [24, 28, 32]),
    "offsets-overlap": _edit(["b", "data_offsets"], [16, 24]),
    "entry-not-object": _edit(["b"], [1, 2]),
    "metadata-not-strings": _edit(["__metadata__", "format"], 3),
}


@pytest.mark.parametrize("edit", SAFETENSORS_EDITS.values(), ids=SAFETENSORS_EDITS.keys())
def test_safetensors_bad_headers(tmp_path, edit):
    header, data = small_safetensors()
    edit(header)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    assert_rejected(load_safetensors, path)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x05\x00",
        struct.pack("<Q", 2**63) + b"{}",
        struct.pack("<Q", 0) + b"{}",
        struct.pack("<Q", 100) + b"{}",
        struct.pack("<Q", 8) + b"not json",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 4) + b'"\xff"',
        struct.pack("<Q", 4000) + b"[" * 2000 + b"]" * 2000,
        safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
    ],
    ids=[
        "empty",
        "short",
        "huge-length",
        "zero-length",
        "length-past-end",
        "not-json",
        "not-object",
        "not-utf8",
        "deep-nesting",
        "truncated-data",
    ],
)
def test_safetensors_bad_files(tmp_path, raw):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    assert_rejected(load_safetensors, path)


def test_safetensors_duplicate_names(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = f'{{"a": {entry}, "a": {entry}}}'.encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    assert "twice" in assert_rejected(load_safetensors, path)


def test_safetensors_not_a_regular_file(tmp_path):
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    assert "not a regular file" in assert_rejected(load_safetensors, folder)
    assert "does not exist" in assert_rejected(load_safetensors, tmp_path / "none.safetensors")


def copy_released(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(RELEASED, src)
    return src


def convert_fails(src: Path, out: Path, *extra: str) -> str:
    """Convert ``src``: exit 1 with one ``Error:`` line, no traceback, nothing written."""
    result = run_cli("convert", str(src), str(out), *extra)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    assert not out.exists()
    assert [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []
    return errors[0]


def test_relabelled_integer_weight_is_refused(tmp_path):
    """A float tensor relabelled I32 must not become an int32 embedding."""
    src = copy_released(tmp_path)
    weights = src / "model.safetensors"
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["model.embed_tokens.weight"]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    weights.write_bytes(raw[:8] + text + raw[8 + length :])
    error = convert_fails(src, tmp_path / "out")
    assert "'model.embed_tokens.weight'" in error and "int32" in error


def test_corrupt_safetensors_fail_convert_in_one_line(tmp_path):
    src = copy_released(tmp_path)
    weights = src / "model.safetensors"
    raw = weights.read_bytes()
    for cut in (4, 100, len(raw) - 1):
        weights.write_bytes(raw[:cut])
        assert str(weights) in convert_fails(src, tmp_path / "out")


# --- torch .bin ---------------------------------------------------------------------------------


def small_bin(path: Path) -> Path:
    shared = contiguous("float32", random_values("float32", (4, 6)))
    state = {
        "w": shared,
        "tied": Tensor(shared.storage, 0, (4, 6), (6, 1)),
        "t": Tensor(shared.storage, 2, (3, 2), (1, 6)),
        "h": contiguous("bfloat16", random_values("bfloat16", (5,))),
        "i": contiguous("int64", random_values("int64", (2, 2))),
    }
    return write_checkpoint(path, state)


def test_bin_random_corruptions(tmp_path):
    raw = small_bin(tmp_path / "ok.bin").read_bytes()
    load_torch_bin(tmp_path / "ok.bin")
    fuzz(load_torch_bin, raw, len(raw), tmp_path, ".bin")


def test_bin_random_pickle_corruptions(tmp_path):
    """Corrupt data.pkl itself and zip it again, so the CRC check does not catch it first."""
    with zipfile.ZipFile(small_bin(tmp_path / "ok.bin")) as zf:
        records = {name.removeprefix("archive/"): zf.read(name) for name in zf.namelist()}
    pkl = records.pop("data.pkl")
    records.pop("version")  # write_zip adds it

    def load_rezipped(path: Path) -> None:
        load_torch_bin(write_zip(path, path.read_bytes(), records))

    fuzz(load_rezipped, pkl, len(pkl), tmp_path, ".bin")


def float_storage(numel: int) -> Storage:
    """A float32 storage of ``numel`` elements, pickled by its size alone."""
    return Storage(TorchGlobal("torch", "FloatStorage"), np.broadcast_to(np.float32(0), (numel,)))


def pickled(obj: Any) -> tuple[bytes, dict[str, Storage]]:
    """``obj`` as torch pickles it, and its storages by record key."""
    buf = io.BytesIO()
    pickler = TorchPickler(buf)
    pickler.dump(obj)
    return buf.getvalue(), {key: storage for key, storage in pickler.storages.values()}


def bin_with(path: Path, obj: Any) -> Path:
    """A checkpoint of ``obj`` whose float32 storage records are zeros of their declared size."""
    pkl, storages = pickled(obj)
    data = {f"data/{key}": bytes(4 * s.data.size) for key, s in storages.items()}
    return write_zip(path, pkl, {"byteorder": b"little", **data})


BAD_LAYOUTS = {
    "stride-0-repeat": Tensor(float_storage(2), 0, (20000, 20000), (0, 0)),
    "negative-offset": Tensor(float_storage(4), -1, (2,), (1,)),
    "bool-size": Tensor(float_storage(4), 0, (True,), (1,)),
    "float-stride": Tensor(float_storage(4), 0, (2,), (1.0,)),
    "huge-stride-empty": Tensor(float_storage(4), 0, (0, 2), (2**70, 1)),
    "huge-dim-empty": Tensor(float_storage(4), 0, (0, 2**40), (1, 1)),
    "huge-offset": Tensor(float_storage(4), 2**62, (1,), (1,)),
    "past-the-end": Tensor(float_storage(4), 3, (2,), (1,)),
    "overflowing-product": Tensor(float_storage(4), 0, (2**31 - 1,) * 4, (0,) * 4),
}


@pytest.mark.parametrize("tensor", BAD_LAYOUTS.values(), ids=BAD_LAYOUTS.keys())
def test_bin_bad_layouts(tmp_path, tensor):
    assert_rejected(load_torch_bin, bin_with(tmp_path / "m.bin", {"w": tensor}))


def test_bin_storage_size_lies(tmp_path):
    pkl, _ = pickled({"w": Tensor(float_storage(2**60), 0, (2,), (1,))})
    huge = write_zip(tmp_path / "huge.bin", pkl, {"byteorder": b"little", "data/0": bytes(8)})
    assert f"expected {2**62}" in assert_rejected(load_torch_bin, huge)
    pkl, _ = pickled({"w": Tensor(float_storage(2), 0, (2,), (1,))})
    long = write_zip(tmp_path / "long.bin", pkl, {"byteorder": b"little", "data/0": bytes(64)})
    assert "more than the 8 expected" in assert_rejected(load_torch_bin, long)
    order = write_zip(tmp_path / "order.bin", pkl, {"byteorder": b"little" * 100})
    assert_rejected(load_torch_bin, order)


def test_bin_many_names_over_one_storage(tmp_path):
    """Names are cheap in a pickle: many full views of one storage would fill memory."""
    storage = float_storage(1000)
    views = {f"w{i}": Tensor(storage, 0, (1000,), (1,)) for i in range(6)}
    error = assert_rejected(load_torch_bin, bin_with(tmp_path / "m.bin", views))
    assert "'w4'" in error and "4 times" in error


def test_bin_compressed_records(tmp_path):
    pkl, _ = pickled({"w": Tensor(float_storage(2), 0, (2,), (1,))})
    path = tmp_path / "deflated.bin"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/data/0", bytes(8))
    assert "compressed" in assert_rejected(load_torch_bin, path)


def test_bin_encrypted_record(tmp_path):
    pkl, _ = pickled({"w": Tensor(float_storage(2), 0, (2,), (1,))})
    path = write_zip(tmp_path / "m.bin", pkl, {"byteorder": b"little", "data/0": bytes(8)})
    raw = bytearray(path.read_bytes())
    at = raw.index(b"PK\x01\x02") + 8  # the first central directory entry's flags
    raw[at] |= 1
    path.write_bytes(bytes(raw))
    assert "encrypted" in assert_rejected(load_torch_bin, path)


def test_bin_oversized_pickle(tmp_path):
    path = write_zip(tmp_path / "big.bin", b"(" + b"N" * (17 << 20) + b"l.")
    assert "data.pkl" in assert_rejected(load_torch_bin, path)


PICKLE_BOMBS = {
    "bytes8-length": b"\x80\x04\x8e" + struct.pack("<Q", 2**60) + b"x.",
    "unicode4-length": b"\x80\x02X" + struct.pack("<I", 2**31) + b"x.",
    "memo-index": b"\x80\x02Nr" + struct.pack("<I", 2**31) + b".",
}


@pytest.mark.parametrize("pkl", PICKLE_BOMBS.values(), ids=PICKLE_BOMBS.keys())
def test_bin_pickle_claims_past_its_size(tmp_path, pkl):
    """The C unpickler allocates what a length or memo index claims before reading on."""
    assert_rejected(load_torch_bin, write_zip(tmp_path / "m.bin", pkl))


def test_bin_overlapping_records(tmp_path):
    """Records that overlap in the file ("quoted overlap") claim more bytes than it holds."""
    assert "overlaps" in assert_rejected(load_torch_bin, overlapping_bin(tmp_path / "m.bin", 5))


# --- hand-made zips: pre-deflated and overlapping records ---------------------------------------


def _local(name: bytes, method: int, crc: int, csize: int, usize: int) -> bytes:
    head = (0x04034B50, 20, 0, method, 0, 0x21, crc, csize, usize, len(name), 0)
    return struct.pack("<IHHHHHIIIHH", *head) + name


def _central(name: bytes, method: int, crc: int, csize: int, usize: int, offset: int) -> bytes:
    fields = (0x02014B50, 20, 20, 0, method, 0, 0x21, crc, csize, usize, len(name), 0, 0, 0, 0, 0)
    return struct.pack("<IHHHHHHIIIHHHHHII", *fields, offset) + name


def _end(count: int, size: int, offset: int) -> bytes:
    return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, size, offset, 0)


def zip_parts(records: list[tuple[str, int, bytes, int, int]]) -> tuple[bytes, bytes]:
    """Local headers with payloads, and central directory entries, of (name, method, payload
    as stored, inflated size, crc) records laid out in order from the start of the file."""
    body, central = b"", b""
    for name, method, payload, usize, crc in records:
        central += _central(name.encode(), method, crc, len(payload), usize, len(body))
        body += _local(name.encode(), method, crc, len(payload), usize) + payload
    return body, central


def zip_file(body: bytes, central: bytes, count: int) -> bytes:
    return body + central + _end(count, len(central), len(body))


def stored(name: str, payload: bytes) -> tuple[str, int, bytes, int, int]:
    return name, 0, payload, len(payload), zlib.crc32(payload)


def deflated_zeros(name: str, mib: int) -> tuple[str, int, bytes, int, int]:
    """A record inflating to ``mib`` MiB of zeros from about a thousandth of that: after a full
    flush deflate starts afresh, so one compressed MiB repeats."""
    compressor, chunk = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(1 << 20)
    first = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeat = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    last = compressor.compress(chunk) + compressor.flush()
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(chunk, crc)
    return name, 8, first + repeat * (mib - 2) + last, mib << 20, crc


def deflate_bomb_bin(path: Path, member: str) -> Path:
    """A 2-float checkpoint whose ``member`` record inflates to 2 GiB - 1 MiB."""
    pkl, _ = pickled({"w": Tensor(float_storage(2), 0, (2,), (1,))})
    records = {
        "data.pkl": stored("archive/data.pkl", pkl),
        "data/0": stored("archive/data/0", bytes(8)),
    }
    records[member] = deflated_zeros(f"archive/{member}", 2047)
    all_records = [stored("archive/byteorder", b"little"), *records.values()]
    path.write_bytes(zip_file(*zip_parts(all_records), len(all_records)))
    return path


def overlapping_bin(path: Path, count: int, size: int = 1 << 10) -> Path:
    """A checkpoint of ``count`` byte tensors whose records nest: each record's data holds the
    local headers and data of all the records after it, so a file of little more than ``size``
    bytes has records of about ``count * size`` bytes."""
    names = [f"archive/data/{i}".encode() for i in range(count)]
    chain, entries = bytes(size), []
    for name in reversed(names):
        crc = zlib.crc32(chain)
        entries.append((name, crc, len(chain)))
        chain = _local(name, 0, crc, len(chain), len(chain)) + chain
    entries.reverse()
    byte_storage = TorchGlobal("torch", "ByteStorage")
    tensors = {
        f"w{i}": Tensor(Storage(byte_storage, np.broadcast_to(np.uint8(0), (n,))), 0, (n,), (1,))
        for i, (_, _, n) in enumerate(entries)
    }
    pkl, _ = pickled(tensors)
    body, central = zip_parts(
        [stored("archive/byteorder", b"little"), stored("archive/data.pkl", pkl)]
    )
    offset = len(body)
    for name, crc, n in entries:
        central += _central(name, 0, crc, n, n, offset)
        offset += len(_local(name, 0, crc, n, n))
    path.write_bytes(zip_file(body + chain, central, 2 + count))
    return path


# --- GGUF ---------------------------------------------------------------------------------------

U32, I32, F32, BOOL, STRING, ARRAY, U64 = 4, 5, 6, 7, 8, 9, 10
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUV"
MERGES = [f"{CHARS[2 * i]} {CHARS[2 * i + 1]}" for i in range(VOCAB - len(CHARS))]
TOKENS = list(CHARS) + [m.replace(" ", "") for m in MERGES]


def gguf_string(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def gguf_value(kind: int, value: Any) -> bytes:
    if kind == STRING:
        return gguf_string(value)
    if kind == ARRAY:
        item_kind, items = value
        return struct.pack("<IQ", item_kind, len(items)) + b"".join(
            gguf_value(item_kind, item) for item in items
        )
    return struct.pack(f"<{_SCALARS[kind]}", value)


def llama_metadata() -> dict[str, tuple[int, Any]]:
    counts = {
        "block_count": LAYERS,
        "context_length": 128,
        "embedding_length": HIDDEN,
        "feed_forward_length": FFN,
        "attention.head_count": HEADS,
        "attention.head_count_kv": KV_HEADS,
        "rope.dimension_count": HEAD_DIM,
        "vocab_size": VOCAB,
    }
    return {
        "general.architecture": (STRING, "llama"),
        **{f"llama.{key}": (U32, value) for key, value in counts.items()},
        "llama.rope.freq_base": (F32, 10000.0),
        "llama.attention.layer_norm_rms_epsilon": (F32, 1e-5),
        "tokenizer.ggml.model": (STRING, "gpt2"),
        "tokenizer.ggml.pre": (STRING, "gpt-2"),
        "tokenizer.ggml.tokens": (ARRAY, (STRING, TOKENS)),
        "tokenizer.ggml.token_type": (ARRAY, (I32, [1] * VOCAB)),
        "tokenizer.ggml.merges": (ARRAY, (STRING, MERGES)),
        "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2),
    }


def llama_tensors() -> dict[str, np.ndarray]:
    return {name: np.array(w) for name, w in to_gguf(hf_weights(tied=False)).items()}


def gguf_bytes(
    metadata: dict[str, tuple[int, Any]] | None = None,
    tensors: dict[str, np.ndarray] | None = None,
    *,
    version: int = 3,
    counts: tuple[int, int] | None = None,
    info: dict[str, dict[str, Any]] | None = None,
    raw_keys: bytes = b"",
) -> bytes:
    """A GGUF file of F32 ``tensors`` (a tiny LLaMA by default). ``counts`` overrides the header's
    (tensor, key) counts, ``info`` fields of a tensor's description, ``raw_keys`` is appended to
    the key/value section as is."""
    metadata = llama_metadata() if metadata is None else metadata
    tensors = llama_tensors() if tensors is None else tensors
    keys = (
        b"".join(
            gguf_string(k) + struct.pack("<I", kind) + gguf_value(kind, v)
            for k, (kind, v) in metadata.items()
        )
        + raw_keys
    )
    n_keys = len(metadata) + (raw_keys != b"")
    infos, data = b"", b""
    for name, array in tensors.items():
        fields = {"name": name, "dims": list(reversed(array.shape)), "type": 0, "offset": len(data)}
        fields |= (info or {}).get(name, {})
        n_dims = fields.get("n_dims", len(fields["dims"]))
        infos += gguf_string(fields["name"], fields.get("name_length"))
        infos += struct.pack("<I", n_dims)
        infos += b"".join(struct.pack("<Q", d) for d in fields["dims"])
        infos += struct.pack("<IQ", fields["type"], fields["offset"])
        data += array.astype("<f4").tobytes()
        data += bytes(-len(data) % 32)
    n_tensors, n_keys = counts or (len(tensors), n_keys)
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_keys) + keys + infos
    return head + bytes(-len(head) % 32) + data


def write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def read_gguf_and_tokenizer(path: Path) -> None:
    read_gguf(path)
    save_gguf_tokenizer(path, path.parent / "tokenizer")


def test_valid_gguf_reads(tmp_path):
    config, weights = read_gguf(write(tmp_path / "ok.gguf", gguf_bytes()))
    assert config["num_hidden_layers"] == LAYERS and len(weights) == 9 * LAYERS + 3
    save_gguf_tokenizer(tmp_path / "ok.gguf", tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").exists()


def test_gguf_random_corruptions(tmp_path):
    raw = gguf_bytes()
    header_end = raw.index(np.array(llama_tensors()["token_embd.weight"], "<f4").tobytes())
    fuzz(read_gguf_and_tokenizer, raw, header_end, tmp_path, ".gguf")


HUGE = 2**60
GGUF_HEADERS = {
    "bad-magic": lambda: b"GGML" + gguf_bytes()[4:],
    "version-1": lambda: gguf_bytes(version=1),
    "version-99": lambda: gguf_bytes(version=99),
    "tensor-count": lambda: gguf_bytes(counts=(HUGE, len(llama_metadata()))),
    "key-count": lambda: gguf_bytes(counts=(len(llama_tensors()), HUGE)),
    "key-count-2^31": lambda: gguf_bytes(counts=(len(llama_tensors()), 2**31)),
    "key-length": lambda: gguf_bytes(raw_keys=gguf_string("k", HUGE)),
    "string-length": lambda: gguf_bytes(
        raw_keys=gguf_string("k") + b"\x08\0\0\0" + gguf_string("v", HUGE)
    ),
    "array-length": lambda: gguf_bytes(
        raw_keys=gguf_string("k") + struct.pack("<IIQ", ARRAY, U32, HUGE)
    ),
    "string-array-length": lambda: gguf_bytes(
        raw_keys=gguf_string("k") + struct.pack("<IIQ", ARRAY, STRING, HUGE)
    ),
    "nested-array": lambda: gguf_bytes(
        raw_keys=gguf_string("k") + struct.pack("<IIQ", ARRAY, ARRAY, 0)
    ),
    "value-type": lambda: gguf_bytes(raw_keys=gguf_string("k") + struct.pack("<I", 13)),
    "key-not-utf8": lambda: gguf_bytes(
        raw_keys=gguf_string(b"\xff\xfe") + struct.pack("<II", U32, 0)
    ),
    "duplicate-key": lambda: gguf_bytes(
        raw_keys=gguf_string("general.architecture")
        + struct.pack("<I", STRING)
        + gguf_string("llama")
    ),
    "tensor-name-length": lambda: gguf_bytes(info={"output_norm.weight": {"name_length": HUGE}}),
    "n-dims-0": lambda: gguf_bytes(info={"output_norm.weight": {"n_dims": 0, "dims": []}}),
    "n-dims-5": lambda: gguf_bytes(info={"output_norm.weight": {"dims": [32, 1, 1, 1, 1]}}),
    "n-dims-2^31": lambda: gguf_bytes(info={"output_norm.weight": {"n_dims": 2**31}}),
    "dim-2^40": lambda: gguf_bytes(info={"output_norm.weight": {"dims": [2**40]}}),
    "dims-past-end": lambda: gguf_bytes(info={"output.weight": {"dims": [32, 2**20]}}),
    "type-deprecated": lambda: gguf_bytes(info={"output_norm.weight": {"type": 4}}),
    "type-int8": lambda: gguf_bytes(info={"output_norm.weight": {"type": 24}}),
    "type-unknown": lambda: gguf_bytes(info={"output_norm.weight": {"type": 99}}),
    "type-quantized-vector": lambda: gguf_bytes(info={"output_norm.weight": {"type": 8}}),
    "type-partial-block": lambda: gguf_bytes(
        info={"output_norm.weight": {"type": 8, "dims": [16]}}
    ),
    "offset-past-end": lambda: gguf_bytes(info={"output_norm.weight": {"offset": 2**63}}),
    "offset-unaligned": lambda: gguf_bytes(info={"output_norm.weight": {"offset": 4}}),
    "offset-overlap": lambda: gguf_bytes(info={"output_norm.weight": {"offset": 0}}),
    "duplicate-tensor": lambda: gguf_bytes(info={"output_norm.weight": {"name": "output.weight"}}),
    "alignment-0": lambda: gguf_bytes(llama_metadata() | {"general.alignment": (U32, 0)}),
    "alignment-3": lambda: gguf_bytes(llama_metadata() | {"general.alignment": (U32, 3)}),
    "alignment-string": lambda: gguf_bytes(
        llama_metadata() | {"general.alignment": (STRING, "32")}
    ),
    "truncated-header": lambda: gguf_bytes()[:20],
    "truncated-metadata": lambda: gguf_bytes()[:200],
    "truncated-data": lambda: gguf_bytes()[:-100],
    "empty": lambda: b"",
}


@pytest.mark.parametrize("make", GGUF_HEADERS.values(), ids=GGUF_HEADERS.keys())
def test_gguf_bad_headers(tmp_path, make):
    assert_rejected(read_gguf, write(tmp_path / "bad.gguf", make()))


def with_metadata(changes: dict[str, tuple[int, Any] | None]) -> bytes:
    """The tiny LLaMA GGUF with metadata keys changed (None removes one)."""
    metadata = llama_metadata() | changes
    return gguf_bytes({key: value for key, value in metadata.items() if value is not None})


GGUF_METADATA = {
    "head-count-0": {"llama.attention.head_count": (U32, 0)},
    "head-count-kv-0": {"llama.attention.head_count_kv": (U32, 0)},
    "head-count-kv-3": {"llama.attention.head_count_kv": (U32, 3)},
    "block-count-string": {"llama.block_count": (STRING, "2")},
    "block-count-huge": {"llama.block_count": (U64, 2**40)},
    "block-count-beyond-tensors": {"llama.block_count": (U32, 10**6)},
    "block-count-bool": {"llama.block_count": (BOOL, True)},
    "hidden-float": {"llama.embedding_length": (F32, 32.0)},
    "hidden-not-multiple": {"llama.embedding_length": (U32, 30)},
    "eps-negative": {"llama.attention.layer_norm_rms_epsilon": (F32, -1.0)},
    "eps-nan": {"llama.attention.layer_norm_rms_epsilon": (F32, float("nan"))},
    "eps-array": {"llama.attention.layer_norm_rms_epsilon": (ARRAY, (F32, [1e-5]))},
    "no-block-count": {"llama.block_count": None},
    "architecture-number": {"general.architecture": (U32, 1)},
    "architecture-other": {"general.architecture": (STRING, "qwen2")},
    "architecture-array": {"general.architecture": (ARRAY, (U32, [1, 2]))},
    "tokenizer-model-array": {"tokenizer.ggml.model": (ARRAY, (U32, [1, 2]))},
    "rope-scaling-array": {"llama.rope.scaling.type": (ARRAY, (STRING, ["linear"]))},
    "rope-scaling-no-factor": {"llama.rope.scaling.type": (STRING, "linear")},
    "rope-partial": {"llama.rope.dimension_count": (U32, 4)},
    "heads-do-not-split-rows": {
        "llama.attention.head_count": (U32, 32),
        "llama.attention.head_count_kv": (U32, 32),
        "llama.rope.dimension_count": None,
    },
    "bos-out-of-range": {"tokenizer.ggml.bos_token_id": (U32, 1000)},
    "bos-string": {"tokenizer.ggml.bos_token_id": (STRING, "1")},
    "eos-missing-but-added": {
        "tokenizer.ggml.eos_token_id": None,
        "tokenizer.ggml.add_eos_token": (BOOL, True),
    },
    "add-bos-number": {"tokenizer.ggml.add_bos_token": (U32, 1)},
    "tokens-numbers": {"tokenizer.ggml.tokens": (ARRAY, (U32, list(range(VOCAB))))},
    "tokens-empty": {"tokenizer.ggml.tokens": (ARRAY, (STRING, []))},
    "token-type-short": {"tokenizer.ggml.token_type": (ARRAY, (I32, [1] * 3))},
    "token-type-missing": {"tokenizer.ggml.token_type": None},
    "merge-unknown-token": {"tokenizer.ggml.merges": (ARRAY, (STRING, ["a zz"]))},
    "merge-result-unknown": {"tokenizer.ggml.merges": (ARRAY, (STRING, ["c b"]))},
    "merge-no-space": {"tokenizer.ggml.merges": (ARRAY, (STRING, ["ab"]))},
    "merges-number": {"tokenizer.ggml.merges": (U32, 3)},
    "pre-unknown": {"tokenizer.ggml.pre": (STRING, "bert")},
    "pre-array": {"tokenizer.ggml.pre": (ARRAY, (STRING, ["gpt-2"]))},
    "model-unknown": {"tokenizer.ggml.model": (STRING, "bert")},
    "scores-missing": {"tokenizer.ggml.model": (STRING, "llama")},
    "chat-template-number": {"tokenizer.chat_template": (U32, 7)},
}


@pytest.mark.parametrize("changes", GGUF_METADATA.values(), ids=GGUF_METADATA.keys())
def test_gguf_bad_metadata(tmp_path, changes):
    assert_rejected(read_gguf, write(tmp_path / "bad.gguf", with_metadata(changes)))


def test_gguf_without_tokenizer_cannot_save_one(tmp_path):
    metadata = {k: v for k, v in llama_metadata().items() if not k.startswith("tokenizer")}
    path = write(tmp_path / "bare.gguf", gguf_bytes(metadata))
    read_gguf(path)
    assert "no tokenizer" in assert_rejected(lambda p: save_gguf_tokenizer(p, tmp_path / "t"), path)


def test_bad_gguf_fails_convert_in_one_line(tmp_path):
    for name in ("head-count-0", "bos-out-of-range"):
        path = write(tmp_path / f"{name}.gguf", with_metadata(GGUF_METADATA[name]))
        assert str(path) in convert_fails(path, tmp_path / "out", "--stack-from-one", "1")


# --- shard indexes ------------------------------------------------------------------------------


def sharded_bin(folder: Path) -> Path:
    folder.mkdir()
    values = random_values("float32", (2, 3))
    write_checkpoint(folder / "s1.bin", {"a": contiguous("float32", values)})
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.bin"}}))
    load_sharded_bin(index)
    return index


BAD_INDEXES = {
    "not-json": "{weight_map",
    "not-utf8": b'{"weight_map": {"a": "\xff.bin"}}',
    "list": "[1, 2]",
    "weight-map-list": '{"weight_map": ["s1.bin"]}',
    "shard-number": '{"weight_map": {"a": 7}}',
    "traversal": '{"weight_map": {"a": "../s1.bin"}}',
    "absolute": '{"weight_map": {"a": "/etc/passwd.bin"}}',
    "subfolder": '{"weight_map": {"a": "sub/s1.bin"}}',
    "backslash": '{"weight_map": {"a": "..\\\\s1.bin"}}',
    "dot-dot": '{"weight_map": {"a": ".."}}',
    "newline": '{"weight_map": {"a": "s1\\n.bin"}}',
    "wrong-suffix": '{"weight_map": {"a": "config.json"}}',
    "missing-shard": '{"weight_map": {"a": "s9.bin"}}',
    "deep-nesting": "[" * 100_000 + "]" * 100_000,
    "too-large": '{"weight_map": {}, "pad": "' + "x" * (17 << 20) + '"}',
}


@pytest.mark.parametrize("text", BAD_INDEXES.values(), ids=BAD_INDEXES.keys())
def test_bad_shard_indexes(tmp_path, text):
    index = sharded_bin(tmp_path / "ckpt")
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_rejected(load_sharded_bin, index)


def test_bad_safetensors_index_fails_convert(tmp_path):
    src = copy_released(tmp_path)
    index = src / "model.safetensors.index.json"
    for text in ("{", '{"weight_map": {"lm_head.weight": "../model.safetensors"}}'):
        index.write_text(text)
        assert str(index) in convert_fails(src, tmp_path / "out")


# --- the worst cases, end to end under a capped address space -----------------------------------

# `import mlx_sharedllm` takes about 0.4 GiB of address space; before they were checked, the bombs
# below needed more than this cap (up to 3.2 GB) and the GGUF headers crashed mx.load
ADDRESS_SPACE = 3 << 29  # 1.5 GiB

CHILD = """
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import mlx_sharedllm
from click.testing import CliRunner
from mlx_sharedllm.cli.main import cli
for name, args in json.loads(sys.argv[2]).items():
    result = CliRunner().invoke(cli, args)
    line = {"name": name, "exit_code": result.exit_code, "output": result.output}
    print(json.dumps(line | {"exception": repr(result.exception)}), flush=True)
print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


# GGUF headers that made mx.load segfault, abort or divide by zero
GGUF_CRASHERS = (
    "tensor-count",
    "key-count",
    "key-length",
    "n-dims-2^31",
    "type-deprecated",
    "alignment-0",
)


def released_with(folder: Path, weights: Callable[[Path], Any]) -> Path:
    folder.mkdir()
    shutil.copy(RELEASED / "config.json", folder)
    weights(folder / "pytorch_model.bin")
    return folder


def worst_cases(tmp_path: Path) -> dict[str, list[str]]:
    storage = float_storage(2 << 20)  # 8 MiB
    many_views = {f"w{i}": Tensor(storage, 0, (2 << 20,), (1,)) for i in range(400)}
    bins = {
        "bin-stride-0": lambda p: bin_with(p, {"w": BAD_LAYOUTS["stride-0-repeat"]}),
        "bin-many-views": lambda p: bin_with(p, many_views),
        "bin-deflated-storage": lambda p: deflate_bomb_bin(p, "data/0"),
        "bin-deflated-pickle": lambda p: deflate_bomb_bin(p, "data.pkl"),
        "bin-overlapping-records": lambda p: overlapping_bin(p, 1500, 1 << 20),
        "bin-memo-index": lambda p: write_zip(p, b"\x80\x02Nr" + struct.pack("<I", 2**27) + b"."),
    }
    cases = {name: [str(released_with(tmp_path / name, make))] for name, make in bins.items()}
    for name in GGUF_CRASHERS:
        path = write(tmp_path / f"{name}.gguf", GGUF_HEADERS[name]())
        cases[f"gguf-{name}"] = [str(path), "--stack-from-one", "1"]
    return {name: ["convert", *args, str(tmp_path / "out")] for name, args in cases.items()}


def test_worst_cases_fail_in_one_line_within_bounded_memory(tmp_path):
    cases = worst_cases(tmp_path)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(ADDRESS_SPACE), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [json.loads(line) for line in child.stdout.splitlines()]
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:], lines[-1:])
    *results, peak = lines
    assert [r["name"] for r in results] == list(cases)
    for result, args in zip(results, cases.values()):
        assert result["exception"] == "SystemExit(1)", result
        errors = [line for line in result["output"].splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and args[1] in errors[0], result
    print(f"peak resident memory of the worst cases: {peak['peak_rss_kib'] >> 10} MiB")
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
