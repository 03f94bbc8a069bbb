"""Writing model folders: atomically, with the side files a user of the model needs.

`convert`, `fuse` (adapters.py) and training checkpoints all write through here, so the
library never reaches into `convert/`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.utils import save_model as mlx_lm_save_model

# One name for each float dtype a model or tree is stored in.
FLOAT_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# Files next to the weights that a user of the converted model still needs.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)

# Temporary folders are named .OUT.mlx-sharedllm-PID-RANDOM (plus .old for a replaced OUT), so
# one left by a killed process (kill -9, power loss) can be told apart and removed later.
TEMP_MARK = "mlx-sharedllm"
_TEMP_NAME = re.compile(rf"\..+\.{TEMP_MARK}-(\d+)-\w+(\.old)?")


def write_atomically(out: Path, force: bool, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a new folder next to `out`, then rename it to `out` (replacing
    an existing one when `force`): a failed or interrupted write leaves nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)
    prefix = f".{out.name}.{TEMP_MARK}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
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


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary folders in `folder` whose writing process is gone."""
    for entry in folder.iterdir():
        match = _TEMP_NAME.fullmatch(entry.name)
        if match and not _alive(int(match[1])) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's process
    return True


def copy_side_files(src: Path, folder: Path) -> None:
    """Copy the tokenizer and the other SIDE_FILES that `src` (a folder) has."""
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, folder / name)


def save_model_folder(folder: Path, model: Any, config: dict[str, Any]) -> None:
    """The model's weights (mlx-lm's sharded safetensors) and its config.json."""
    mlx_lm_save_model(folder, model)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def safetensors_headers(path: Path) -> dict[str, dict]:
    """Every tensor's header entry (dtype, shape, data_offsets) in a folder's files, with
    the file it is in and where that file's data starts (`file`, `data_start`)."""
    headers = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > file.stat().st_size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(length))
        except (struct.error, ValueError):
            raise ValueError(f"{file} is not a safetensors file") from None
        header.pop("__metadata__", None)
        for entry in header.values():
            entry.update(file=file, data_start=8 + length)
        headers.update(header)
    if not headers:
        raise ValueError(f"{path} holds no .safetensors weights")
    return headers


def live_injection_layers(path: Path, m: int) -> tuple[int, ...]:
    """The layers below `m` of a converted folder whose injection output projection is not
    all zeros (an all-zero one adds nothing). Reads those tensors' bytes only."""
    headers, live = safetensors_headers(path), []
    for i in range(m):
        prefix = f"model.layers.{i}.cross_attn.o_proj."
        # Quantized weights are zero when their scales and biases are.
        parts = ["scales", "biases"] if prefix + "scales" in headers else ["weight"]
        if prefix + parts[0] in headers and not all(_is_zero(headers[prefix + p]) for p in parts):
            live.append(i)
    return tuple(live)


def _is_zero(entry: dict) -> bool:
    """True when a float tensor holds only zeros (of either sign)."""
    start, end = entry["data_offsets"]
    with open(entry["file"], "rb") as f:
        f.seek(entry["data_start"] + start)
        data = f.read(end - start)
    width = {"F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}[entry["dtype"]]
    sign = np.array(1 << (8 * np.dtype(width).itemsize - 1), dtype=width)
    return not np.any(np.frombuffer(data, width) & ~sign)


def config_of_folder(path: Path) -> dict[str, Any]:
    """A converted folder's config.json, with `injection_layers` filled in for a folder
    written before configs had them: the layers whose injection output is not all zeros
    (those that add something), the compressor running up to the last of them; every
    layer below M when none does (an untrained zero init)."""
    params = json.loads((Path(path) / "config.json").read_text())
    if not isinstance(params, dict) or "injection_layers" in params:
        return params
    m = params.get("num_injection_layers")
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        return params  # the config's own validation says what is wrong
    live = live_injection_layers(Path(path), m)
    if not live or live == tuple(range(m)):
        return params
    return {**params, "injection_layers": list(live), "num_injection_layers": live[-1] + 1}
