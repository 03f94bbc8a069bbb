"""SharedLLM in MLX: read contexts longer than the model's window through a context tree."""

from ._blas import preload_openblas

OPENBLAS = preload_openblas()

from .config import SharedLLMConfig  # noqa: E402  (after the BLAS preload)
from .loading import load, load_context  # noqa: E402
from .model import SharedLLM  # noqa: E402
from .tree import ContextTree  # noqa: E402

__all__ = ["ContextTree", "SharedLLM", "SharedLLMConfig", "load", "load_context"]
