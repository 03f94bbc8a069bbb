"""Train the injection: data, split noise, the training loop and its checkpoints.

Every example has its own context tree, built by `model.compress` outside the gradient:
the lower model is frozen and no gradient flows into compression. Examples run one at
a time (each has its own tree) and their gradients are accumulated into one step.
"""

from __future__ import annotations

import codecs
import itertools
import json
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from tqdm import tqdm

from .adapters import ADAPTER_FILES, GROUPS, load_adapter, save_adapter, set_trainable
from .config import check_log_scale
from .distractors import Distractors
from .distributed import World, compress_in_shares
from .io import FLOAT_DTYPES, write_atomically
from .model import AttentionTap, SharedLLM

SIGMA_LM, SIGMA_SFT = 0.2, 0.1  # split noise sigma / node length (SPEC section 3)
CHECKPOINT, LOG = "checkpoint", "log.jsonl"
# What a resumed run must share with its checkpoint: what learns, and what the loss is.
RESUME_KEYS = (
    "train",
    "injection_layers",
    "attention_loss",
    "attention_heads",
    "distractor_chunks",
    "log_scale_entries",
)
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
    return _compress(model, example, _splits(model, sigma, rng))


def _splits(model: SharedLLM, sigma: float, rng: np.random.Generator) -> list[int] | None:
    if sigma <= 0:
        return None
    return draw_splits(model.config.chunk_len, model.config.tree_depth, sigma, rng)


def _compress(model: SharedLLM, example: Example, splits: list[int] | None):
    context, query = mx.array(example.context), mx.array(example.query)
    if splits is None:
        return model.compress(context, query)
    return model.compress(context, query, splits=splits)


# -- the loop ----------------------------------------------------------------------


@dataclass
class TrainConfig:
    """How to train. A step accumulates the gradients of `grad_accum` examples."""

    steps: int = 1000
    grad_accum: int = 8
    learning_rate: float = 1e-4
    warmup: int = 100
    min_lr: float = 0.0
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    eval_every: int = 100
    eval_examples: int = 32
    save_every: int = 100
    seed: int = 0
    train: tuple[str, ...] = ("injection",)
    injection_layers: tuple[int, ...] | None = None  # None: every injection layer trains
    split_noise: float | None = None  # sigma / node length; None: the source's default
    dtype: str | None = None  # cast the model to this float dtype for training
    # The weight of the attention loss (0: off): on examples with evidence, the negative
    # log attention of `attention_heads` (layer, head) pairs (None: every head of the
    # training injection layers) on the context token that each answer token copies.
    attention_loss: float = 0.0
    attention_heads: tuple[tuple[int, int], ...] | None = None
    # Pad every training tree with chunks of distractor text, to a number of chunks drawn
    # log-uniformly up to this (0: off); `train` gets the text (see distractors.py).
    distractor_chunks: int = 0
    # Train with the injection's attention sharpened beyond this many tree entries (see
    # model.log_scale; the adapter keeps it). None: the model's setting.
    log_scale_entries: int | None = None

    def __post_init__(self) -> None:
        self.train = tuple(self.train)
        if self.attention_heads is not None:
            self.attention_heads = tuple((int(a), int(b)) for a, b in self.attention_heads)
        if self.attention_loss < 0:
            raise ValueError(f"attention_loss must be >= 0, got {self.attention_loss}")
        if self.log_scale_entries is not None:
            check_log_scale(self.log_scale_entries)
        if self.distractor_chunks < 0 or self.distractor_chunks == 1:
            raise ValueError(
                f"distractor_chunks must be 0 (off) or at least 2, got {self.distractor_chunks}"
            )
        if self.injection_layers is not None:
            self.injection_layers = tuple(sorted({int(i) for i in self.injection_layers}))
            if not self.injection_layers or "injection" not in self.train:
                raise ValueError("injection_layers needs 'injection' in train and a layer")
        unknown = set(self.train) - set(GROUPS)
        if unknown or not self.train:
            raise ValueError(f"train must name some of {GROUPS}, got {self.train}")
        if self.dtype is not None and self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {self.dtype!r}")
        if min(self.steps, self.grad_accum, self.eval_every, self.save_every) < 1:
            raise ValueError("steps, grad_accum, eval_every and save_every must be >= 1")


@dataclass
class TrainState:
    """Where a run is: what a checkpoint must hold to resume exactly."""

    step: int = 0
    epoch: int = 0
    index: int = 0  # examples of `epoch` already used
    rng: dict = field(default_factory=dict)
    base_fingerprint: str = ""
    config: dict = field(default_factory=dict)
    processes: int = 1  # of the run that wrote the checkpoint (a resumed run may differ)


@dataclass
class StepInfo:
    """What `train` reports after each step (eval_loss: when it evaluated)."""

    step: int
    loss: float
    learning_rate: float
    tokens_per_s: float
    eval_loss: float | None = None
    attention_loss: float | None = None  # per taught (row, head), when there was one
    batch: int | None = None  # examples per step over all processes (several processes)


@dataclass
class TrainResult:
    """The run's last step, its loss and last eval loss, its time and the adapter file."""

    steps: int
    loss: float
    eval_loss: float | None
    seconds: float
    adapter: Path


def make_optimizer(config: TrainConfig) -> optim.AdamW:
    """AdamW with linear warmup, then cosine decay to `min_lr`."""
    lr, warmup = config.learning_rate, min(config.warmup, config.steps - 1)
    decay = optim.cosine_decay(lr, config.steps - warmup, config.min_lr)
    if warmup > 0:
        ramp = optim.linear_schedule(lr / warmup, lr, warmup)
        decay = optim.join_schedules([ramp, decay], [warmup])
    return optim.AdamW(learning_rate=decay, weight_decay=config.weight_decay)


@dataclass
class AttentionTarget:
    """Where the injection should look: tree `entries` for input `rows`, taught to the
    listed heads of each injection layer that runs (in layer order; None: not taught)."""

    rows: mx.array
    entries: mx.array
    heads: list[list[int] | None]


def example_loss(
    model: SharedLLM, inputs, targets, mask, tree, attention: AttentionTarget | None = None
) -> tuple[mx.array, mx.array]:
    """(summed cross-entropy over the masked targets, summed negative log attention of
    the taught heads on their entries, per head). The tree is a constant here."""
    tap = AttentionTap(attention.rows) if attention is not None else None
    h = model.model(inputs[None], tree, [None] * len(model.layers), tap)[0]
    # Only scored positions need logits: a response is a few tokens of a long window.
    keep = np.flatnonzero(np.asarray(mask))
    if len(keep) < len(mask):
        rows = mx.array(keep)
        h, targets, mask = h[rows], targets[rows], mask[rows]
    logits = model.head(h).astype(mx.float32)
    loss = (nn.losses.cross_entropy(logits, targets) * mask).sum()
    if tap is None:
        return loss, mx.array(0.0)
    return loss, attention_nll(tap.logprobs, attention)


def attention_nll(logprobs: list[mx.array], target: AttentionTarget) -> mx.array:
    """Minus the log attention on the target entries, summed over rows, mean over heads."""
    total, heads_taught = mx.array(0.0), 0
    index = target.entries[None, :, None]
    for layer_logprobs, heads in zip(logprobs, target.heads):
        if heads:
            picked = layer_logprobs[0][mx.array(heads)]
            on = mx.take_along_axis(
                picked, mx.broadcast_to(index, (len(heads), *index.shape[1:])), -1
            )
            total, heads_taught = total - on.sum(), heads_taught + len(heads)
    return total / max(heads_taught, 1)


def taught_heads(model: SharedLLM, config: TrainConfig) -> list[list[int] | None]:
    """Per injection layer that runs while training (in order), the heads to teach."""
    n_inj, n_heads = model.config.num_injection_layers, model.args.num_attention_heads
    training = config.injection_layers or tuple(range(n_inj))
    pairs = config.attention_heads or [(i, h) for i in training for h in range(n_heads)]
    wrong = [f"{i}.{h}" for i, h in pairs if i not in training or not 0 <= h < n_heads]
    if wrong:
        raise ValueError(f"attention heads {wrong} are not heads of a training injection layer")
    running = [i for i in range(n_inj) if i in training or not model.layers[i].cross_attn.idle]
    return [sorted(h for i, h in pairs if i == layer) or None for layer in running]


def _arrays(example: Example) -> tuple[mx.array, mx.array, mx.array]:
    return mx.array(example.inputs), mx.array(example.targets), mx.array(example.mask)


def evaluate(
    model: SharedLLM, source: ExampleSource, count: int, world: World | None = None
) -> float:
    """Mean loss per target token over the first `count` examples, without split noise
    (with several processes, each evaluates every `world.size`-th example)."""
    world = world or World()
    total = tokens = 0.0
    for i, example in enumerate(itertools.islice(source.examples(0), count)):
        if i % world.size != world.rank:
            continue
        tree = build_tree(model, example, 0.0, np.random.default_rng(0))
        loss, _ = example_loss(model, *_arrays(example), tree)
        total, tokens = total + loss.item(), tokens + float(example.mask.sum())
    total, tokens = world.sum([total, tokens], "summing the eval loss")
    return total / max(tokens, 1.0)


def _stream(source: ExampleSource, state: TrainState) -> Iterator[Example]:
    """Examples from the state's position on, epoch after epoch; advances the state."""
    while True:
        used = state.index
        for example in itertools.islice(source.examples(state.epoch), state.index, None):
            state.index += 1
            yield example
        if state.index == used == 0:
            raise DataError("the training data holds no examples")
        state.epoch, state.index = state.epoch + 1, 0


class _Trainer:
    def __init__(self, model, source, out, config, eval_source, base_fingerprint, world):
        self.model, self.source, self.out, self.config = model, source, Path(out), config
        self.eval_source, self.world = eval_source, world
        sigma = config.split_noise
        self.sigma = getattr(source, "split_sigma", SIGMA_SFT) if sigma is None else sigma
        self.state = TrainState(
            base_fingerprint=base_fingerprint, config=asdict(config), processes=world.size
        )
        self.rng = np.random.default_rng(config.seed)
        self.optimizer = make_optimizer(config)
        self.optimizer.init(model.trainable_parameters())
        self.loss_and_grad = nn.value_and_grad(model, self._loss)
        self.tokens, self.eval_loss = 0, None
        self.heads = taught_heads(model, config) if config.attention_loss else None
        self.distractors: Distractors | None = None

    def _loss(self, model, inputs, targets, mask, tree, attention):
        """(what the gradient is of, the answer loss, the attention loss)."""
        loss, attn = example_loss(model, inputs, targets, mask, tree, attention)
        return loss + self.config.attention_loss * attn, loss, attn

    def step(self, examples: Iterator[Example]) -> tuple[float, int, float | None]:
        """One optimizer step over `grad_accum` examples per process: (mean token loss,
        tokens, mean attention loss per taught row, or None), over all processes."""
        world = self.world
        batch = list(itertools.islice(examples, self.config.grad_accum * world.size))
        # Every process draws for every example: the random stream is one process's.
        drawn = [self._draw(example) for example in batch]
        mine = world.share(len(batch))
        grads, total, targets, tokens, attn, rows = None, 0.0, 0.0, 0, 0.0, 0
        for example, (splits, padding) in zip(batch[mine], drawn[mine]):
            tree = _compress(self.model, example, splits)
            first = 0
            if self.distractors is not None:
                tree, first = self.distractors.place(tree, padding)
            target = self._attention_target(example, tree, first * tree.chunk_len)
            (_, loss, part), g = self.loss_and_grad(self.model, *_arrays(example), tree, target)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(loss, part, grads)
            n_rows = 0 if target is None else target.rows.size
            attn, rows = attn + part.item(), rows + n_rows
            total = total + loss.item()
            targets, tokens = targets + float(example.mask.sum()), tokens + example.tokens
        divisor = max(targets, 1.0)
        if world.size > 1:
            sums = world.sum([total, targets, tokens, attn, rows], "summing the step's losses")
            total, targets, tokens, attn, rows = sums
            tokens, divisor = int(tokens), max(targets, 1.0) / world.size
            grads = world.average_gradients(grads)
        grads = tree_map(lambda g: g / divisor, grads)
        grads, _ = optim.clip_grad_norm(grads, self.config.clip_norm)
        self.optimizer.update(self.model, grads)
        parameters = self.model.trainable_parameters()
        world.wait("averaging the gradients", parameters, self.optimizer.state)
        return total / max(targets, 1.0), tokens, attn / rows if rows else None

    def _draw(self, example: Example) -> tuple[list[int] | None, Any]:
        """The example's random draws: its split noise and its distractor padding."""
        splits = _splits(self.model, self._sigma(example), self.rng)
        if self.distractors is None:
            return splits, None
        return splits, self.distractors.draw(len(example.context), self.rng, example.continues)

    def _attention_target(self, example: Example, tree, shift: int) -> AttentionTarget | None:
        """The example's evidence as tree entries; its context starts at entry `shift`."""
        if self.heads is None or example.attend is None or not len(example.attend):
            return None
        if tree.entries_per_chunk != tree.chunk_len or self.model.config.layout != "paper":
            raise ValueError(
                "the attention loss needs a tree that keeps every context token in order "
                "(last_p <= 0, the paper layout)"
            )
        rows, entries = example.attend.T
        return AttentionTarget(mx.array(rows), mx.array(entries + shift), self.heads)

    def _sigma(self, example: Example) -> float:
        """The split noise: the run's setting, else the example's source's."""
        if self.config.split_noise is None and example.split_sigma is not None:
            return example.split_sigma
        return self.sigma

    @property
    def done(self) -> bool:
        return self.state.step >= self.config.steps

    def advance(self, examples: Iterator[Example], start: float) -> StepInfo:
        """Take a step; evaluate when it is time. `start` is when this run began."""
        loss, tokens, attn = self.step(examples)
        self.state.step, self.tokens = self.state.step + 1, self.tokens + tokens
        lr = self.optimizer.learning_rate.item()
        speed = self.tokens / (time.perf_counter() - start)
        info = StepInfo(self.state.step, loss, lr, speed, attention_loss=attn)
        if self.world.size > 1:
            info.batch = self.config.grad_accum * self.world.size
        if self.eval_source and (self.state.step % self.config.eval_every == 0 or self.done):
            info.eval_loss = self.eval_loss = evaluate(
                self.model, self.eval_source, self.config.eval_examples, self.world
            )
        return info

    def save(self) -> None:
        """Write the checkpoint (a folder, atomically), then the adapter next to it."""
        self.state.rng = self.rng.bit_generator.state
        write_atomically(self.out / CHECKPOINT, True, self._write_checkpoint)
        for name in ADAPTER_FILES:
            partial_path = self.out / f"{name}.partial"
            partial_path.write_bytes((self.out / CHECKPOINT / name).read_bytes())
            os.replace(partial_path, self.out / name)

    def _write_checkpoint(self, folder: Path) -> None:
        extra = {"step": self.state.step, "train": list(self.config.train)}
        if self.config.injection_layers is not None:
            extra["injection_layers"] = list(self.config.injection_layers)
        save_adapter(folder, self.model, self.state.base_fingerprint, extra)
        state = dict(tree_flatten(self.optimizer.state))
        mx.save_safetensors(str(folder / "optimizer.safetensors"), state)
        (folder / "state.json").write_text(json.dumps(asdict(self.state), indent=1) + "\n")

    def restore(self) -> None:
        """Continue from the checkpoint in `out`: weights, optimizer, RNG, data position.

        The other processes read rank 0's checkpoint, sent to them."""
        with tempfile.TemporaryDirectory() as copy:
            folder = self.world.broadcast_folder(self.out / CHECKPOINT, Path(copy), "resuming")
            self._restore(folder)
        if self.world.main:
            _truncate_log(self.out / LOG, self.state.step)

    def _restore(self, folder: Path) -> None:
        saved = TrainState(**json.loads((folder / "state.json").read_text()))
        name = self.out / CHECKPOINT
        if saved.base_fingerprint != self.state.base_fingerprint:
            raise ValueError(
                f"{name} was trained from another base model "
                f"(fingerprint {saved.base_fingerprint}, this one {self.state.base_fingerprint})"
            )
        defaults = TrainConfig()
        for key in RESUME_KEYS:
            value, default = (
                json.loads(json.dumps(getattr(c, key))) for c in (self.config, defaults)
            )
            trained = saved.config.get(key, default)  # a key older checkpoints lack
            if trained != value:
                raise ValueError(f"{name} trained {key} {trained}, not {value}")
        load_adapter(self.model, folder, check_fingerprint=False)
        opt = mx.load(str(folder / "optimizer.safetensors"))
        self.optimizer.state = tree_map_with_path(lambda p, _: opt[p], self.optimizer.state)
        self.rng.bit_generator.state = saved.rng
        saved.config, saved.processes = self.state.config, self.world.size
        self.state = saved


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after `step`, so a resumed run's log reads as one run."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


class _Interrupt:
    """Defers Ctrl-C to the end of the current step, so a checkpoint is always exact."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> _Interrupt:
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(
    model: SharedLLM,
    data: ExampleSource,
    out: str | Path,
    config: TrainConfig | None = None,
    eval_data: ExampleSource | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[StepInfo], None] | None = None,
    stop_after: int | None = None,
    distractor_text: np.ndarray | None = None,
    world: World | None = None,
) -> TrainResult:
    """Train the injection of `model` on `data`; write checkpoints and the adapter to `out`.

    Only the groups in `config.train` learn (by default the injection blocks); the lower
    model is frozen. `out` receives `adapter.safetensors` + `adapter.json`, a
    `checkpoint/` folder to resume from (`resume=True` continues exactly where it
    stopped) and `log.jsonl`, the loss per step and the eval loss. Ctrl-C stops after the
    current step with a checkpoint saved. `callback(StepInfo)` is called after each step.
    `stop_after` ends the run at that step of the schedule, as Ctrl-C would (checkpoint
    and adapter saved; `resume` continues it). `distractor_text` (token ids) is the text
    of the distractor chunks when `config.distractor_chunks` is set.

    `world` (see distributed.py): the processes `mlx.launch` started, which train data
    parallel with `grad_accum` examples each per step; rank 0 alone writes `out` and
    shows progress. None: this process alone.
    """
    config = config or TrainConfig()
    if (distractor_text is None) != (config.distractor_chunks == 0):
        raise ValueError("distractor chunks need distractor text, and distractor text a count")
    if model.config.quantization:
        raise ValueError("cannot train a quantized model: convert it without --quantize")
    base = model.fingerprint()
    if config.log_scale_entries is not None:
        model.config.log_scale_entries = config.log_scale_entries
    if config.dtype:
        model.set_dtype(FLOAT_DTYPES[config.dtype])
    set_trainable(model, config.train, config.injection_layers)
    out, world = Path(out), world or World()
    with world.watch():
        world.check_same(base_fingerprint=base, config=asdict(config))
        trainer = _Trainer(model, data, out, config, eval_data, base, world)
        _start(trainer, resume)
        if "injection" in config.train:  # a layer that learns is never skipped as idle
            every = range(model.config.num_injection_layers)
            model.mark_idle_injections(tuple(config.injection_layers or every))
        progress = progress and world.main
        if config.distractor_chunks:
            trainer.distractors = _distractors(model, distractor_text, config, progress, world)
        return _run(trainer, progress, callback, stop_after or config.steps)


def _start(trainer: _Trainer, resume: bool) -> None:
    """Resume the checkpoint in `out`, or start afresh: rank 0 looks, every process acts."""
    out, world = trainer.out, trainer.world
    found = world.main and (out / CHECKPOINT / "state.json").exists()
    if world.any(found, "looking for a checkpoint"):
        if not resume:
            raise FileExistsError(
                f"{out} holds a checkpoint: resume it (--resume), or use another folder"
            )
        trainer.restore()
    elif world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG).unlink(missing_ok=True)


def _distractors(model, tokens, config: TrainConfig, progress: bool, world: World) -> Distractors:
    bank = config.distractor_chunks - 1
    share = math.ceil(bank / world.size)
    with tqdm(total=share, unit="chunk", desc="distractors", disable=not progress) as bar:

        def update(done: int, _) -> None:
            bar.update(done - bar.n)

        def in_shares(chunks: np.ndarray):
            return compress_in_shares(model, chunks, world, update)

        shared = in_shares if world.size > 1 else None
        return Distractors(model, tokens, config.distractor_chunks, update, shared)


def _run(trainer: _Trainer, progress: bool, callback, stop_after: int) -> TrainResult:
    config, state = trainer.config, trainer.state
    examples, start = _stream(trainer.source, state), time.perf_counter()
    info = StepInfo(state.step, math.nan, math.nan, 0.0)
    bar = tqdm(total=config.steps, initial=state.step, unit="step", disable=not progress)
    world = trainer.world
    log_path = trainer.out / LOG if world.main else os.devnull
    with bar, _Interrupt() as interrupt, open(log_path, "a") as log:
        while state.step < min(config.steps, stop_after):
            info = trainer.advance(examples, start)
            _report(bar, log, info)
            if callback:
                callback(info)
            last = trainer.done or state.step == stop_after
            # Every process stops at the same step, when any of them was interrupted.
            stop = world.any(interrupt.requested, "ending a step")
            if world.main and (state.step % config.save_every == 0 or last or stop):
                trainer.save()
            if stop:
                raise KeyboardInterrupt
    adapter = trainer.out / ADAPTER_FILES[0]
    return TrainResult(
        state.step, info.loss, trainer.eval_loss, time.perf_counter() - start, adapter
    )


def _report(bar: tqdm, log, info: StepInfo) -> None:
    record = {k: v for k, v in asdict(info).items() if v is not None}
    log.write(json.dumps(record) + "\n")
    log.flush()
    postfix = {"loss": f"{info.loss:.4f}", "tok/s": f"{info.tokens_per_s:,.0f}"}
    if info.eval_loss is not None:
        postfix["eval"] = f"{info.eval_loss:.4f}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)
