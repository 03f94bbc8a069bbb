"""Compressed documents kept in memory and on disk, the least recently used dropped first.

Only the model's worker thread calls `get` and `put` (they run MLX); the index behind
`__contains__` is shared with the event loop under a lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..cache import TreeFormat
from ..loading import load_context
from ..model import SharedLLM
from ..tree import ContextTree

log = logging.getLogger(__name__)

# Trees are saved 8-bit where the model's head_dim takes the group, as the CLI saves them.
SAVE_BITS, SAVE_GROUP = 8, 64
SUFFIX = ".tree"
ID = re.compile(r"[0-9a-f]{64}")


class TooLarge(ValueError):
    """A tree larger than the whole cache budget."""


def document_id(fingerprint: str, text: str) -> str:
    """A document's id: the sha256 of the model's fingerprint and the text."""
    return hashlib.sha256(f"{fingerprint}\n{text}".encode()).hexdigest()


def stored_format(model: SharedLLM) -> TreeFormat:
    """The format trees are compressed and saved in: 8-bit where head_dim allows."""
    bits = None if model.tree_shape(0)[3] % SAVE_GROUP else SAVE_BITS
    return TreeFormat(model.compute_dtype, bits, SAVE_GROUP)


def readable(tree: ContextTree, model: SharedLLM) -> ContextTree:
    """The tree as it is read: in float on a CPU, where quantized matmuls are slow."""
    quantized = tree.layers and tree.layers[0].fmt.bits is not None
    if quantized and mx.default_device() == mx.cpu:
        return tree.stored_as(TreeFormat(model.compute_dtype))
    return tree


class TreeStore:
    """Trees by id under `folder/<fingerprint>/`, with at most `budget` bytes in memory
    and `budget` bytes of files; a tree evicted from memory is read back from its file."""

    def __init__(self, model: SharedLLM, folder: Path, budget: int):
        self.model, self.budget = model, budget
        self.folder = Path(folder) / model.fingerprint()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, ContextTree] = OrderedDict()
        self._files: OrderedDict[str, int] = self._scan()
        self._evict()

    def _scan(self) -> OrderedDict[str, int]:
        """The saved trees, oldest use first (a file's mtime is its last use)."""
        for partial in self.folder.glob(f"*{SUFFIX}.partial"):
            partial.unlink(missing_ok=True)
        found = [
            (p.stat().st_mtime, p.stem, p.stat().st_size)
            for p in self.folder.glob(f"*{SUFFIX}")
            if ID.fullmatch(p.stem)
        ]
        return OrderedDict((name, size) for _, name, size in sorted(found))

    def path(self, doc_id: str) -> Path:
        return self.folder / f"{doc_id}{SUFFIX}"

    def __contains__(self, doc_id: str) -> bool:
        with self._lock:
            return doc_id in self._memory or doc_id in self._files

    def get(self, doc_id: str) -> ContextTree | None:
        """The tree, from memory or its file (None if neither holds it), marked as used."""
        with self._lock:
            tree = self._memory.get(doc_id)
            if tree is not None:
                self._memory.move_to_end(doc_id)
            on_disk = doc_id in self._files
        if on_disk:
            self._touch(doc_id)
        if tree is not None or not on_disk:
            return tree
        try:
            tree = readable(load_context(self.path(doc_id), self.model), self.model)
        except ValueError as e:
            log.warning("dropping an unreadable saved tree: %s", e)
            self.delete(doc_id)
            return None
        self._keep(doc_id, tree)
        return tree

    def put(self, doc_id: str, tree: ContextTree) -> ContextTree:
        """Save a tree (stored as `stored_format`) and keep it; the tree to read."""
        tree = readable(tree, self.model)
        if tree.nbytes > self.budget:
            raise TooLarge(
                f"the compressed text takes {tree.nbytes:,} bytes, more than the cache "
                f"budget ({self.budget:,} bytes; --cache-bytes)"
            )
        self._save(doc_id, tree)
        self._keep(doc_id, tree)
        return tree

    def _save(self, doc_id: str, tree: ContextTree) -> None:
        path = self.path(doc_id)
        try:
            tree.stored_as(stored_format(self.model)).save(path)
        except OSError as e:
            log.warning("cannot save a tree to %s (kept in memory only): %s", path, e)
            return
        with self._lock:
            self._files[doc_id] = path.stat().st_size
            self._files.move_to_end(doc_id)
        self._evict()

    def _keep(self, doc_id: str, tree: ContextTree) -> None:
        with self._lock:
            self._memory[doc_id] = tree
            self._memory.move_to_end(doc_id)
        self._evict()

    def _touch(self, doc_id: str) -> None:
        with self._lock:
            self._files.move_to_end(doc_id)
        with contextlib.suppress(OSError):  # evicted meanwhile
            os.utime(self.path(doc_id))

    def _evict(self) -> None:
        """Drop the least recently used trees until memory and files fit the budget."""
        with self._lock:
            while sum(t.nbytes for t in self._memory.values()) > self.budget:
                self._memory.popitem(last=False)
            dropped = []
            while sum(self._files.values()) > self.budget:
                dropped.append(self._files.popitem(last=False)[0])
        for doc_id in dropped:
            self.path(doc_id).unlink(missing_ok=True)

    def delete(self, doc_id: str) -> bool:
        """Forget a tree in memory and on disk; whether there was one."""
        with self._lock:
            found = self._memory.pop(doc_id, None) is not None
            found = self._files.pop(doc_id, None) is not None or found
        self.path(doc_id).unlink(missing_ok=True)
        return found

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "documents": len(set(self._memory) | set(self._files)),
                "memory_bytes": sum(t.nbytes for t in self._memory.values()),
                "disk_bytes": sum(self._files.values()),
                "budget_bytes": self.budget,
                "folder": str(self.folder),
            }

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(set(self._memory) | set(self._files))
