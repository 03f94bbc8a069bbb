"""Generate text that reads a long context through the context tree.

Sampling, logits processors, the streaming detokenizer and the decode loop are
mlx-lm's; this module prepares the context tree and the running text around them.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import GenerationResponse as MlxLmResponse
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .model import SharedLLM
from .reread import (
    REREAD_SEPARATOR,
    Passage,
    attention_profile,
    choose,
    question_words,
    reread_text,
    token_terms,
)
from .selection import keep_attended_chunks
from .settings import Settings
from .sources import Sources, TextOffsets, document_passages, find_sources, tokenize_with_offsets
from .tree import ContextTree, check_token_ids

# progress(stage, done, total): stage "tokenize" counts characters, "compress" chunks.
Progress = Callable[[str, int, int], None]
# A question: text, chat messages ({"role": ..., "content": ...}, the last user message
# asks) or token ids (used as they are).
Prompt = str | list[dict[str, str]] | Iterable[int]
PIECE_CHARS = 1 << 20
# The user's message when passages are re-read (on the dev split this framing beat the
# passages and the question alone: benchmarks/results/suite_dev_variants.log).
REREAD_MESSAGE = "Read the text and answer the question.\n\nText:\n{passages}\n\nQuestion: {prompt}"


@dataclass
class GenerationResponse(MlxLmResponse):
    """mlx-lm's response, plus what the context cost."""

    context_tokens: int = 0
    chunks: int = 0
    tree_entries: int = 0
    chunks_read: int = 0
    compress_tps: float = 0.0
    reread_tokens: int = 0
    passages: tuple = ()
    sources: Sources | None = None


@dataclass
class PreparedContext:
    tree: ContextTree | None
    running: np.ndarray
    stats: dict[str, Any]


class WithTree(nn.Module):
    """The model with a fixed tree and settings (default: the model's), callable the way
    mlx-lm's decode loop calls models."""

    def __init__(
        self, model: SharedLLM, tree: ContextTree | None, settings: Settings | None = None
    ):
        super().__init__()
        self.model = model
        self.tree = tree
        self.settings = settings or model.settings

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        return self.model(inputs, tree=self.tree, cache=cache, settings=self.settings)


def text_pieces(stream: TextIO, size: int = PIECE_CHARS) -> Iterator[str]:
    """Read text in pieces of about `size` characters, so a huge file is never one string.

    Each piece but the last ends at a line break (else a space), so no word is split;
    a text shorter than `size` is one piece and tokenizes exactly as a whole.
    """
    text = stream.read(size)
    while text:
        more = stream.read(size)
        if not more:
            yield text
            return
        cut = text.rfind("\n") + 1 or text.rfind(" ") + 1 or len(text)
        yield text[:cut]
        text = text[cut:] + more


def tokenize_pieces(
    tokenizer: TokenizerWrapper,
    pieces: Iterable[str],
    progress: Progress | None = None,
    piece_done: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Token ids (no special tokens) of a text given in pieces, so a huge file never
    has to be held as one string; `piece_done(characters, tokens)` after each piece."""
    callbacks = [c for c in (_tokenize_progress(progress), piece_done) if c]
    ids = []
    for piece in pieces:
        ids.append(np.asarray(tokenizer.encode(piece, add_special_tokens=False), np.int32))
        for callback in callbacks:
            callback(len(piece), len(ids[-1]))
    return np.concatenate(ids) if ids else np.zeros(0, np.int32)


def _tokenize_progress(progress: Progress | None) -> Callable[[int, int], None] | None:
    """A piece_done callback that reports characters tokenized so far as `progress` does."""
    if progress is None:
        return None
    done = 0

    def piece_done(chars: int, tokens: int) -> None:
        nonlocal done
        done += chars
        progress("tokenize", done, 0)

    return piece_done


def is_conversation(prompt: Any) -> bool:
    """True for a prompt given as chat messages: a list (or tuple) that holds a dict (all
    of them must be {"role": ..., "content": ...} messages: `question_index`)."""
    return isinstance(prompt, (list, tuple)) and any(isinstance(m, dict) for m in prompt)


def _is_message(message: Any) -> bool:
    """A dict of a string role and a string content."""
    fields = ("role", "content")
    return isinstance(message, dict) and all(isinstance(message.get(f), str) for f in fields)


def question_index(messages: Sequence[Any]) -> int:
    """The index of a conversation's question: its last user message (messages after it,
    such as an assistant's, stay after it). ValueError for a message that is not a dict
    of a string role and a string content, or a conversation with no user message."""
    for i, message in enumerate(messages):
        if not _is_message(message):
            raise ValueError(
                f"message {i} of the conversation is not a dict of a string 'role' and a "
                f"string 'content': {message!r}"
            )
    users = [i for i, message in enumerate(messages) if message["role"] == "user"]
    if not users:
        raise ValueError("the conversation has no user message: its last one is the question")
    return users[-1]


def question_of(prompt: Prompt) -> str | Iterable[int]:
    """What a prompt asks: its text, a conversation's last user message, or its token ids."""
    return prompt[question_index(prompt)]["content"] if is_conversation(prompt) else prompt


def with_question(prompt: Prompt, text: str) -> str | list[dict[str, str]]:
    """The prompt with `text` in place of its question (a conversation keeps its other
    messages, in order)."""
    if not is_conversation(prompt):
        return text
    at = question_index(prompt)
    return [*prompt[:at], {**prompt[at], "content": text}, *prompt[at + 1 :]]


def encode_prompt(
    tokenizer: TokenizerWrapper, prompt: Prompt, chat_template: bool | None = None
) -> np.ndarray:
    """The prompt's token ids: a string or a conversation (chat messages) wrapped in the
    chat template when asked (default: when the tokenizer has one; a conversation without
    one is written as "role: content" lines), token ids as they are. ValueError for a
    conversation that `question_index` refuses."""
    conversation = is_conversation(prompt)
    if not conversation and not isinstance(prompt, str):
        return np.asarray(list(prompt), np.int32)
    if conversation:
        question_index(prompt)  # refuses messages that are not a conversation with a question
    use_template = tokenizer.has_chat_template if chat_template is None else chat_template
    if use_template and not tokenizer.has_chat_template:
        raise ValueError("this tokenizer has no chat template")
    messages = list(prompt) if conversation else [{"role": "user", "content": prompt}]
    if use_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif conversation:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    else:
        text = prompt
    return np.asarray(tokenizer.encode(text, add_special_tokens=not use_template), np.int32)


def prepare_context(
    model: SharedLLM,
    tokenizer: TokenizerWrapper | None,
    context: str | ContextTree | Any | None,
    prompt_ids: np.ndarray,
    progress: Progress | None = None,
    settings: Settings | None = None,
) -> PreparedContext:
    """Compress the context (as `settings`, default the model's, say) and build the
    running text.

    Full chunks of the context go to the tree; the tokens after the last full chunk
    join the running text ahead of the prompt, so no token is lost. The prompt is the
    tree's query.
    """
    if isinstance(context, ContextTree):
        return _prepared(context, prompt_ids, 0.0)
    if context is None:
        ids = np.zeros(0, np.int32)
    elif isinstance(context, str):
        if tokenizer is None:
            raise ValueError("a text context needs a tokenizer")
        ids = tokenize_pieces(tokenizer, text_pieces(io.StringIO(context)), progress)
    else:
        ids = np.asarray(context, np.int32).reshape(-1)
    if len(ids) < model.config.chunk_len:
        stats = {"context_tokens": len(ids), "chunks": 0, "tree_entries": 0}
        return PreparedContext(None, np.concatenate([ids, prompt_ids]), stats)

    def chunk_progress(done: int, total: int) -> None:
        if progress:
            progress("compress", done, total)

    tic = time.perf_counter()
    tree = model.compress(mx.array(ids), mx.array(prompt_ids), chunk_progress, settings=settings)
    return _prepared(tree, prompt_ids, time.perf_counter() - tic)


def _prepared(tree: ContextTree, prompt_ids: np.ndarray, seconds: float) -> PreparedContext:
    remainder = np.zeros(0, np.int32) if tree.remainder is None else np.array(tree.remainder)
    compressed = tree.n_chunks * tree.chunk_len
    stats = {
        "context_tokens": compressed + len(remainder),
        "chunks": tree.n_chunks,
        "tree_entries": tree.num_entries,
        "compress_tps": compressed / seconds if seconds else 0.0,
    }
    running = np.concatenate([remainder.astype(np.int32), prompt_ids])
    return PreparedContext(tree, running, stats)


def stream_generate(
    model: SharedLLM,
    tokenizer: TokenizerWrapper,
    prompt: Prompt,
    context: str | ContextTree | Any | None = None,
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    top_k: int = 0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    chat_template: bool | None = None,
    progress: Progress | None = None,
    settings: Settings | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    sources: bool = False,
    text_offsets: TextOffsets | None = None,
) -> Iterator[GenerationResponse]:
    """Answer `prompt` (text, a conversation of chat messages whose last user message
    asks, or token ids) about `context` (a string, token ids, or a compressed ContextTree),
    yielding a response per generated token with the text so far and the stats.

    `settings` (default: the model's own, `model.settings`) say how a new tree is built
    and stored, how many chunks the question reads (`chunks_per_question`: those the
    injection heads attend to most, selection.py) and how many tokens of the passages
    it points at are put back in the running text to be read in full (`reread_tokens`,
    reread.py; the response's `passages` say which).
    `kv_bits` quantizes the upper model's own KV cache (mlx-lm's QuantizedKVCache).
    `sources` adds the answer's `sources` to the responses (sources.py: one more pass
    over the tree, unless re-reading read the whole tree: its pass serves both), with
    character offsets into a text context, or into the text that `text_offsets`
    describes when the context is its token ids.
    """
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt_ids = encode_prompt(tokenizer, prompt, chat_template)
    check_token_ids(mx.array(prompt_ids), model.config.upper.vocab_size, "the prompt")
    window = model.args.max_position_embeddings
    if window and len(prompt_ids) > window:
        raise ValueError(
            f"the prompt is {len(prompt_ids)} tokens, longer than the model's window ({window})"
        )
    settings = settings or model.settings
    head_dim = model.tree_shape(0)[3]
    if kv_bits is not None and head_dim % kv_group_size:
        raise ValueError(f"head_dim {head_dim} is not a multiple of kv_group_size {kv_group_size}")
    read: list[Passage] = []
    profile: np.ndarray | None = None  # the heads' attention over the whole tree, once read
    if sources and isinstance(context, str):
        context, text_offsets = tokenize_with_offsets(
            tokenizer, text_pieces(io.StringIO(context)), _tokenize_progress(progress)
        )
    prepared = prepare_context(model, tokenizer, context, prompt_ids, progress, settings)
    tree, running = prepared.tree, prepared.running
    if tree is not None:
        tree = keep_attended_chunks(model, tree, running, settings.chunks_per_question, settings)
    stats = {**prepared.stats, "chunks_read": tree.n_chunks if tree is not None else 0}
    budget = settings.reread_tokens

    def room_for(budget: int) -> int:
        """The re-reading budget that leaves the window room for the prompt and answer
        (none left: the tree is read without re-reading)."""
        if not window:
            return budget
        return min(budget, window - len(prompt_ids) - max_tokens)

    if tree is not None and budget and tree.tokens is None:
        warnings.warn(
            "this saved tree does not keep its tokens (an older version saved it): "
            "it is read without re-reading; compress the context again to re-read it",
            stacklevel=2,
        )
    elif tree is not None and budget and room_for(budget) > 0:
        if sources and tree is prepared.tree:  # no chunk left out: one pass serves both
            profile = attention_profile(model, tree, prepared.running, settings)
        passages, running = reread_passages(
            model,
            tokenizer,
            tree,
            prepared.running,
            prompt,
            room_for(budget),
            chat_template,
            settings,
            profile,
        )
        stats["reread_tokens"] = sum(p.end - p.start for p in passages)
        stats["passages"] = tuple(passages)
        if sources:
            selected = tree.meta.get("selected_chunks")
            read = document_passages(passages, prepared.tree, selected)
        # The passages, read in full, are the answer's source; the tree would add its
        # coarse reading of the same text on top (in a dev probe of 6 questions it
        # answered 1 with the tree, 2 without; read_suite.py's `reread+tree` measures it).
        tree = None
    if sources and prepared.tree is not None:
        stats["sources"] = find_sources(
            model, tokenizer, prepared.tree, prepared.running, read, text_offsets,
            settings=settings, profile=profile,
        )  # fmt: skip
    if seed is not None:
        mx.random.seed(seed)
    responses = mlx_lm_stream_generate(
        WithTree(model, tree, settings),
        tokenizer,
        mx.array(running),
        max_tokens=max_tokens,
        sampler=make_sampler(temp, top_p, min_p, top_k=top_k),
        logits_processors=make_logits_processors(repetition_penalty=repetition_penalty),
        prompt_cache=model.make_cache(),
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=0,
    )
    for response in responses:
        yield GenerationResponse(**vars(response), **stats)


def reread_passages(
    model: SharedLLM,
    tokenizer: TokenizerWrapper,
    tree: ContextTree,
    running: np.ndarray,
    prompt: Prompt,
    budget: int,
    chat_template: bool | None = None,
    settings: Settings | None = None,
    profile: np.ndarray | None = None,
) -> tuple[list[Passage], np.ndarray]:
    """The passages of the context (the tree's tokens, then the remainder) that the
    question points at, and the running text that reads them: in the user's message ahead
    of the question (a conversation's last user message), cut down to their sentences that
    hold the most of the question's rare words, one per line (reread.reread_text; a
    prompt given as token ids gets whole passages ahead of it, untemplated).

    `running` is the text the model reads before answering (the tree's remainder, then
    the encoded prompt), whose last token asks the heads where to look (with `settings`,
    default the model's; `profile`: their reread.attention_profile of `tree` for `running`,
    when already read).
    """
    remainder = np.zeros(0, np.int32) if tree.remainder is None else np.array(tree.remainder)
    asked = question_of(prompt)
    question = (
        np.asarray(tokenizer.encode(asked, add_special_tokens=False), np.int32)
        if isinstance(asked, str)
        else np.asarray(list(asked), np.int32)
    )
    terms = token_terms(tokenizer)
    passages = choose(model, tree, running, budget, question, terms, remainder, settings, profile)
    context = np.concatenate([np.array(tree.tokens).reshape(-1), remainder]).astype(np.int32)
    pieces = [context[p.start : p.end] for p in passages]
    if not isinstance(asked, str):
        sep = np.asarray(tokenizer.encode(REREAD_SEPARATOR, add_special_tokens=False), np.int32)
        parts = [x for piece in pieces for x in (piece, sep)]
        return passages, np.concatenate([*parts, question]).astype(np.int32)
    words = question_words(asked, tokenizer.decode(context.tolist()))
    text = reread_text([tokenizer.decode(piece.tolist()).strip() for piece in pieces], words)
    message = REREAD_MESSAGE.format(passages=text, prompt=asked)
    return passages, encode_prompt(tokenizer, with_question(prompt, message), chat_template)


def generate(
    model: SharedLLM,
    tokenizer: TokenizerWrapper,
    prompt: Prompt,
    context: str | ContextTree | Any | None = None,
    **kwargs: Any,
) -> str:
    """The whole answer of `stream_generate` as one string."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, context, **kwargs))
