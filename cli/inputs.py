"""Reading what the user gives `generate`, with one-line errors for bad input."""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from ..generate import text_pieces

SNIFF_BYTES = 8192


class FiniteRange(click.FloatRange):
    """A float range that also refuses nan and inf (which compare false with any bound)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


class InputError(Exception):
    """Bad input: reported as one line, without a traceback."""


@dataclass
class TextSource:
    """A text file (or stdin) read in pieces, so a huge file is never one string."""

    path: str
    encoding: str
    size: int | None
    head: bytes = b""

    def pieces(self) -> Iterator[str]:
        try:
            with self._open() as stream:
                yield from text_pieces(stream)
        except UnicodeDecodeError as e:
            raise InputError(
                f"{self.path} is not valid {self.encoding} text (byte {e.start} of a piece); "
                "pass --encoding, e.g. --encoding latin-1"
            ) from None

    def _open(self) -> io.TextIOBase:
        if self.path == "-":
            raw = io.BufferedReader(_Prefixed(self.head, sys.stdin.buffer))
            return io.TextIOWrapper(raw, encoding=self.encoding)
        return open(self.path, encoding=self.encoding)


class _Prefixed(io.RawIOBase):
    """stdin with the bytes already sniffed put back in front."""

    def __init__(self, head: bytes, rest: io.BufferedIOBase):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.head[: len(buffer)] or self.rest.read1(len(buffer))
        self.head = self.head[len(data) :] if self.head else b""
        buffer[: len(data)] = data
        return len(data)


def check_regular_file(file: Path, name: str) -> None:
    """A one-line error unless `file` is a regular file (not missing, a folder or a
    device, whose reading would fail or never end)."""
    if file.is_dir():
        raise InputError(f"{name} is a directory, not a text file")
    if not file.exists():
        raise InputError(f"no such file: {name}")
    if not file.is_file():
        raise InputError(
            f"{name} is not a regular file (a device, pipe or socket); "
            "to read a stream, pipe it in with --file -"
        )


def read_text_file(path: str, encoding: str) -> TextSource:
    """Check a context file up front: it exists, is not empty, and looks like text."""
    try:
        "".encode(encoding)
    except LookupError:
        raise InputError(f"unknown encoding {encoding!r}") from None
    if path == "-":
        head, size = sys.stdin.buffer.read(SNIFF_BYTES), None
    else:
        file = Path(path)
        check_regular_file(file, path)
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(SNIFF_BYTES)
    if not head:
        raise InputError(f"{'stdin' if path == '-' else path} is empty")
    if b"\0" in head and "16" not in encoding and "32" not in encoding:
        raise InputError(f"{path} looks like a binary file, not text")
    return TextSource(path, encoding, size, head if path == "-" else b"")


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise InputError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        check_regular_file(prompt_file, str(prompt_file))
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{prompt_file} is not UTF-8 text") from None
    if prompt is None or not prompt.strip():
        raise InputError("give a prompt: --prompt TEXT or --prompt-file PATH")
    return prompt
