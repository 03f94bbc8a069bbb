"""Where an answer came from: the chunks of the document that it drew on most, with their
place in the original text.

Two signals say where the model looked: the share of attention that the injection heads
give each chunk at the prompt's last token (one extra pass over the tree), and the
passages that re-reading put back into the window in full (reread.py). Sources list the
re-read chunks first, best first, then the most-attended others; each carries its token
offsets, its character offsets into the original text when the text was tokenized with
offsets (`TextOffsets`), the share of attention it got and a short excerpt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .reread import Passage, attention_profile, tokens_in_order
from .settings import PASSAGE_TOKENS, Settings
from .tree import ContextTree

TOP_SOURCES = 3


@dataclass(frozen=True)
class TextOffsets:
    """The original text and, for each of its tokens, the character it starts at
    (`starts` has one more entry: the text's length), so that tokens [a, b) are exactly
    `text[starts[a]:starts[b]]`."""

    text: str
    starts: np.ndarray

    def chars(self, start: int, end: int) -> tuple[int, int]:
        return int(self.starts[start]), int(self.starts[end])


def piece_offsets(tokenizer, piece: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, start character of each token) of one piece of text, no special
    tokens, from the tokenizer's offset mapping (a fast Hugging Face tokenizer's)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        encoded = hf(piece, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        raise ValueError(
            "this tokenizer gives no character offsets (not a fast tokenizer)"
        ) from None
    ids = np.asarray(encoded["input_ids"], np.int32)
    starts = np.asarray([a for a, _ in encoded["offset_mapping"]], np.int64).reshape(-1)
    # A token made of bytes of a character that an earlier token began maps to that
    # character; keeping starts non-decreasing keeps every span a slice of the text.
    return ids, np.maximum.accumulate(starts) if len(starts) else starts


def tokenize_with_offsets(
    tokenizer, pieces: Iterable[str], piece_done: Callable[[int, int], None] | None = None
) -> tuple[np.ndarray, TextOffsets]:
    """Token ids of a text given in pieces (as `generate.tokenize_pieces` makes them) and
    its TextOffsets; `piece_done(characters, tokens)` after each piece."""
    ids, starts, texts, base = [], [], [], 0
    for piece in pieces:
        piece_ids, piece_starts = piece_offsets(tokenizer, piece)
        ids.append(piece_ids)
        starts.append(piece_starts + base)
        texts.append(piece)
        base += len(piece)
        if piece_done:
            piece_done(len(piece), len(piece_ids))
    ids_all = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    starts.append(np.array([base]))
    return ids_all, TextOffsets("".join(texts), np.concatenate(starts))


@dataclass(frozen=True)
class Source:
    """One chunk of the document that the answer drew on. `chunk` is its index (the
    number of full chunks for the tokens after the last one); spans are [start, end)."""

    chunk: int
    tokens: tuple[int, int]
    chars: tuple[int, int] | None
    share: float
    excerpt: str
    excerpt_tokens: tuple[int, int]
    excerpt_chars: tuple[int, int] | None
    reread: bool


@dataclass(frozen=True)
class Sources:
    """The answer's sources, and `profile`: per full chunk, the share of the injection
    heads' attention (mean over heads; sums to 1), for an app to draw along the text."""

    sources: tuple[Source, ...]
    profile: np.ndarray


def chunk_profile(entry_profile: np.ndarray, n_chunks: int) -> np.ndarray:
    """(heads, entries) attention shares -> per chunk share, mean over heads."""
    return entry_profile.reshape(len(entry_profile), n_chunks, -1).sum(-1).mean(0)


def document_passages(
    passages: Sequence[Passage], tree: ContextTree, selected: Sequence[int] | None
) -> list[Passage]:
    """Passages of a (maybe chunk-selected) tree's context as spans of the whole
    document; `selected` are the kept chunks' indices (None: every chunk)."""
    length = tree.chunk_len
    kept = len(selected) if selected is not None else tree.n_chunks
    full = tree.n_chunks

    def place(position: int) -> int:
        if selected is None:
            return position
        if position >= kept * length:
            return full * length + position - kept * length
        return int(selected[position // length]) * length + position % length

    return [Passage(place(p.start), place(p.end - 1) + 1) for p in passages]


def find_sources(
    model,
    tokenizer,
    tree: ContextTree,
    running: np.ndarray,
    passages: Sequence[Passage] = (),
    offsets: TextOffsets | None = None,
    top: int = TOP_SOURCES,
    settings: Settings | None = None,
    profile: np.ndarray | None = None,
) -> Sources:
    """The sources of an answer about `tree` (every chunk of the document) to the
    question that `running` ends with; `passages` (document spans, best last, as
    re-reading chose them) were read again in full. The heads' attention is read with
    `settings` (default: the model's), unless `profile` gives it (their attention_profile
    of `tree` for `running`, already read: re-reading's, when it read the same tree)."""
    if tree.tokens is None:
        raise ValueError("this tree does not keep its tokens: compress the context again")
    entries = attention_profile(model, tree, running, settings) if profile is None else profile
    n = tree.n_chunks
    per_chunk = np.zeros(n) if entries is None else chunk_profile(entries, n)
    remainder = np.zeros(0, np.int32) if tree.remainder is None else np.array(tree.remainder)
    document = np.concatenate([np.array(tree.tokens).reshape(-1), remainder]).astype(np.int32)
    if offsets is not None and len(offsets.starts) != len(document) + 1:
        raise ValueError(
            f"the text's offsets cover {len(offsets.starts) - 1} tokens, the tree "
            f"{len(document)}: they are not of the same text"
        )
    chunks = _ranked_chunks(per_chunk, passages, tree.chunk_len, top)
    found = [
        _source(c, tree, document, per_chunk, entries, passages, offsets, tokenizer) for c in chunks
    ]
    return Sources(tuple(found), per_chunk)


def _ranked_chunks(
    profile: np.ndarray, passages: Sequence[Passage], length: int, top: int
) -> list[int]:
    """Chunks with re-read passages (best first), then the most-attended others, `top`
    in all or as many as were re-read (the remainder, shorter than a chunk, is chunk
    len(profile))."""
    reread = []
    for p in reversed(passages):
        for c in range(p.start // length, (p.end - 1) // length + 1):
            if c not in reread:
                reread.append(c)
    rest = [int(c) for c in np.argsort(-profile, kind="stable") if int(c) not in reread]
    return (reread + rest)[: max(top, len(reread))]


def _source(chunk, tree, document, profile, entries, passages, offsets, tokenizer) -> Source:
    length = tree.chunk_len
    start = chunk * length
    end = len(document) if chunk == tree.n_chunks else start + length
    inside = [p for p in reversed(passages) if p.start < end and start < p.end]
    if inside:
        a, b = max(inside[0].start, start), min(inside[0].end, end)
    else:
        a, b = _best_window(tree, entries, chunk, start, end)
    if offsets is not None:
        chars, excerpt_chars = offsets.chars(start, end), offsets.chars(a, b)
        excerpt = offsets.text[excerpt_chars[0] : excerpt_chars[1]]
    else:
        chars = excerpt_chars = None
        excerpt = tokenizer.decode(document[a:b].tolist())
    share = float(profile[chunk]) if chunk < len(profile) else 0.0
    return Source(chunk, (start, end), chars, share, excerpt, (a, b), excerpt_chars, bool(inside))


def _best_window(tree, entries, chunk: int, start: int, end: int) -> tuple[int, int]:
    """The PASSAGE_TOKENS tokens of the chunk that the heads attend to most (where tree
    entries are the chunk's tokens in order), else the chunk's first ones."""
    size = min(PASSAGE_TOKENS, end - start)
    if entries is None or chunk >= tree.n_chunks or not tokens_in_order(tree):
        return start, start + size
    shares = entries.mean(0)[start:end]
    sums = np.convolve(shares, np.ones(size), mode="valid")
    first = start + int(np.argmax(sums))
    return first, first + size
