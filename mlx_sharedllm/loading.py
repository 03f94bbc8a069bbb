"""Load a converted SharedLLM model folder."""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import transformers
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model, load_tokenizer

from .config import SharedLLMConfig
from .io import config_of_folder
from .model import SharedLLM, fingerprint_of
from .settings import Settings, read_config
from .tree import ContextTree, token_hash

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


DEFAULT = "default"


def load(path: str | Path = DEFAULT) -> tuple[SharedLLM, TokenizerWrapper | None]:
    """Load a converted model folder: (model, tokenizer), tokenizer None when it has none.
    The model's default settings are those its config.json records.

    With no argument (or "default"), the embedded default model with its adapter, built
    once into the cache (`mlx_sharedllm.default.default_model`).
    """
    if str(path) == DEFAULT:
        from .default import default_model

        path = default_model()
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a converted model folder (no config.json)")
    params = config_of_folder(path)
    migrated = "injection_layers" in params and not _declares_layers(path)
    keys = ("injection_layers", "num_injection_layers")
    model, _ = load_model(
        path,
        model_config={k: params[k] for k in keys} if migrated else None,
        get_model_classes=lambda config: (
            partial(SharedLLM, settings=read_config(config)[1]),
            SharedLLMConfig,
        ),
    )
    if migrated:
        model.aliases = (legacy_fingerprint(path),)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        return model, None
    # transformers reads our config.json and warns that it does not know "sharedllm".
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return model, load_tokenizer(path)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _declares_layers(path: Path) -> bool:
    return "injection_layers" in json.loads((path / "config.json").read_text())


def legacy_fingerprint(path: Path) -> str:
    """The fingerprint that the code before `injection_layers` gave a folder that this
    version reads with fewer injection blocks (trees and adapters made then record it)."""
    params = json.loads((path / "config.json").read_text())
    config, settings = read_config(params)
    weights: dict[str, mx.array] = {}
    for file in sorted(path.glob("model*.safetensors")):
        weights.update(mx.load(str(file)))
    if config.upper.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return fingerprint_of(config, settings, weights.items())


def load_context(
    path: str | Path, model: SharedLLM, context: Any = None, settings: Settings | None = None
) -> ContextTree:
    """Load a tree saved with `ContextTree.save`, refusing one made by another model or
    with other tree settings than `settings` (default: the model's), or one whose token
    ids this model's vocabulary does not hold.

    `context`, the token ids the tree was compressed from, if given, must be what the
    tree records (its hash, and its remainder).
    """
    tree = ContextTree.load(path)
    made_by, ours = tree.meta.get("model"), model.fingerprint()
    if made_by != ours and made_by not in model.aliases:
        raise ValueError(
            f"{path} was compressed by a different model (fingerprint {made_by}, "
            f"this model is {ours}): compress the text again with this model"
        )
    if made_by in model.aliases:
        tree = migrated_tree(tree, model)
    if tree.meta.get("config") != model.tree_dict(settings):
        raise ValueError(
            f"{path} was compressed with other tree settings: {tree.meta.get('config')}"
        )
    if tree.chunk_len != model.config.chunk_len:
        raise ValueError(
            f"{path} has chunks of {tree.chunk_len} tokens, the model {model.config.chunk_len}"
        )
    if len(tree.layers) != len(model.config.injection_layers):
        raise ValueError(
            f"{path} holds {len(tree.layers)} layers, the model injects in "
            f"{len(model.config.injection_layers)}"
        )
    expected = model.tree_shape(tree.num_entries)
    for i, layer in enumerate(tree.layers):
        if layer.shape != expected:
            raise ValueError(f"{path}: layer {i} has shape {layer.shape}, expected {expected}")
    try:
        tree.check_token_ids(model.config.upper.vocab_size)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if context is not None:
        _check_context(path, tree, np.asarray(context).reshape(-1))
    return tree


def migrated_tree(tree: ContextTree, model: SharedLLM) -> ContextTree:
    """A tree saved before `injection_layers`, for the model this version loads from the
    same folder: one layer per injection layer (the others were stored empty), and the
    settings as the model now records them."""
    layers = [tree.layers[i] for i in model.config.injection_layers if i < len(tree.layers)]
    meta = {**tree.meta, "model": model.fingerprint(), "config": model.tree_dict()}
    return dataclasses.replace(tree, layers=layers, meta=meta)


def _check_context(path: str | Path, tree: ContextTree, ids: np.ndarray) -> None:
    """Refuse a tree that was not compressed from the token ids `ids`."""
    compressed = tree.n_chunks * tree.chunk_len
    recorded = tree.meta.get("context_sha256")
    if recorded is None:
        raise ValueError(f"{path} records no hash of its context to check it against")
    remainder = np.zeros(0) if tree.remainder is None else np.array(tree.remainder)
    if (
        len(ids) != compressed + len(remainder)
        or token_hash(ids[:compressed]) != recorded
        or not np.array_equal(ids[compressed:], remainder)
    ):
        raise ValueError(f"{path} was compressed from another context than the one given")
