"""What a checkpoint of the released SharedLLM code looks like: its config and weight names."""

from __future__ import annotations

from typing import Any

from mlx_lm.models.llama import ModelArgs as LlamaArgs

from ..config import SharedLLMConfig, head_dim
from ..settings import Settings
from .tables import ConversionError, Shape, injection_table, layer_table, model_table


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
        chunk_len=chunk_len,
        layout="reference",
    )


def settings_from_released(hf: dict[str, Any]) -> Settings:
    """The tree settings a checkpoint of the released code was trained with (SPEC
    section 6)."""
    return Settings.from_dict(
        {
            "tree_depth": int(hf.get("segment_tree_depth", 3)),
            "last_p": hf.get("last_p", 32),
            "policy": "query" if hf.get("do_retrieval", True) else "right",
        }
    )


def weight_table(
    cfg: SharedLLMConfig, lower_layers_stored: int
) -> tuple[dict[str, Shape], dict[str, Shape]]:
    """(kept, dropped): every weight name the released code saves, with its shape.

    Kept names are identical in our model and all required. Dropped names may be
    present: the lower model's layers from M up, which never run, and RoPE buffers.
    """
    up, low, m = cfg.upper, cfg.lower, cfg.num_injection_layers
    kept = model_table("model", up, range(up.num_hidden_layers))
    for i in range(m):
        kept.update(injection_table(f"model.layers.{i}", up))
    if not up.tie_word_embeddings:
        kept["lm_head.weight"] = (up.vocab_size, up.hidden_size)
    kept.update(model_table("encoder", low, range(m)))
    dropped: dict[str, Shape] = {}
    for i in range(m, lower_layers_stored):
        dropped.update(layer_table(f"encoder.layers.{i}", low))
    # Older transformers versions saved the RoPE frequencies, which we recompute.
    for prefix, args, count in (
        ("model", up, up.num_hidden_layers),
        ("encoder", low, lower_layers_stored),
    ):
        for i in range(count):
            dropped[f"{prefix}.layers.{i}.self_attn.rotary_emb.inv_freq"] = (head_dim(args) // 2,)
    return kept, dropped
