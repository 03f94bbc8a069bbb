"""Chunk selection: a question reads the chunks its injection heads point at.

A softmax over every entry of a long tree spreads thin: at 64 chunks of 1024 entries the
answer's evidence gets a small share of each head's attention even when the head finds
it. Selection asks the injection heads once, at the last token before the answer, which
chunks they attend to, and answers from the `keep` chunks that some head attends to
most. The kept chunks stay where they were (their keys are already rotated to their
chunk position), so any tree layout and storage format can be selected from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .model import SharedLLM
from .reread import attention_profile
from .settings import Settings, check_chunks_per_question
from .tree import ContextTree, join_chunks


def chunk_scores(
    model: SharedLLM, tree: ContextTree, running: np.ndarray, settings: Settings | None = None
) -> np.ndarray | None:
    """Per chunk, the largest share of attention that any injection head gives the
    chunk's entries at the running text's last token (read with `settings`, default the
    model's); None when no injection runs."""
    profile = attention_profile(model, tree, running, settings)
    if profile is None:
        return None
    return profile.reshape(len(profile), tree.n_chunks, -1).sum(-1).max(0)


def keep_chunks(tree: ContextTree, chunks: Sequence[int]) -> ContextTree:
    """The tree with only `chunks` (in the given order), each at its own chunk position;
    the query position and the remainder are kept."""
    chunks = np.asarray(chunks, np.int64)
    if chunks.size == 0 or chunks.min() < 0 or chunks.max() >= tree.n_chunks:
        raise ValueError(f"chunks to keep must be in 0..{tree.n_chunks - 1}, got {chunks}")
    kept = join_chunks([(tree, int(c)) for c in chunks])
    return dataclasses.replace(
        kept,
        query_position=tree.query_position,
        remainder=tree.remainder,
        meta={**kept.meta, "selected_chunks": chunks.tolist()},
    )


def keep_attended_chunks(
    model: SharedLLM,
    tree: ContextTree,
    running: np.ndarray,
    keep: int,
    settings: Settings | None = None,
) -> ContextTree:
    """The `keep` chunks of `tree` (a question's `Settings.chunks_per_question`) that the
    injection heads attend to most at the last token of `running` (the text the model
    reads before answering), in context order; the attention is read with `settings`
    (default: the model's). The tree itself when it has no more than `keep` chunks or
    `keep` is 0."""
    check_chunks_per_question(keep)
    if keep == 0 or tree.n_chunks <= keep or len(running) == 0:
        return tree
    scores = chunk_scores(model, tree, running, settings)
    if scores is None:
        return tree
    return keep_chunks(tree, np.sort(np.argsort(-scores, kind="stable")[:keep]))
