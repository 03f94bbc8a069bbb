"""The `mlx-sharedllm` command."""

from __future__ import annotations

import click

from ..convert.checkpoint import DTYPES, convert_checkpoint
from ..convert.released import ConversionError
from ..convert.torch_bin import CheckpointError


@click.group()
@click.version_option(package_name="mlx-sharedllm")
def cli() -> None:
    """SharedLLM on MLX: ask questions about texts longer than the model's window."""


@cli.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path())
@click.option(
    "--dtype",
    type=click.Choice(sorted(DTYPES)),
    default=None,
    help="Weight dtype (default: as stored).",
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize the weights.")
@click.option(
    "--q-bits",
    type=click.Choice(["2", "3", "4", "5", "6", "8"]),
    default="4",
    show_default=True,
    help="Bits per weight when quantizing.",
)
@click.option(
    "--q-group-size",
    type=click.Choice(["32", "64", "128"]),
    default="64",
    show_default=True,
    help="Group size when quantizing.",
)
@click.option(
    "--chunk-len",
    type=int,
    default=1024,
    show_default=True,
    help="Tokens per compressed chunk, used when a 1-D context is cut into chunks.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def convert(
    src: str,
    out: str,
    dtype: str | None,
    quantize: bool,
    q_bits: str,
    q_group_size: str,
    chunk_len: int,
    force: bool,
) -> None:
    """Convert a checkpoint of the released PyTorch SharedLLM code (SRC) to MLX (OUT)."""
    try:
        path = convert_checkpoint(
            src,
            out,
            dtype=dtype,
            quantize=quantize,
            q_bits=int(q_bits),
            q_group_size=int(q_group_size),
            chunk_len=chunk_len,
            force=force,
        )
    except (ConversionError, CheckpointError, FileExistsError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}", err=True)


def main() -> None:
    cli()
