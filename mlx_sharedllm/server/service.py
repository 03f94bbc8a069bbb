"""What the model's worker thread does for a request: compress a document once, find or
build the context a request reads, and stream the answer.

Every method that takes a `job` runs on the worker thread (engine.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..generate import (
    Prompt,
    encode_prompt,
    question_index,
    stream_generate,
    text_pieces,
    tokenize_pieces,
)
from ..model import SharedLLM
from ..tree import ContextTree
from .api import ApiError, Sampling, StopText
from .engine import Engine, Job
from .store import TooLarge, TreeStore, document_id, readable, stored_format

DEFAULT_MAX_TOKENS = 256
# Between documents read together, and between messages folded into a context.
JOIN = "\n\n"


@dataclass
class Ask:
    """A checked generation request: chat `messages` or a completion `prompt`."""

    sampling: Sampling
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    documents: list[str] = field(default_factory=list)
    sources: bool = False


@dataclass
class Context:
    """What a request reads besides its running text: a tree, or a short text in full."""

    tree: ContextTree | None = None
    ids: np.ndarray | None = None
    doc_id: str | None = None
    cache_hit: bool | None = None
    compress_seconds: float = 0.0

    def pending(self, chunk_len: int) -> bool:
        """Whether the ids still have to be compressed (a chunk or more)."""
        return self.tree is None and self.ids is not None and len(self.ids) >= chunk_len

    def running_tokens(self, chunk_len: int) -> int:
        """Tokens this context adds to the running text: a tree's remainder, or a text
        shorter than a chunk in full."""
        if self.tree is not None:
            return 0 if self.tree.remainder is None else int(self.tree.remainder.size)
        if self.ids is None:
            return 0
        return len(self.ids) % chunk_len if self.pending(chunk_len) else len(self.ids)

    @property
    def source(self) -> ContextTree | np.ndarray | None:
        return self.tree if self.tree is not None else self.ids


class Service:
    """One model, its documents and the worker that runs it."""

    def __init__(
        self,
        model: SharedLLM,
        tokenizer: TokenizerWrapper,
        store: TreeStore,
        engine: Engine,
        name: str,
    ):
        self.model, self.store, self.engine, self.name = model, store, engine, name
        self.tokenizer = (
            tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)
        )
        self.fingerprint = model.fingerprint()
        self.settings = model.settings
        self.window = model.args.max_position_embeddings or 0
        self.chunk_len = model.config.chunk_len
        self.compressions = 0

    def document_id(self, text: str) -> str:
        return document_id(self.fingerprint, text)

    # -- documents ------------------------------------------------------------------

    def add_document(self, job: Job, text: str) -> dict[str, Any]:
        """Compress a text once (a saved tree answers again), and describe it."""
        doc_id = self.document_id(text)
        if (tree := self.store.get(doc_id)) is not None:
            return self._describe(doc_id, tree, True, 0.0)
        ids = self._tokenize(job, text)
        if len(ids) < self.chunk_len:
            raise ApiError(
                400,
                f"the text is {len(ids):,} tokens, shorter than one chunk ({self.chunk_len}): "
                "send it in the message instead",
                param="text",
            )
        tree, seconds = self._compress(job, ids)
        try:
            tree = self.store.put(doc_id, tree)
        except TooLarge as e:
            raise ApiError(400, str(e), param="text", code="document_too_large") from None
        return self._describe(doc_id, tree, False, seconds)

    def _describe(self, doc_id: str, tree: ContextTree, hit: bool, seconds: float) -> dict:
        remainder = 0 if tree.remainder is None else int(tree.remainder.size)
        return {
            "id": doc_id,
            "object": "document",
            "model": self.name,
            "tokens": tree.n_chunks * tree.chunk_len + remainder,
            "chunks": tree.n_chunks,
            "tree_entries": tree.num_entries,
            "bytes": tree.nbytes,
            "cache_hit": hit,
            "compress_seconds": round(seconds, 3),
        }

    def _tokenize(self, job: Job, text: str) -> np.ndarray:
        def progress(stage: str, done: int, total: int) -> None:
            job.emit("progress", {"stage": stage, "done": done, "total": len(text)})
            job.check()

        return tokenize_pieces(self.tokenizer, text_pieces(io.StringIO(text)), progress)

    def _compress(self, job: Job, ids: np.ndarray) -> tuple[ContextTree, float]:
        """Compress once (query: the text's first token, as `compress` without a prompt),
        reporting each batch and stopping at the first batch after a cancel."""

        def progress(done: int, total: int) -> None:
            job.emit("progress", {"stage": "compress", "done": done, "total": total})
            job.check()

        tic = time.perf_counter()
        ids = mx.array(ids)
        # Trees are compressed once and kept, in the store's format.
        settings = dataclasses.replace(self.settings, tree_format=stored_format(self.model))
        tree = self.model.compress(ids, ids[:1], progress, settings=settings)
        self.compressions += 1
        return tree, time.perf_counter() - tic

    def _documents(self, job: Job, doc_ids: list[str]) -> Context:
        """The tree of the named documents; several are read as one, compressed once."""
        trees = [self.store.get(doc_id) for doc_id in doc_ids]
        missing = [d for d, tree in zip(doc_ids, trees) if tree is None]
        if missing:
            raise ApiError(
                404, f"no document {missing[0]}", param="documents", code="document_not_found"
            )
        if len(trees) == 1:
            return Context(trees[0], doc_id=doc_ids[0], cache_hit=True)
        joined = self.document_id("documents:" + JOIN.join(doc_ids))
        if (tree := self.store.get(joined)) is not None:
            return Context(tree, doc_id=joined, cache_hit=True)
        sep = np.asarray(self.tokenizer.encode(JOIN, add_special_tokens=False), np.int32)
        parts = [part for tree in trees for part in (_token_ids(tree), sep)][:-1]
        return self._stored(job, joined, np.concatenate(parts))

    def _stored(self, job: Job, doc_id: str, ids: np.ndarray) -> Context:
        tree, seconds = self._compress(job, ids)
        try:
            tree = self.store.put(doc_id, tree)
        except TooLarge:  # read once, not kept
            tree = readable(tree, self.model)
        return Context(tree, doc_id=doc_id, cache_hit=False, compress_seconds=seconds)

    # -- answers --------------------------------------------------------------------

    def answer(self, job: Job, ask: Ask) -> dict[str, Any]:
        """Stream the answer as "text" events; its finish reason and usage."""
        requested = ask.sampling.max_tokens
        max_tokens = requested or DEFAULT_MAX_TOKENS
        prompt, template, tokens = self._prompt(ask)
        if ask.documents:
            self._room(prompt, template, Context(), requested)  # before any compression
            context = self._documents(job, ask.documents)
        elif not self.window or tokens + max_tokens <= self.window:
            context = Context()
        else:
            prompt, template, text = self._split(ask, max_tokens)
            context = self._long_context(job, text)
        max_tokens = self._room(prompt, template, context, requested)
        if context.pending(self.chunk_len):
            context = self._stored(job, context.doc_id, context.ids)
        finish, last = self._generate(job, prompt, template, context, ask, max_tokens)
        usage = self._usage(last, context, ask.documents)
        if ask.sources:
            usage["sharedllm"]["sources"] = sources_json(last.sources)
        return {"finish_reason": finish, "usage": usage}

    def _prompt(self, ask: Ask) -> tuple[Prompt, bool | None, int]:
        """The running prompt, whether `stream_generate` wraps it in the chat template, and
        its length in tokens: messages go as messages (re-reading frames their last user
        message, the question; an assistant's message after it stays after it)."""
        if ask.messages is None:
            ids = self._ids(ask.prompt, True)
            return ids, False, len(ids)
        ids = self._conversation(ask.messages)  # the template's refusal is a 400 here
        return ask.messages, None, len(ids)

    def _ids(self, text: str, special: bool) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=special), np.int32)

    def _conversation(self, messages: list[dict[str, str]]) -> np.ndarray:
        try:
            question_index(messages)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        try:
            return encode_prompt(self.tokenizer, messages)
        except Exception as e:  # the template's own refusal, e.g. roles out of order
            raise ApiError(400, f"the chat template refuses these messages: {e}") from None

    def _prompt_tokens(self, prompt: Prompt, template: bool | None) -> int:
        return len(encode_prompt(self.tokenizer, prompt, template))

    def _split(self, ask: Ask, max_tokens: int) -> tuple[Prompt, bool | None, str]:
        """Cut a request longer than the window: the last paragraph of its question (the
        prompt, or the last user message, with the messages after it) stays the running
        prompt (cut to what fits beside a chunk's remainder), everything before it
        becomes the context, so the same document asked again is the same context."""
        if ask.messages is None:
            earlier, last, after = [], ask.prompt, []
        else:
            at = question_index(ask.messages)
            earlier = [m["content"] for m in ask.messages[:at]]
            last, after = ask.messages[at]["content"], ask.messages[at + 1 :]
        cut = last.rstrip().rfind("\n") + 1
        head, tail = last[:cut], last[cut:]
        template = None if ask.messages is not None else False
        overhead = self._prompt_tokens(_asking("", after), template) if template is None else 0
        room = self.window - max_tokens - (self.chunk_len - 1) - overhead
        if room <= 0:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} leaves no room in the model's window "
                f"({self.window}) for the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )
        ids = self._ids(tail, False)
        if len(ids) > room:
            head += self.tokenizer.decode(ids[:-room].tolist())
            tail = self.tokenizer.decode(ids[-room:].tolist())
        text = JOIN.join(part for part in (*earlier, head.strip()) if part)
        prompt = _asking(tail.strip(), after) if template is None else self._ids(tail, False)
        return prompt, template, text

    def _long_context(self, job: Job, text: str) -> Context:
        """The saved tree of a request's long part, or its token ids (compressed once the
        running text is known to fit)."""
        doc_id = self.document_id(text)
        if (tree := self.store.get(doc_id)) is not None:
            return Context(tree, doc_id=doc_id, cache_hit=True)
        return Context(ids=self._tokenize(job, text), doc_id=doc_id)

    def _room(
        self, prompt: Any, template: bool | None, context: Context, requested: int | None
    ) -> int:
        """The tokens left to generate (max_tokens, else the default cut to the window);
        refuse a running text that leaves none or less than max_tokens asked."""
        extra = context.running_tokens(self.chunk_len)
        used = self._prompt_tokens(prompt, template) + extra
        wanted = requested or DEFAULT_MAX_TOKENS
        if not self.window or used + wanted <= self.window:
            return wanted
        if requested is None and used < self.window:
            return self.window - used
        raise ApiError(
            400,
            f"the prompt is {used:,} tokens"
            + (f" with {extra:,} of the context read in full" if extra else "")
            + f"; with max_tokens {wanted:,} that is more than the model's window "
            f"({self.window:,})",
            param="messages" if used >= self.window else "max_tokens",
            code="context_length_exceeded",
        )

    def _generate(
        self,
        job: Job,
        prompt: Any,
        template: bool | None,
        context: Context,
        ask: Ask,
        max_tokens: int,
    ) -> tuple[str | None, Any]:
        stop, last, finish = StopText(ask.sampling.stop), None, None
        responses = stream_generate(
            self.model,
            self.tokenizer,
            prompt,
            context.source,
            chat_template=template,
            settings=self.settings,
            sources=ask.sources,
            **ask.sampling.options(max_tokens),
        )
        with contextlib.closing(responses):
            try:
                for last in responses:
                    job.check()
                    text, stopped = stop.feed(last.text)
                    if text:
                        job.emit("text", text)
                    if stopped:
                        return "stop", last
                    finish = last.finish_reason
            except ValueError as e:  # the prompt or context refused before generating
                raise ApiError(400, str(e)) from None
        if rest := stop.flush():
            job.emit("text", rest)
        return finish, last

    def _usage(self, last: Any, context: Context, documents: list[str]) -> dict[str, Any]:
        prompt, completion = last.prompt_tokens, last.generation_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "sharedllm": {
                "context_tokens": last.context_tokens,
                "chunks": last.chunks,
                "chunks_read": last.chunks_read,
                "tree_entries": last.tree_entries,
                "reread_tokens": last.reread_tokens,
                "cache_hit": context.cache_hit,
                "compress_seconds": round(context.compress_seconds, 3),
                "documents": documents,
                "context_id": context.doc_id if context.tree is not None else None,
            },
        }


def _asking(question: str, after: list[dict[str, str]]) -> Prompt:
    """A long request's running prompt: its question alone, or as the user's message
    followed by the messages that came after it."""
    return [{"role": "user", "content": question}, *after] if after else question


def sources_json(found: Any) -> list[dict[str, Any]] | None:
    """The answer's sources (sources.py) as JSON: token offsets into the document (the
    server keeps trees, not texts), attention share, excerpt, whether re-read; None when
    the context was short enough to read whole."""
    if found is None:
        return None
    return [
        {
            "chunk": s.chunk,
            "tokens": list(s.tokens),
            "share": round(s.share, 6),
            "excerpt": s.excerpt,
            "excerpt_tokens": list(s.excerpt_tokens),
            "reread": s.reread,
        }
        for s in found.sources
    ]


def _token_ids(tree: ContextTree) -> np.ndarray:
    """The token ids a tree was compressed from (its chunks, then its remainder)."""
    parts = [np.array(tree.tokens).reshape(-1)]
    if tree.remainder is not None:
        parts.append(np.array(tree.remainder))
    return np.concatenate(parts).astype(np.int32)
