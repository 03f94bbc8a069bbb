"""Convert checkpoints to MLX SharedLLM folders, without torch.

Sources: a checkpoint of the released SharedLLM code, or a plain LLaMA-family model
(HF safetensors/.bin folder or a GGUF file) stacked from one. Either may be a local
path or a Hugging Face Hub repo id.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.utils import quantize_model, save_model
from tqdm import tqdm

from ..model import SharedLLM
from .gguf import read_gguf, save_gguf_tokenizer
from .released import config_from_released, weight_table
from .stack import StackOptions, stack_from_one
from .tables import ConversionError, check_weights
from .torch_bin import load_torch_bin

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Files next to the weights that a user of the converted model still needs.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "tokenizer.model", "*.jinja"]

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


def _weight_files(src: Path) -> tuple[list[Path], Loader, Path | None]:
    """The weight files of a checkpoint folder, their loader, and their index if sharded."""
    for pattern, index_name, loader in (
        ("*.safetensors", "model.safetensors.index.json", lambda p: mx.load(str(p))),
        ("pytorch_model*.bin", "pytorch_model.bin.index.json", load_torch_bin),
    ):
        index = src / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted({src / f for f in weight_map.values()}), loader, index
        files = sorted(src.glob(pattern))
        if len(files) == 1:
            return files, loader, None
        if files:
            raise ConversionError(f"{src} has {len(files)} {pattern} files but no {index_name}")
    raise ConversionError(f"no weights (*.safetensors or pytorch_model*.bin) in {src}")


def read_weights(src: Path, progress: bool = True) -> Iterator[tuple[str, mx.array]]:
    """Every tensor of a checkpoint folder, one file at a time (a progress bar per file)."""
    files, loader, index = _weight_files(src)
    weight_map = json.loads(index.read_text())["weight_map"] if index else None
    for path in tqdm(files, desc="reading weights", unit="file", disable=not progress):
        if not path.exists():
            raise ConversionError(f"{index} names {path.name}, which does not exist")
        for name, value in loader(path).items():
            if weight_map is not None and weight_map.get(name) != path.name:
                raise ConversionError(
                    f"{path.name} holds {name}, which {index.name} puts in {weight_map.get(name)}"
                )
            yield name, value


def _released_model(src: Path, hf: dict, dtype: mx.Dtype | None, progress: bool) -> SharedLLM:
    cfg = config_from_released(hf)
    lower_layers = (hf.get("encoder_config") or hf)["num_hidden_layers"]
    kept, dropped = weight_table(cfg, lower_layers)
    weights = check_weights(read_weights(src, progress), kept, dropped, src, dtype)
    model = SharedLLM(cfg)
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
    hf = json.loads((src / "config.json").read_text())
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
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert `src` into an MLX SharedLLM folder `out`.

    `stack` stacks a plain LLaMA from one; `tree` overrides tree settings (chunk_len,
    tree_depth, last_p, policy). The output is written to a temporary folder next to
    `out` and renamed into place, so a failed or interrupted conversion leaves nothing
    behind.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    src = resolve_source(src)
    model = build_model(src, DTYPES.get(dtype), stack, progress)
    model.config = dataclasses.replace(model.config, **(tree or {}))
    config = model.config.to_dict()
    if quantize:
        model, config = quantize_model(model, config, q_group_size, q_bits)
    mx.eval(model.parameters())
    _write_atomically(out, force, lambda tmp: _save(tmp, src, model, config))
    return out


def _save(tmp: Path, src: Path, model: SharedLLM, config: dict) -> None:
    save_model(tmp, model)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if src.is_file():
        save_gguf_tokenizer(src, tmp)
        return
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)


def _write_atomically(out: Path, force: bool, write: Callable[[Path], None]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists() and force:
            old = tmp.with_name(tmp.name + ".old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
