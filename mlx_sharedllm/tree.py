"""The context tree: which segments of each chunk are kept, and the tree itself.

Planning works on token offsets only (cheap numpy); the model runs the encoder on
the planned segments. See SPEC section 3 for the algorithm.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .cache import TreeCache, TreeFormat
from .config import check_int

# chooser(node_start, half) -> (n,) ints, 0 keeps the left half and 1 the right.
HalfChooser = Callable[[np.ndarray, int], np.ndarray]


def keep_count(length: int, tokens: int | None = 0, fraction: float | None = None) -> int:
    """Tokens to keep from a segment of `length`: `int(length * fraction)` when a fraction
    is given, else `tokens` when > 0, else all (SPEC's last_p, as Settings holds it)."""
    if fraction is not None:
        return int(length * fraction)
    return tokens if tokens > 0 else length


def downsample_index(
    length: int, tokens: int | None = 0, fraction: float | None = None
) -> np.ndarray:
    """Positions kept by downsampling: every `length // t`-th token, from the first, for
    t = keep_count(length, tokens, fraction).

    This keeps more than t positions when t does not divide `length`, as the
    released code does. A keep count of 0, or one above `length`, keeps everything.
    """
    return np.arange(0, length, _interval(length, tokens, fraction))


def downsample_count(length: int, tokens: int | None = 0, fraction: float | None = None) -> int:
    """len(downsample_index(length, tokens, fraction)), without listing the positions."""
    return -(-length // _interval(length, tokens, fraction))


def _interval(length: int, tokens: int | None, fraction: float | None) -> int:
    return max(1, length // max(1, keep_count(length, tokens, fraction)))


def pick_halves(left: np.ndarray, right: np.ndarray, layout: str) -> np.ndarray:
    """Which half each chunk keeps, from the (n,) similarity scores of its halves.

    The paper compares a chunk's own halves. The released code (reference layout)
    lays the scores out as [lefts..., rights...] and reads them back as rows of two,
    so row j pairs scores from other chunks. Ties keep the first (left) entry.
    """
    if layout == "reference":
        scores = np.concatenate([left, right]).reshape(-1, 2)
    else:
        scores = np.stack([left, right], axis=1)
    return np.argmax(scores, axis=1)


def leaf_rows(n: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """For each chunk slot, the two leaf rows it holds. Row r is side r % 2 of chunk r // 2.

    The reference layout splits the 2n rows into halves and joins row j with row n + j.
    """
    if layout == "reference":
        return np.arange(n), np.arange(n, 2 * n)
    return np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2)


@dataclass
class SegmentPlan:
    """The segments every chunk slot is built from, finest level first.

    Segment s of slot j is `chunks[source[j, s], start[j, s] : start[j, s] + lengths[s]]`.
    """

    source: np.ndarray
    start: np.ndarray
    lengths: list[int]


def plan_segments(
    n: int,
    chunk_len: int,
    depth: int,
    layout: str,
    choose: HalfChooser,
    preserved: Sequence[int] | None = None,
) -> SegmentPlan:
    """Walk the tree of every chunk at once, recording which segments are preserved.

    The policy always compares the two exact halves of a node. `preserved[d]` is how
    many tokens the part not kept gets at level d (default: half, as at inference;
    training's split noise moves it, the same for every chunk so the tree stays
    regular).
    """
    if preserved is None:
        preserved = [chunk_len >> (d + 1) for d in range(depth - 1)]
    node, length = np.zeros(n, dtype=np.int64), chunk_len
    kept_out: list[tuple[np.ndarray, int]] = []
    for size in preserved:
        keep = np.asarray(choose(node, length // 2), dtype=np.int64)
        kept_out.append((node + (1 - keep) * (length - size), size))
        node, length = node + keep * size, length - size
    leaf = length // 2  # an odd last node loses its last token
    rows = leaf_rows(n, layout)
    sources = [r // 2 for r in rows] + [np.arange(n)] * len(kept_out)
    starts = [node[r // 2] + (r % 2) * leaf for r in rows]
    starts += [start for start, _ in reversed(kept_out)]
    lengths = [leaf, leaf] + [size for _, size in reversed(kept_out)]
    return SegmentPlan(np.stack(sources, 1), np.stack(starts, 1), lengths)


def chunk_positions(n: int, entries: int, layout: str) -> tuple[np.ndarray, int]:
    """Chunk-level RoPE positions: (key position of each chunk, query position)."""
    chunks = np.arange(n)
    if layout == "reference":
        # The released code indexes its cos/sin table twice, giving c // T and n + 1.
        return chunks // entries, n + 1
    return chunks, n


@dataclass
class ContextTree:
    """Compressed key/value states of a long context: one TreeCache per injection layer.

    One layer per injection layer of the model (`config.injection_layers`, in order); a
    tree saved before models declared them may hold empty layers, which loading drops.

    Each layer holds (1, kv_heads, n_chunks * entries_per_chunk, head_dim) keys and
    values, chunk-major, keys already rotated to their chunk position, stored as
    `layers[i].fmt` says (a float dtype or affine quantized).
    `remainder` holds the trailing tokens that did not fill a chunk (not compressed), and
    `tokens` the compressed chunks' own token ids, (n_chunks, chunk_len), which re-reading
    puts back in the running text (None for a tree saved before trees kept them).
    `meta` records what the tree was built from: the model's fingerprint, the tree
    settings, and hashes of the context and query tokens.
    """

    layers: list[TreeCache]
    n_chunks: int
    chunk_len: int
    entries_per_chunk: int
    query_position: int
    remainder: mx.array | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    tokens: mx.array | None = None
    # The vocabulary size check_token_ids last accepted the token arrays for (0: none).
    _ids_checked: int = field(default=0, init=False, repr=False, compare=False)

    @property
    def num_entries(self) -> int:
        return self.n_chunks * self.entries_per_chunk

    @property
    def keys(self) -> list[mx.array]:
        """Every layer's keys as float arrays (dequantized when stored quantized)."""
        return [layer.keys for layer in self.layers]

    @property
    def values(self) -> list[mx.array]:
        return [layer.values for layer in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def stored_as(self, fmt: TreeFormat) -> ContextTree:
        """The same tree with its entries stored in `fmt` (e.g. 8-bit, to save it small)."""
        return replace(self, layers=[layer.stored_as(fmt) for layer in self.layers])

    def layer(self, i: int) -> TreeCache:
        return self.layers[i]

    def per_chunk(self, x: mx.array) -> mx.array:
        """View a (1, kv, n*T, D) tree array as (n, kv, T, D)."""
        _, kv, _, d = x.shape
        return x.reshape(kv, self.n_chunks, self.entries_per_chunk, d).transpose(1, 0, 2, 3)

    def check_token_ids(self, vocab_size: int) -> None:
        """Refuse a remainder or tokens outside a vocabulary of `vocab_size` (an embedding
        lookup out of range reads past its table). Checked once per tree and vocabulary."""
        if self._ids_checked == vocab_size:
            return
        for name, ids in (("remainder", self.remainder), ("tokens", self.tokens)):
            if ids is not None:
                check_token_ids(ids, vocab_size, f"the tree's {name}")
        self._ids_checked = vocab_size

    def save(self, path: str | Path) -> None:
        """Write the tree, as stored (quantized or not), and its metadata to a safetensors
        file at `path` (any name). The header carries a checksum of the arrays."""
        arrays = self._arrays()
        fmt = self.layers[0].fmt
        header = {
            "layers": len(self.layers),
            "shapes": [list(layer.shape) for layer in self.layers],
            "format": {"dtype": fmt.dtype, "bits": fmt.bits, "group_size": fmt.group_size},
            "n_chunks": self.n_chunks,
            "chunk_len": self.chunk_len,
            "entries_per_chunk": self.entries_per_chunk,
            "query_position": self.query_position,
            "meta": self.meta,
            "checksum": checksum(arrays),
        }
        metadata = {"format": TREE_FORMAT, "tree": json.dumps(header)}
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        # A file object keeps MLX from appending ".safetensors" to the name.
        with open(partial, "wb") as f:
            mx.save_safetensors(f, arrays, metadata=metadata)
        os.replace(partial, path)

    def _arrays(self) -> dict[str, mx.array]:
        """The arrays a saved tree holds, by name."""
        arrays = {}
        for i, layer in enumerate(self.layers):
            for kind, parts in (("keys", layer.key_parts), ("values", layer.value_parts)):
                arrays.update({f"{kind}.{i}.{j}": a for j, a in enumerate(parts)})
        if self.remainder is not None:
            arrays["remainder"] = self.remainder
        if self.tokens is not None:
            arrays["tokens"] = self.tokens
        return arrays

    @classmethod
    def load(cls, path: str | Path) -> ContextTree:
        """Read a tree written by `save`, refusing a file that is corrupt or inconsistent;
        use `mlx_sharedllm.load_context` to check it against a model."""
        try:
            arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
            header = _read_header(metadata)
            fmt = TreeFormat(**header["format"])
            parts = 1 if fmt.bits is None else 3
            shapes = header["shapes"]
            _check_names(arrays, header["layers"], parts)
            if metadata["format"] == TREE_FORMAT and checksum(arrays) != header["checksum"]:
                raise ValueError("the arrays do not match their checksum: the file is corrupt")

            def stored(kind: str, i: int) -> tuple[mx.array, ...]:
                return tuple(arrays[f"{kind}.{i}.{j}"] for j in range(parts))

            tree = cls(
                layers=[
                    TreeCache.from_parts(fmt, shapes[i], stored("keys", i), stored("values", i))
                    for i in range(header["layers"])
                ],
                n_chunks=header["n_chunks"],
                chunk_len=header["chunk_len"],
                entries_per_chunk=header["entries_per_chunk"],
                query_position=header["query_position"],
                remainder=arrays.get("remainder"),
                meta=header["meta"],
                tokens=arrays.get("tokens"),
            )
            tree.check()
            return tree
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a readable context tree: {e}") from None

    def check(self) -> None:
        """Refuse a tree whose parts disagree: layer shapes and stored arrays, the chunk
        counts, the query position, the token arrays, or inf and NaN entries."""
        n, t = self.n_chunks, self.entries_per_chunk
        _check_shapes([layer.shape for layer in self.layers], n * t)
        for i, layer in enumerate(self.layers):
            try:
                layer.check_stored()
            except ValueError as e:
                raise ValueError(f"layer {i}: {e}") from None
        _check_query_position(self.query_position, n, self.meta)
        if self.remainder is not None:
            _check_ids_array(self.remainder, 1, "remainder")
            if self.remainder.size >= self.chunk_len:
                raise ValueError(
                    f"the remainder holds {self.remainder.size} tokens, a whole chunk or more"
                )
        if self.tokens is not None:
            _check_ids_array(self.tokens, 2, "tokens")
            if tuple(self.tokens.shape) != (n, self.chunk_len):
                raise ValueError(
                    f"tokens have shape {tuple(self.tokens.shape)}, not {(n, self.chunk_len)}"
                )
            made_from = self.meta.get("context_sha256")
            if made_from is not None and made_from != token_hash(self.tokens):
                raise ValueError("the tokens are not the context the tree was made from")


def join_chunks(pieces: Sequence[tuple[ContextTree, int]]) -> ContextTree:
    """A tree whose chunk p is chunk j of tree t, for pieces[p] = (t, j): entries as stored
    (keys stay rotated to chunk position j). The query goes after the last chunk; there is
    no remainder. A layer empty in the first tree (a legacy tree's) stays empty."""
    first = pieces[0][0]
    layers = [
        _chunk_entries(pieces, i) if layer.capacity else layer
        for i, layer in enumerate(first.layers)
    ]
    tokens = None
    if all(tree.tokens is not None for tree, _ in pieces):
        tokens = mx.stack([tree.tokens[j] for tree, j in pieces])
    # Part of a context, or of several: their hashes would be wrong.
    meta = {k: v for k, v in first.meta.items() if not k.endswith("_sha256")}
    n = len(pieces)
    return ContextTree(layers, n, first.chunk_len, first.entries_per_chunk, n, None, meta, tokens)


def _chunk_entries(pieces: Sequence[tuple[ContextTree, int]], i: int) -> TreeCache:
    """Layer i's entries of chunk j of tree t, for each (t, j) in `pieces`, in order."""
    t = pieces[0][0].entries_per_chunk
    return TreeCache.concatenate(
        [tree.layers[i].take(slice(j * t, (j + 1) * t)) for tree, j in pieces]
    )


TREE_FORMAT = "mlx-sharedllm-context-tree/3"
# Trees saved before the header carried checksums; they load without that check.
UNCHECKED_FORMAT = "mlx-sharedllm-context-tree/2"
HEADER_INTS = {"layers": 1, "n_chunks": 1, "chunk_len": 2, "entries_per_chunk": 1}


def token_hash(tokens: mx.array) -> str:
    """The sha256 of token ids (as int64), which a tree's meta records of its context."""
    return hashlib.sha256(np.array(tokens, dtype=np.int64).tobytes()).hexdigest()


def checksum(arrays: dict[str, mx.array]) -> str:
    """The sha256 of arrays' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        x = arrays[name]
        digest.update(f"{name}{x.dtype}{tuple(x.shape)}".encode())
        digest.update(memoryview(mx.contiguous(x)))
    return digest.hexdigest()


def check_token_ids(ids: mx.array, vocab_size: int, what: str) -> None:
    """Refuse token ids outside 0..vocab_size - 1, naming the first bad one."""
    if ids.size == 0:
        return
    low, high = mx.min(ids).item(), mx.max(ids).item()
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"{what} holds token id {bad}, outside the model's vocabulary (0..{vocab_size - 1})"
        )


def _read_header(metadata: dict[str, str]) -> dict[str, Any]:
    """The tree header of a saved file, with its fields' types and ranges checked."""
    if metadata.get("format") not in (TREE_FORMAT, UNCHECKED_FORMAT):
        raise ValueError(f"not a saved context tree (format {metadata.get('format')!r})")
    header = json.loads(metadata["tree"])
    if not isinstance(header, dict):
        raise ValueError("the tree header is not an object")
    for name, low in HEADER_INTS.items():
        check_int(name, header[name], low)
    check_int("query_position", header["query_position"], 0)
    if header["entries_per_chunk"] > header["chunk_len"]:
        raise ValueError(
            f"entries_per_chunk {header['entries_per_chunk']} exceeds chunk_len "
            f"{header['chunk_len']}"
        )
    for name in ("format", "meta"):
        if not isinstance(header[name], dict):
            raise ValueError(f"the header's {name} is not an object")
    if not isinstance(header["meta"].get("config", {}), dict):
        raise ValueError("the header's meta.config is not an object")
    shapes = header.setdefault("shapes", [header.get("shape")] * header["layers"])
    if not isinstance(shapes, list) or len(shapes) != header["layers"]:
        raise ValueError(f"the header's shapes do not list its {header['layers']} layers")
    return header


def _check_names(arrays: dict[str, mx.array], layers: int, parts: int) -> None:
    """Refuse a file that lacks one of a tree's arrays or holds others."""
    expected = {
        f"{kind}.{i}.{j}"
        for kind in ("keys", "values")
        for i in range(layers)
        for j in range(parts)
    }
    missing = sorted(expected - set(arrays))
    extra = sorted(set(arrays) - expected - {"remainder", "tokens"})
    if missing or extra:
        raise ValueError(f"arrays missing {missing}, unexpected {extra}")


def _check_shapes(shapes: list[tuple[int, ...]], entries: int) -> None:
    """Every layer is (1, kv_heads, entries, head_dim), or empty (a legacy tree's), with the
    same kv_heads and head_dim."""
    for i, shape in enumerate(shapes):
        if len(shape) != 4 or any(type(x) is not int for x in shape):
            raise ValueError(f"layer {i} has shape {shape}, not 4 integers")
        if shape[0] != 1 or shape[2] not in (0, entries) or min(shape[1], shape[3]) < 1:
            raise ValueError(
                f"layer {i} has shape {tuple(shape)}, not (1, kv_heads, {entries} entries "
                "(n_chunks x entries_per_chunk) or 0, head_dim)"
            )
    if len({(s[1], s[3]) for s in shapes}) > 1:
        raise ValueError("the layers disagree on kv_heads or head_dim")


def _check_query_position(position: int, n_chunks: int, meta: dict[str, Any]) -> None:
    """Compress puts the query after the last chunk: at n_chunks (paper layout) or
    n_chunks + 1 (reference). A tree of selected chunks keeps its whole tree's position,
    beyond the last chunk it holds."""
    selected = meta.get("selected_chunks")
    if selected is None:
        if position not in (n_chunks, n_chunks + 1):
            raise ValueError(
                f"query_position {position} is not where {n_chunks} chunks put the query"
            )
        return
    if not isinstance(selected, list) or len(selected) != n_chunks:
        raise ValueError(f"selected_chunks does not list the tree's {n_chunks} chunks")
    if any(type(c) is not int or c < 0 for c in selected) or not position > max(selected):
        raise ValueError(f"query_position {position} does not follow the selected chunks")


def _check_ids_array(ids: mx.array, ndim: int, name: str) -> None:
    if ids.ndim != ndim or not mx.issubdtype(ids.dtype, mx.integer):
        raise ValueError(
            f"{name} must be a {ndim}-D array of token ids, got {ids.dtype} {tuple(ids.shape)}"
        )
