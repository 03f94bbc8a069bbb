"""`mlx-sharedllm train` and `mlx-sharedllm fuse`."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from ..adapters import GROUPS
from ..convert.stack import ConversionError, parse_heads
from ..distributed import DEFAULT_TIMEOUT
from ..io import FLOAT_DTYPES
from ..train import TrainConfig
from ..train_data import Instructions, Mixture, TextLM
from . import EXIT_INTERRUPTED
from .inputs import FiniteRange, InputError


def _task(files: tuple[Path, ...], task: str) -> str:
    if task != "auto":
        return task
    kinds = {f.suffix == ".jsonl" for f in files}
    if len(kinds) > 1:
        return "mix"
    return "sft" if kinds == {True} else "lm"


def make_source(files, task: str, tokenizer, config, options: dict, seed: int):
    """The examples of `files`: language modelling on text, JSONL instructions, or a mix
    of both (text files for lm, .jsonl files for sft, weighted by --lm-weight)."""
    if task == "mix":
        sft = [f for f in files if f.suffix == ".jsonl"]
        text = [f for f in files if f.suffix != ".jsonl"]
        if not sft or not text:
            raise InputError("--task mix needs both text files and .jsonl files")
        sources = [make_source(text, "lm", tokenizer, config, options, seed)]
        sources.append(make_source(sft, "sft", tokenizer, config, options, seed))
        weight = options["lm_weight"]
        return Mixture(sources, [weight, 1 - weight], seed)
    if task == "sft":
        return Instructions(
            files,
            tokenizer,
            config.chunk_len,
            chat_template=options["chat_template"],
            seed=seed,
            encoding=options["encoding"],
        )
    if tokenizer is None:
        raise InputError("the model has no tokenizer, so it cannot read text files")
    return TextLM(
        files,
        tokenizer,
        config.chunk_len,
        context_chunks=options["context_chunks"],
        window=options["window"],
        seed=seed,
        encoding=options["encoding"],
    )


def _groups(value: str) -> tuple[str, ...]:
    groups = tuple(g.strip() for g in value.split(",") if g.strip())
    if not groups or set(groups) - set(GROUPS):
        raise click.BadParameter(f"name some of {', '.join(GROUPS)}, comma-separated")
    return groups


@click.command("train")
@click.option(
    "--model",
    default=None,
    help="A converted model folder or Hub repo (default: the embedded one).",
)
@click.option(
    "--data",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Text files (language modelling) or .jsonl files of {context, prompt, response}.",
)
@click.option("--eval-data", multiple=True, type=click.Path(path_type=Path), help="Held-out data.")
@click.option(
    "--task",
    type=click.Choice(["auto", "lm", "sft", "mix"]),
    default="auto",
    show_default=True,
    help="lm: text, loss on the next window; sft: JSONL, loss on the response; mix: both "
    "(text files lm, .jsonl files sft); auto: by suffix.",
)
@click.option(
    "--lm-weight",
    type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    help="mix: the share of language-modelling examples.",
)
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in OUT.")
@click.option(
    "--stop-after",
    type=click.IntRange(min=1),
    default=None,
    help="End the run after this step of the --steps schedule (checkpoint saved; "
    "--resume continues it).",
)
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--grad-accum",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Examples per optimizer step.",
)
@click.option(
    "--lr",
    type=FiniteRange(min=0, min_open=True),
    default=1e-4,
    show_default=True,
    help="Peak learning rate.",
)
@click.option("--warmup", type=click.IntRange(min=0), default=100, show_default=True)
@click.option(
    "--min-lr", type=FiniteRange(min=0), default=0.0, show_default=True, help="Cosine decay floor."
)
@click.option("--weight-decay", type=FiniteRange(min=0), default=0.01, show_default=True)
@click.option("--clip-norm", type=FiniteRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--eval-examples", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--save-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--train",
    "groups",
    default="injection",
    show_default=True,
    help="What learns: injection, upper (the top N-M layers), head; comma-separated.",
)
@click.option(
    "--injection-layers",
    default=None,
    help="Train only these injection layers, e.g. '17,18' (default: all of them).",
)
@click.option(
    "--attention-loss",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="sft: weight of teaching the injection heads to look at each answer's "
    '"evidence" in the context (records that mark it; 0: off).',
)
@click.option(
    "--attention-heads",
    default=None,
    help="The heads the attention loss teaches, e.g. '17.3,18.6' (default: every head of "
    "the training injection layers).",
)
@click.option(
    "--distractors",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Text files whose chunks, compressed once, pad every training tree (with "
    "--distractor-chunks), so that training sees trees as long as a book's.",
)
@click.option(
    "--distractor-chunks",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Pad each tree to a number of chunks drawn log-uniformly up to this (0: off).",
)
@click.option(
    "--log-scale-entries",
    type=click.IntRange(min=0),
    default=None,
    help="Sharpen the injection's attention by log(entries)/log(N) on trees of more than N "
    "entries (0: off; default: the model's setting). The adapter keeps it.",
)
@click.option(
    "--split-noise",
    type=click.FloatRange(min=0),
    default=None,
    help="Split noise sigma per node length (default 0.2 for lm, 0.1 for sft; 0: off).",
)
@click.option(
    "--context-chunks",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="lm: chunks of context (X_C) per example.",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=None,
    help="lm: tokens of running text (X_D) per example (default: chunk_len).",
)
@click.option("--chat-template/--no-chat-template", default=None, help="sft: format prompts.")
@click.option(
    "--dtype",
    type=click.Choice(sorted(FLOAT_DTYPES)),
    default="float32",
    show_default=True,
    help="Train in this dtype (the adapter still fits the model as stored).",
)
@click.option("--encoding", default="utf-8", show_default=True, help="The data's text encoding.")
@click.option(
    "--peer-timeout",
    type=FiniteRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Under mlx.launch: seconds a process waits for the others before it stops the run.",
)
def train_command(model, data, eval_data, task, out, resume, stop_after, groups, **options) -> None:
    """Train the context injection of a model on DATA; write an adapter to OUT.

    The lower model stays frozen. OUT gets adapter.safetensors + adapter.json (use them
    with `generate --adapter` or `fuse`), a checkpoint/ to --resume from, and log.jsonl.
    Ctrl-C stops after the current step, with a checkpoint saved.

    Under `mlx.launch`, the processes train data parallel: --grad-accum examples each
    per step (the global batch is that times the processes); rank 0 writes OUT.
    """
    from ..distributed import PeerLost, launched
    from ..train import train

    world = launched(options.pop("peer_timeout"))
    try:
        config = TrainConfig(**_train_options(options, _groups(groups)))
        if world.size > 1 and world.main:
            click.echo(
                f"{world.size} processes, {config.grad_accum} examples each per step: "
                f"a global batch of {world.size * config.grad_accum}",
                err=True,
            )
        shared, tokenizer = _load(model)
        kind = _task(data, task)
        train_source = make_source(data, kind, tokenizer, shared.config, options, config.seed)
        eval_kind = _task(eval_data, "auto" if task == "mix" else task)
        held_out = eval_data and make_source(
            eval_data, eval_kind, tokenizer, shared.config, options, config.seed
        )
        distractors = _distractor_text(options["distractors"], tokenizer, options["encoding"])
        result = train(
            shared,
            train_source,
            out,
            config,
            held_out or None,
            resume,
            stop_after=stop_after,
            distractor_text=distractors,
            world=world,
        )
    except PeerLost as e:
        raise click.ClickException(f"{e}; the checkpoint in {out} resumes with --resume") from None
    except FileExistsError:
        message = f"{out} holds a checkpoint: resume it (--resume), or use another folder"
        raise click.ClickException(_ranked(world, message)) from None
    except (InputError, ValueError) as e:
        raise click.ClickException(_ranked(world, str(e))) from None
    except KeyboardInterrupt:
        if world.main:
            click.echo(f"\ninterrupted; the checkpoint in {out} resumes with --resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if not world.main:
        return
    evaluated = "" if result.eval_loss is None else f", eval loss {result.eval_loss:.4f}"
    click.echo(
        f"trained {result.steps} steps in {result.seconds:.0f}s: loss {result.loss:.4f}"
        f"{evaluated}; adapter in {out}",
        err=True,
    )


def _ranked(world, message: str) -> str:
    """The message, naming the process when there are several."""
    return f"rank {world.rank}: {message}" if world.size > 1 else message


def _train_options(options: dict, groups: tuple[str, ...]) -> dict:
    names = ("steps", "grad_accum", "warmup", "min_lr", "weight_decay", "clip_norm", "seed")
    names += ("eval_every", "eval_examples", "save_every", "split_noise", "dtype")
    names += ("attention_loss", "distractor_chunks", "log_scale_entries")
    if bool(options["distractors"]) != bool(options["distractor_chunks"]):
        raise click.BadParameter("--distractors and --distractor-chunks go together")
    picked = {name: options[name] for name in names}
    if options["attention_heads"] is not None:
        try:
            picked["attention_heads"] = parse_heads(options["attention_heads"])
        except ConversionError as e:
            raise click.BadParameter(str(e)) from None
    layers = options["injection_layers"]
    if layers is not None:
        try:
            layers = tuple(int(i) for i in layers.split(",") if i.strip())
        except ValueError:
            raise click.BadParameter(f"not a list of layers: {layers!r}") from None
    return {**picked, "learning_rate": options["lr"], "train": groups, "injection_layers": layers}


def _distractor_text(files: tuple[Path, ...], tokenizer, encoding: str):
    if not files:
        return None
    if tokenizer is None:
        raise InputError("the model has no tokenizer, so it cannot read distractor text")
    text = "".join(f.read_text(encoding=encoding) for f in files)
    return np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)


def _load(ref: str | None):
    from ..loading import load
    from .generate_cli import resolve_model

    path = resolve_model(ref)
    try:
        return load(path)
    except Exception as e:  # any failure here means unusable weights or config
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot load the model in {path}: {reason}") from None


@click.command("fuse")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="The adapter's base model (default: the embedded one).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def fuse_command(adapter: Path, out: Path, model: str | None, force: bool) -> None:
    """Write OUT: the model with the ADAPTER folder (from `train`) merged in."""
    from ..adapters import fuse
    from .generate_cli import resolve_model

    try:
        fuse(resolve_model(model), adapter, out, force=force)
    except FileExistsError:
        raise click.ClickException(f"{out} exists; pass --force to replace it") from None
    except (InputError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out}", err=True)
