"""`mlx-sharedllm generate`: progress bars, streaming output, stats, one-line errors."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from ..generate import stream_generate, tokenize_pieces
from ..loading import load
from ..plan import check_fits, plan_for_model_dir, wired_limit
from .inputs import InputError, TextSource


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


def load_model(path: Path):
    try:
        model, tokenizer = load(path)
    except Exception as e:  # any failure here means unusable weights or config
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot load the model in {path}: {reason}") from None
    if tokenizer is None:
        raise InputError(f"the model in {path} has no tokenizer")
    return model, tokenizer


def _tokenize(tokenizer, source: TextSource):
    with tqdm(
        total=source.size,
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        file=sys.stderr,
        leave=False,
    ) as bar:

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(done - bar.n)

        return tokenize_pieces(tokenizer, source.pieces(), progress)


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


def stats_line(r) -> str:
    return (
        f"context {r.context_tokens:,} tokens | {r.chunks:,} chunks ({r.chunks_read:,} read, "
        f"{r.reread_tokens:,} tokens re-read) | "
        f"{r.tree_entries:,} tree entries | compress {r.compress_tps:,.0f} tok/s | "
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


def _saved_context(path: Path, model):
    from ..loading import load_context

    try:
        return load_context(path, model)
    except ValueError as e:
        raise InputError(str(e)) from None


def _compress_and_save(model, tokenizer, ids, prompt, chat_template, options, path: Path):
    """Compress the context once and save it (the question is the tree's query)."""
    import mlx.core as mx

    from ..cache import TreeFormat
    from ..generate import encode_prompt

    if len(ids) < model.config.chunk_len:
        raise InputError(
            f"the context is {len(ids):,} tokens, shorter than one chunk "
            f"({model.config.chunk_len}): there is nothing to compress and save"
        )
    bits, group = options.get("tree_bits"), options.get("tree_group_size") or 64
    bar = _CompressBar(model.config.chunk_len)
    tree = model.compress(
        mx.array(ids),
        mx.array(encode_prompt(tokenizer, prompt, chat_template)),
        lambda done, total: bar("compress", done, total),
        TreeFormat(model.compute_dtype, bits, group),
    )
    try:
        tree.save(path)
    except OSError as e:
        raise InputError(f"cannot write the context to {path}: {e.strerror or e}") from None
    click.echo(f"saved the compressed context to {path} ({tree.nbytes / 1e6:,.0f} MB)", err=True)
    return tree


def _stream(model, tokenizer, prompt, ids, chat_template, options):
    """Stream the answer to stdout; the last response (with the stats), if any."""
    response = None
    for response in stream_generate(
        model,
        tokenizer,
        prompt,
        ids,
        chat_template=chat_template,
        progress=_CompressBar(model.config.chunk_len),
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
    context_path: Path | None = None,
) -> None:
    path = resolve_model(model_ref)
    plan = _memory_plan(path, source, prompt, options, force)
    model, tokenizer = load_model(path)
    if adapter is not None:
        from ..adapters import load_adapter

        try:
            load_adapter(model, adapter)
        except (ValueError, FileNotFoundError) as e:
            raise InputError(str(e)) from None
    if verbose:
        click.echo(f"model: {path} (fingerprint {model.fingerprint()})", err=True)
    reread = options.get("reread_tokens")
    reread = model.config.reread_tokens if reread is None else reread
    if model.config.injection != "trained" and not reread:
        click.echo(
            f"note: this model's context injection is untrained "
            f"(init '{model.config.injection}'); answers cannot draw on the compressed "
            "context yet (--reread-tokens reads passages of it again in full)",
            err=True,
        )
    ids = _tokenize(tokenizer, source) if source else None
    if verbose and ids is not None:
        click.echo(f"context: {len(ids):,} tokens, chunks of {model.config.chunk_len}", err=True)
    if context_path is not None:
        ids = _saved_context(context_path, model)
    elif save_context is not None:
        ids = _compress_and_save(
            model, tokenizer, ids, prompt, chat_template, options, save_context
        )
    try:
        with wired_limit(plan) if plan else contextlib.nullcontext():
            response = _stream(model, tokenizer, prompt, ids, chat_template, options)
    except ValueError as e:
        raise InputError(str(e)) from None
    sys.stdout.write("\n")
    if response is not None:
        click.echo(stats_line(response), err=True)
