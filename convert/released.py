"""What a checkpoint of the released SharedLLM code looks like: its config and weight names."""

from __future__ import annotations

from typing import Any

from mlx_lm.models.llama import ModelArgs as LlamaArgs

from ..config import SharedLLMConfig, head_dim, parse_last_p

Shape = tuple[int, ...]


class ConversionError(ValueError):
    """The source checkpoint does not match what the converter expects."""


def config_from_released(hf: dict[str, Any], chunk_len: int = 1024) -> SharedLLMConfig:
    """Our config for a checkpoint saved by the released code (SPEC section 6)."""
    m = hf.get("num_cross_attn_layers")
    if not isinstance(m, int) or m >= 0:
        raise ConversionError(
            f"num_cross_attn_layers is {m!r}: only a negative value (the bottom |M| "
            "layers inject) is supported"
        )
    lower = hf.get("encoder_config") or hf
    return SharedLLMConfig(
        upper=LlamaArgs.from_dict({**hf, "model_type": "llama"}),
        lower=LlamaArgs.from_dict({**lower, "model_type": "llama"}),
        num_injection_layers=-m,
        tree_depth=int(hf.get("segment_tree_depth", 3)),
        last_p=parse_last_p(hf.get("last_p", 32)),
        chunk_len=chunk_len,
        policy="query" if hf.get("do_retrieval", True) else "right",
        layout="reference",
    )


def _layer_table(prefix: str, args: LlamaArgs) -> dict[str, Shape]:
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


def _injection_table(prefix: str, args: LlamaArgs) -> dict[str, Shape]:
    dim, q = args.hidden_size, args.num_attention_heads * head_dim(args)
    return {
        f"{prefix}.cross_attn.layernorm.weight": (dim,),
        f"{prefix}.cross_attn.q_proj.weight": (q, dim),
        f"{prefix}.cross_attn.o_proj.weight": (dim, q),
    }


def _model_table(prefix: str, args: LlamaArgs, layers: range) -> dict[str, Shape]:
    table = {
        f"{prefix}.embed_tokens.weight": (args.vocab_size, args.hidden_size),
        f"{prefix}.norm.weight": (args.hidden_size,),
    }
    for i in layers:
        table.update(_layer_table(f"{prefix}.layers.{i}", args))
    return table


def weight_table(
    cfg: SharedLLMConfig, lower_layers_stored: int
) -> tuple[dict[str, Shape], dict[str, Shape]]:
    """(kept, dropped): every weight name the released code saves, with its shape.

    Kept names are identical in our model and all required. Dropped names may be
    present: the lower model's layers from M up, which never run, and RoPE buffers.
    """
    up, low, m = cfg.upper, cfg.lower, cfg.num_injection_layers
    kept = _model_table("model", up, range(up.num_hidden_layers))
    for i in range(m):
        kept.update(_injection_table(f"model.layers.{i}", up))
    if not up.tie_word_embeddings:
        kept["lm_head.weight"] = (up.vocab_size, up.hidden_size)
    kept.update(_model_table("encoder", low, range(m)))
    dropped: dict[str, Shape] = {}
    for i in range(m, lower_layers_stored):
        dropped.update(_layer_table(f"encoder.layers.{i}", low))
    # Older transformers versions saved the RoPE frequencies, which we recompute.
    for prefix, args, count in (
        ("model", up, up.num_hidden_layers),
        ("encoder", low, lower_layers_stored),
    ):
        for i in range(count):
            dropped[f"{prefix}.layers.{i}.self_attn.rotary_emb.inv_freq"] = (head_dim(args) // 2,)
    return kept, dropped
