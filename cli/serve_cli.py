"""`mlx-sharedllm serve`: the OpenAI-compatible local server."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import click

from .inputs import InputError

INSTALL = "pip install 'mlx-sharedllm[server]'"
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ByteSize(click.ParamType):
    """A size in bytes: an integer, or one with a K, M, G or T suffix (powers of 1024)."""

    name = "bytes"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(value), re.IGNORECASE)
        if not match:
            self.fail(f"{value!r} is not a size (e.g. 2G, 512M, 1000000)", param, ctx)
        size = int(float(match[1]) * UNITS[match[2].lower()])
        if size < 1:
            self.fail("the size must be at least 1 byte", param, ctx)
        return size


def missing_packages() -> list[str]:
    return [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]


def default_cache_dir() -> Path:
    from ..assets import cache_home

    return cache_home() / "server"


@click.command("serve")
@click.option(
    "--model",
    default=None,
    help="A converted model folder or Hub repo (default: embedded SmolLM2-135M).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--api-key",
    envvar="MLX_SHAREDLLM_API_KEY",
    default=None,
    help="Require `Authorization: Bearer KEY` (also $MLX_SHAREDLLM_API_KEY).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where compressed documents are kept (default: the cache folder's server/).",
)
@click.option(
    "--cache-bytes",
    type=ByteSize(),
    default="2G",
    show_default=True,
    help="The budget of compressed documents, in memory and on disk each (least recently "
    "used dropped first).",
)
@click.option(
    "--queue",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Requests that may wait or run at once; more get 429.",
)
@click.option("--max-body", type=ByteSize(), default="64M", show_default=True)
def serve_command(model, host, port, api_key, cache_dir, cache_bytes, queue, max_body) -> None:
    """Serve the model over an OpenAI-compatible HTTP API; each document is compressed
    once, and its tree kept in memory and on disk."""
    from .generate_cli import load_model, resolve_model

    if missing := missing_packages():
        raise click.ClickException(f"the server needs {' and '.join(missing)}: {INSTALL}")
    from ..server import make_service, serve

    try:
        path = resolve_model(model)
        loaded, tokenizer = load_model(path)
    except InputError as e:
        raise click.ClickException(str(e)) from None
    cache_dir = cache_dir or default_cache_dir()
    service = make_service(loaded, tokenizer, model or "default", cache_dir, cache_bytes, queue)
    click.echo(
        f"serving {path} (fingerprint {service.fingerprint}) on http://{host}:{port}/v1, "
        f"documents in {service.store.folder}",
        err=True,
    )
    serve(service, host, port, api_key=api_key, max_body=max_body)
