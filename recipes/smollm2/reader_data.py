"""Examples for the reader: the re-read message (numbered lines, then a question) and the
answer it should give.

Re-reading hands the model the lines of the document that hold a question's words
(mlx_sharedllm/reread.py). The 135M reader then sometimes answers from its own knowledge
instead of those lines, lists two of three values, or describes a key ("an astrolabe is
an instrument") instead of giving its value. These examples teach it to answer from the
lines: one or several facts among sentences of real prose, decoys of the same shape for
other keys and other attributes, and questions that ask for one value, for every value
of a key, or for the key a value belongs to. An instruction ("the number only") asks for
the bare value; a question without one is answered with a sentence.

Filler comes from Alice and Sherlock Holmes only (War and Peace is the dev book and
Botchan the test book). Every template, key and value is new: none is among the
suite's or the probe's (`check_disjoint`, run by the tests).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Keys: a person, or an object named by two words.
FIRST = ("Agatha", "Bertram", "Constance", "Desmond", "Eudora", "Fitzroy", "Gwendolyn",
         "Horatio", "Isadora", "Jasper", "Lavinia", "Mortimer", "Novella", "Percival",
         "Rowena", "Sylvester", "Temperance", "Ulysses", "Wilfred", "Zenobia")  # fmt: skip
LAST = ("Blackwood", "Crane", "Dunmore", "Ellery", "Fairbanks", "Greaves", "Holloway",
        "Kettering", "Marlow", "Norcross", "Penhallow", "Radcliffe", "Summerby", "Tolliver",
        "Whitcombe", "Yardley")  # fmt: skip
THING_ADJECTIVES = ("mahogany", "brass", "velvet", "cedar", "ivory", "tin", "jade", "oak",
                    "silk", "slate", "amber", "granite")  # fmt: skip
THINGS = ("music box", "telescope", "sea chest", "typewriter", "spinning wheel",
          "weather vane", "carriage clock", "microscope", "snuff box", "harpsichord",
          "globe", "sundial")  # fmt: skip
NUMBER_ATTRIBUTES = ("locker number", "room number", "ticket number", "badge number",
                     "account number", "parcel number", "serial number", "order number",
                     "cabin number", "case number", "permit number", "pew number")  # fmt: skip
WORD_ATTRIBUTES = ("password", "passphrase", "nickname", "call sign", "alias", "keyword")
WORD_VALUES = ("rhubarb", "pumpernickel", "periwinkle", "albatross", "gooseberry", "chinchilla",
               "thistle", "marigold", "cobblestone", "buttermilk", "dragonfly", "parsnip",
               "hazelnut", "puffin", "wigwam", "juniper", "sycamore", "nightingale")  # fmt: skip
PHRASE_ATTRIBUTES = ("slogan", "favourite song", "anthem", "secret recipe", "catchphrase",
                     "battle cry")  # fmt: skip
PHRASE_ADJECTIVES = ("midnight", "dancing", "silver", "lonely", "whistling", "golden",
                     "sleeping", "stormy", "laughing", "painted", "wandering",
                     "frosty")  # fmt: skip
PHRASE_NOUNS = ("teapot", "fox", "harbour", "violin", "bellows", "orchard", "kettle", "pony",
                "windmill", "chimney", "scarecrow", "pudding")  # fmt: skip

FACTS = (
    "The {attr} of {key} is {value}.",
    "{Key} has the {attr} {value}.",
    "According to the records, {key}'s {attr} is {value}.",
    "We were told that the {attr} for {key} was {value}.",
    "{Key} gave {value} as the {attr}.",
    "For {key}, the {attr} is {value}.",
    "Under {key}, the {attr} reads {value}.",
    "Everyone knew the {attr} of {key}: {value}.",
)
MORE_FACTS = (
    "{Key} also has the {attr} {value}.",
    "A further {attr} of {key} is {value}.",
    "Later, {value} was added as another {attr} of {key}.",
)
QUESTIONS = (
    "What is the {attr} of {key}?",
    "What is {key}'s {attr}?",
    "Which {attr} does {key} have?",
    "Tell me the {attr} of {key}.",
    "According to the text, what {attr} goes with {key}?",
    "Find {key}'s {attr}.",
)
LIST_QUESTIONS = (
    "List every {attr} of {key}.",
    "What are all the {attr}s of {key}?",
    "Name each {attr} that {key} has.",
    "Which {attr}s does {key} have? Include all of them.",
)
WHO_QUESTIONS = ("Whose {attr} is {value}?", "Which one has the {attr} {value}?")
INSTRUCTIONS = {
    "number": ("Answer with the number only.", "Just the number, please.", ""),
    "word": ("Answer with the word only.", "One word, please.", ""),
    "phrase": ("Answer with the phrase only.", "Just the words of it, please.", ""),
}
LIST_INSTRUCTIONS = ("Separate them with commas.", "Give them all, with commas between.", "")
ANSWERS = ("The {attr} of {key} is {value}.", "{Key}'s {attr} is {value}.")
LIST_ANSWERS = ("The {attr}s of {key} are {values}.", "{Key} has the {attr}s {values}.")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class ReaderExample:
    lines: tuple[str, ...]
    question: str
    answer: str
    values: tuple[str, ...]  # what the answer must hold: the value(s), or the key
    key: str


def filler_sentences(text: str) -> list[str]:
    """The text's sentences of 6 to 50 words, each on one line."""
    sentences = (" ".join(s.split()) for s in _SENTENCE.split(text))
    return [s for s in sentences if 6 <= len(s.split()) <= 50]


def _pick(rng: np.random.Generator, pool) -> str:
    return str(pool[int(rng.integers(len(pool)))])


def _key(rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return f"{_pick(rng, FIRST)} {_pick(rng, LAST)}"
    return f"the {_pick(rng, THING_ADJECTIVES)} {_pick(rng, THINGS)}"


def _value(rng: np.random.Generator, kind: str) -> str:
    if kind == "number":
        return str(int(rng.integers(10 ** int(rng.integers(2, 8)), 10**9)))
    if kind == "word":
        return _pick(rng, WORD_VALUES)
    return f"the {_pick(rng, PHRASE_ADJECTIVES)} {_pick(rng, PHRASE_NOUNS)}"


def _attr(rng: np.random.Generator, kind: str) -> str:
    pools = {"number": NUMBER_ATTRIBUTES, "word": WORD_ATTRIBUTES, "phrase": PHRASE_ATTRIBUTES}
    return _pick(rng, pools[kind])


def _say(template: str, key: str, attr: str, value: str, quote: bool) -> str:
    shown = f'"{value}"' if quote else value
    words = {"key": key, "Key": key[:1].upper() + key[1:], "attr": attr, "value": shown}
    return template.format(**words)


def _distinct(rng: np.random.Generator, draw, n: int, avoid: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        value = draw(rng)
        if value not in avoid and value not in out:
            out.append(value)
    return out


def reader_example(
    rng: np.random.Generator, filler: list[str], list_share: float = 0.25
) -> ReaderExample:
    """One message and its answer: every value of a key (`list_share` of the time), a
    single fact, or the key of a value, among decoys and prose."""
    kind = _pick(rng, ("number", "word", "phrase"))
    task = "list" if rng.random() < list_share else _pick(rng, ("single", "single", "who"))
    quote = kind != "number" and rng.random() < 0.6
    attr = _attr(rng, kind)
    key, *others = _distinct(rng, _key, 4, set())
    count = int(rng.integers(2, 6)) if task == "list" else 1
    values = _distinct(rng, lambda r: _value(r, kind), count + 3, set())
    facts = [_say(_pick(rng, FACTS), key, attr, values[0], quote)]
    facts += [_say(_pick(rng, MORE_FACTS), key, attr, v, quote) for v in values[1:count]]
    decoys = [
        _say(_pick(rng, FACTS), other, attr, v, quote)
        for other, v in zip(others[: int(rng.integers(0, 4))], values[count:])
    ]
    if rng.random() < 0.5:  # another attribute of the same key
        other_kind = _pick(rng, ("number", "word", "phrase"))
        other_attr = _distinct(rng, lambda r: _attr(r, other_kind), 1, {attr})[0]
        other = _distinct(rng, lambda r: _value(r, other_kind), 1, set(values))[0]
        decoys.append(_say(_pick(rng, FACTS), key, other_attr, other, quote))
    lines = _interleave(rng, facts, decoys, filler)
    question, answer = _ask(rng, task, kind, key, attr, values[:count])
    wanted = (key,) if task == "who" else tuple(values[:count])
    return ReaderExample(tuple(lines), question, answer, wanted, key)


def _interleave(rng, facts: list[str], decoys: list[str], filler: list[str]) -> list[str]:
    """Prose lines with the facts (in their order) and the decoys at random places."""
    prose = [filler[int(i)] for i in rng.choice(len(filler), int(rng.integers(0, 7)))]
    lines = list(prose)
    for decoy in decoys:
        lines.insert(int(rng.integers(0, len(lines) + 1)), decoy)
    at = sorted(int(rng.integers(0, len(lines) + 1)) for _ in facts)
    for shift, (i, fact) in enumerate(zip(at, facts)):
        lines.insert(i + shift, fact)
    return lines


def _ask(rng, task: str, kind: str, key: str, attr: str, values: list[str]) -> tuple[str, str]:
    """(question, answer): the bare value(s) when an instruction asks for them, else a
    sentence."""
    words = {"key": key, "Key": key[:1].upper() + key[1:], "attr": attr}
    if task == "who":
        question = _pick(rng, WHO_QUESTIONS).format(**words, value=values[0])
        return question, key[:1].upper() + key[1:] + "."
    if task == "list":
        question = _pick(rng, LIST_QUESTIONS).format(**words)
        instruction = _pick(rng, LIST_INSTRUCTIONS)
        listed = ", ".join(values)
        if instruction:
            return f"{question} {instruction}", listed
        return question, _pick(rng, LIST_ANSWERS).format(**words, values=listed)
    question = _pick(rng, QUESTIONS).format(**words)
    instruction = _pick(rng, INSTRUCTIONS[kind])
    if instruction:
        return f"{question} {instruction}", values[0]
    return question, _pick(rng, ANSWERS).format(**words, value=values[0])


def pool_words() -> set[str]:
    """Every word of the keys, attributes and values drawn here, lowercased."""
    pools = (FIRST, LAST, THING_ADJECTIVES, THINGS, NUMBER_ATTRIBUTES, WORD_ATTRIBUTES,
             WORD_VALUES, PHRASE_ATTRIBUTES, PHRASE_ADJECTIVES, PHRASE_NOUNS)  # fmt: skip
    return {w.lower() for pool in pools for item in pool for w in re.findall(r"\w+", item)}
