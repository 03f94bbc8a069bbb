"""Tests for the torch-free ``pytorch_model.bin`` reader.

Besides the torch-written fixtures, checkpoints are written here by hand in torch's zip format
(a protocol-2 ``data.pkl`` whose tensors reduce to ``torch._utils._rebuild_tensor_v2`` and whose
storages are persistent ids, plus ``data/<key>`` records), so layouts can be chosen freely.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import pickletools
import subprocess
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_sharedllm.convert.checkpoint import read_weights
from mlx_sharedllm.convert.tables import ConversionError
from mlx_sharedllm.convert.torch_bin import (
    CheckpointError,
    UnsafeCheckpointError,
    load_torch_bin,
)

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
BF16_BIN = FIXTURES / "n3_bf16_bin" / "checkpoint" / "pytorch_model.bin"
SHARDED_INDEX = FIXTURES / "n2_sharded_bin" / "checkpoint" / "pytorch_model.bin.index.json"

STORAGE_CLASSES = {
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "float64": "DoubleStorage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
}
MX_DTYPES = {name: getattr(mx, "bool_" if name == "bool" else name) for name in STORAGE_CLASSES}
# numpy dtype of each storage's elements; bfloat16 elements are their uint16 bit patterns
NP_DTYPES = {name: np.dtype(name) for name in STORAGE_CLASSES if name != "bfloat16"} | {
    "bfloat16": np.dtype(np.uint16)
}


# --- writing torch-format checkpoints without torch -------------------------------------------


class TorchGlobal(NamedTuple):
    """A torch global, written as a GLOBAL opcode without importing its module."""

    module: str
    name: str

    def __call__(self, *args: Any) -> Any:  # pickle requires reduce functions to be callable
        raise NotImplementedError


@dataclass(eq=False)
class Storage:
    """A storage record: 1-D elements (bfloat16 as uint16 bits), pickled as a persistent id."""

    cls: TorchGlobal
    data: np.ndarray


@dataclass(eq=False)
class Tensor:
    """A strided view into a storage; ``dtype`` set means v3 over an untyped byte storage."""

    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str | None = None

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, OrderedDict())
        if self.dtype is None:
            return TorchGlobal("torch._utils", "_rebuild_tensor_v2"), args
        v3_args = (*args, TorchGlobal("torch", self.dtype))
        return TorchGlobal("torch._utils", "_rebuild_tensor_v3"), v3_args


@dataclass(eq=False)
class Parameter:
    data: Tensor

    def __reduce__(self):
        return TorchGlobal("torch._utils", "_rebuild_parameter"), (self.data, True, OrderedDict())


class TorchPickler(pickle._Pickler):
    """Protocol-2 pickler writing ``TorchGlobal``s and storages the way ``torch.save`` does.

    The pure-Python pickler is used because its dispatch table can emit a GLOBAL opcode for a
    module that is not importable here.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=2)
        self.storages: dict[int, tuple[str, Storage]] = {}

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, Storage):
            return None
        key, _ = self.storages.setdefault(id(obj), (str(len(self.storages)), obj))
        return ("storage", obj.cls, key, "cpu", obj.data.size)

    def save_torch_global(self, obj: TorchGlobal) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[TorchGlobal] = save_torch_global


def write_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        for name, data in (records or {}).items():
            zf.writestr(f"archive/{name}", data)
        zf.writestr("archive/version", "3\n")
    return path


def write_checkpoint(path: Path, obj: Any, byteorder: str = "little") -> Path:
    buf = io.BytesIO()
    pickler = TorchPickler(buf)
    pickler.dump(obj)
    order = "<" if byteorder == "little" else ">"
    records = {
        f"data/{key}": s.data.astype(s.data.dtype.newbyteorder(order)).tobytes()
        for key, s in pickler.storages.values()
    }
    return write_zip(path, buf.getvalue(), {"byteorder": byteorder.encode(), **records})


def typed_storage(dtype: str, values: np.ndarray) -> Storage:
    """A storage of ``values`` (bfloat16 given as bf16-exact float32) flattened."""
    flat = np.ravel(values)
    if dtype == "bfloat16":
        flat = (flat.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return Storage(TorchGlobal("torch", STORAGE_CLASSES[dtype]), flat.astype(NP_DTYPES[dtype]))


def row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))


def contiguous(dtype: str, values: np.ndarray) -> Tensor:
    return Tensor(typed_storage(dtype, values), 0, values.shape, row_major(values.shape))


def random_values(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random values exactly representable in ``dtype`` (bfloat16 ones as float32)."""
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype == "bfloat16":
        bits = rng.standard_normal(shape).astype(np.float32).view(np.uint32)
        return (bits & 0xFFFF0000).view(np.float32)  # truncated to the top 16 bits: exact bf16
    if np.issubdtype(NP_DTYPES[dtype], np.integer):
        info = np.iinfo(NP_DTYPES[dtype])
        return rng.integers(info.min, info.max, shape, dtype=NP_DTYPES[dtype], endpoint=True)
    return rng.standard_normal(shape).astype(NP_DTYPES[dtype])


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


# --- hand-written checkpoints -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(STORAGE_CLASSES))
def test_roundtrip_each_dtype(tmp_path, dtype):
    values = random_values(dtype, (3, 5))
    path = write_checkpoint(tmp_path / "m.bin", {"w": contiguous(dtype, values)})
    out = load_torch_bin(path)["w"]
    assert out.dtype == MX_DTYPES[dtype]
    assert out.shape == (3, 5)
    np.testing.assert_array_equal(to_numpy(out), values)


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64"])
def test_layouts_over_shared_storage(tmp_path, dtype, byteorder):
    base = random_values(dtype, (24,), seed=1)
    storage = typed_storage(dtype, base)
    state = {
        "transposed": Tensor(storage, 0, (4, 3), (1, 4)),
        "tail": Tensor(storage, 12, (2, 6), (6, 1)),
        "scalar": Tensor(storage, 5, (), ()),
        "expanded": Tensor(storage, 20, (3, 2), (0, 1)),
        "empty": Tensor(storage, 0, (0, 4), (4, 1)),
    }
    path = write_checkpoint(tmp_path / "m.bin", state, byteorder)
    assert sum("/data/" in n for n in zipfile.ZipFile(path).namelist()) == 1
    out = load_torch_bin(path)
    expected = {
        "transposed": base[:12].reshape(3, 4).T,
        "tail": base[12:].reshape(2, 6),
        "scalar": base[5],
        "expanded": np.broadcast_to(base[20:22], (3, 2)),
        "empty": base[:0].reshape(0, 4),
    }
    assert list(out) == list(expected)
    for name, want in expected.items():
        assert out[name].dtype == MX_DTYPES[dtype], name
        assert out[name].shape == want.shape, name
        np.testing.assert_array_equal(to_numpy(out[name]), want, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    offset=st.integers(0, 3),
    dtype=st.sampled_from(["float16", "bfloat16", "int32"]),
    data=st.data(),
)
def test_permuted_views_match_numpy(tmp_path_factory, shape, offset, dtype, data):
    perm = data.draw(st.permutations(range(len(shape))))
    block = random_values(dtype, tuple(shape), seed=offset)
    base = np.concatenate([random_values(dtype, (offset,), seed=9), block.ravel()])
    view = block.transpose(perm)
    strides = tuple(row_major(tuple(shape))[p] for p in perm)
    tensor = Tensor(typed_storage(dtype, base), offset, view.shape, strides)
    path = write_checkpoint(tmp_path_factory.mktemp("perm") / "m.bin", {"v": tensor})
    out = load_torch_bin(path)["v"]
    assert out.shape == view.shape
    np.testing.assert_array_equal(to_numpy(out), view)


def test_state_dict_forms_torch_writes(tmp_path):
    """OrderedDict with ``_metadata`` (BUILD), a Parameter, and a v3 uint16 tensor."""
    weight = random_values("float16", (2, 3))
    u16 = np.arange(6, dtype=np.uint16) * 1000
    untyped = Storage(TorchGlobal("torch.storage", "UntypedStorage"), u16.view(np.uint8))
    state = OrderedDict(
        weight=Parameter(contiguous("float16", weight)),
        counts=Tensor(untyped, 1, (2, 2), (1, 2), dtype="uint16"),
    )
    state._metadata = OrderedDict({"": {"version": 1}})
    out = load_torch_bin(write_checkpoint(tmp_path / "m.bin", state))
    np.testing.assert_array_equal(np.array(out["weight"]), weight)
    assert out["counts"].dtype == mx.uint16
    np.testing.assert_array_equal(np.array(out["counts"]), u16[1:5].reshape(2, 2).T)


# --- refusing unsafe or malformed files --------------------------------------------------------


class Call:
    """Pickles as a call of ``fn(*args)``: what a malicious checkpoint would run on load."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize(
    ("make_payload", "global_name"),
    [
        (lambda marker: Call(os.system, f"touch {marker}"), r"(os|posix)\.system"),
        (lambda marker: Call(builtins.eval, f"open({str(marker)!r}, 'w')"), r"builtins\.eval"),
        (lambda marker: Call(subprocess.Popen, ["touch", str(marker)]), r"subprocess\.Popen"),
    ],
    ids=["os.system", "builtins.eval", "subprocess.Popen"],
)
def test_refuses_code_execution(tmp_path, make_payload, global_name):
    marker = tmp_path / "pwned"
    state = {"ok": contiguous("float32", np.ones(2)), "evil": make_payload(marker)}
    path = write_checkpoint(tmp_path / "evil.bin", state)
    pkl = zipfile.ZipFile(path).read("archive/data.pkl")
    foreign = [
        arg
        for op, arg, _ in pickletools.genops(pkl)
        if op.name == "GLOBAL" and not arg.startswith(("torch", "collections"))
    ]
    assert len(foreign) == 1  # the payload really is in the pickle
    with pytest.raises(UnsafeCheckpointError, match=global_name) as excinfo:
        load_torch_bin(path)
    assert str(path) in str(excinfo.value)
    assert not marker.exists()


PATCH_FN = b"}X\x02\x00\x00\x00fnccollections\nOrderedDict\ns"  # {"fn": OrderedDict}


@pytest.mark.parametrize(
    "state", [PATCH_FN, b"N" + PATCH_FN + b"\x86"], ids=["dict-state", "slot-state"]
)
def test_build_cannot_patch_whitelisted_globals(tmp_path, state):
    """A BUILD opcode must not swap the rebuild stand-in's callable (for later loads too)."""
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + state + b"b."
    with pytest.raises(CheckpointError, match="corrupt"):
        load_torch_bin(write_zip(tmp_path / "patch.bin", pkl))
    values = np.arange(3, dtype=np.float32)
    path = write_checkpoint(tmp_path / "ok.bin", {"w": contiguous("float32", values)})
    np.testing.assert_array_equal(np.array(load_torch_bin(path)["w"]), values)


@pytest.mark.parametrize(
    "pid",
    [
        ("storage", TorchGlobal("torch", "FloatStorage"), "0", "cpu"),
        ("storage", "FloatStorage", "0", "cpu", 2),
        ("module", TorchGlobal("torch", "FloatStorage"), "0", "cpu", 2),
        "storage",
    ],
)
def test_refuses_unexpected_persistent_ids(tmp_path, pid):
    class BadPidPickler(TorchPickler):
        def persistent_id(self, obj: Any) -> Any:
            return pid if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    BadPidPickler(buf).dump({"w": contiguous("float32", np.ones(2))})
    path = write_zip(tmp_path / "m.bin", buf.getvalue(), {"data/0": np.ones(2, "<f4").tobytes()})
    with pytest.raises(CheckpointError, match="persistent id"):
        load_torch_bin(path)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"w": Tensor(typed_storage("float32", np.ones(2)), 0, (2,), (1,)), "step": 3}, "'step'"),
        ({"state_dict": {"w": contiguous("float32", np.ones(2))}}, "'state_dict'"),
        ([contiguous("float32", np.ones(2))], "expected a dict"),
        ({"w": Tensor(typed_storage("float32", np.ones(4)), 1, (2, 2), (2, 1))}, "past the end"),
        ({"w": Tensor(typed_storage("float32", np.ones(4)), 0, (2,), (-1,))}, "invalid layout"),
        ({"w": Tensor(typed_storage("float32", np.ones(4)), 0, (2, 2), (1,))}, "invalid layout"),
    ],
    ids=["int-value", "nested-dict", "list", "out-of-bounds", "negative-stride", "rank-mismatch"],
)
def test_refuses_non_tensor_content_and_bad_layouts(tmp_path, obj, message):
    path = write_checkpoint(tmp_path / "m.bin", obj)
    with pytest.raises(CheckpointError, match=message) as excinfo:
        load_torch_bin(path)
    assert str(path) in str(excinfo.value)


def test_refuses_legacy_and_non_zip_files(tmp_path):
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + b".")
    with pytest.raises(CheckpointError, match=r"legacy.*torch < 1\.6"):
        load_torch_bin(legacy)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{junk}: not a zip"):
        load_torch_bin(junk)


def test_refuses_truncated_and_corrupt_zips(tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(BF16_BIN.read_bytes()[: BF16_BIN.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=str(truncated)):
        load_torch_bin(truncated)

    values = np.arange(64, dtype=np.float32)
    path = write_checkpoint(tmp_path / "corrupt.bin", {"w": contiguous("float32", values)})
    raw = bytearray(path.read_bytes())
    raw[raw.find(values.tobytes()) + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{path}: corrupt"):
        load_torch_bin(path)


def test_refuses_missing_records(tmp_path):
    buf = io.BytesIO()
    TorchPickler(buf).dump({"w": contiguous("float32", np.ones(2))})
    with pytest.raises(CheckpointError, match="corrupt"):
        load_torch_bin(write_zip(tmp_path / "no_storage.bin", buf.getvalue()))
    short = {"data/0": np.ones(1, "<f4").tobytes()}
    with pytest.raises(CheckpointError, match="has 4 bytes, expected 8"):
        load_torch_bin(write_zip(tmp_path / "short.bin", buf.getvalue(), short))
    no_pickle = tmp_path / "no_pickle.bin"
    with zipfile.ZipFile(no_pickle, "w") as zf:
        zf.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match="data.pkl"):
        load_torch_bin(no_pickle)


# --- sharded checkpoints -----------------------------------------------------------------------


def write_sharded(tmp_path: Path, shards: dict[str, dict[str, Tensor]], weight_map: dict) -> Path:
    for name, tensors in shards.items():
        write_checkpoint(tmp_path / name, tensors)
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


SHARD_VALUES = {name: random_values("bfloat16", (2, 3), seed=i) for i, name in enumerate("abc")}


def two_shards() -> dict[str, dict[str, Tensor]]:
    tensors = {name: contiguous("bfloat16", v) for name, v in SHARD_VALUES.items()}
    return {"s1.bin": {"a": tensors["a"], "b": tensors["b"]}, "s2.bin": {"c": tensors["c"]}}


def load_sharded_bin(index: Path) -> dict[str, mx.array]:
    """A sharded checkpoint's tensors, read the way `convert` reads them."""
    return dict(read_weights(Path(index).parent, progress=False))


def test_sharded_roundtrip(tmp_path):
    index = write_sharded(tmp_path, two_shards(), {"a": "s1.bin", "b": "s1.bin", "c": "s2.bin"})
    out = load_sharded_bin(str(index))
    assert sorted(out) == ["a", "b", "c"]
    for name, values in SHARD_VALUES.items():
        assert out[name].dtype == mx.bfloat16
        np.testing.assert_array_equal(to_numpy(out[name]), values)


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        ({"a": "s1.bin", "c": "s2.bin"}, r"s1\.bin holds 'b', which .* puts in None"),
        ({"a": "s1.bin", "b": "s2.bin", "c": "s2.bin"}, r"s1\.bin holds 'b', .* in 's2\.bin'"),
    ],
    ids=["unlisted-key", "key-in-other-shard"],
)
def test_sharded_index_mismatch(tmp_path, weight_map, message):
    """A missing key is the weight table's to report (tests/test_convert.py)."""
    index = write_sharded(tmp_path, two_shards(), weight_map)
    with pytest.raises(ConversionError, match=message):
        load_sharded_bin(index)


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}', '{"weight_map": {"a": 1}}'])
def test_sharded_bad_index(tmp_path, text):
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(text)
    with pytest.raises(CheckpointError, match=str(index)):
        load_sharded_bin(index)


# --- checkpoints written by torch 2.13 ---------------------------------------------------------


def storage_records(path: Path) -> set[bytes]:
    with zipfile.ZipFile(path) as zf:
        return {zf.read(n) for n in zf.namelist() if "/data/" in n}


def expected_shapes(case: str) -> dict[str, tuple[int, ...]]:
    knobs = json.loads((FIXTURES / case / "case.json").read_text())["knobs"]
    hidden, inter, vocab = knobs["hidden"], knobs["inter"], knobs["vocab"]
    kv = knobs["kv_heads"] * hidden // knobs["heads"]
    return {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "model.layers.0.self_attn.q_proj.weight": (hidden, hidden),
        "model.layers.0.self_attn.k_proj.weight": (kv, hidden),
        "model.layers.0.self_attn.v_proj.weight": (kv, hidden),
        "model.layers.0.mlp.gate_proj.weight": (inter, hidden),
        "model.layers.0.mlp.down_proj.weight": (hidden, inter),
        f"model.layers.{knobs['layers'] - 1}.input_layernorm.weight": (hidden,),
    }


def test_torch_written_bf16_file():
    tensors = load_torch_bin(BF16_BIN)
    assert len(tensors) == 83
    assert {a.dtype for a in tensors.values()} == {mx.bfloat16}
    for name, shape in expected_shapes("n3_bf16_bin").items():
        assert tensors[name].shape == shape, name
    # independent route to the values: each tensor's bits are one of the raw storage records
    records = storage_records(BF16_BIN)
    for name, a in tensors.items():
        assert np.array(a.view(mx.uint16)).tobytes() in records, name
        assert np.isfinite(to_numpy(a)).all(), name


def test_torch_written_sharded_files():
    tensors = load_sharded_bin(SHARDED_INDEX)
    index = json.loads(SHARDED_INDEX.read_text())
    assert sorted(tensors) == sorted(index["weight_map"])
    assert {a.dtype for a in tensors.values()} == {mx.float32}
    assert sum(a.nbytes for a in tensors.values()) == index["metadata"]["total_size"]
    for name, shape in expected_shapes("n2_sharded_bin").items():
        assert tensors[name].shape == shape, name
    for name, shard in index["weight_map"].items():
        assert np.array(tensors[name]).tobytes() in storage_records(SHARDED_INDEX.parent / shard)
