"""Train the injection: the trainer's steps, checkpoints, resume, signals and log.

Every example has its own context tree, built by `model.compress` outside the gradient:
the lower model is frozen and no gradient flows into compression. Examples run one at
a time (each has its own tree) and their gradients are accumulated into one step.
The data lives in train_data.py, the losses in losses.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from tqdm import tqdm

from .adapters import ADAPTER_FILES, GROUPS, load_adapter, save_adapter, set_trainable
from .distractors import Distractors
from .distributed import World
from .io import FLOAT_DTYPES, write_atomically
from .losses import AttentionTarget, example_loss, taught_heads
from .model import SharedLLM
from .settings import check_log_scale
from .train_data import (
    SIGMA_SFT,
    DataError,
    Example,
    ExampleSource,
    build_tree,
    compress_example,
    make_distractors,
    noise_splits,
)

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
            tree = compress_example(self.model, example, splits)
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
        splits = noise_splits(self.model, self._sigma(example), self.rng)
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
    of the distractor chunks when `config.distractor_chunks` is set. The model's settings
    take `config.log_scale_entries` when it is given, as an adapter's would.

    `world` (see distributed.py): the processes `mlx.launch` started, which train data
    parallel with `grad_accum` examples each per step; rank 0 alone writes `out` and
    shows progress. None: this process alone.
    """
    config = config or TrainConfig()
    if (distractor_text is None) != (config.distractor_chunks == 0):
        raise ValueError("distractor chunks need distractor text, and distractor text a count")
    if model.config.quantization:
        raise ValueError("cannot train a quantized model: convert it unquantized")
    base = model.fingerprint()
    if config.log_scale_entries is not None:
        scale = config.log_scale_entries
        model.settings = dataclasses.replace(model.settings, log_scale_entries=scale)
    if config.dtype:
        model.set_dtype(FLOAT_DTYPES[config.dtype])
    set_trainable(model, config.train, config.injection_layers)
    out, world = Path(out), world or World()
    with world.watch():
        world.check_same(base_fingerprint=base, config=asdict(config))
        trainer = _Trainer(model, data, out, config, eval_data, base, world)
        _start(trainer, resume)
        progress = progress and world.main
        if config.distractor_chunks:
            trainer.distractors = make_distractors(
                model, distractor_text, config.distractor_chunks, progress, world
            )
        return _run(trainer, progress, callback, stop_after or config.steps)


def _start(trainer: _Trainer, resume: bool) -> None:
    """Resume the checkpoint in `out`, or start afresh: rank 0 looks, every process acts."""
    out, world = trainer.out, trainer.world
    found = world.main and (out / CHECKPOINT / "state.json").exists()
    if world.any(found, "looking for a checkpoint"):
        if not resume:
            raise FileExistsError(
                f"{out} holds a checkpoint: resume it (resume=True), or use another folder"
            )
        trainer.restore()
    elif world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG).unlink(missing_ok=True)


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
