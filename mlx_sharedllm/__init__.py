"""SharedLLM in MLX: read contexts longer than the model's window through a context tree."""

import importlib
from typing import Any

from ._blas import preload_openblas

OPENBLAS = preload_openblas()

# Loaded on first use, so that `import mlx_sharedllm` (and the CLI's entry point, which
# handles Ctrl-C) starts at once; MLX and mlx-lm load with the first of these.
_LAZY = {
    "ContextTree": ".tree",
    "SharedLLM": ".model",
    "SharedLLMConfig": ".config",
    "Settings": ".settings",
    "load": ".loading",
    "load_context": ".loading",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
