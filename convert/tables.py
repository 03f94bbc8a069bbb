"""Weight-name tables: every name a checkpoint may hold, with its shape."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.llama import ModelArgs as LlamaArgs

from ..config import head_dim
from .files import OneLineError

Shape = tuple[int, ...]


class ConversionError(OneLineError):
    """The source checkpoint does not match what the converter expects."""


def layer_table(prefix: str, args: LlamaArgs) -> dict[str, Shape]:
    dim, inter, d = args.hidden_size, args.intermediate_size, head_dim(args)
    q, kv = args.num_attention_heads * d, args.num_key_value_heads * d
    linears = {
        "self_attn.q_proj": ((q, dim), args.attention_bias),
        "self_attn.k_proj": ((kv, dim), args.attention_bias),
        "self_attn.v_proj": ((kv, dim), args.attention_bias),
        "self_attn.o_proj": ((dim, q), args.attention_bias),
        "mlp.gate_proj": ((inter, dim), args.mlp_bias),
        "mlp.up_proj": ((inter, dim), args.mlp_bias),
        "mlp.down_proj": ((dim, inter), args.mlp_bias),
    }
    table = {
        f"{prefix}.input_layernorm.weight": (dim,),
        f"{prefix}.post_attention_layernorm.weight": (dim,),
    }
    for name, (shape, bias) in linears.items():
        table[f"{prefix}.{name}.weight"] = shape
        if bias:
            table[f"{prefix}.{name}.bias"] = shape[:1]
    return table


def injection_table(prefix: str, args: LlamaArgs) -> dict[str, Shape]:
    dim, q = args.hidden_size, args.num_attention_heads * head_dim(args)
    return {
        f"{prefix}.cross_attn.layernorm.weight": (dim,),
        f"{prefix}.cross_attn.q_proj.weight": (q, dim),
        f"{prefix}.cross_attn.o_proj.weight": (dim, q),
    }


def model_table(prefix: str, args: LlamaArgs, layers: range) -> dict[str, Shape]:
    table = {
        f"{prefix}.embed_tokens.weight": (args.vocab_size, args.hidden_size),
        f"{prefix}.norm.weight": (args.hidden_size,),
    }
    for i in layers:
        table.update(layer_table(f"{prefix}.layers.{i}", args))
    return table


def check_weights(
    items: Iterable[tuple[str, mx.array]],
    kept: dict[str, Shape],
    dropped: dict[str, Shape],
    src: Path,
    dtype: mx.Dtype | None,
) -> dict[str, mx.array]:
    """Check every weight's name, shape and dtype against the table; drop the dropped; cast."""
    weights: dict[str, mx.array] = {}
    for name, value in items:
        expected = kept.get(name, dropped.get(name))
        if expected is None:
            raise ConversionError(f"unknown weight {name!r:.100} in {src}")
        if tuple(value.shape) != expected:
            raise ConversionError(
                f"weight {name!r} has shape {tuple(value.shape)}, expected {expected}"
            )
        if name in kept:
            weights[name] = _float_weight(name, value, src, dtype)
    missing = sorted(set(kept) - set(weights))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConversionError(f"missing weight {missing[0]!r}{more} in {src}")
    return weights


def _float_weight(name: str, value: mx.array, src: Path, dtype: mx.Dtype | None) -> mx.array:
    """``value`` cast to ``dtype``; every weight the model keeps is a float, and an integer one
    (a float tensor relabelled, say) would be cast silently into nonsense."""
    if not mx.issubdtype(value.dtype, mx.floating):
        dtype_name = str(value.dtype).removeprefix("mlx.core.")
        raise ConversionError(f"weight {name!r} in {src} is {dtype_name}, not a float type")
    return value.astype(dtype) if dtype is not None else value
