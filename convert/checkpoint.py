"""Convert a checkpoint of the released PyTorch SharedLLM code to MLX, without torch."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model, save_model
from tqdm import tqdm

from ..model import SharedLLM
from .released import ConversionError, config_from_released, weight_table
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

Loader = Callable[[Path], dict[str, mx.array]]


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
    """Every tensor of the checkpoint, one file at a time (with a progress bar per file)."""
    files, loader, index = _weight_files(src)
    weight_map = json.loads(index.read_text())["weight_map"] if index else None
    for path in tqdm(files, desc="converting", unit="file", disable=not progress):
        if not path.exists():
            raise ConversionError(f"{index} names {path.name}, which does not exist")
        tensors = loader(path)
        for name, value in tensors.items():
            if weight_map is not None and weight_map.get(name) != path.name:
                raise ConversionError(
                    f"{path.name} holds {name}, which {index.name} puts in {weight_map.get(name)}"
                )
            yield name, value


def collect_weights(
    src: Path, cfg, lower_layers: int, dtype: mx.Dtype | None, progress: bool = True
) -> dict[str, mx.array]:
    """Read, check against the weight table, drop unused layers, cast."""
    kept, dropped = weight_table(cfg, lower_layers)
    weights: dict[str, mx.array] = {}
    for name, value in read_weights(src, progress):
        expected = kept.get(name, dropped.get(name))
        if expected is None:
            raise ConversionError(f"unknown weight {name!r} in {src}")
        if tuple(value.shape) != expected:
            raise ConversionError(
                f"weight {name!r} has shape {tuple(value.shape)}, expected {expected}"
            )
        if name in kept:
            weights[name] = value.astype(dtype) if dtype is not None else value
    missing = sorted(set(kept) - set(weights))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConversionError(f"missing weight {missing[0]!r}{more} in {src}")
    return weights


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    chunk_len: int = 1024,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the released code's checkpoint folder `src` into an MLX model folder `out`.

    The output is written to a temporary folder next to `out` and renamed into place,
    so a failed or interrupted conversion leaves nothing behind.
    """
    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    hf = json.loads((src / "config.json").read_text())
    cfg = config_from_released(hf, chunk_len)
    lower_layers = (hf.get("encoder_config") or hf)["num_hidden_layers"]
    weights = collect_weights(src, cfg, lower_layers, DTYPES.get(dtype), progress)

    model = SharedLLM(cfg)
    model.load_weights(list(weights.items()))
    config = cfg.to_dict()
    if quantize:
        model, config = quantize_model(model, config, q_group_size, q_bits)
    mx.eval(model.parameters())
    _write_atomically(out, force, lambda tmp: _save(tmp, src, model, config))
    return out


def _save(tmp: Path, src: Path, model: SharedLLM, config: dict) -> None:
    save_model(tmp, model)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
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


def parameter_count(model: SharedLLM) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))
