"""Stack a plain LLaMA-family model from one: its bottom M layers become the compressor."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.llama import ModelArgs as LlamaArgs

from ..config import SharedLLMConfig, head_dim
from ..model import SharedLLM
from .tables import ConversionError, Shape, check_weights, model_table

INITS = ("zero", "copy")


@dataclass
class StackOptions:
    """`m` injection layers; `init` is how their cross-attention starts: `zero` (o_proj = 0,
    so the model is exactly the base model) or `copy` (q_proj, o_proj and the norm copied
    from the layer's self-attention, like the released code's init_mode=copy).

    `heads` ((layer, head) pairs, with `copy`) copies o_proj for those heads only and
    zeroes the rest: the base model's retrieval heads then read the tree from the start,
    while every other head adds nothing (copying all heads adds each head's output twice,
    which breaks the model). `auto_heads` finds those heads instead (heads.py): that many,
    or with 0 those that stand out.
    """

    m: int
    init: str = "zero"
    heads: tuple[tuple[int, int], ...] | None = None
    auto_heads: int | None = None

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ConversionError(f"init must be one of {INITS}, got {self.init!r}")
        if self.auto_heads is not None:
            if self.init != "copy":
                raise ConversionError("finding heads to copy needs init 'copy'")
            if self.heads is not None:
                raise ConversionError("name heads to copy, or find them (auto), not both")
            if self.auto_heads < 0:
                raise ConversionError(f"auto heads must be 0 or more, got {self.auto_heads}")
        if self.heads is not None:
            self.heads = tuple((int(layer), int(head)) for layer, head in self.heads)
            if self.init != "copy":
                raise ConversionError("copying chosen heads needs init 'copy'")
            if not self.heads:
                raise ConversionError("heads is empty: name at least one (layer, head)")
            deep = [f"{layer}.{head}" for layer, head in self.heads if layer >= self.m]
            if deep:
                raise ConversionError(f"heads {deep} are not below the {self.m} injection layers")


def parse_heads(value: str) -> tuple[tuple[int, int], ...]:
    """'17.3,18.6' -> ((17, 3), (18, 6))."""
    try:
        pairs = [item.strip().split(".") for item in value.split(",") if item.strip()]
        return tuple((int(layer), int(head)) for layer, head in pairs)
    except ValueError:
        raise ConversionError(
            f"heads must look like '17.3,18.6' or 'auto' or 'auto:4', got {value!r}"
        ) from None


def parse_copy_heads(value: str) -> dict:
    """The StackOptions fields that a `--copy-heads` value sets: 'auto' (the heads that
    stand out), 'auto:4' (the best 4) or '17.3,18.6'."""
    name, _, count = value.strip().partition(":")
    if name != "auto":
        return {"heads": parse_heads(value)}
    if not count:
        return {"auto_heads": 0}
    if not count.isdigit() or int(count) < 1:
        raise ConversionError(f"'auto:N' needs a count of 1 or more, got {value!r}")
    return {"auto_heads": int(count)}


def keep_heads(model: SharedLLM, heads: Iterable[tuple[int, int]], m: int) -> SharedLLM:
    """The model (whose cross-attention in layers 0..m-1 started as a copy of all heads)
    with injection blocks only in the layers of `heads`, each copying only those heads'
    output."""
    stack = StackOptions(m, "copy", tuple(heads))
    n_heads = model.args.num_attention_heads
    weights = dict(tree_flatten(model.parameters()))
    layers = injection_layers(stack)
    for i in layers:
        name = f"model.layers.{i}.cross_attn.o_proj.weight"
        weights[name] = weights[name] * _head_mask(stack, i, weights[name], n_heads)
    config = dataclasses.replace(
        model.config, injection_layers=layers, num_injection_layers=layers[-1] + 1
    )
    kept = SharedLLM(config, model.settings)
    kept.load_weights(list(kept.sanitize(weights).items()))
    return kept


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


def injection_layers(stack: StackOptions) -> tuple[int, ...]:
    """The layers that get an injection block: those with heads to copy, when named (the
    others would add nothing), else all of 0..m-1."""
    if stack.heads is None:
        return tuple(range(stack.m))
    return tuple(sorted({layer for layer, _ in stack.heads}))


def injection_init(
    weights: dict[str, mx.array], stack: StackOptions, n_heads: int
) -> dict[str, mx.array]:
    """The cross-attention weights of the injection layers, from their self-attention."""
    out = {}
    for i in injection_layers(stack):
        layer = f"model.layers.{i}"
        o_proj = weights[f"{layer}.self_attn.o_proj.weight"]
        out[f"{layer}.cross_attn.layernorm.weight"] = weights[f"{layer}.input_layernorm.weight"]
        out[f"{layer}.cross_attn.q_proj.weight"] = weights[f"{layer}.self_attn.q_proj.weight"]
        out[f"{layer}.cross_attn.o_proj.weight"] = o_proj * _head_mask(stack, i, o_proj, n_heads)
    return out


def _head_mask(stack: StackOptions, layer: int, o_proj: mx.array, n_heads: int) -> mx.array:
    """Which input columns of layer `layer`'s o_proj the init copies (1) or zeroes (0)."""
    if stack.init == "zero":
        return mx.zeros((o_proj.shape[1],), o_proj.dtype)
    if stack.heads is None:
        return mx.ones((o_proj.shape[1],), o_proj.dtype)
    width = o_proj.shape[1] // n_heads
    heads = {h for l_, h in stack.heads if l_ == layer}
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise ConversionError(f"layer {layer} has {n_heads} heads, not head {bad[0]}")
    mask = [1.0 if c // width in heads else 0.0 for c in range(o_proj.shape[1])]
    return mx.array(mask, o_proj.dtype)


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
    layers = injection_layers(stack)
    cfg = SharedLLMConfig(
        upper=args,
        lower=None,
        num_injection_layers=layers[-1] + 1,
        injection_layers=layers,
        layout="paper",
        injection=stack.init,
    )
    kept, dropped = base_table(args)
    weights = check_weights(weights.items(), kept, dropped, src, dtype)
    weights.update(injection_init(weights, stack, args.num_attention_heads))
    model = SharedLLM(cfg)
    model.load_weights(list(weights.items()))
    return model
