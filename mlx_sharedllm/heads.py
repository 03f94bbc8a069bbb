"""Find a model's retrieval heads: the self-attention heads that look at a fact in the
context while the model copies it into an answer (Wu et al. 2024, "Retrieval Head
Mechanistically Explains Long-Context Factuality").

A stacked model's injection reads the tree through its cross-attention; starting that
cross-attention as a copy of the retrieval heads (and zero elsewhere) lets a converted
model read the tree with no training (`convert --stack-from-one M --init copy
--copy-heads auto`). The probe needs only the model and its tokenizer: numbers planted in
a haystack of built-in prose, each asked for and answered (teacher-forced); a head's score
is its mean attention, from the position that predicts each answer token, to the token
of the planted number that it copies (the paper counts argmax hits instead).

On SmolLM2-135M this finds 18.6, 18.7, 17.4 and 17.3 (scores 0.62-0.34, the next 0.07):
the heads that recipes/smollm2/ found with its training needles, and that the default
model's injection starts from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_attention_mask

from .generate import encode_prompt

# Plain prose with no digits of its own, shuffled into haystacks (written for this probe).
FILLER = (
    "The road to the village followed the river for most of the morning.",
    "Along the bank, willows leaned over the water and dropped their leaves into it.",
    "A farmer was mending a fence, and he waved at the travellers as they passed.",
    "The market square was quiet until the bells of the church began to ring.",
    "Children ran between the stalls, chasing a dog that had stolen a loaf of bread.",
    "In the afternoon the clouds gathered over the hills and the wind turned cold.",
    "The innkeeper lit a fire and set out bowls of soup for anyone who came in.",
    "Nobody in the room could remember when the old bridge had last been repaired.",
    "A letter arrived from the city, sealed with red wax and tied with a string.",
    "The teacher read it twice before she folded it and put it in her pocket.",
    "Later she walked to the station to ask about the trains that ran on Sundays.",
    "The clerk shrugged and pointed to a timetable that had faded in the sun.",
    "On the way home she stopped at the bakery, where the windows were steamed up.",
    "Her brother had promised to write, but his letters were always late.",
    "The garden behind the house was full of beans, onions and tall sunflowers.",
    "Every evening the neighbours sat on their steps and talked about the weather.",
    "A storm in the night knocked down a branch that blocked the lane for a day.",
    "The doctor came by in his cart and stayed for a cup of tea and some gossip.",
    "By winter the river froze, and the mill stopped turning until the spring.",
    "Travellers who reached the inn late found the door locked and the lights out.",
    "The library kept its oldest books in a cabinet that only the keeper could open.",
    "Once a year the whole town gathered in the square for the harvest festival.",
)
COLOURS = ("amber", "cobalt", "crimson", "ivory", "jade", "ochre", "silver", "violet")
THINGS = ("lantern", "compass", "kettle", "ledger", "trunk", "violin", "clock", "saddle")


@dataclass(frozen=True)
class HeadScore:
    """A head (layer, head) and the share of attention it gave the planted facts."""

    layer: int
    head: int
    score: float

    def __str__(self) -> str:
        return f"{self.layer}.{self.head}"


@dataclass(frozen=True)
class Probe:
    """One teacher-forced case: `tokens`, the `rows` that predict the answer's tokens,
    and for each row the position it should look at: the planted value's token that
    the row's answer token copies."""

    tokens: np.ndarray
    rows: np.ndarray
    targets: np.ndarray


def attention_weights(layer, h: mx.array, rows: mx.array) -> mx.array:
    """`layer`'s causal self-attention weights (heads, len(rows), L) at query positions
    `rows`, for its input hidden states `h` (1, L, D)."""
    attn, x = layer.self_attn, layer.input_layernorm(h)
    _, length, _ = x.shape
    q = attn.q_proj(x).reshape(1, length, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = attn.k_proj(x).reshape(1, length, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    q, k = attn.rope(q)[:, :, rows], attn.rope(k)
    k = mx.repeat(k, attn.n_heads // attn.n_kv_heads, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * attn.scale
    scores = mx.where(mx.arange(length)[None] <= rows[:, None], scores, -mx.inf)
    return mx.softmax(scores.astype(mx.float32), axis=-1)[0]


def head_scores(model, probe: Probe, layers: int) -> np.ndarray:
    """(layers, heads): the mean attention share each head of the first `layers` layers
    gives the probe's value span from the answer's positions."""
    h = model.model.embed_tokens(mx.array(probe.tokens[None]))
    mask = create_attention_mask(h, None)
    rows = mx.array(probe.rows)
    out = []
    for layer in model.layers[:layers]:
        weights = attention_weights(layer, h, rows)
        picked = weights[:, mx.arange(len(probe.rows)), mx.array(probe.targets)]
        out.append(np.array(picked.mean(axis=-1)))
        h = layer(h, mask)
    return np.stack(out)


def haystack(tokenizer, length: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled FILLER sentences, each encoded on its own, `length` tokens or more."""
    sentences, total = [], 0
    while total < length:
        for i in rng.permutation(len(FILLER)):
            ids = np.asarray(tokenizer.encode(" " + FILLER[i], add_special_tokens=False))
            sentences.append(ids.astype(np.int32))
            total += len(ids)
    return sentences


def make_probe(tokenizer, length: int, depth: float, rng: np.random.Generator) -> Probe:
    """A haystack of about `length` tokens with one number planted at `depth` (0-1), its
    question, and the number as the teacher-forced answer."""
    key = f"{rng.choice(COLOURS)} {rng.choice(THINGS)}"
    value = str(int(rng.integers(1_000_000, 9_999_999)))

    def encode(text: str) -> np.ndarray:
        return np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)

    before, number = encode(f" The code for the {key} is"), encode(f" {value}")
    sentences = haystack(tokenizer, length, rng)
    at = int(round(depth * len(sentences)))
    head = np.concatenate([*sentences[:at], before]) if at else before
    start = len(head)
    context = np.concatenate([head, number, encode("."), *sentences[at:]])
    question = f"What is the code for the {key}? Answer with the number only."
    prompt = encode_prompt(tokenizer, question)
    answer = encode(value)
    tokens = np.concatenate([context, prompt, answer]).astype(np.int32)
    first = len(context) + len(prompt) - 1
    targets = start + copied_from(number, answer)
    return Probe(tokens, np.arange(first, first + len(answer)), targets)


def copied_from(source: np.ndarray, answer: np.ndarray) -> np.ndarray:
    """For each answer token, the index in `source` of the token it copies: the next
    equal token in order, else (a tokenizer that splits the value differently once a
    space precedes it) the source token at the same share of the way through."""
    out, at = [], 0
    for j, token in enumerate(answer.tolist()):
        hits = np.flatnonzero(source[at:] == token)
        if len(hits):
            at += int(hits[0])
            out.append(at)
            at += 1
        else:
            out.append(min(len(source) - 1, j * len(source) // len(answer)))
    return np.asarray(out)


# With no count asked for, the heads that stand out: those scoring at least STANDOUT of
# the best head's score, at most MAX_STANDOUT of them.
STANDOUT, MAX_STANDOUT = 0.25, 8


def score_heads(
    model, tokenizer, layers: int, probes: int = 8, length: int = 1024, seed: int = 0
) -> np.ndarray:
    """(layers, heads) retrieval scores of the first `layers` layers' heads, averaged over
    `probes` numbers planted at depths spread over haystacks of about `length` tokens."""
    if not 1 <= layers <= len(model.layers):
        raise ValueError(f"layers must be 1 to {len(model.layers)}, got {layers}")
    if probes < 1:
        raise ValueError(f"probes must be at least 1, got {probes}")
    rng = np.random.default_rng(seed)
    depths = np.linspace(0.1, 0.9, probes)
    total = sum(head_scores(model, make_probe(tokenizer, length, d, rng), layers) for d in depths)
    return total / probes


def find_heads(
    model, tokenizer, layers: int | None = None, top: int | None = None, **probe: int
) -> list[HeadScore]:
    """The retrieval heads of the first `layers` layers (default: all), best first: the
    `top` best, or (default) those that stand out (STANDOUT). `probe` goes to
    `score_heads` (probes, length, seed)."""
    layers = len(model.layers) if layers is None else layers
    scores = score_heads(model, tokenizer, layers, **probe)
    if top is not None:
        return best_heads(scores, top)
    best = best_heads(scores, min(MAX_STANDOUT, scores.size))
    return [h for h in best if h.score >= STANDOUT * best[0].score]


def best_heads(scores: np.ndarray, top: int) -> list[HeadScore]:
    """The `top` highest of a (layers, heads) score table, best first."""
    if not 1 <= top <= scores.size:
        raise ValueError(f"top must be 1 to {scores.size} (layers x heads), got {top}")
    order = np.argsort(-scores, axis=None, kind="stable")[:top]
    rows, cols = np.unravel_index(order, scores.shape)
    return [HeadScore(int(r), int(c), float(scores[r, c])) for r, c in zip(rows, cols)]


def heads_spec(heads: Sequence[HeadScore]) -> str:
    """'17.3,18.6': the form `--copy-heads` takes."""
    return ",".join(str(h) for h in heads)
