"""Needles in haystacks of real text: the synthetic retrieval examples.

Training and evaluation use disjoint needle templates, names and values: training
numbers have an even digit sum, evaluation numbers an odd one (`number`), so no value
the evaluation asks for was ever trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Template:
    """A fact to hide (`needle`), the question that asks for it, the slot that answers
    it, and what the answer is called in the prompt."""

    needle: str
    question: str
    slot: str
    kind: str


TRAIN_TEMPLATES = (
    Template(
        "The secret passkey is {number}. Remember it.",
        "What is the secret passkey?",
        "number",
        "number",
    ),
    Template(
        "{name}'s lucky number is {number}.", "What is {name}'s lucky number?", "number", "number"
    ),
    Template(
        "The code that opens the {thing} is {number}.",
        "What is the code that opens the {thing}?",
        "number",
        "number",
    ),
    Template(
        "Remember this: the train to {city} leaves from platform {number}.",
        "Which platform does the train to {city} leave from?",
        "number",
        "number",
    ),
    Template(
        'The password for the {thing} is "{word}".',
        "What is the password for the {thing}?",
        "word",
        "word",
    ),
    Template(
        "{name} hid the letter in the {place}.",
        "Where did {name} hide the letter?",
        "place",
        "place",
    ),
    Template(
        "The name of {name}'s dog is {dog}.", "What is the name of {name}'s dog?", "dog", "name"
    ),
    Template(
        "In the year {year}, the old bridge in {city} was rebuilt.",
        "In which year was the old bridge in {city} rebuilt?",
        "year",
        "year",
    ),
)

TRAIN_WORDS = {
    "name": ("Margaret", "Thomas", "Eleanor", "Samuel", "Beatrice", "Oliver", "Clara", "Henry"),
    "thing": ("blue cabinet", "garden gate", "iron chest", "attic door", "old safe", "red locker"),
    "city": ("Lisbon", "Krakow", "Nairobi", "Osaka", "Quebec", "Tbilisi", "Valparaiso", "Dublin"),
    "word": (
        "marmalade",
        "thunder",
        "pelican",
        "saffron",
        "lantern",
        "juniper",
        "quartz",
        "tundra",
    ),
    "place": ("piano bench", "flour jar", "boot closet", "bird house", "clock case", "tea tin"),
    "dog": ("Biscuit", "Pepper", "Rufus", "Waffles", "Ziggy", "Nutmeg", "Pickles", "Barnaby"),
}


def number(rng: np.random.Generator, digits: int, parity: int) -> str:
    """A random number of `digits` digits whose digit sum has the given parity."""
    while True:
        text = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        if sum(map(int, text)) % 2 == parity:
            return text


def fill(template: Template, words: dict, rng: np.random.Generator, parity: int):
    """(needle sentence, question, answer) with random names and values."""
    values = {key: str(rng.choice(options)) for key, options in words.items()}
    values["number"] = number(rng, int(rng.integers(3, 9)), parity)
    values["year"] = str(int(rng.integers(1200, 2000)))
    answer = values[template.slot]
    return template.needle.format(**values), template.question.format(**values), answer


def sentence_ends(tokenizer, ids: np.ndarray) -> np.ndarray:
    """Positions right after a token that ends a sentence."""
    unique = np.unique(ids)
    ends = {int(t) for t in unique if tokenizer.decode([int(t)]).rstrip().endswith((".", "!", "?"))}
    return np.flatnonzero(np.isin(ids, list(ends))) + 1


def insert(
    haystack: np.ndarray, ends: np.ndarray, needle: np.ndarray, depth: float
) -> tuple[np.ndarray, int]:
    """The haystack with the needle after the sentence end nearest to `depth` (0..1)."""
    target = depth * len(haystack)
    at = int(ends[np.argmin(np.abs(ends - target))]) if len(ends) else int(target)
    at = min(at, len(haystack))
    return np.concatenate([haystack[:at], needle, haystack[at:]]), at
