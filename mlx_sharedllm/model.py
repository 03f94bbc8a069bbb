"""The SharedLLM stack: a lower LLaMA that compresses, an upper LLaMA that reads.

Parameter names follow the released PyTorch code: `model.*` is the upper model,
`encoder.*` the lower one, `lm_head` the output head.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

from .cache import TreeCache, TreeFormat
from .config import SharedLLMConfig, head_dim
from .kernels import inject_attention, rotate_at, tree_compress
from .settings import IN_TREES, Settings, check_tree_depth
from .tree import (
    ContextTree,
    SegmentPlan,
    check_token_ids,
    chunk_positions,
    downsample_index,
    pick_halves,
    plan_segments,
    token_hash,
)

logger = logging.getLogger(__name__)

# Query blocks of the compressor's causal self-attention on the CPU. MLX's CPU softmax
# costs about 12 ns a score (its exp is not vectorised) and the causal mask is applied
# to a full square of scores; block i of 4 scores only the keys up to its end, 5/8 of
# the square (benchmarks/default_model.py measures it against 1 block).
ENCODE_BLOCKS = 4


def make_rope(args: llama.ModelArgs) -> nn.Module:
    return initialize_rope(
        head_dim(args),
        args.rope_theta,
        args.rope_traditional,
        args.rope_scaling,
        args.max_position_embeddings,
    )


@dataclass
class AttentionTap:
    """Asks the injection blocks for their attention at some query rows (training uses it
    to teach the heads where to look): each block that runs appends its log-probabilities
    over the tree entries, (B, heads, len(rows), entries), in layer order."""

    rows: mx.array
    logprobs: list[mx.array] = field(default_factory=list)


class Injection(nn.Module):
    """Cross-attention from the upper model's hidden states over the context tree.

    There is no k/v projection: the lower model's own keys and values are read.
    """

    def __init__(self, args: llama.ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.scale = head_dim(args) ** -0.5
        dim, inner = args.hidden_size, self.n_heads * head_dim(args)
        self.layernorm = nn.RMSNorm(dim, eps=args.rms_norm_eps)
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)
        self.rope = make_rope(args)

    def __call__(
        self,
        x: mx.array,
        tree: TreeCache,
        position: int,
        tap: AttentionTap | None = None,
        sharpen: float = 1.0,
    ) -> mx.array:
        b, length, _ = x.shape
        q = self.q_proj(self.layernorm(x)).reshape(b, length, self.n_heads, -1)
        q = rotate_at(q.transpose(0, 2, 1, 3), self.rope, position)
        if tap is not None:
            tap.logprobs.append(self.log_attention(q[:, :, tap.rows], tree, sharpen))
        out = inject_attention(q, tree, self.scale * sharpen)
        return x + self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))

    def log_attention(self, q: mx.array, tree: TreeCache, sharpen: float = 1.0) -> mx.array:
        """log softmax(q K^T * scale * sharpen) over the tree entries, (B, heads, L, entries)."""
        keys, _ = tree.dequantized()
        b, kv_heads, entries, _ = keys.shape
        _, heads, length, dim = q.shape
        q = q.reshape(b, kv_heads, heads // kv_heads, length, dim)
        scores = (q @ keys[:, :, None].swapaxes(-1, -2)) * (self.scale * sharpen)
        scores = scores.reshape(b, heads, length, entries).astype(mx.float32)
        return scores - mx.logsumexp(scores, axis=-1, keepdims=True)


class DecoderLayer(llama.TransformerBlock):
    """A LLaMA block with an optional injection between self-attention and the MLP."""

    def __init__(self, args: llama.ModelArgs, inject: bool):
        super().__init__(args)
        if inject:
            self.cross_attn = Injection(args)

    def __call__(
        self, x, mask=None, cache=None, tree_kv=None, position: int = 0, tap=None, sharpen=1.0
    ) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        if tree_kv is not None:
            h = self.cross_attn(h, tree_kv, position, tap, sharpen)
        return h + self.mlp(self.post_attention_layernorm(h))


class UpperModel(nn.Module):
    def __init__(self, config: SharedLLMConfig):
        super().__init__()
        args = config.upper
        self.config = config
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            DecoderLayer(args, inject=i in config.injection_layers)
            for i in range(args.num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self,
        inputs: mx.array,
        tree: ContextTree | None,
        cache: list,
        tap: AttentionTap | None = None,
        sharpen: float = 1.0,
    ) -> mx.array:
        """Final hidden states; the injections scale their attention logits by `sharpen`."""
        self._check_inputs(inputs, tree, cache[0])
        h = self.embed_tokens(inputs)
        mask = create_attention_mask(h, cache[0])
        reads = dict(zip(self.config.injection_layers, tree.layers)) if tree is not None else {}
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            h = layer(h, mask, c, reads.get(i), tree.query_position if tree else 0, tap, sharpen)
        return self.norm(h)

    def _check_inputs(self, inputs: mx.array, tree: ContextTree | None, cache) -> None:
        """Refuse token ids the embedding does not hold (reading them would crash): the
        tree's and those of a prompt. A decode step's one token was sampled from the
        logits, so it is not checked, which keeps mlx-lm's decoding pipelined."""
        vocab = self.config.upper.vocab_size
        if tree is not None:
            tree.check_token_ids(vocab)
        if inputs.shape[-1] > 1 or cache is None or cache.offset == 0:
            check_token_ids(inputs, vocab, "the input")


def log_scale(entries: int, base: int) -> float:
    """How much the injection sharpens its attention over a tree of `entries` entries:
    log(entries) / log(base) beyond `base` entries, else 1 (and always 1 when base is 0).

    Softmax attention over n entries spreads as n grows; scaling the logits by log n
    keeps it as peaked as over the `base` entries that training showed the injection
    (the log-n attention scaling of length extrapolation; Chiang & Cholak 2022).
    """
    if base <= 0 or entries <= base:
        return 1.0
    return math.log(entries) / math.log(base)


class SharedLLM(nn.Module):
    """The stacked model. `compress` builds a ContextTree; calling the model decodes.

    `config`, the description, never changes. `settings` are the model's default
    settings (settings.py), which `compress` and decoding use unless given others; an
    adapter loaded on the model replaces those it records. `injection` says how the
    injection weights came to be: the description's, until an adapter is loaded
    ("trained").
    """

    def __init__(self, config: SharedLLMConfig, settings: Settings | None = None):
        super().__init__()
        self.model = UpperModel(config)
        self._config = config
        self.settings = settings or Settings()
        self.injection = config.injection
        self.args = config.upper
        # Fingerprints this model's folder had before it was migrated (loading.py): trees
        # and adapters made then record them.
        self.aliases: tuple[str, ...] = ()
        if not config.stacked:
            self.encoder = llama.LlamaModel(config.lower)
        if not config.upper.tie_word_embeddings:
            self.lm_head = nn.Linear(config.upper.hidden_size, config.upper.vocab_size, bias=False)
        self.chunk_rope = make_rope(config.upper)

    @property
    def config(self) -> SharedLLMConfig:
        """The model description (read only: it is the model the weights belong to)."""
        return self._config

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    @property
    def lower(self) -> nn.Module:
        """The compressor: its own model, or the upper model when stacked from one."""
        return self.model if self.config.stacked else self.encoder

    def __call__(
        self,
        inputs: mx.array,
        tree: ContextTree | None = None,
        cache: list | None = None,
        settings: Settings | None = None,
    ) -> mx.array:
        """Logits (B, L, vocab) for `inputs` (B, L), reading `tree` in the injection layers
        (its attention scaled as `settings`, default the model's, say)."""
        return self.head(self.hidden_states(inputs, tree, cache, settings=settings))

    def hidden_states(
        self,
        inputs: mx.array,
        tree: ContextTree | None = None,
        cache: list | None = None,
        tap: AttentionTap | None = None,
        settings: Settings | None = None,
    ) -> mx.array:
        """The upper model's final hidden states for `inputs`; `tap`, if given, collects
        the injections' attention."""
        entries = (settings or self.settings).log_scale_entries
        sharpen = log_scale(tree.num_entries, entries) if tree is not None else 1.0
        return self.model(inputs, tree, cache or [None] * len(self.layers), tap, sharpen)

    def head(self, h: mx.array) -> mx.array:
        """Logits for the final hidden states `h`."""
        if self.config.upper.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def tree_shape(self, entries: int) -> tuple[int, int, int, int]:
        """Shape of one layer's tree keys (or values) holding `entries` entries."""
        lower = self.config.lower or self.config.upper
        return (1, lower.num_key_value_heads, entries, head_dim(lower))

    def make_cache(self) -> list[KVCache]:
        """A fresh KV cache for the upper model's self-attention."""
        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        if self.config.upper.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return {k: v for k, v in weights.items() if not self._unused_injection(k)}

    def _unused_injection(self, name: str) -> bool:
        """A legacy folder's injection weights for a layer that does not inject (its
        output projection was all zeros: see loading.live_injection_layers)."""
        parts = name.split(".")
        return (
            len(parts) > 3
            and parts[:2] == ["model", "layers"]
            and parts[3] == "cross_attn"
            and int(parts[2]) not in self.config.injection_layers
        )

    # -- compression ---------------------------------------------------------------

    def compress(
        self,
        context: Any,
        query: Any,
        progress: Callable[[int, int], None] | None = None,
        *,
        settings: Settings | None = None,
        splits: list[int] | None = None,
    ) -> ContextTree:
        """Compress `context` into a context tree, guided by the running text `query`.

        `context` is (n, chunk_len) token ids, or a 1-D array that is cut into
        `config.chunk_len` chunks; its trailing `len % chunk_len` tokens are not
        compressed and are returned in `tree.remainder`, for the caller to put in
        the running text. `query` is the (L,) or (1, L) running text. `progress`, if
        given, is called with (chunks done, chunks in all) as batches finish.
        `settings` (default: the model's) say how the tree is built and stored. `splits`
        gives the preserved size per level (training's split noise; default: halves).
        """
        s = settings or self.settings
        chunks, remainder = self._as_chunks(context)
        lower = self.config.lower or self.config.upper
        check_token_ids(chunks, lower.vocab_size, "the context")
        check_token_ids(mx.array(query), self.config.upper.vocab_size, "the query")
        n, chunk_len = chunks.shape
        check_tree_depth(s.tree_depth, chunk_len)
        progress = progress or (lambda done, total: None)
        progress(0, n)
        chooser = self._chooser(chunks, query, s)
        plan = plan_segments(n, chunk_len, s.tree_depth, self.config.layout, chooser, splits)
        kept = (s.keep_tokens, s.keep_fraction)
        entries = sum(len(downsample_index(length, *kept)) for length in plan.lengths)
        fmt = s.tree_format or TreeFormat(dtype=self.compute_dtype)
        _, kv_heads, _, dim = self.tree_shape(n * entries)
        caches = [TreeCache(kv_heads, n * entries, dim, fmt) for _ in self.config.injection_layers]
        key_pos, query_pos = chunk_positions(n, entries, self.config.layout)
        for idx in self._batches(n, s.compress_batch):
            positions, keep = mx.array(key_pos[idx]), mx.arange(entries)
            for cache, (k, v) in zip(caches, self._encode_slots(chunks, plan, idx, s)):
                tree_compress(k, v, keep, positions, idx * entries, self.chunk_rope, cache)
            mx.eval([(c.key_parts, c.value_parts) for c in caches])
            progress(int(idx[-1]) + 1, n)
        return ContextTree(
            layers=caches,
            n_chunks=n,
            chunk_len=chunk_len,
            entries_per_chunk=entries,
            query_position=int(query_pos),
            remainder=remainder,
            meta={
                "model": self.fingerprint(),
                "config": self.tree_dict(s),
                "context_sha256": token_hash(chunks),
                "query_sha256": token_hash(mx.array(query)),
            },
            tokens=chunks.astype(mx.int32),
        )

    @property
    def compute_dtype(self) -> str:
        """The float dtype the model computes in (its norms are never quantized)."""
        return str(self.model.norm.weight.dtype).rsplit(".", 1)[-1]

    def fingerprint(self) -> str:
        """A short hash that tells this model's weights, description and tree settings
        from another's."""
        parameters = tree_flatten(self.parameters())
        return fingerprint_of(self.config, self.settings, parameters, self.injection)

    def tree_dict(self, settings: Settings | None = None) -> dict[str, Any]:
        """What a context tree made with `settings` (default: the model's) depends on, as
        its metadata records it."""
        return {**self.config.tree_dict(), **(settings or self.settings).to_dict(IN_TREES)}

    def config_dict(self) -> dict[str, Any]:
        """The model's config.json (see `config_json`)."""
        return config_json(self.config, self.settings, self.injection)

    def _as_chunks(self, context: Any) -> tuple[mx.array, mx.array | None]:
        context = mx.array(context) if not isinstance(context, mx.array) else context
        if context.ndim == 2:
            return context, None
        if context.ndim != 1:
            raise ValueError(f"context must be 1-D or (n, chunk_len), got shape {context.shape}")
        chunk_len = self.config.chunk_len
        n = context.shape[0] // chunk_len
        if n == 0:
            raise ValueError(
                f"context has {context.shape[0]} tokens, fewer than one chunk ({chunk_len})"
            )
        rest = context.shape[0] - n * chunk_len
        if rest:
            logger.info(
                "compressing %d chunks; the last %d tokens are left in tree.remainder", n, rest
            )
        return context[: n * chunk_len].reshape(n, chunk_len), context[n * chunk_len :]

    def _chooser(self, chunks: mx.array, query: Any, settings: Settings):
        if settings.policy == "right":
            return lambda node, half: np.ones(len(node), dtype=np.int64)
        query = mx.array(query).reshape(1, -1)
        q_vec = _unit(self._layer0_state(self.model, query))[0]

        def choose(node: np.ndarray, half: int) -> np.ndarray:
            scores = []
            for idx in self._batches(len(node), settings.compress_batch):
                halves = [_gather(chunks, idx, node[idx] + side * half, half) for side in (0, 1)]
                vecs = _unit(self._layer0_state(self.lower, mx.concatenate(halves)))
                # One batch at a time, so memory does not grow with the number of chunks.
                scores.append(np.array((vecs @ q_vec).reshape(2, -1)))
            scores = np.concatenate(scores, axis=1)
            return pick_halves(scores[0], scores[1], self.config.layout)

        return choose

    def _layer0_state(self, model: nn.Module, tokens: mx.array) -> mx.array:
        """The policy's vector: embedding, the whole layer 0, final norm, last token.

        Under the causal mask the last token's output needs every token's key and
        value but only its own query and MLP, so only those are computed.
        """
        layer, x = model.layers[0], model.embed_tokens(tokens)
        attn, (b, length, _) = layer.self_attn, x.shape
        h = layer.input_layernorm(x)
        keys = attn.k_proj(h).reshape(b, length, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = attn.v_proj(h).reshape(b, length, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        query = attn.q_proj(h[:, -1:]).reshape(b, 1, attn.n_heads, -1).transpose(0, 2, 1, 3)
        query = attn.rope(query, offset=length - 1)
        out = mx.fast.scaled_dot_product_attention(query, attn.rope(keys), values, scale=attn.scale)
        x = x[:, -1] + attn.o_proj(out.reshape(b, -1))
        return model.norm(x + layer.mlp(layer.post_attention_layernorm(x)))

    def _encode_slots(
        self, chunks: mx.array, plan: SegmentPlan, idx: np.ndarray, settings: Settings
    ):
        """Encode the planned segments of chunk slots `idx` with the lower model.

        Returns per layer (keys, values) of shape (len(idx), kv_heads, T, head_dim), each
        slot's downsampled segments joined along the sequence in plan order.
        """
        parts = [
            self._encode(_gather(chunks, plan.source[idx, s], plan.start[idx, s], n), settings)
            for s, n in enumerate(plan.lengths)
        ]
        return [
            (
                mx.concatenate([p[i][0] for p in parts], axis=2),
                mx.concatenate([p[i][1] for p in parts], axis=2),
            )
            for i in range(len(self.config.injection_layers))
        ]

    def _encode(self, tokens: mx.array, settings: Settings) -> list[tuple[mx.array, mx.array]]:
        """Run the lower model on (B, len) segments; per injection layer, downsampled
        (keys, values)."""
        lower, m = self.lower, self.config.num_injection_layers
        h, kvs = lower.embed_tokens(tokens), []
        for layer in lower.layers[:m]:
            h, keys, values = encode_block(layer, h)
            kvs.append((keys, values))
        kept = (settings.keep_tokens, settings.keep_fraction)
        keep = mx.array(downsample_index(tokens.shape[1], *kept))
        return [
            (kvs[i][0][:, :, keep], kvs[i][1][:, :, keep]) for i in self.config.injection_layers
        ]

    @staticmethod
    def _batches(n: int, size: int) -> list[np.ndarray]:
        return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


def encode_block(layer: nn.Module, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """A lower LLaMA block on (B, L) tokens from position 0, as the block computes it with
    a causal mask but in query blocks (`causal_attention`): (output, rotated keys, values)."""
    attn, (b, length, _) = layer.self_attn, x.shape
    h = layer.input_layernorm(x)

    def heads(y: mx.array, n: int) -> mx.array:
        return y.reshape(b, length, n, -1).transpose(0, 2, 1, 3)

    queries = attn.rope(heads(attn.q_proj(h), attn.n_heads))
    keys = attn.rope(heads(attn.k_proj(h), attn.n_kv_heads))
    values = heads(attn.v_proj(h), attn.n_kv_heads)
    out = causal_attention(queries, keys, values, attn.scale)
    h = x + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h)), keys, values


def causal_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, blocks: int | None = None
) -> mx.array:
    """Causal self-attention of (B, heads, L, dim) queries, in `blocks` query blocks
    (default: ENCODE_BLOCKS on the CPU, else 1), block i over the keys up to its end only:
    the same result, with fewer scores computed."""
    if blocks is None:
        blocks = ENCODE_BLOCKS if mx.default_device() == mx.cpu else 1
    length = q.shape[2]
    ends = sorted({length * (i + 1) // blocks for i in range(blocks)} - {0})
    outs = [
        mx.fast.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, :end], v[:, :, :end], scale=scale, mask="causal"
        )
        for start, end in zip([0, *ends[:-1]], ends)
    ]
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def _gather(chunks: mx.array, rows: np.ndarray, starts: np.ndarray, length: int) -> mx.array:
    """Tokens chunks[rows[b], starts[b] : starts[b] + length] for every b."""
    cols = mx.array(starts)[:, None] + mx.arange(length)[None]
    return mx.take_along_axis(chunks[mx.array(rows)], cols, axis=1)


def config_json(
    config: SharedLLMConfig, settings: Settings, injection: str | None = None
) -> dict[str, Any]:
    """A model folder's config.json: the description, how the injection weights came to
    be (default: as the description says) and the default settings, in one flat object."""
    return {**config.to_dict(), "injection": injection or config.injection, **settings.to_dict()}


def fingerprint_of(
    config: SharedLLMConfig,
    settings: Settings,
    parameters: Iterable[tuple[str, mx.array]],
    injection: str | None = None,
) -> str:
    """A short hash of a description, the settings a tree depends on and parameters: every
    parameter's name, shape, dtype and an evenly spaced sample of its values, so it is
    quick even for a large model. `injection` (default: the description's) says how the
    injection weights came to be."""
    # The other settings change no tree (an adapter carries those it was trained with).
    described = {**config.to_dict(), **settings.to_dict(IN_TREES)}
    described["injection"] = injection or config.injection
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for name, value in sorted(parameters, key=lambda item: item[0]):
        flat = value.reshape(-1)
        sample = flat[:: max(1, flat.size // 64)]
        if sample.dtype == mx.bfloat16:
            sample = sample.astype(mx.float32)
        digest.update(f"{name}{value.shape}{value.dtype}".encode())
        digest.update(np.array(sample).tobytes())
    return digest.hexdigest()[:16]


def _unit(x: mx.array, eps: float = 1e-6) -> mx.array:
    norm = mx.linalg.norm(x.astype(mx.float32), axis=-1, keepdims=True)
    return x.astype(mx.float32) / mx.maximum(norm, eps)
