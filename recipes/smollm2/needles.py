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


# -- varied needles: phrasings, keys and attributes drawn at random -----------------------
# Stage 2 of the recipe trains on these so that the injection learns to match a question
# to its fact by the key, not by one of eight fixed sentences. None of the evaluation's
# words ("special", "magic", its adjectives and nouns) is used.

VARIED_ATTRIBUTES = (
    "secret code",
    "passkey",
    "account number",
    "locker number",
    "PIN",
    "reference number",
    "ticket number",
    "phone extension",
    "serial number",
    "room number",
    "access code",
    "combination",
    "order number",
    "badge number",
    "catalogue number",
    "door code",
    "lottery number",
    "safe code",
    "invoice number",
    "parcel number",
)
VARIED_KEYS = {
    "person": (
        "Margaret",
        "Thomas",
        "Eleanor",
        "Samuel",
        "Beatrice",
        "Oliver",
        "Clara",
        "Henry",
        "Agnes",
        "Walter",
        "Florence",
        "Arthur",
        "Mabel",
        "Frederick",
        "Edith",
        "Louis",
        "Harriet",
        "Victor",
        "Josephine",
        "Albert",
        "Rosalind",
        "Edmund",
        "Winifred",
        "Hugo",
    ),
    "first": (
        "red",
        "silver",
        "northern",
        "little",
        "crimson",
        "broken",
        "golden",
        "hidden",
        "winter",
        "copper",
        "purple",
        "silent",
        "iron",
        "western",
        "paper",
        "sleepy",
        "marble",
        "bright",
        "dusty",
        "wooden",
        "frozen",
        "lucky",
        "ancient",
        "crooked",
    ),
    "second": (
        "falcon",
        "lantern",
        "river",
        "tower",
        "garden",
        "engine",
        "castle",
        "window",
        "bottle",
        "mountain",
        "island",
        "ribbon",
        "kettle",
        "anchor",
        "mirror",
        "forest",
        "bridge",
        "feather",
        "carriage",
        "chimney",
        "pebble",
        "basket",
        "saddle",
        "beacon",
    ),
}
VARIED_NEEDLES = (
    "The {attr} of {key} is {value}.",
    "{Key}'s {attr} is {value}.",
    "Note: the {attr} for {key} is {value}.",
    "For {key}, the {attr} is {value}.",
    "Remember that the {attr} assigned to {key} is {value}.",
    "The {attr} that belongs to {key} is {value}.",
    "Please keep in mind: {key} has the {attr} {value}.",
    "It was written down that the {attr} of {key} was {value}.",
    "{Key} uses {value} as the {attr}.",
    "The {attr} registered under {key}: {value}.",
)
VARIED_QUESTIONS = (
    "What is the {attr} of {key}?",
    "What is {key}'s {attr}?",
    "Tell me the {attr} for {key}.",
    "Which {attr} was given for {key} in the text?",
    "According to the text, what is the {attr} assigned to {key}?",
    "What {attr} does {key} have?",
    "Find the {attr} of {key} in the passage above.",
)
VARIED_SUFFIXES = (
    "Answer with the number only.",
    "Give only the number.",
    "Respond with the number and nothing else.",
    "Only the digits, please.",
    "",
)


def varied_key(rng: np.random.Generator) -> str:
    """A name, or two random words joined by a space, a hyphen or an underscore."""
    if rng.random() < 0.3:
        return str(rng.choice(VARIED_KEYS["person"]))
    first, second = rng.choice(VARIED_KEYS["first"]), rng.choice(VARIED_KEYS["second"])
    joined = f"{first}{rng.choice([' ', '-', '_'])}{second}"
    return f"the {joined}" if rng.random() < 0.3 else joined


def varied_fill(rng: np.random.Generator, key: str, attr: str, parity: int):
    """(needle sentence, question with its instruction, answer) for one key."""
    value = number(rng, int(rng.integers(3, 10)), parity)
    words = {"key": key, "Key": key[:1].upper() + key[1:], "attr": attr, "value": value}
    needle = str(rng.choice(VARIED_NEEDLES)).format(**words)
    question = str(rng.choice(VARIED_QUESTIONS)).format(**words)
    suffix = str(rng.choice(VARIED_SUFFIXES))
    return needle, f"{question} {suffix}".strip(), value
