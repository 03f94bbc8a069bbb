"""`mlx-sharedllm generate`: progress bars, streaming output, stats, one-line errors."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm import tqdm

from ..cache import TreeFormat
from ..generate import stream_generate
from ..loading import load
from ..plan import FLOAT_TREE, plan_for_model_dir, wired_limit
from ..plan_render import check_fits
from ..settings import Settings
from .inputs import InputError, TextSource
from .plan_cli import tree_bits_option

# Saved trees are 8-bit unless asked otherwise: about a third of float32's size, and on
# the reading suite's dev split they chose the same passages as float (README).
SAVE_TREE_BITS = 8


def resolve_model(ref: str | None) -> Path:
    """The model folder for --model: a converted folder, a Hub repo, or the default."""
    if ref is None:
        from ..default import default_model

        return default_model()
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(
                f"{ref} is not a converted model (no config.json); "
                "make one with `mlx-sharedllm convert`"
            )
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
        raise InputError(f"unknown model {ref!r}: no such folder, and not a Hub repo id")
    from ..convert.checkpoint import resolve_source
    from ..convert.tables import ConversionError

    try:
        return resolve_source(ref)
    except ConversionError as e:
        raise InputError(str(e)) from None


def _load_adapter(model, adapter: Path) -> None:
    from ..adapters import load_adapter

    try:
        load_adapter(model, adapter)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None


def load_model(path: Path):
    try:
        model, tokenizer = load(path)
    except Exception as e:  # any failure here means unusable weights or config
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot load the model in {path}: {reason}") from None
    if tokenizer is None:
        raise InputError(f"the model in {path} has no tokenizer")
    return model, tokenizer


def _tokenize(tokenizer, source: TextSource, offsets: bool = False):
    """The context's token ids, with a bar of characters read and tokens made (stdin has
    no size known ahead, so its bar counts without a total); with `offsets`, (ids,
    TextOffsets) for the answer's sources."""
    from ..generate import tokenize_pieces
    from ..sources import tokenize_with_offsets

    with tqdm(
        total=source.size,
        unit="char",
        unit_scale=True,
        desc="tokenizing",
        file=sys.stderr,
        leave=False,
    ) as bar:
        tokens = 0

        def advance(chars: int, new_tokens: int) -> None:
            nonlocal tokens
            tokens += new_tokens
            bar.update(chars)
            bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)

        if offsets:
            return tokenize_with_offsets(tokenizer, source.pieces(), advance)
        return tokenize_pieces(tokenizer, source.pieces(), piece_done=advance)


def check_prompt(model, tokenizer, prompt: str, chat_template: bool | None) -> None:
    """Refuse a prompt longer than the model's window before any context is read."""
    from ..generate import encode_prompt

    window = model.args.max_position_embeddings
    n = len(encode_prompt(tokenizer, prompt, chat_template))
    if window and n > window:
        raise InputError(f"the prompt is {n:,} tokens, longer than the model's window ({window:,})")


class _CompressBar:
    """A tqdm bar of chunks, with tokens/s, driven by the API's progress callback."""

    def __init__(self, chunk_len: int):
        self.chunk_len, self.bar, self.start = chunk_len, None, time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, unit="chunk", desc="compressing", file=sys.stderr)
        self.bar.update(done - self.bar.n)
        rate = done * self.chunk_len / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s")
        if done == total:
            self.bar.close()


def stats_line(r, origin: str | None = None) -> str:
    """The stats of a finished answer; `origin` says where the tree came from (default:
    compressed now, at the speed measured)."""
    origin = origin or f"compressed at {r.compress_tps:,.0f} tok/s"
    return (
        f"context {r.context_tokens:,} tokens, {origin} | {r.chunks:,} chunks "
        f"({r.chunks_read:,} read, {r.reread_tokens:,} tokens re-read) | "
        f"{r.tree_entries:,} tree entries | "
        f"prompt {r.prompt_tokens:,} tokens, {r.prompt_tps:,.0f} tok/s | "
        f"generation {r.generation_tokens:,} tokens, {r.generation_tps:,.1f} tok/s | "
        f"peak memory {r.peak_memory:.2f} GB"
    )


def _memory_plan(path: Path, source: TextSource | None, prompt: str, options: dict, force: bool):
    """Plan memory before loading anything; refuse a plan that does not fit unless forced.

    Token counts are estimated before the tokenizer is loaded, at 3 bytes per token
    (high for English text): the context from the file size, the running window as
    one chunk (the remainder) plus the prompt plus the tokens to generate."""
    tokens = (source.size or 0) // 3 if source is not None else 0
    try:
        chunk_len = json.loads((path / "config.json").read_text())["chunk_len"]
        plan = plan_for_model_dir(
            path,
            tokens,
            options.get("tree_bits"),
            options.get("kv_bits"),
            tree_group_size=options.get("tree_group_size") or 64,
            kv_group_size=options.get("kv_group_size") or 64,
            running_tokens=chunk_len + len(prompt.encode()) // 3 + options.get("max_tokens", 0),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable weights: loading the model says what is wrong
    refusal = check_fits(plan)
    if refusal and not force:
        raise InputError(refusal)
    return plan


def planned_tree_bits(choice: str | None, saving: bool) -> int | str | None:
    """--tree-bits as the planner takes it. Not given: the tree format the model records
    (what it compresses with), unless the tree is saved: then it is built as `save_bits`
    says, planned as float (at least as large)."""
    return FLOAT_TREE if choice is None and saving else tree_bits_option(choice)


def run_settings(model, options: dict[str, Any], tree_choice: str | None, group: int) -> Settings:
    """The model's settings with the flags given (taken out of `options`): the tree
    format in memory (--tree-bits: `tree_choice`, with `group`), the chunks a question
    reads (--select-chunks) and the tokens re-read (--reread-tokens)."""
    bits = options.pop("tree_bits", None)
    given = {
        "chunks_per_question": options.pop("select_chunks", None),
        "reread_tokens": options.pop("reread_tokens", None),
    }
    changes = {name: value for name, value in given.items() if value is not None}
    if tree_choice is not None:
        changes["tree_format"] = TreeFormat(model.compute_dtype, bits, group)
    return dataclasses.replace(model.settings, **changes)


def _saved_context(path: Path, model, settings: Settings, ids=None):
    """A saved tree, checked against the model and settings; on a CPU, in the model's
    float dtype: quantized matmuls are slow there (answering about Botchan from its 8-bit
    tree took 116 s, against seconds from float), and only the file needs to be small."""
    import mlx.core as mx

    from ..loading import load_context

    try:
        tree = load_context(path, model, context=ids, settings=settings)
    except ValueError as e:
        raise InputError(str(e)) from None
    if mx.default_device() == mx.cpu and tree.layers and tree.layers[0].fmt.bits is not None:
        tree = tree.stored_as(TreeFormat(model.compute_dtype))
    return tree


def save_bits(model, choice: str | None, group: int) -> int | None:
    """The bits a saved tree is stored with: --tree-bits's choice ('4', '8', 'float'), by
    default SAVE_TREE_BITS where the model's head_dim takes the group size (else float)."""
    if choice is not None:
        return None if choice == "float" else int(choice)
    head_dim = model.tree_shape(0)[3]
    if head_dim % group:
        click.echo(
            f"note: saving the tree in float: head_dim {head_dim} is not a multiple of "
            f"--tree-group-size {group}",
            err=True,
        )
        return None
    return SAVE_TREE_BITS


def compress_and_save(
    model,
    tokenizer,
    ids,
    prompt: str | None,
    chat_template,
    bits: int | None,
    group: int,
    path: Path,
) -> tuple[Any, float]:
    """Compress the context once and save it (`prompt` is the tree's query; without one,
    the text's first token); the tree and the tokens/s it was compressed at."""
    import mlx.core as mx

    from ..generate import encode_prompt

    if len(ids) < model.config.chunk_len:
        raise InputError(
            f"the context is {len(ids):,} tokens, shorter than one chunk "
            f"({model.config.chunk_len}): there is nothing to compress and save"
        )
    query = encode_prompt(tokenizer, prompt, chat_template) if prompt else ids[:1]
    bar = _CompressBar(model.config.chunk_len)
    tic = time.perf_counter()
    stored = dataclasses.replace(
        model.settings, tree_format=TreeFormat(model.compute_dtype, bits, group)
    )
    tree = model.compress(
        mx.array(ids),
        mx.array(query),
        lambda done, total: bar("compress", done, total),
        settings=stored,
    )
    seconds = time.perf_counter() - tic
    try:
        tree.save(path)
    except OSError as e:
        raise InputError(f"cannot write the context to {path}: {e.strerror or e}") from None
    kind = "float" if bits is None else f"{bits}-bit"
    click.echo(
        f"saved the compressed context ({kind}) to {path}: {path.stat().st_size / 1e6:,.0f} MB",
        err=True,
    )
    return tree, tree.n_chunks * tree.chunk_len / max(seconds, 1e-9)


def _stream(model, tokenizer, prompt, ids, chat_template, settings, options):
    """Stream the answer to stdout; the last response (with the stats), if any."""
    response = None
    for response in stream_generate(
        model,
        tokenizer,
        prompt,
        ids,
        chat_template=chat_template,
        progress=_CompressBar(model.config.chunk_len),
        settings=settings,
        **options,
    ):
        sys.stdout.write(response.text)
        sys.stdout.flush()
    return response


def run_generate(
    prompt: str,
    source: TextSource | None,
    model_ref: str | None,
    *,
    adapter: Path | None = None,
    force: bool = False,
    verbose: bool,
    chat_template: bool | None,
    options: dict[str, Any],
    save_context: Path | None = None,
    save_tree_bits: str | None = None,
    context_path: Path | None = None,
) -> None:
    path = resolve_model(model_ref)
    tree_bits = planned_tree_bits(save_tree_bits, save_context is not None)
    plan = _memory_plan(path, source, prompt, {**options, "tree_bits": tree_bits}, force)
    model, tokenizer = load_model(path)
    if adapter is not None:
        _load_adapter(model, adapter)
    if verbose:
        click.echo(f"model: {path} (fingerprint {model.fingerprint()})", err=True)
    group = options.pop("tree_group_size", None) or 64
    settings = run_settings(model, options, save_tree_bits, group)
    if model.injection != "trained" and not settings.reread_tokens:
        click.echo(
            f"note: this model's context injection is untrained "
            f"(init '{model.injection}'); answers cannot draw on the compressed "
            "context yet (--reread-tokens reads passages of it again in full)",
            err=True,
        )
    check_prompt(model, tokenizer, prompt, chat_template)
    sources_map = options.pop("sources_map", None)
    options["sources"] = options.get("sources") or sources_map is not None
    ids = _tokenize(tokenizer, source, options["sources"]) if source else None
    if isinstance(ids, tuple):
        ids, options["text_offsets"] = ids
    if verbose and ids is not None:
        click.echo(f"context: {len(ids):,} tokens, chunks of {model.config.chunk_len}", err=True)
    origin = None
    if context_path is not None:
        origin = f"loaded from {context_path}"
        ids = _saved_context(context_path, model, settings, ids)
    elif save_context is not None:
        bits = save_bits(model, save_tree_bits, group)
        ids, tps = compress_and_save(
            model, tokenizer, ids, prompt, chat_template, bits, group, save_context
        )
        origin = f"compressed at {tps:,.0f} tok/s"
    elif ids is None:
        origin = "none given"
    try:
        with wired_limit(plan) if plan else contextlib.nullcontext():
            response = _stream(model, tokenizer, prompt, ids, chat_template, settings, options)
    except ValueError as e:
        raise InputError(str(e)) from None
    sys.stdout.write("\n")
    if response is not None and response.sources is not None:
        print_sources(response.sources)
        if sources_map is not None:
            draw_sources_map(response.sources, sources_map)
    if response is not None:
        click.echo(stats_line(response, origin), err=True)


EXCERPT_CHARS = 160


def source_line(number: int, source) -> str:
    """'[1] chars 81,200-85,310 (12%, re-read): "..."' (tokens where no text is known)."""
    unit, (start, end) = ("chars", source.chars) if source.chars else ("tokens", source.tokens)
    how = f"{source.share:.0%}" + (", re-read" if source.reread else "")
    excerpt = " ".join(source.excerpt.split())
    if len(excerpt) > EXCERPT_CHARS:
        excerpt = excerpt[: EXCERPT_CHARS - 3].rstrip() + "..."
    return f'[{number}] {unit} {start:,}-{end:,} ({how}): "{excerpt}"'


def print_sources(found) -> None:
    """The answer's sources, after the answer, on stdout."""
    click.echo("sources:")
    for i, source in enumerate(found.sources, 1):
        click.echo(source_line(i, source))


def draw_sources_map(found, path: Path) -> None:
    """A PNG of the attention profile along the document, re-read chunks marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--sources-map needs matplotlib: pip install matplotlib") from None
    profile = found.profile
    reread = {s.chunk for s in found.sources if s.reread}
    colours = ["tab:orange" if c in reread else "tab:blue" for c in range(len(profile))]
    fig, ax = plt.subplots(figsize=(10, 3))
    ax.bar(np.arange(len(profile)), profile * 100, width=1.0, color=colours)
    ax.set_xlabel("chunk (position in the document)")
    ax.set_ylabel("attention share (%)")
    ax.set_title("Where the answer looked (orange: re-read in full)")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    click.echo(f"wrote the sources map to {path}", err=True)


def run_compress(
    source: TextSource,
    model_ref: str | None,
    out: Path,
    *,
    prompt: str | None,
    tree_bits: str | None,
    group: int,
    adapter: Path | None = None,
    force: bool = False,
    chat_template: bool | None = None,
) -> None:
    """`mlx-sharedllm compress`: tokenize, compress and save a context tree."""
    path = resolve_model(model_ref)
    planned = {"tree_bits": planned_tree_bits(tree_bits, saving=True)}
    plan = _memory_plan(path, source, prompt or "", planned, force)
    model, tokenizer = load_model(path)
    if adapter is not None:
        _load_adapter(model, adapter)
    bits = save_bits(model, tree_bits, group)
    if prompt:
        check_prompt(model, tokenizer, prompt, chat_template)
    ids = _tokenize(tokenizer, source)
    click.echo(f"context: {len(ids):,} tokens, model {path}", err=True)
    with wired_limit(plan) if plan else contextlib.nullcontext():
        compress_and_save(model, tokenizer, ids, prompt, chat_template, bits, group, out)
