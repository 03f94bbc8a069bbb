"""Data-parallel training on MLX's distributed engine (`mx.distributed`, `mlx.launch`).

Every process walks the same example stream and draws the same random numbers; each
computes only its own block of a step's examples, and the gradients are averaged across
processes before the optimizer step. So N processes of `grad_accum` examples each train
as one process of N * grad_accum examples would. Only rank 0 writes files.

A collective that fails (a process died: its sockets closed) raises `PeerLost`; one that
hangs (a process stopped answering) ends this process after `timeout` seconds, and
`mlx.launch` then stops the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from .cache import TreeCache
from .distractors import arrange
from .model import SharedLLM
from .tree import ContextTree

DEFAULT_TIMEOUT = 1800.0  # seconds a process waits for the others in one collective


class PeerLost(RuntimeError):
    """Another process of the run stopped, or stopped answering."""


class World:
    """The processes of a run: this one's rank, how many there are, and the collectives.

    `World()` is one process alone: every collective returns its input.
    """

    def __init__(self, group: Any = None, timeout: float = DEFAULT_TIMEOUT):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.timeout = timeout
        self._waiting: tuple[float, str] | None = None
        self._watching = False

    @property
    def main(self) -> bool:
        """True on the process that writes files and shows progress."""
        return self.rank == 0

    def share(self, count: int) -> slice:
        """This process's block of `count` items split in equal blocks, one per process."""
        each = count // self.size
        return slice(self.rank * each, (self.rank + 1) * each)

    def wait(self, what: str, *arrays: Any) -> None:
        """Evaluate `arrays`, which hold collectives, under the watchdog."""
        if self.size == 1:
            mx.eval(*arrays)
            return
        self._waiting = (time.monotonic(), what)
        try:
            mx.eval(*arrays)
        except RuntimeError as e:
            lost = f"rank {self.rank}: another process stopped while {what} ({e})"
            raise PeerLost(lost) from None
        finally:
            self._waiting = None

    def sum(self, values: Sequence[float], what: str) -> list[float]:
        """The sums of `values` over the processes, in float64."""
        if self.size == 1:
            return [float(v) for v in values]
        total = mx.distributed.all_sum(
            mx.array(np.asarray(values, np.float64)), group=self.group, stream=mx.cpu
        )
        self.wait(what, total)
        return np.array(total).tolist()

    def any(self, flag: bool, what: str) -> bool:
        return self.sum([float(flag)], what)[0] > 0

    def average_gradients(self, grads: Any) -> Any:
        """The mean of `grads` over the processes (lazy: `wait` evaluates it)."""
        if self.size == 1:
            return grads
        # average_gradients drops empty branches (layers with nothing to train); the
        # optimizer wants the tree as it was.
        mean = dict(tree_flatten(nn.average_gradients(grads, group=self.group)))
        return tree_map_with_path(lambda path, _: mean[path], grads)

    def broadcast(self, tree: Any, what: str) -> Any:
        """Rank 0's arrays of `tree`, on every process (the others pass arrays of the same
        shapes and dtypes)."""
        if self.size == 1:
            return tree

        def send(x: mx.array) -> mx.array:
            x = x if self.main else mx.zeros_like(x)
            return mx.distributed.all_sum(x, group=self.group)

        tree = tree_map(send, tree)
        self.wait(what, tree)
        return tree

    def broadcast_bytes(self, data: bytes | None, what: str) -> bytes:
        """Rank 0's `data` on every process."""
        if self.size == 1:
            return data or b""
        size = int(self.broadcast(mx.array([len(data or b"")]), what).item())
        words = np.zeros(-(-size // 4), np.int32)
        if self.main:
            words.view(np.uint8)[:size] = np.frombuffer(data or b"", np.uint8)
        words = np.array(self.broadcast(mx.array(words), what))
        return words.view(np.uint8)[:size].tobytes()

    def broadcast_folder(self, folder: Path, copy: Path, what: str) -> Path:
        """Rank 0's `folder` (its files), on the other processes copied into `copy`."""
        if self.size == 1:
            return folder
        listing = json.dumps(sorted(p.name for p in folder.iterdir())) if self.main else ""
        names = json.loads(self.broadcast_bytes(listing.encode(), what))
        for name in names:
            data = self.broadcast_bytes((folder / name).read_bytes() if self.main else None, what)
            if not self.main:
                (copy / name).write_bytes(data)
        return folder if self.main else copy

    def gather(self, x: mx.array) -> mx.array:
        """Every process's `x`, concatenated along the first axis in rank order (lazy)."""
        if self.size == 1:
            return x
        return mx.distributed.all_gather(x, group=self.group)

    def check_same(self, **facts: Any) -> None:
        """Refuse a run whose processes differ in `facts` (the model, the settings)."""
        if self.size == 1:
            return
        digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode())
        mine = np.frombuffer(digest.digest()[:8], np.int32)
        every = self.gather(mx.array(mine)[None])
        self.wait("comparing the processes' settings", every)
        differ = [r for r, d in enumerate(np.array(every)) if not np.array_equal(d, mine)]
        if differ:
            raise ValueError(
                f"rank {self.rank} and rank(s) {differ} differ in the model or the training "
                f"settings ({', '.join(facts)}): give every process the same ones"
            )

    @contextmanager
    def watch(self) -> Iterator[World]:
        """While inside: a collective that waits over `timeout` ends this process, and
        SIGTERM (mlx.launch stopping the run) raises PeerLost. Left by an error, SIGTERM
        stays ignored: the launcher stops every process as soon as one fails, and the
        error must still be reported (the launcher waits for the process to end)."""
        if self.size == 1:
            yield self
            return
        self._watching = True
        threading.Thread(target=self._watchdog, daemon=True).start()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._terminated)
        try:
            yield self
        except BaseException:
            if previous is not None:
                previous = signal.SIG_IGN
            raise
        finally:
            self._watching = False
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _terminated(self, signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one PeerLost, not one per signal
        raise PeerLost(f"rank {self.rank}: stopped by the launcher: another process failed")

    def _watchdog(self) -> None:
        while self._watching:
            time.sleep(min(1.0, self.timeout / 10))
            waiting = self._waiting
            if waiting and time.monotonic() - waiting[0] > self.timeout:
                sys.stderr.write(
                    f"rank {self.rank}: no answer from the other processes for "
                    f"{self.timeout:.0f}s while {waiting[1]}; stopping\n"
                )
                sys.stderr.flush()
                os._exit(1)


def launched(timeout: float = DEFAULT_TIMEOUT) -> World:
    """The run's processes: those `mlx.launch` started, or this one alone."""
    group = mx.distributed.init()
    return World(group if group.size() > 1 else None, timeout)


def compress_in_shares(
    model: SharedLLM,
    chunks: np.ndarray,
    world: World,
    progress: Callable[[int, int], None] | None = None,
) -> ContextTree:
    """The tree of `chunks` (movable chunks only: see distractors.movable_chunks), each
    process compressing an equal share; the shares are gathered and their chunks moved
    to their places by rotating the keys."""
    n = len(chunks)
    each = math.ceil(n / world.size)
    mine = chunks[world.rank * each : (world.rank + 1) * each]
    # Equal shares for all_gather: a short share is padded with copies of chunk 0.
    mine = np.concatenate([mine, np.repeat(chunks[:1], each - len(mine), 0)])
    local = model.compress(mx.array(mine), mx.array(chunks[0, :1]), progress)
    layers = [_gathered(layer, world) for layer in local.layers]
    tokens = world.gather(local.tokens)
    stored = [(c.key_parts, c.value_parts) for c in layers]
    world.wait("gathering the distractor chunks", stored, tokens)
    shares = [
        dataclasses.replace(
            local,
            layers=[_slice(layer, r) for layer in layers],
            tokens=tokens[r * each : (r + 1) * each],
        )
        for r in range(world.size)
    ]
    return arrange(model, [(shares[c // each], c % each) for c in range(n)])


def _gathered(layer: TreeCache, world: World) -> TreeCache:
    """A layer whose stored parts hold every process's (stacked on the first axis), in
    any storage format."""
    if not layer.capacity:
        return layer
    keys = tuple(world.gather(p) for p in layer.key_parts)
    values = tuple(world.gather(p) for p in layer.value_parts)
    return TreeCache.from_parts(layer.fmt, layer.shape, keys, values)


def _slice(layer: TreeCache, rank: int) -> TreeCache:
    """Process `rank`'s part of a gathered layer."""
    if not layer.capacity:
        return layer
    keys = tuple(p[rank : rank + 1] for p in layer.key_parts)
    values = tuple(p[rank : rank + 1] for p in layer.value_parts)
    return TreeCache.from_parts(layer.fmt, layer.shape, keys, values)
