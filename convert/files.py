"""What every checkpoint reader shares: its error type, size bounds and shard-index checks.

Readers check a file's own description of itself (counts, lengths, offsets, shapes) against the
file's size before they allocate anything, so a corrupt or hostile file fails with one line
naming it instead of crashing the process or exhausting memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_HEADER_BYTES",
    "CheckpointError",
    "OneLineError",
    "check_file",
    "read_json",
    "read_weight_map",
]

# Bound on a file's JSON or pickle header (safetensors header, data.pkl, shard index): real ones
# are well under 1 MiB, and parsing can take some 20 times a header's size in memory.
MAX_HEADER_BYTES = 16 << 20


class OneLineError(ValueError):
    """An error the CLI prints as one ``Error:`` line, whatever line breaks a file put in it."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


class CheckpointError(OneLineError):
    """A checkpoint is unreadable, malformed, or inconsistent with its index."""


def check_file(path: Path) -> int:
    """The size of ``path``, which must be a regular file (not a folder, FIFO or device); the
    error does not name it, as callers prefix their file's name to every error."""
    try:
        if path.is_file():
            return path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read it ({e.strerror or e})") from None
    raise CheckpointError("is not a regular file" if path.exists() else "does not exist")


def read_json(path: Path) -> Any:
    """A small JSON file's content."""
    try:
        if check_file(path) > MAX_HEADER_BYTES:
            raise CheckpointError(f"larger than {MAX_HEADER_BYTES >> 20} MiB")
        return json.loads(path.read_bytes().decode("utf-8"))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def read_weight_map(index: Path, suffix: str) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of a sharded checkpoint's index.

    Every shard must be a plain file name ending in ``suffix`` next to the index: a name with a
    folder in it could reach files outside the checkpoint.
    """
    content = read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: no 'weight_map' of tensor name -> shard file")
    for shard in dict.fromkeys(weight_map.values()):
        if not _plain_file_name(shard) or not shard.endswith(suffix):
            raise CheckpointError(
                f"{index}: shard {shard!r:.100} is not a {suffix} file name in its folder"
            )
        if not (index.parent / shard).is_file():
            raise CheckpointError(f"{index}: names {shard!r}, which does not exist")
    return weight_map


def _plain_file_name(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and name.isprintable()
        and not any(sep in name for sep in ("/", "\\", ":"))
    )
