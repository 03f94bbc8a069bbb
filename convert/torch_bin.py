"""Read PyTorch ``torch.save`` zip checkpoints (``pytorch_model.bin``) without torch.

The ``data.pkl`` inside is loaded by a restricted unpickler: the only globals it resolves are
torch's tensor-rebuilding functions, storage classes and dtypes (plus ``OrderedDict``), each
mapped to an inert stand-in defined here, so a malicious checkpoint cannot run code. Tensors
are then copied out of the ``data/<key>`` storage records into ``mx.array``s.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
import pickletools
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from .files import MAX_HEADER_BYTES, CheckpointError, check_file

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "load_torch_bin",
]


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle references a global outside the tensor-loading whitelist."""


# torch dtype name -> (numpy dtype of its bytes, mx dtype); numpy has no bfloat16, so its bits
# are read as uint16 and reinterpreted
_DTYPES: dict[str, tuple[type, mx.Dtype]] = {
    "float32": (np.float32, mx.float32),
    "float16": (np.float16, mx.float16),
    "bfloat16": (np.uint16, mx.bfloat16),
    "float64": (np.float64, mx.float64),
    "int64": (np.int64, mx.int64),
    "int32": (np.int32, mx.int32),
    "int16": (np.int16, mx.int16),
    "int8": (np.int8, mx.int8),
    "uint8": (np.uint8, mx.uint8),
    "uint16": (np.uint16, mx.uint16),
    "uint32": (np.uint32, mx.uint32),
    "uint64": (np.uint64, mx.uint64),
    "bool": (np.bool_, mx.bool_),
}

# storage class -> element dtype; UntypedStorage holds raw bytes (torch 2.x writes it for
# dtypes without a legacy storage class, e.g. uint16, via _rebuild_tensor_v3)
_STORAGE_CLASSES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "UntypedStorage": "uint8",
}

_MAX_DIM = 2**31 - 1  # MLX shapes are int32
# bound on offsets and strides (in elements): far beyond any real tensor, and small enough that
# strides in bytes fit numpy's int64
_MAX_INDEX = 2**48
# tied weights view one storage several times (T5 ties four), so tensors may hold that many
# times the bytes of their storages, and no more
_MAX_VIEWS = 4

_ENCRYPTED = 0x1  # zip general purpose flag

# torch < 1.6 wrote a bare pickle stream that starts by pickling this magic number
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

# what a malformed zip, pickle, or stand-in call can raise while loading
_CORRUPT_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    OSError,
    AttributeError,
    NotImplementedError,
    RecursionError,
)


# The stand-ins are NamedTuples: immutable and without __dict__ or __setstate__, so a pickle's
# BUILD opcode cannot patch the shared whitelist objects between loads.


class _StorageType(NamedTuple):
    """Stand-in for a torch storage class such as ``torch.FloatStorage``."""

    dtype: str


class _DType(NamedTuple):
    """Stand-in for a torch dtype such as ``torch.bfloat16``."""

    name: str


class _Storage(NamedTuple):
    """The zip record ``data/<key>``, holding ``numel`` elements of ``dtype``."""

    dtype: str
    key: str
    numel: int


class _Tensor(NamedTuple):
    """A strided view of ``dtype`` elements into a storage, as torch pickles a tensor."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str


class _Global(NamedTuple):
    """Stand-in for a whitelisted torch function."""

    fn: Callable[..., Any]

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _rebuild_tensor(storage: _Storage, offset: int, size: Any, stride: Any, *_: Any) -> _Tensor:
    # v1 passes exactly these; v2 adds requires_grad, backward_hooks, metadata: all irrelevant
    return _Tensor(storage, offset, tuple(size), tuple(stride), storage.dtype)


def _rebuild_tensor_v3(
    storage: _Storage,
    offset: int,
    size: Any,
    stride: Any,
    _requires_grad: Any,
    _backward_hooks: Any,
    dtype: _DType,
    *_: Any,
) -> _Tensor:
    # storage is an UntypedStorage of bytes; offset, size and stride count dtype elements
    return _Tensor(storage, offset, tuple(size), tuple(stride), dtype.name)


def _rebuild_parameter(data: _Tensor, *_: Any) -> _Tensor:
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _Global(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Global(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v3"): _Global(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Global(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Global(_rebuild_parameter),
    # torch 2.x names storage classes under torch / torch.storage; GPU-saved 1.x files torch.cuda
    **{
        (module, cls): _StorageType(dtype)
        for module in ("torch", "torch.storage", "torch.cuda")
        for cls, dtype in _STORAGE_CLASSES.items()
    },
    **{("torch", name): _DType(name) for name in _DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only whitelisted globals, each to an inert stand-in."""

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles spell some globals the Python 2 way (__builtin__.eval); undo that as
        # pickle's own find_class would, so the whitelist and error messages see the real name
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global {module}.{name}: only torch tensor globals are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        match pid:
            case ("storage", _StorageType(dtype), str(key), str(), int(numel)) if numel >= 0:
                return _Storage(dtype, key, numel)
        raise CheckpointError(f"unsupported persistent id {pid!r:.100}")


def _open_zip(path: Path) -> zipfile.ZipFile:
    if zipfile.is_zipfile(path):
        return zipfile.ZipFile(path)
    with path.open("rb") as f:
        head = f.read(32)
    if _LEGACY_MAGIC in head:
        raise CheckpointError(
            "legacy (torch < 1.6) non-zip checkpoint is not supported; re-save it with newer torch"
        )
    raise CheckpointError("not a zip-format torch checkpoint (truncated or corrupt?)")


def _record_prefix(zf: zipfile.ZipFile) -> str:
    """The archive's top folder (torch names it after the file), which holds ``data.pkl``."""
    prefixes = [
        name.removesuffix("/data.pkl")
        for name in zf.namelist()
        if name.count("/") == 1 and name.endswith("/data.pkl")
    ]
    if len(prefixes) != 1:
        raise CheckpointError(f"expected one <folder>/data.pkl in the zip, found {len(prefixes)}")
    return prefixes[0]


def _check_layout(name: str, t: _Tensor, storage_numel: int) -> None:
    """Refuse layouts that would make ``as_strided`` read outside the storage, or that repeat
    its elements into a tensor larger than the storage (a tiny file would then fill memory)."""
    ints = (t.offset, *t.size, *t.stride)
    if (
        len(t.size) != len(t.stride)
        or not all(type(d) is int and 0 <= d <= _MAX_INDEX for d in ints)
        or max(t.size, default=0) > _MAX_DIM
    ):
        raise CheckpointError(f"tensor {name!r} has an invalid layout {t.size} / {t.stride}")
    numel = math.prod(t.size)
    if numel > storage_numel:
        raise CheckpointError(
            f"tensor {name!r} has {numel} elements, more than the {storage_numel} of its storage"
        )
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride, strict=True))
    if numel and last >= storage_numel:
        raise CheckpointError(f"tensor {name!r} reaches past the end of its storage")


def _check_pickle(pickled: bytes) -> None:
    """Refuse a pickle whose lengths or memo indices reach past its own size: the C unpickler
    allocates what they claim before it finds the data missing. (``genops`` reads lengths
    without allocating them, and raises ValueError for one past the end.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # on a bad escape in a text string
        for opcode, arg, _ in pickletools.genops(pickled):
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg >= len(pickled):
                raise CheckpointError(f"pickle memo index {arg} is past its {len(pickled)} bytes")


def _nbytes(storage: _Storage) -> int:
    return storage.numel * np.dtype(_DTYPES[storage.dtype][0]).itemsize


class _Archive:
    """An open torch zip checkpoint: unpickles ``data.pkl`` and reads storage records."""

    def __init__(self, zf: zipfile.ZipFile, size: int) -> None:
        self._zf = zf
        self._unread = size  # bytes of the file that no record read so far has claimed
        self._prefix = _record_prefix(zf)
        self._byteorder = self._read_byteorder()
        self._records: dict[str, bytes] = {}
        self._storage_bytes = 0  # of the distinct records read
        self._tensor_bytes = 0  # of the tensors built from them

    def load(self) -> dict[str, mx.array]:
        pickled = self._read("data.pkl", MAX_HEADER_BYTES)
        _check_pickle(pickled)
        obj = _RestrictedUnpickler(io.BytesIO(pickled)).load()
        if not isinstance(obj, dict):
            raise CheckpointError(f"expected a dict of tensors, found {type(obj).__name__}")
        tensors = {}
        for name, value in obj.items():
            if not isinstance(name, str):
                raise CheckpointError(f"non-string key {name!r:.100}")
            if not isinstance(value, _Tensor):
                raise CheckpointError(f"entry {name!r} is not a tensor ({type(value).__name__})")
            tensors[name] = self._tensor(name, value)
        return tensors

    def _read(self, name: str, limit: int) -> bytes:
        """Record ``name``, refused before it is read if it claims more than ``limit`` bytes."""
        info = self._zf.getinfo(f"{self._prefix}/{name}")
        if info.flag_bits & _ENCRYPTED:
            raise CheckpointError(f"record {name!r:.100} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            # torch.save never compresses, and a compressed record could inflate without bound
            raise CheckpointError(f"record {name!r:.100} is compressed; torch.save never does that")
        if info.file_size > limit:
            raise CheckpointError(
                f"record {name!r:.100} holds {info.file_size} bytes, more than the {limit} expected"
            )
        # stored records are disjoint stretches of the file, so together they fit in it
        if info.file_size > self._unread:
            raise CheckpointError(
                f"record {name!r:.100} overlaps others: together they claim more than the file"
            )
        self._unread -= info.file_size
        return self._zf.read(info)

    def _read_byteorder(self) -> str:
        try:
            order = self._read("byteorder", 16).decode().strip()
        except KeyError:
            return "little"  # older torch wrote no byteorder record; those files are little-endian
        if order not in ("little", "big"):
            raise CheckpointError(f"unknown byteorder {order!r:.20}")
        return order

    def _record(self, storage: _Storage) -> bytes:
        expected = _nbytes(storage)
        if storage.key not in self._records:
            self._records[storage.key] = self._read(f"data/{storage.key}", expected)
            self._storage_bytes += len(self._records[storage.key])
        raw = self._records[storage.key]
        if len(raw) != expected:
            raise CheckpointError(
                f"storage {storage.key!r} has {len(raw)} bytes, expected {expected}"
            )
        return raw

    def _tensor(self, name: str, t: _Tensor) -> mx.array:
        """Copy tensor ``t``'s strided view out of its storage into an ``mx.array``."""
        if not isinstance(t.storage, _Storage):
            raise CheckpointError(f"tensor {name!r} has no storage")
        np_dtype, mx_dtype = _DTYPES[t.dtype]
        dtype = np.dtype(np_dtype).newbyteorder("<" if self._byteorder == "little" else ">")
        _check_layout(name, t, _nbytes(t.storage) // dtype.itemsize)
        flat = np.frombuffer(self._record(t.storage), dtype)
        self._count(name, math.prod(t.size) * dtype.itemsize)
        strides = [s * dtype.itemsize for s in t.stride]
        view = np.lib.stride_tricks.as_strided(flat[t.offset :], t.size, strides, writeable=False)
        # copies only when needed: to densify a strided view or byte-swap to native order
        host = view.astype(dtype.newbyteorder("="), order="C", copy=False)
        if mx_dtype == mx.bfloat16:
            return mx.array(host).view(mx.bfloat16)
        return mx.array(host, dtype=mx_dtype)  # explicit, else mx narrows float64 to float32

    def _count(self, name: str, nbytes: int) -> None:
        """Refuse a tensor that would make the file's tensors outgrow their storages
        _MAX_VIEWS times: names are cheap in a pickle, and each full view of a storage is a copy."""
        self._tensor_bytes += nbytes
        if self._tensor_bytes > _MAX_VIEWS * self._storage_bytes:
            raise CheckpointError(
                f"tensor {name!r} brings the tensors to {self._tensor_bytes} bytes, more than "
                f"{_MAX_VIEWS} times the {self._storage_bytes} bytes of the storages they view"
            )


def load_torch_bin(path: str | Path) -> dict[str, mx.array]:
    """Load a zip-format ``torch.save`` file holding a flat ``{name: tensor}`` dict.

    Raises ``UnsafeCheckpointError`` if its pickle references anything but tensor-rebuilding
    globals, and ``CheckpointError`` for legacy, corrupt, or non-tensor content.
    """
    path = Path(path)
    try:
        size = check_file(path)
        with _open_zip(path) as zf:
            return _Archive(zf, size).load()
    except CheckpointError as e:
        raise type(e)(f"{path}: {e}") from None
    except _CORRUPT_ERRORS as e:
        raise CheckpointError(f"{path}: corrupt torch checkpoint ({type(e).__name__}: {e})") from e
