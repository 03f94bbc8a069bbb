"""SharedLLM in MLX: read contexts longer than the model's window through a context tree."""

from .config import SharedLLMConfig
from .loading import load
from .model import SharedLLM
from .tree import ContextTree

__all__ = ["ContextTree", "SharedLLM", "SharedLLMConfig", "load"]
