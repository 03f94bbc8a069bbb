"""Distractor chunks: plain text compressed once, to make training trees long.

Training examples are short (compressing is the slow part of a step), but a question
about a book is asked over tens of thousands of tree entries. Padding each example's
tree with chunks of other text, compressed once up front, shows the injection a long
tree at the cost of one compression: where a tree's chunks depend only on their own
tokens, a chunk's entries are moved to another chunk position by rotating its keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import TreeCache
from .kernels import chunk_major, rotate_at
from .model import SharedLLM
from .tree import ContextTree, join_chunks


def movable_chunks(model: SharedLLM) -> bool:
    """True when each chunk's tree entries depend only on that chunk's tokens and its
    position (no query-aware split: depth 1 or the 'right' policy; the paper layout,
    whose chunk position is the chunk's index), so chunks can be moved between trees.
    The tree is the model's settings' (training compresses with them)."""
    s = model.settings
    return (s.tree_depth == 1 or s.policy == "right") and model.config.layout == "paper"


def arrange(model: SharedLLM, pieces: list[tuple[ContextTree, int]]) -> ContextTree:
    """A tree whose chunk p is chunk j of tree t, for pieces[p] = (t, j): entries copied,
    keys rotated from chunk position j to p (a quantized tree's keys are quantized again
    after). The query goes after the last chunk; there is no remainder."""
    tree = join_chunks(pieces)
    shifts = mx.array([p - j for p, (_, j) in enumerate(pieces)])
    layers = [
        _moved(tree, layer, model.chunk_rope, shifts) if layer.capacity else layer
        for layer in tree.layers
    ]
    return dataclasses.replace(tree, layers=layers)


def _moved(tree: ContextTree, layer: TreeCache, rope: nn.Module, shifts: mx.array) -> TreeCache:
    """`layer` of `tree` with chunk p's keys rotated on by shifts[p] positions."""
    keys = chunk_major(rotate_at(tree.per_chunk(layer.keys), rope, shifts))[None]
    return TreeCache.from_parts(layer.fmt, layer.shape, layer.fmt.store(keys), layer.value_parts)


class Distractors:
    """Chunks of `tokens`, compressed once, that pad training trees to up to `max_chunks`
    chunks: the example's chunks go in, in order, at a random place among distractor
    chunks drawn at random (`last=True` keeps them last, next to the running text they
    continue). The number of chunks is drawn log-uniformly between the example's and
    `max_chunks`, so every scale of length is trained alike. `compress(chunks)`, if
    given, makes the bank's tree instead of `model.compress` (data-parallel training
    compresses it in shares across processes)."""

    def __init__(
        self,
        model: SharedLLM,
        tokens: np.ndarray,
        max_chunks: int,
        progress: Callable[[int, int], None] | None = None,
        compress: Callable[[np.ndarray], ContextTree] | None = None,
    ):
        if not movable_chunks(model):
            raise ValueError(
                "distractors need trees whose chunks do not depend on the query or on each "
                "other (tree_depth 1 or policy 'right', the paper layout)"
            )
        if max_chunks < 2:
            raise ValueError(f"distractor chunks must be at least 2, got {max_chunks}")
        chunk_len, bank = model.config.chunk_len, max_chunks - 1
        if len(tokens) < bank * chunk_len:
            raise ValueError(
                f"{max_chunks} chunks need {bank * chunk_len:,} tokens of distractor text "
                f"({bank} chunks of {chunk_len}), got {len(tokens):,}"
            )
        self.model, self.max_chunks = model, max_chunks
        chunks = np.asarray(tokens[: bank * chunk_len]).reshape(bank, chunk_len)
        if compress is None:
            self.bank = model.compress(mx.array(chunks), mx.array(chunks[0, :1]), progress)
        else:
            self.bank = compress(chunks)

    def pad(
        self, tree: ContextTree, rng: np.random.Generator, last: bool = False
    ) -> tuple[ContextTree, int]:
        """(the padded tree, the chunk position of the example's first chunk)."""
        return self.place(tree, self.draw(tree.n_chunks, rng, last))

    def draw(
        self, n: int, rng: np.random.Generator, last: bool = False
    ) -> tuple[np.ndarray, int] | None:
        """The random part of padding a tree of `n` chunks: (the bank chunks drawn, the
        position of the tree's first chunk), or None when it is long enough."""
        if n >= self.max_chunks:
            return None
        total = round(math.exp(rng.uniform(math.log(n), math.log(self.max_chunks))))
        picks = rng.choice(self.bank.n_chunks, total - n, replace=False)
        first = total - n if last else int(rng.integers(0, total - n + 1))
        return picks, first

    def place(
        self, tree: ContextTree, drawn: tuple[np.ndarray, int] | None
    ) -> tuple[ContextTree, int]:
        """(`tree` padded as `draw` drew, the chunk position of its first chunk)."""
        if drawn is None:
            return tree, 0
        picks, first = drawn
        pieces = [(self.bank, int(j)) for j in picks]
        pieces[first:first] = [(tree, j) for j in range(tree.n_chunks)]
        return arrange(self.model, pieces), first
