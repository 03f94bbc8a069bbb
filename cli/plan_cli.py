"""`mlx-sharedllm plan`: the memory a run will take, against this machine's memory."""

from __future__ import annotations

from pathlib import Path

import click

from ..plan import (
    FLOAT_TREE,
    MAX_TOKENS,
    SHAPES,
    memory_budget,
    plan_for_model_dir,
    plan_for_shape,
)
from ..plan_render import fit_line, plan_table

BITS = click.Choice(["4", "8"])


def _bits(value: str | None) -> int | None:
    return None if value is None else int(value)


def tree_bits_option(value: str | None) -> int | str | None:
    """--tree-bits ('4', '8', 'float') as PlanSettings takes it (not given: None, the
    format the model records)."""
    return value if value in (None, FLOAT_TREE) else int(value)


@click.command("plan")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A converted model folder (only config.json and the weight headers are read).",
)
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default=None, help="A named shape.")
@click.option("--context-tokens", type=click.IntRange(0, MAX_TOKENS), required=True)
@click.option(
    "--weight-bits",
    type=click.Choice(["2", "3", "4", "5", "6", "8", "16", "32"]),
    default=None,
    help="Quantized weights (group 64), or 16/32 for float (default: as stored; a named "
    "shape: unquantized).",
)
@click.option(
    "--tree-bits",
    type=click.Choice(["4", "8", FLOAT_TREE]),
    default=None,
    help="Quantized tree, or float in the compute dtype (default: the tree_format the "
    "model's config.json records, else float; a named shape: float).",
)
@click.option("--kv-bits", type=BITS, default=None, help="Quantized KV cache (default: float).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="Compute dtype (default: the model's; a named shape: bfloat16).",
)
@click.option(
    "--running-tokens",
    type=click.IntRange(1, MAX_TOKENS),
    default=None,
    help="The upper model's window: remainder + prompt + generated (default chunk_len + 1024).",
)
@click.option("--compress-batch", type=click.IntRange(min=1), default=None)
def plan_command(
    model_dir: Path | None,
    shape: str | None,
    context_tokens: int,
    weight_bits: str | None,
    tree_bits: str | None,
    kv_bits: str | None,
    dtype: str | None,
    running_tokens: int | None,
    compress_batch: int | None,
) -> None:
    """Print the memory a run will take (weights, tree, KV cache, activations) and
    whether it fits this machine."""
    if (model_dir is None) == (shape is None):
        raise click.UsageError("give one of --model and --shape")
    settings = dict(running_tokens=running_tokens, compress_batch=compress_batch)
    if dtype is not None:
        settings["dtype"] = dtype
    try:
        if model_dir is not None:
            plan = plan_for_model_dir(
                model_dir,
                context_tokens,
                tree_bits_option(tree_bits),
                _bits(kv_bits),
                weight_bits=_bits(weight_bits),
                **settings,
            )
        else:
            plan = plan_for_shape(
                shape,
                context_tokens,
                _bits(weight_bits),
                tree_bits=tree_bits_option(tree_bits),
                kv_bits=_bits(kv_bits),
                **settings,
            )
    except (OSError, ValueError, KeyError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(plan_table(plan))
    click.echo("")
    click.echo(fit_line(plan, memory_budget()))
