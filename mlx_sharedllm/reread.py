"""Re-reading: the passages a question points at, read again in full.

The tree is a coarse reading of the whole context, and a small model reads a fact best
with its own full attention, in its window. Re-reading ranks passages of the context two
ways: by the question's words found in each passage (BM25 over the tokens' stems, with
stopwords left out: keys, names, attributes), and by the share of attention the
injection heads give each passage at the prompt's last token (they find where an answer
stands, but favour numbers: the adapter learned to copy them). The words decide and the
attention breaks ties, or ranks alone when none of the question's words is in the
context. The best passages, within a budget of distinct tokens (overlapping ones merge),
go into the user's message ahead of the question, the best one last, next to the
question, cut down to their sentences that hold the most of the question's rare words
(`focus`), one per line; the answer reads them with full attention and no tree
(generate.py).

A passage is `PASSAGE_TOKENS` tokens (at half-passage strides) where the tree keeps every
token in order (depth 1, nothing downsampled, the paper layout); otherwise it is a whole
chunk. The tokens after the last full chunk (the remainder) are candidates too, ranked
by their words alone. Ranking by words needs no training, so re-reading also serves a
converted model with no trained adapter.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from snowballstemmer import stemmer

from .model import AttentionTap, SharedLLM
from .settings import PASSAGE_TOKENS, Settings
from .tree import ContextTree

# A question's word is rare in a context where it stands at most RARE_COUNT times or in
# RARE_SHARE of the context's words (whichever is more): names, keys, attributes.
RARE_COUNT, RARE_SHARE = 20, 0.001
_WORD = re.compile(r"[^\W_]+")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
# The weight of the heads' attention next to the words' (which it only breaks ties of).
TIE_BREAK = 0.01
BM25_K1 = 1.2
# A sentence is re-read when its question words weigh this share of the best one's.
KEEP_SHARE = 0.6
# Between re-read passages (when they are read whole).
REREAD_SEPARATOR = "\n[...]\n"
_STEMMER = stemmer("english")
# Words that say what kind of answer is wanted, not where it stands.
_STOPWORDS = """a about above after again against all am an and any are as at be because been before
    being below between both but by can cannot could did do does doing down during each few
    for from further had has have having he her here hers herself him himself his how i if
    in into is it its itself just me more most my myself no nor not now of off on once only
    or other our ours ourselves out over own same she should so some such than that the
    their theirs them themselves then there these they this those through to too under
    until up very was we were what when where which while who whom whose why will with
    would you your yours yourself yourselves give tell write reply name answer question
    text list every one"""
STOPWORDS = frozenset(_STOPWORDS.split())

# Maps token ids to the word each stands for (lowercased, stripped), "" for none.
TermOf = Callable[[np.ndarray], list[str]]


@dataclass(frozen=True)
class Passage:
    """Tokens [start, end) of the compressed context (chunk-major order)."""

    start: int
    end: int


def attention_profile(
    model: SharedLLM, tree: ContextTree, running: np.ndarray, settings: Settings | None = None
) -> np.ndarray | None:
    """(heads, entries): the attention share each injection head gives each tree entry at
    the running text's last token, scaled as `settings` (default: the model's) say; None
    when no injection runs."""
    tap = AttentionTap(mx.array([len(running) - 1]))
    model.hidden_states(mx.array(np.asarray(running)[None]), tree, tap=tap, settings=settings)
    if not tap.logprobs:
        return None
    return np.array(mx.concatenate([mx.exp(lp[0, :, 0]) for lp in tap.logprobs]))


def tokens_in_order(tree: ContextTree) -> bool:
    """True when tree entry e is token e of the compressed context."""
    config = tree.meta.get("config", {})
    return (
        tree.entries_per_chunk == tree.chunk_len
        and config.get("tree_depth") == 1
        and config.get("layout", "paper") == "paper"
    )


def candidates(tree: ContextTree) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token starts, token ends, entry bounds (2, W)) of the candidate passages: windows of
    PASSAGE_TOKENS at half-passage strides where entries are tokens, else whole chunks."""
    total = tree.n_chunks * tree.chunk_len
    if tokens_in_order(tree) and total > PASSAGE_TOKENS:
        starts = np.arange(0, total - PASSAGE_TOKENS + 1, PASSAGE_TOKENS // 2)
        if starts[-1] + PASSAGE_TOKENS < total:
            starts = np.append(starts, total - PASSAGE_TOKENS)
        ends = starts + PASSAGE_TOKENS
        return starts, ends, np.stack([starts, ends])
    chunks = np.arange(tree.n_chunks)
    t = tree.entries_per_chunk
    return (
        chunks * tree.chunk_len,
        (chunks + 1) * tree.chunk_len,
        np.stack([chunks * t, (chunks + 1) * t]),
    )


def attention_scores(profile: np.ndarray, entry_bounds: np.ndarray) -> np.ndarray:
    """Per passage, the largest share of attention any head gives its entries."""
    sums = np.concatenate([np.zeros((len(profile), 1)), np.cumsum(profile, axis=1)], axis=1)
    return (sums[:, entry_bounds[1]] - sums[:, entry_bounds[0]]).max(axis=0)


def lexical_scores(
    context: np.ndarray, starts: np.ndarray, ends: np.ndarray, query: np.ndarray, term_of: TermOf
) -> np.ndarray:
    """BM25 of each passage [starts, ends) of `context` for the query's words, where a
    word is a token normalised by `term_of` (so " Soup" and "soup" are one word)."""
    vocab = np.unique(np.concatenate([context, query]))
    terms = dict(zip(vocab.tolist(), term_of(vocab)))
    words = sorted({terms[t] for t in np.unique(query).tolist()} - {""})
    scores = np.zeros(len(starts))
    if not words:
        return scores
    word_ids = {w: i for i, w in enumerate(words)}
    column = np.array([word_ids.get(terms[t], -1) for t in vocab.tolist()])
    of_context = column[np.searchsorted(vocab, context)]
    for i in range(len(words)):
        counts = np.concatenate([[0], np.cumsum(of_context == i)])
        tf = counts[ends] - counts[starts]
        df = np.count_nonzero(tf)
        idf = np.log(1 + (len(starts) - df + 0.5) / (df + 0.5))
        scores += idf * tf * (BM25_K1 + 1) / (tf + BM25_K1)
    return scores


def combine(lexical: np.ndarray | None, attention: np.ndarray | None) -> np.ndarray:
    """One score per passage: the question's words first, the heads' attention to break
    ties (and alone where no passage holds any of the question's words). On the dev
    split the words put a fact's passage first for 80% of facts and in the top two for
    89%; fusing the heads' ranking in as an equal (reciprocal rank fusion) lost facts
    the words had found."""
    parts = [x for x in (lexical, attention) if x is not None]
    if not parts:
        raise ValueError("no ranking to combine")
    score = np.zeros(len(parts[0]))
    if lexical is not None and lexical.max() > 0:
        score += lexical / lexical.max()
    if attention is not None and attention.max() > 0:
        score += TIE_BREAK * attention / attention.max()
    return score


def choose_passages(
    scores: np.ndarray, starts: np.ndarray, ends: np.ndarray, budget: int
) -> list[Passage]:
    """The best-scoring passages within `budget` tokens in all, in document order,
    overlapping and touching ones merged. A passage that overlaps chosen ones costs only
    its tokens that they lack, so a fact that a window's edge cuts is read whole: skipping
    overlapping windows instead cut the fact that the best window ends in for 12 of 162
    dev needle questions (benchmarks/results/suite_dev_extend.log)."""
    taken = np.zeros(int(ends.max(initial=0)), bool)
    used = 0
    for i in np.argsort(-scores, kind="stable"):
        start, end = int(starts[i]), int(ends[i])
        new = end - start - int(np.count_nonzero(taken[start:end]))
        if new == 0 or used + new > budget:
            continue
        taken[start:end] = True
        used += new
        if used == budget:
            break
    edges = np.flatnonzero(np.diff(np.concatenate([[0], taken.astype(np.int8), [0]])))
    return [Passage(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def rank_passages(
    model: SharedLLM,
    tree: ContextTree,
    running: np.ndarray,
    question: np.ndarray | None = None,
    term_of: TermOf | None = None,
    remainder: np.ndarray | None = None,
    settings: Settings | None = None,
    profile: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, scores) of every candidate passage of the context (the tree's
    tokens, then `remainder`) for the question that `running` ends with. `question` (its
    own tokens, no chat template) with `term_of` ranks by the question's words, the heads'
    attention (read with `settings`, or `profile`: their attention_profile already read)
    breaking ties; the remainder has no tree entries (no attention)."""
    starts, ends, bounds = candidates(tree)
    context = np.array(tree.tokens).reshape(-1)
    if remainder is not None and len(remainder):
        rest = np.arange(len(context), len(context) + len(remainder), PASSAGE_TOKENS)
        starts, ends = (
            np.append(starts, rest),
            np.append(ends, np.minimum(rest + PASSAGE_TOKENS, len(context) + len(remainder))),
        )
        context = np.concatenate([context, remainder])
    attention = lexical = None
    if profile is None:
        profile = attention_profile(model, tree, running, settings)
    if profile is not None:
        found = attention_scores(profile, bounds)
        attention = np.append(found, np.zeros(len(starts) - len(found)))
    if question is not None and term_of is not None:
        lexical = lexical_scores(context, starts, ends, np.asarray(question), term_of)
    if attention is None and lexical is None:
        return starts, ends, np.zeros(len(starts))
    return starts, ends, combine(lexical, attention)


def choose(
    model: SharedLLM,
    tree: ContextTree,
    running: np.ndarray,
    budget: int,
    question: np.ndarray | None = None,
    term_of: TermOf | None = None,
    remainder: np.ndarray | None = None,
    settings: Settings | None = None,
    profile: np.ndarray | None = None,
) -> list[Passage]:
    """The passages to re-read for the question `running` ends with, within `budget`
    tokens, best last (a small model reads what stands next to the question best); the
    heads' attention is read with `settings` (default: the model's), unless `profile`
    gives it (their attention_profile of `tree` for `running`, already read)."""
    if tree.tokens is None:
        raise ValueError(
            "this tree does not keep its tokens (saved by an older version): compress the "
            "context again to re-read it"
        )
    starts, ends, scores = rank_passages(
        model, tree, running, question, term_of, remainder, settings, profile
    )
    passages = choose_passages(scores, starts, ends, budget)
    best = {p: scores[(starts >= p.start) & (ends <= p.end)].max() for p in passages}
    return sorted(passages, key=lambda p: (best[p], p.start))


def token_terms(tokenizer) -> TermOf:
    """A TermOf for a tokenizer: each token's text, lowercased, without spaces and
    punctuation, cut to its stem ("teaching" is "teach", as in `question_words`); "" for
    a token with no letters or digits, and for a stopword. On the dev book questions this
    put the evidence's passage at a mean rank of 24 among the book's passages, against 44
    for the tokens' own text (benchmarks/results/suite_dev_extend.log)."""

    def term_of(ids: np.ndarray) -> list[str]:
        words = []
        for t in np.asarray(ids).tolist():
            text = tokenizer.decode([t]).strip().lower()
            word = "".join(c for c in text if c.isalnum())
            words.append("" if word in STOPWORDS else _STEMMER.stemWord(word))
        return words

    return term_of


def words_of(text: str) -> list[str]:
    """The text's words (letters and digits), lowercased."""
    return _WORD.findall(text.lower())


def stems_of(text: str) -> list[str]:
    """The text's words, each cut to its stem (Snowball English: "drawers" and "drawer"
    are one word, "teaching" and "teach" too)."""
    return _STEMMER.stemWords(words_of(text))


def question_words(question: str, context: str) -> dict[str, float]:
    """The stems of the question's content words (3+ characters, not in STOPWORDS) that
    are rare in the context (RARE_COUNT, RARE_SHARE), each weighted 1 / count: a word that
    stands k times points at each of its k sentences with 1/k. A key named once outweighs
    an attribute that other keys share, so another key's fact of the same kind (a decoy)
    weighs less than half of the asked one, while a key's several values weigh alike. On
    the dev split this kept a decoy's sentence for 0 of 64 multikey questions, against 16
    for log(1 + N / (1 + count)), and every value as often. Words the context lacks are
    kept too (they select nothing)."""
    words = Counter(words_of(context))  # each distinct word is stemmed once
    counts: Counter[str] = Counter()
    for stem, n in zip(_STEMMER.stemWords(list(words)), words.values()):
        counts[stem] += n
    total = sum(counts.values())
    limit = max(RARE_COUNT, RARE_SHARE * total)
    content = {
        stem
        for word, stem in zip(words_of(question), stems_of(question))
        if len(word) >= 3 and word not in STOPWORDS
    }
    return {w: 1.0 / max(1, counts[w]) for w in content if counts[w] <= limit}


def focus(passages: list[str], words: Mapping[str, float]) -> list[list[str]]:
    """Per passage, its sentences whose `words` (question_words) weigh at least
    KEEP_SHARE of the heaviest sentence's of all the passages, in order; passages left
    with none are dropped. Empty when no sentence holds any of `words`.

    A small model copies the wrong span out of the text around a fact (a number or a
    name nearby, a decoy: another key's fact of the same kind, which holds fewer of the
    question's words, and the rarest ones least). On the dev split the sentences that
    hold any of the words answered 0.72 of the needle questions against 0.54 for the
    whole passages, and those that hold the most 0.78. Weighing the words by rarity and
    keeping sentences within KEEP_SHARE of the best also keeps a key's other values,
    stated in other words ("X is listed with..." beside "X also has ... on file").
    """
    split = [[s.strip() for s in _SENTENCE_BREAK.split(p) if s.strip()] for p in passages]
    weight = [[sum(words[w] for w in set(stems_of(s)) if w in words) for s in ss] for ss in split]
    best = max((w for ws in weight for w in ws), default=0.0)
    if best <= 0:
        return []
    kept = [
        [s for s, w in zip(sentences, ws) if w >= KEEP_SHARE * best]
        for sentences, ws in zip(split, weight)
    ]
    return [k for k in kept if k]


def reread_text(passages: list[str], words: Mapping[str, float]) -> str:
    """The text that the answer re-reads: the sentences that `focus` keeps, numbered one
    per line ("1. ", "2. "), or the whole passages, separated by REREAD_SEPARATOR, when
    no sentence holds any of `words`. With one fact per line the reader copies a key's
    several values as a list (dev split: multivalue 0 of 7 -> 2 of 6, needle questions
    97 of 131 -> 103 of 130; benchmarks/results/suite_dev_stems.log), and numbered lines
    it lists in full: 15 of 18 dev multivalue questions, against 6 for "- " bullets and 2
    for bare lines (benchmarks/results/suite_dev_format.log)."""
    kept = focus(passages, words)
    if not kept:
        return REREAD_SEPARATOR.join(passages)
    lines = [sentence for sentences in kept for sentence in sentences]
    return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))
