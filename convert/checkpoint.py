"""Convert checkpoints to MLX SharedLLM folders, without torch.

Sources: a checkpoint of the released SharedLLM code, or a plain LLaMA-family model
(HF safetensors/.bin folder or a GGUF file) stacked from one. Either may be a local
path or a Hugging Face Hub repo id.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
from mlx_lm.utils import quantize_model
from tqdm import tqdm

from ..io import FLOAT_DTYPES, copy_side_files, save_model_folder, write_atomically
from ..model import SharedLLM, config_json
from ..settings import STACKED_REREAD_TOKENS, read_config
from .files import read_json, read_weight_map
from .gguf import read_gguf, save_gguf_tokenizer
from .released import config_from_released, settings_from_released, weight_table
from .safetensors_reader import load_safetensors
from .stack import StackOptions, keep_heads, stack_from_one
from .tables import ConversionError, check_weights
from .torch_bin import load_torch_bin

HUB_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "tokenizer.model", "*.jinja"]

HEADS_HAYSTACK = 1024  # tokens of haystack around each planted fact, when finding heads

Loader = Callable[[Path], dict[str, mx.array]]


def resolve_source(src: str | Path) -> Path:
    """A local path as is; otherwise a Hugging Face repo id, fetched with huggingface_hub
    (which honours HF_HOME and HF_HUB_OFFLINE)."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(src)):
        raise ConversionError(f"unknown model {str(src)!r}: no such file or directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(src), allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(
            f"unknown model {str(src)!r}: not a local path, and the Hugging Face Hub "
            f"could not provide it ({reason})"
        ) from None


class _WeightFiles(NamedTuple):
    """The weight files of a checkpoint folder, their loader, and its index if sharded."""

    files: list[Path]
    loader: Loader
    index: Path | None = None
    weight_map: dict[str, str] | None = None


def _weight_files(src: Path) -> _WeightFiles:
    for suffix, pattern, index_name, loader in (
        (".safetensors", "*.safetensors", "model.safetensors.index.json", load_safetensors),
        (".bin", "pytorch_model*.bin", "pytorch_model.bin.index.json", load_torch_bin),
    ):
        index = src / index_name
        if index.exists():
            weight_map = read_weight_map(index, suffix)
            return _WeightFiles(
                sorted({src / f for f in weight_map.values()}), loader, index, weight_map
            )
        files = sorted(src.glob(pattern))
        if len(files) == 1:
            return _WeightFiles(files, loader)
        if files:
            raise ConversionError(f"{src} has {len(files)} {pattern} files but no {index_name}")
    raise ConversionError(f"no weights (*.safetensors or pytorch_model*.bin) in {src}")


def read_weights(src: Path, progress: bool = True) -> Iterator[tuple[str, mx.array]]:
    """Every tensor of a checkpoint folder, one file at a time (a progress bar per file)."""
    files, loader, index, weight_map = _weight_files(src)
    for path in tqdm(files, desc="reading weights", unit="file", disable=not progress):
        for name, value in loader(path).items():
            if weight_map is not None and weight_map.get(name) != path.name:
                raise ConversionError(
                    f"{path.name} holds {name!r:.100}, which {index.name} puts in "
                    f"{weight_map.get(name)!r}"
                )
            yield name, value


def _released_model(src: Path, hf: dict, dtype: mx.Dtype | None, progress: bool) -> SharedLLM:
    cfg = config_from_released(hf)
    lower_layers = (hf.get("encoder_config") or hf)["num_hidden_layers"]
    kept, dropped = weight_table(cfg, lower_layers)
    # closed on an error, so the progress bar ends its line before the error is printed
    with closing(read_weights(src, progress)) as items:
        weights = check_weights(items, kept, dropped, src, dtype)
    model = SharedLLM(cfg, settings_from_released(hf))
    model.load_weights(list(weights.items()))
    return model


def build_model(
    src: Path, dtype: mx.Dtype | None, stack: StackOptions | None, progress: bool
) -> SharedLLM:
    """The SharedLLM that `src` (a local folder or GGUF file) describes."""
    if src.is_file():
        if src.suffix != ".gguf":
            raise ConversionError(f"{src} is a file but not a GGUF file; give a folder or .gguf")
        if stack is None:
            raise ConversionError("a GGUF file is a plain LLaMA: pass --stack-from-one M")
        hf, weights = read_gguf(src, dtype or mx.float32)
        return stack_from_one(hf, weights.items(), stack, src, dtype)
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json")
    hf = read_json(src / "config.json")
    if not isinstance(hf, dict):
        raise ConversionError(f"{src / 'config.json'} is not a JSON object")
    released = "num_cross_attn_layers" in hf
    if released and stack is not None:
        raise ConversionError(f"{src} is already a SharedLLM checkpoint: drop --stack-from-one")
    if released:
        return _released_model(src, hf, dtype, progress)
    if stack is None:
        raise ConversionError(f"{src} is a plain LLaMA checkpoint: pass --stack-from-one M")
    return stack_from_one(hf, read_weights(src, progress), stack, src, dtype)


def convert(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    stack: StackOptions | None = None,
    tree: dict[str, Any] | None = None,
    reread_tokens: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert `src` into an MLX SharedLLM folder `out`.

    `stack` stacks a plain LLaMA from one; `tree` overrides the tree keys of config.json
    (chunk_len, tree_depth, last_p, policy: the CLI's flags). `reread_tokens` is the
    re-reading budget config.json records (default: STACKED_REREAD_TOKENS for a model
    stacked from one, whose injection is untrained; else the checkpoint's, or off). The
    output is written to a temporary folder next to `out` and renamed into place, so a
    failed or interrupted conversion leaves nothing behind.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
    src = resolve_source(src)
    model = build_model(src, FLOAT_DTYPES.get(dtype), stack, progress)
    if stack is not None and stack.auto_heads is not None:
        model = copy_retrieval_heads(src, model, stack, progress)
    if reread_tokens is None and stack is not None:
        reread_tokens = STACKED_REREAD_TOKENS
    reread = {} if reread_tokens is None else {"reread_tokens": reread_tokens}
    config = config_json(*read_config({**model.config_dict(), **(tree or {}), **reread}))
    if quantize:
        model, config = quantize_model(model, config, q_group_size, q_bits)
    mx.eval(model.parameters())
    write_atomically(out, force, lambda tmp: _save(tmp, src, model, config))
    return out


def copy_retrieval_heads(
    src: Path, model: SharedLLM, stack: StackOptions, progress: bool
) -> SharedLLM:
    """The model with injection only for the base model's retrieval heads below layer M
    (heads.py), found on `model`, whose injection copies every head."""
    from mlx_lm.utils import load_tokenizer

    from ..heads import find_heads

    with tempfile.TemporaryDirectory() as folder:
        _save_tokenizer(src, Path(folder))
        if not any(Path(folder).iterdir()):
            raise ConversionError(f"{src} has no tokenizer, which finding heads needs")
        tokenizer = load_tokenizer(Path(folder))
    if progress:
        print(f"finding retrieval heads in layers 0-{stack.m - 1}...", file=sys.stderr)
    # Haystacks well inside the window, so that the heads are scored where they work.
    length = min(HEADS_HAYSTACK, model.args.max_position_embeddings // 2)
    heads = find_heads(model, tokenizer, stack.m, stack.auto_heads or None, length=length)
    if progress:
        found = ", ".join(f"{h} ({h.score:.2f})" for h in heads)
        print(f"copying heads {found}", file=sys.stderr)
    return keep_heads(model, [(h.layer, h.head) for h in heads], stack.m)


def _save_tokenizer(src: Path, folder: Path) -> None:
    if src.is_file():
        save_gguf_tokenizer(src, folder)
    else:
        copy_side_files(src, folder)


def _save(tmp: Path, src: Path, model: SharedLLM, config: dict) -> None:
    save_model_folder(tmp, model, config)
    _save_tokenizer(src, tmp)
