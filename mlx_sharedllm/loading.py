"""Load a converted SharedLLM model folder."""

from __future__ import annotations

from pathlib import Path

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from .config import SharedLLMConfig
from .model import SharedLLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load(path: str | Path) -> tuple[SharedLLM, TokenizerWrapper | None]:
    """Load a converted model folder: (model, tokenizer), tokenizer None when it has none."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a converted model folder (no config.json)")
    model, _ = load_model(path, get_model_classes=lambda config: (SharedLLM, SharedLLMConfig))
    has_tokenizer = any((path / name).exists() for name in TOKENIZER_FILES)
    return model, load_tokenizer(path) if has_tokenizer else None
