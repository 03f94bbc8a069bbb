"""The context tree: which segments of each chunk are kept, and the tree itself.

Planning works on token offsets only (cheap numpy); the model runs the encoder on
the planned segments. See SPEC section 3 for the algorithm.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .cache import TreeCache, TreeFormat

# chooser(node_start, half) -> (n,) ints, 0 keeps the left half and 1 the right.
HalfChooser = Callable[[np.ndarray, int], np.ndarray]


def keep_count(length: int, last_p: int | float) -> int:
    """Tokens to keep from a segment of `length`: an int > 0 keeps that many, a float
    keeps `int(length * last_p)`, an int <= 0 keeps all."""
    if isinstance(last_p, float):
        return int(length * last_p)
    return last_p if last_p > 0 else length


def downsample_index(length: int, last_p: int | float) -> np.ndarray:
    """Positions kept by downsampling: every `length // t`-th token, from the first.

    This keeps more than t positions when t does not divide `length`, as the
    released code does. A keep count of 0, or one above `length`, keeps everything.
    """
    t = keep_count(length, last_p)
    interval = max(1, length // max(1, t))
    return np.arange(0, length, interval)


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

    A layer whose injection is idle (all-zero output projection) holds no entries.

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

    @property
    def num_entries(self) -> int:
        return self.n_chunks * self.entries_per_chunk

    @property
    def keys(self) -> list[mx.array]:
        """Every layer's keys as float arrays (dequantized when stored quantized)."""
        return [layer.dequantized()[0] for layer in self.layers]

    @property
    def values(self) -> list[mx.array]:
        return [layer.dequantized()[1] for layer in self.layers]

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

    def save(self, path: str | Path) -> None:
        """Write the tree, as stored (quantized or not), and its metadata to a safetensors
        file at `path` (any name)."""
        arrays = {}
        for i, layer in enumerate(self.layers):
            for kind, stored in (("keys", layer.keys), ("values", layer.values)):
                parts = stored if isinstance(stored, tuple) else (stored,)
                arrays.update({f"{kind}.{i}.{j}": a for j, a in enumerate(parts)})
        if self.remainder is not None:
            arrays["remainder"] = self.remainder
        if self.tokens is not None:
            arrays["tokens"] = self.tokens
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
        }
        metadata = {"format": TREE_FORMAT, "tree": json.dumps(header)}
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        # A file object keeps MLX from appending ".safetensors" to the name.
        with open(partial, "wb") as f:
            mx.save_safetensors(f, arrays, metadata=metadata)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | Path) -> ContextTree:
        """Read a tree written by `save`; use `mlx_sharedllm.load_context` to check it
        against a model."""
        try:
            arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
            if metadata.get("format") != TREE_FORMAT:
                raise ValueError(f"not a saved context tree (format {metadata.get('format')!r})")
            header = json.loads(metadata["tree"])
            fmt = TreeFormat(**header["format"])
            parts = 1 if fmt.bits is None else 3

            def stored(kind: str, i: int):
                found = tuple(arrays[f"{kind}.{i}.{j}"] for j in range(parts))
                return found if fmt.bits is not None else found[0]

            shapes = header.get("shapes") or [header["shape"]] * header["layers"]
            layers = [
                TreeCache.from_arrays(fmt, shapes[i], stored("keys", i), stored("values", i))
                for i in range(header["layers"])
            ]
            return cls(
                layers=layers,
                n_chunks=int(header["n_chunks"]),
                chunk_len=int(header["chunk_len"]),
                entries_per_chunk=int(header["entries_per_chunk"]),
                query_position=int(header["query_position"]),
                remainder=arrays.get("remainder"),
                meta=header["meta"],
                tokens=arrays.get("tokens"),
            )
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a readable context tree: {e}") from None


TREE_FORMAT = "mlx-sharedllm-context-tree/2"
