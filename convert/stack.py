"""Stack a plain LLaMA-family model from one: its bottom M layers become the compressor."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.llama import ModelArgs as LlamaArgs

from ..config import SharedLLMConfig, head_dim
from ..model import SharedLLM
from .tables import ConversionError, Shape, check_weights, model_table

INITS = ("zero", "copy")


@dataclass
class StackOptions:
    """`m` injection layers; `init` is how their cross-attention starts: `zero` (o_proj = 0,
    so the model is exactly the base model) or `copy` (q_proj, o_proj and the norm copied
    from the layer's self-attention, like the released code's init_mode=copy)."""

    m: int
    init: str = "zero"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ConversionError(f"init must be one of {INITS}, got {self.init!r}")


def base_table(args: LlamaArgs) -> tuple[dict[str, Shape], dict[str, Shape]]:
    """(kept, dropped) weight names of a plain LLaMA in Hugging Face naming."""
    kept = model_table("model", args, range(args.num_hidden_layers))
    dropped = {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": (head_dim(args) // 2,)
        for i in range(args.num_hidden_layers)
    }
    head = {"lm_head.weight": (args.vocab_size, args.hidden_size)}
    (dropped if args.tie_word_embeddings else kept).update(head)
    return kept, dropped


def injection_init(weights: dict[str, mx.array], m: int, init: str) -> dict[str, mx.array]:
    """The cross-attention weights of layers 0..m-1, started from their self-attention."""
    out = {}
    for i in range(m):
        layer = f"model.layers.{i}"
        o_proj = weights[f"{layer}.self_attn.o_proj.weight"]
        out[f"{layer}.cross_attn.layernorm.weight"] = weights[f"{layer}.input_layernorm.weight"]
        out[f"{layer}.cross_attn.q_proj.weight"] = weights[f"{layer}.self_attn.q_proj.weight"]
        out[f"{layer}.cross_attn.o_proj.weight"] = (
            o_proj if init == "copy" else mx.zeros_like(o_proj)
        )
    return out


def stack_from_one(
    hf: dict,
    items: Iterable[tuple[str, mx.array]],
    stack: StackOptions,
    src: Path,
    dtype: mx.Dtype | None,
) -> SharedLLM:
    """A SharedLLM (paper layout) whose compressor is the base model's bottom M layers."""
    if hf.get("model_type", "llama") not in ("llama", "mistral"):
        raise ConversionError(f"{src}: model_type {hf.get('model_type')!r} is not LLaMA-family")
    weights = dict(items)
    # A config may omit tie_word_embeddings; then an lm_head tells whether it is tied.
    hf = {"tie_word_embeddings": "lm_head.weight" not in weights, **hf, "model_type": "llama"}
    args = LlamaArgs.from_dict(hf)
    cfg = SharedLLMConfig(
        upper=args,
        lower=None,
        num_injection_layers=stack.m,
        layout="paper",
        injection=stack.init,
    )
    kept, dropped = base_table(args)
    weights = check_weights(weights.items(), kept, dropped, src, dtype)
    weights.update(injection_init(weights, stack.m, stack.init))
    model = SharedLLM(cfg)
    model.load_weights(list(weights.items()))
    return model
