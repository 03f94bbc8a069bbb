"""Training data: example sources (plain text, instructions, mixtures), split noise, and
the distractor chunks that pad training trees."""

from __future__ import annotations

import codecs
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .distractors import Distractors
from .distributed import World, compress_in_shares
from .model import SharedLLM

SIGMA_LM, SIGMA_SFT = 0.2, 0.1  # split noise sigma / node length (SPEC section 3)
PIECE_CHARS, READ_BYTES = 1 << 20, 1 << 16


class DataError(ValueError):
    """Bad training data; the message names the file and, where it can, the line."""


@dataclass
class Example:
    """One training example in token ids.

    `context` (n, chunk_len) is compressed into the tree, guided by `query`; the upper
    model reads `inputs` and the loss is on `targets` where `mask` is 1.
    """

    context: np.ndarray
    query: np.ndarray
    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    split_sigma: float | None = None  # set by a Mixture: the noise of the example's source
    # (k, 2): an input row and the context token that its next token copies (from a
    # record's "evidence"); the attention loss teaches the injection to look there.
    attend: np.ndarray | None = None
    # True when the running text continues the context's last chunk (language
    # modelling): distractor chunks then go before the context, never after it.
    continues: bool = False

    @property
    def tokens(self) -> int:
        return int(self.context.size + self.inputs.size)


class ExampleSource(Protocol):
    """Anything that yields the same examples for the same epoch, in the same order."""

    split_sigma: float

    def examples(self, epoch: int) -> Iterator[Example]: ...


def shuffled(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle a stream through a buffer of `size` items, so memory stays bounded."""
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def _read_lines(
    path: Path, encoding: str, max_chars: int | None = None
) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file, with read errors naming the file and line.

    Bytes are decoded as they come, so a bad byte is reported on its own line. With
    `max_chars`, a longer line comes in pieces, so memory stays bounded.
    """
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r}") from None
    number, pending, size = 1, [], 0
    try:
        with open(path, "rb") as f:
            reads = iter(lambda: f.readline(READ_BYTES), b"")
            for raw in itertools.chain(reads, [None]):
                *lines, rest = decoder.decode(raw or b"", final=raw is None).split("\n")
                for line in lines:
                    yield number, "".join([*pending, line, "\n"])
                    number, pending, size = number + 1, [], 0
                pending.append(rest)
                size += len(rest)
                if max_chars and size > max_chars:
                    yield number, "".join(pending)
                    pending, size = [], 0
    except UnicodeDecodeError:
        raise DataError(f"{path}:{number}: not valid {encoding} text") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if size:
        yield number, "".join(pending)


def _check_files(paths: Sequence[str | Path]) -> list[Path]:
    if not paths:
        raise DataError("no data files given")
    files = [Path(p) for p in paths]
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if not os.access(path, os.R_OK):
            raise DataError(f"{path}: cannot read: permission denied")
    return files


class TextLM:
    """Language modelling on plain text files.

    Each example is a window of the token stream: X_C, the preceding `context_chunks`
    chunks, is compressed; the upper model predicts X_D, the next `window` tokens. Files
    are read in pieces, so memory stays bounded; a window never spans two files.
    """

    split_sigma = SIGMA_LM

    def __init__(
        self,
        paths: Sequence[str | Path],
        tokenizer: Any,
        chunk_len: int,
        context_chunks: int = 4,
        window: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 64,
        encoding: str = "utf-8",
    ):
        self.paths, self.tokenizer, self.encoding = _check_files(paths), tokenizer, encoding
        self.chunk_len, self.context_chunks = chunk_len, context_chunks
        self.window = window or chunk_len
        self.seed, self.shuffle_buffer = seed, shuffle_buffer

    def examples(self, epoch: int) -> Iterator[Example]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.paths))
        windows = itertools.chain.from_iterable(self._windows(self.paths[i]) for i in order)
        return shuffled(windows, self.shuffle_buffer, rng)

    def _windows(self, path: Path) -> Iterator[Example]:
        context = self.context_chunks * self.chunk_len
        need, buffer, count = context + self.window + 1, np.zeros(0, np.int32), 0
        for ids in self._token_pieces(path):
            buffer = np.concatenate([buffer, ids])
            while len(buffer) >= need:
                xd = buffer[context:need]
                yield Example(
                    buffer[:context].reshape(self.context_chunks, self.chunk_len),
                    xd[:-1],
                    xd[:-1],
                    xd[1:],
                    np.ones(self.window, np.float32),
                    continues=True,
                )
                buffer, count = buffer[self.window :], count + 1
        if count == 0:
            raise DataError(
                f"{path}: too short: one example needs {need} tokens "
                f"({self.context_chunks} chunks of {self.chunk_len} + {self.window + 1})"
            )

    def _token_pieces(self, path: Path) -> Iterator[np.ndarray]:
        """The file's tokens, in pieces of about PIECE_CHARS characters."""
        piece: list[str] = []
        size = 0
        for _, line in _read_lines(path, self.encoding, PIECE_CHARS):
            piece.append(line)
            size += len(line)
            if size >= PIECE_CHARS:
                yield self._encode("".join(piece))
                piece, size = [], 0
        if piece:
            yield self._encode("".join(piece))

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)


SFT_FIELDS = ("context", "prompt", "response")


class Instructions:
    """Instruction data: JSONL records {context, prompt, response}; loss on the response.

    A field is text (tokenized; the prompt as `generate` formats it) or a list of token
    ids, taken as is. The context's full chunks are compressed, with the prompt as the
    tree's query; its trailing tokens join the running text ahead of the prompt, as in
    `generate`. A record may instead hold {context, turns: [{prompt, response}, ...]}:
    several questions about one context, asked one after another in the running text
    (the first prompt is the query), with the loss on every response. Every record is
    checked once up front.
    """

    split_sigma = SIGMA_SFT

    def __init__(
        self,
        paths: Sequence[str | Path],
        tokenizer: Any,
        chunk_len: int,
        chat_template: bool | None = None,
        seed: int = 0,
        shuffle_buffer: int = 256,
        encoding: str = "utf-8",
    ):
        self.paths, self.tokenizer, self.encoding = _check_files(paths), tokenizer, encoding
        self.chunk_len, self.chat_template = chunk_len, chat_template
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.size = sum(self._check(path) for path in self.paths)

    def examples(self, epoch: int) -> Iterator[Example]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.paths))
        records = itertools.chain.from_iterable(self._records(self.paths[i]) for i in order)
        return (self._example(*r) for r in shuffled(records, self.shuffle_buffer, rng))

    def _check(self, path: Path) -> int:
        count = sum(1 for _ in self._records(path))
        if count == 0:
            raise DataError(f"{path}: no records (an empty JSONL file)")
        return count

    def _records(self, path: Path) -> Iterator[tuple[str, dict]]:
        for number, line in _read_lines(path, self.encoding):
            if line.strip():
                yield f"{path}:{number}", _parse_record(line, f"{path}:{number}", self.tokenizer)

    def _example(self, where: str, record: dict) -> Example:
        context = self._ids(record["context"])
        n = len(context) // self.chunk_len
        if n == 0:
            raise DataError(
                f"{where}: the context has {len(context)} tokens, "
                f"fewer than one chunk ({self.chunk_len})"
            )
        pieces, scored, attend = [context[n * self.chunk_len :]], [False], []
        for turn in _turns(record):
            pieces += [self._prompt_ids(turn["prompt"]), self._ids(turn["response"], eos=True)]
            scored += [False, True]
            if "evidence" in turn:
                first = sum(map(len, pieces[:-1])) - 1  # the row that predicts the response
                start, end = turn["evidence"]
                attend += [(first + j, start + j) for j in range(min(end - start, len(pieces[-1])))]
        running = np.concatenate(pieces)
        # Token t + 1 is a target of the loss when it belongs to a response.
        is_response = np.concatenate([np.full(len(p), s) for p, s in zip(pieces, scored)])
        mask = is_response[1:].astype(np.float32)
        chunks = context[: n * self.chunk_len].reshape(n, self.chunk_len)
        attend = np.asarray([a for a in attend if a[1] < n * self.chunk_len], np.int64)
        return Example(
            chunks, pieces[1], running[:-1], running[1:], mask, attend=attend.reshape(-1, 2)
        )

    def _ids(self, value: str | list[int], eos: bool = False) -> np.ndarray:
        if not isinstance(value, str):
            return np.asarray(value, np.int32)
        ids = self.tokenizer.encode(value, add_special_tokens=False)
        if eos and self.tokenizer.eos_token_id is not None:
            ids = [*ids, self.tokenizer.eos_token_id]
        return np.asarray(ids, np.int32)

    def _prompt_ids(self, value: str | list[int]) -> np.ndarray:
        from .generate import encode_prompt

        if not isinstance(value, str):
            return np.asarray(value, np.int32)
        return encode_prompt(self.tokenizer, value, self.chat_template)


def _parse_record(line: str, where: str, tokenizer: Any) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object with {SFT_FIELDS}")
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            raise DataError(f"{where}: 'turns' must be a non-empty list of {{prompt, response}}")
        for i, turn in enumerate(turns):
            _check_fields(
                {"context": record.get("context"), **turn}, f"{where}: turn {i}", tokenizer
            )
            _check_evidence({"context": record.get("context"), **turn}, f"{where}: turn {i}")
        return record
    _check_fields(record, where, tokenizer)
    _check_evidence(record, where)
    return record


def _check_evidence(turn: dict, where: str) -> None:
    """An optional "evidence": [start, end), the context tokens that the response copies."""
    if "evidence" not in turn:
        return
    span, context = turn["evidence"], turn.get("context")
    ints = isinstance(span, list) and len(span) == 2 and all(isinstance(i, int) for i in span)
    if not ints or not 0 <= span[0] < span[1]:
        raise DataError(f"{where}: 'evidence' must be [start, end] token indices, start < end")
    if isinstance(context, list) and span[1] > len(context):
        raise DataError(f"{where}: 'evidence' ends after the context ({len(context)} tokens)")


def _turns(record: dict) -> list[dict]:
    return record.get("turns") or [record]


def _check_fields(record: dict, where: str, tokenizer: Any) -> None:
    for name in SFT_FIELDS:
        value = record.get(name)
        if value is None:
            raise DataError(f"{where}: the record has no {name!r} field")
        is_ids = isinstance(value, list) and all(isinstance(t, int) for t in value)
        if not (isinstance(value, str) or is_ids) or len(value) == 0:
            raise DataError(f"{where}: {name!r} must be non-empty text or a list of token ids")
        if isinstance(value, str) and tokenizer is None:
            raise DataError(f"{where}: {name!r} is text, and the model has no tokenizer")


class Mixture:
    """Examples of several sources, interleaved at random in proportion to `weights`.

    An epoch runs every source through its own epoch once; a source that runs out stops
    being drawn. Each example keeps its source's split noise.
    """

    def __init__(self, sources: Sequence[ExampleSource], weights: Sequence[float], seed: int = 0):
        if len(sources) != len(weights) or not sources:
            raise ValueError("a mixture needs one weight per source, and some sources")
        if min(weights) <= 0:
            raise ValueError(f"mixture weights must be positive, got {list(weights)}")
        self.sources, self.weights, self.seed = list(sources), np.asarray(weights, float), seed
        self.split_sigma = max(s.split_sigma for s in self.sources)

    def examples(self, epoch: int) -> Iterator[Example]:
        rng = np.random.default_rng([self.seed, epoch, len(self.sources)])
        streams = [source.examples(epoch) for source in self.sources]
        live = list(range(len(streams)))
        while live:
            p = self.weights[live] / self.weights[live].sum()
            i = live[int(rng.choice(len(live), p=p))]
            example = next(streams[i], None)
            if example is None:
                live.remove(i)
                continue
            example.split_sigma = self.sources[i].split_sigma
            yield example


# -- split noise -------------------------------------------------------------------


def draw_splits(chunk_len: int, depth: int, sigma: float, rng: np.random.Generator) -> list[int]:
    """Tokens in the preserved part at each level above the last (SPEC section 3).

    b = floor(l/2 - eps), eps ~ N(0, (sigma * l)^2), clipped so that the kept node can
    still be split at every later level.
    """
    sizes, length = [], chunk_len
    for level in range(depth - 1):
        eps = rng.normal(0.0, sigma * length)
        room = 2 ** (depth - 1 - level)
        sizes.append(int(np.clip(math.floor(length / 2 - eps), 1, length - room)))
        length -= sizes[-1]
    return sizes


def build_tree(model: SharedLLM, example: Example, sigma: float, rng: np.random.Generator):
    """The example's context tree, with split noise when sigma > 0 (training only)."""
    return compress_example(model, example, noise_splits(model, sigma, rng))


def noise_splits(model: SharedLLM, sigma: float, rng: np.random.Generator) -> list[int] | None:
    """The split sizes of one tree with noise `sigma`; None without noise."""
    if sigma <= 0:
        return None
    return draw_splits(model.config.chunk_len, model.settings.tree_depth, sigma, rng)


def compress_example(model: SharedLLM, example: Example, splits: list[int] | None):
    """The example's context tree, split at `splits` (None: the policy's own splits)."""
    context, query = mx.array(example.context), mx.array(example.query)
    if splits is None:
        return model.compress(context, query)
    return model.compress(context, query, splits=splits)


# -- distractor padding ------------------------------------------------------------


def make_distractors(
    model: SharedLLM, tokens: np.ndarray, count: int, progress: bool, world: World
) -> Distractors:
    """The distractor bank of `count` chunks from `tokens`, compressed in shares by the
    processes of `world`, with a progress bar when `progress`."""
    bank = count - 1
    share = math.ceil(bank / world.size)
    with tqdm(total=share, unit="chunk", desc="distractors", disable=not progress) as bar:

        def update(done: int, _) -> None:
            bar.update(done - bar.n)

        def in_shares(chunks: np.ndarray):
            return compress_in_shares(model, chunks, world, update)

        shared = in_shares if world.size > 1 else None
        return Distractors(model, tokens, count, update, shared)
