"""Declared configuration of a SharedLLM stack."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.llama import ModelArgs as LlamaArgs

POLICIES = ("query", "right")
# How the injection weights came to be: trained, or initialised by stacking from one.
INJECTIONS = ("trained", "zero", "copy")
LAYOUTS = ("paper", "reference")
# Re-reading reads passages of this many tokens (reread.py).
PASSAGE_TOKENS = 128


def parse_last_p(value: int | float | str) -> int | float:
    """Read `last_p` as the released config writes it: "32" is an int, "0.125" a float."""
    if isinstance(value, bool):
        raise ValueError(f"last_p must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"last_p must be an int or a float, got {value!r}") from None


def _llama_args(value: LlamaArgs | dict[str, Any]) -> LlamaArgs:
    if isinstance(value, LlamaArgs):
        return value
    return LlamaArgs.from_dict({"model_type": "llama", **value})


@dataclass
class SharedLLMConfig:
    """Everything that defines a SharedLLM stack.

    `upper` is the decoder (all N layers run); `lower` is the compressor, of which only
    the first `num_injection_layers` (M) layers exist. Upper layers i < M read the
    context tree through an injection block. `lower=None` stacks the model from one:
    the compressor is the upper model's own bottom M layers (shared weights).
    """

    upper: LlamaArgs
    lower: LlamaArgs | None
    num_injection_layers: int
    tree_depth: int = 3
    last_p: int | float = 32
    chunk_len: int = 1024
    policy: str = "query"
    layout: str = "paper"
    compress_batch: int = 8
    injection: str = "trained"
    # Scale the injection's attention logits by log(entries) / log(this) on trees of more
    # entries than this (0: off); see model.log_scale. Set by training, kept by adapters.
    log_scale_entries: int = 0
    # A question reads only this many chunks, those its injection heads attend to most
    # (0: every chunk); see selection.py. Kept by adapters.
    select_chunks: int = 0
    # Re-read in full, in the running text, up to this many tokens of the passages that
    # the question points at (0: off); see reread.py. Kept by adapters.
    reread_tokens: int = 0
    model_type: str = "sharedllm"
    quantization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.upper = _llama_args(self.upper)
        self.lower = None if self.lower is None else _llama_args(self.lower)
        self.last_p = parse_last_p(self.last_p)
        self._validate()
        if self.lower is not None and self.lower.num_hidden_layers > self.num_injection_layers:
            # Nothing above layer M of the lower model ever runs.
            self.lower = dataclasses.replace(
                self.lower, num_hidden_layers=self.num_injection_layers, layer_types=None
            )

    @property
    def stacked(self) -> bool:
        """True when the lower model is the upper model's bottom layers."""
        return self.lower is None

    def _validate(self) -> None:
        m, up, low = self.num_injection_layers, self.upper, self.lower or self.upper
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {self.injection!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not 1 <= m <= up.num_hidden_layers:
            raise ValueError(f"num_injection_layers must be in 1..{up.num_hidden_layers}, got {m}")
        if low.num_hidden_layers < m:
            raise ValueError(
                f"the lower model has {low.num_hidden_layers} layers, fewer than M={m}"
            )
        if self.tree_depth < 1:
            raise ValueError(f"tree_depth must be >= 1, got {self.tree_depth}")
        check_log_scale(self.log_scale_entries)
        check_select_chunks(self.select_chunks)
        check_reread_tokens(self.reread_tokens)
        if self.compress_batch < 1:
            raise ValueError(f"compress_batch must be >= 1, got {self.compress_batch}")
        if head_dim(up) != head_dim(low):
            raise ValueError(
                f"upper head_dim {head_dim(up)} != lower head_dim {head_dim(low)}: "
                "the upper queries attend over the lower keys"
            )
        if up.num_attention_heads % low.num_key_value_heads:
            raise ValueError(
                f"upper heads ({up.num_attention_heads}) must be a multiple of the lower "
                f"key/value heads ({low.num_key_value_heads})"
            )
        check_chunk_len(self.chunk_len, self.tree_depth)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> SharedLLMConfig:
        """Build from a config.json dict; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def tree_dict(self) -> dict[str, Any]:
        """The settings a context tree depends on."""
        keys = ("num_injection_layers", "tree_depth", "last_p", "chunk_len", "policy", "layout")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["upper"] = _args_dict(self.upper)
        out["lower"] = None if self.lower is None else _args_dict(self.lower)
        if out["quantization"] is None:
            del out["quantization"]
        return out


def _args_dict(args: LlamaArgs) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(args).items() if v is not None}


def head_dim(args: LlamaArgs) -> int:
    return args.head_dim or args.hidden_size // args.num_attention_heads


def check_log_scale(entries: int) -> None:
    """`log_scale_entries` is 0 (off) or a number of entries, at least 2 (log(1) is 0)."""
    if entries != 0 and entries < 2:
        raise ValueError(f"log_scale_entries must be 0 (off) or at least 2, got {entries}")


def check_select_chunks(chunks: int) -> None:
    """`select_chunks` is 0 (read every chunk) or how many chunks a question reads."""
    if chunks < 0:
        raise ValueError(f"select_chunks must be 0 (every chunk) or more, got {chunks}")


def check_reread_tokens(tokens: int) -> None:
    """`reread_tokens` is 0 (off) or a budget of at least one passage."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ValueError(f"reread_tokens must be 0 (off) or a number of tokens, got {tokens!r}")
    if 0 < tokens < PASSAGE_TOKENS:
        raise ValueError(
            f"reread_tokens must be 0 (off) or at least one passage ({PASSAGE_TOKENS}), "
            f"got {tokens}"
        )


def check_chunk_len(chunk_len: int, depth: int) -> None:
    """Every split above the last level halves a node, so it must have an even length."""
    if chunk_len % (2 ** (depth - 1)) or chunk_len < 2**depth:
        raise ValueError(
            f"chunk_len {chunk_len} cannot be halved {depth - 1} times and still leave two "
            f"leaves: use a multiple of {2 ** (depth - 1)} that is at least {2**depth}"
        )
