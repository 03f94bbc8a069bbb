"""`mlx-sharedllm serve`: an OpenAI-compatible local server that compresses each document
once and keeps its tree in memory and on disk.

Needs the `server` extra (starlette, uvicorn): `pip install 'mlx-sharedllm[server]'`.
"""

from __future__ import annotations

from pathlib import Path

from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..model import SharedLLM
from .app import MAX_BODY_BYTES, create_app
from .engine import Engine
from .service import Service
from .store import TreeStore, document_id

DEFAULT_CACHE_BYTES = 2 << 30
DEFAULT_QUEUE = 16

__all__ = ["MAX_BODY_BYTES", "Service", "create_app", "document_id", "make_service", "serve"]


def make_service(
    model: SharedLLM,
    tokenizer: TokenizerWrapper,
    name: str,
    cache_dir: Path,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    queue: int = DEFAULT_QUEUE,
) -> Service:
    """The model behind one worker thread, with its tree cache under `cache_dir`; at most
    `queue` requests wait or run at once."""
    store = TreeStore(model, cache_dir, cache_bytes)
    return Service(model, tokenizer, store, Engine(queue), name)


def serve(
    service: Service,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    api_key: str | None = None,
    max_body: int = MAX_BODY_BYTES,
    log_level: str = "info",
) -> None:
    """Serve until interrupted, then stop the worker."""
    import uvicorn

    app = create_app(service, api_key=api_key, max_body=max_body)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5
    )
    try:
        uvicorn.Server(config).run()
    finally:
        service.engine.close()
