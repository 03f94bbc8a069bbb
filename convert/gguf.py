"""Read LLaMA-architecture GGUF files (as llama.cpp writes them) into Hugging Face LLaMA form.

Tensors and metadata come from ``mx.load``, so no torch and no ``gguf`` package is needed; the
header is checked first (``gguf_header``), and the metadata after. The weights get HF names and
dtypes, Q/K rows go back to HF order, and the tokenizer is rebuilt from the ``tokenizer.ggml.*``
metadata with the ``tokenizers`` library. Every problem with the file is one ``CheckpointError``
line naming it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from .files import CheckpointError
from .gguf_header import check_gguf_header

__all__ = ["read_gguf", "save_gguf_tokenizer"]

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_REQUIRED_KEYS = (
    "llama.embedding_length",
    "llama.block_count",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.context_length",
)
# optional and required llama.* metadata, by the kind of value it must hold
_COUNTS = (
    "llama.embedding_length",
    "llama.block_count",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.rope.dimension_count",
    "llama.context_length",
    "llama.vocab_size",
    "llama.rope.scaling.original_context_length",
)
_REALS = (
    "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.freq_base",
    "llama.rope.scaling.factor",
)
_MAX_COUNT = 2**31 - 1  # MLX shapes are int32
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
_FLAGS = ("add_bos_token", "add_eos_token", "add_space_prefix")
# every block type mx.load returns quantized (Q4_0, Q4_1, Q8_0) packs 32 values per block
_GROUP_SIZE = 32

# llama.cpp token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regexes (applied in turn) that split text before byte-level BPE, as
# in llama.cpp's llama-vocab.cpp; the file holds only this name, not the regexes
_BYTE_LEVEL_SPLITS = {
    "gpt-2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
}


def read_gguf(
    path: str | Path, dtype: mx.Dtype | None = mx.float32
) -> tuple[dict, dict[str, mx.array]]:
    """(hf_config, weights) for a LLaMA GGUF file. weights use HF names:
    model.embed_tokens.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
    model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.layers.{i}.input_layernorm.weight,
    model.layers.{i}.post_attention_layernorm.weight, model.norm.weight, and lm_head.weight
    only when the file has output.weight (else hf_config['tie_word_embeddings'] = True).
    Quantized tensors (Q4_0/Q4_1/Q8_0, which mx.load returns as MLX affine weight/scales/biases)
    are dequantized with mx.dequantize and cast to `dtype` (None keeps float tensors as stored)."""
    path = Path(path)
    with _naming(path):
        tensors, metadata = _load(path)
        config = _hf_config(metadata, tensors)
        heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
        weights = {}
        for name, weight in _dequantized(tensors, dtype).items():
            n_head = heads.get(name.split(".")[-2])
            weights[_hf_name(name)] = weight if n_head is None else _unpermute(name, weight, n_head)
    mx.eval(weights)
    return config, weights


def save_gguf_tokenizer(path: str | Path, out_dir: str | Path) -> None:
    """Write the tokenizer stored in the GGUF file to out_dir as HF tokenizer files
    (tokenizer.json + tokenizer_config.json, incl. chat_template if the GGUF has one and
    bos/eos tokens), so that mlx_lm.utils.load_tokenizer(out_dir) loads it."""
    path = Path(path)
    with _naming(path):
        _, metadata = _load(path)
        if "tokenizer.ggml.model" not in metadata:
            raise CheckpointError("has no tokenizer (no tokenizer.ggml.model metadata)")
        tokenizer = _tokenizer(metadata)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = json.dumps(_tokenizer_config(metadata), indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Prefix the file's name to the CheckpointErrors raised inside."""
    try:
        yield
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _load(path: Path) -> tuple[dict[str, mx.array], dict]:
    """Tensors and metadata (scalars as Python values) of a LLaMA GGUF file, checked."""
    names = check_gguf_header(path)
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"unreadable GGUF file ({e})") from None
    metadata = {
        key: _scalar(value) if isinstance(value, mx.array) and value.ndim == 0 else value
        for key, value in metadata.items()
    }
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or architecture != "llama":
        raise CheckpointError(
            f"unsupported GGUF architecture {architecture!r:.50}: only 'llama' is read"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise CheckpointError(f"lacks metadata {missing}")
    for name in names:
        _hf_name(name)  # before _dequantized could take a stored "x.scales" for a quantized x's
    if "tokenizer.ggml.model" in metadata:
        _check_tokenizer(metadata)
    return tensors, metadata


def _check_model_metadata(md: dict, tensors: dict[str, mx.array]) -> None:
    """Refuse llama.* values the config cannot be built from."""
    if "token_embd.weight" not in tensors:
        raise CheckpointError("lacks the token_embd.weight tensor")
    for key in _COUNTS:
        value = md.get(key, 1)
        if type(value) is not int or not 0 < value <= _MAX_COUNT:
            raise CheckpointError(f"metadata {key} is {value!r:.50}, not a positive integer")
    for key in _REALS:
        value = md.get(key, 1.0)
        if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
            raise CheckpointError(f"metadata {key} is {value!r:.50}, not a positive number")
    scaling = md.get("llama.rope.scaling.type", "none")
    if not isinstance(scaling, str):
        raise CheckpointError("metadata llama.rope.scaling.type is not a string")
    if scaling != "none" and "llama.rope.scaling.factor" not in md:
        raise CheckpointError(
            f"metadata llama.rope.scaling.type is {scaling!r:.50} without a factor"
        )
    hidden, heads = md["llama.embedding_length"], md["llama.attention.head_count"]
    if heads % md.get("llama.attention.head_count_kv", heads):
        raise CheckpointError(f"head_count {heads} is not a multiple of head_count_kv")
    if "llama.attention.key_length" not in md and hidden % heads:
        raise CheckpointError(f"embedding_length {hidden} is not a multiple of head_count {heads}")
    # each block has its own tensors; more blocks than tensors would only build huge tables
    if md["llama.block_count"] > len(tensors):
        raise CheckpointError(
            f"block_count {md['llama.block_count']} exceeds its {len(tensors)} tensors"
        )


def _scalar(value: mx.array) -> bool | int | float:
    """A 0-d metadata array as a Python value; float32s at their shortest decimal (1e-05, not
    9.999999747378752e-06), as the HF config they came from spelled them."""
    if value.dtype == mx.float32:
        return float(str(np.float32(value.item())))
    return value.item()


def _hf_config(md: dict, tensors: dict[str, mx.array]) -> dict:
    """An HF LlamaConfig dict (as mlx-lm's llama ModelArgs reads it) from llama.* metadata."""
    _check_model_metadata(md, tensors)
    hidden, heads = md["llama.embedding_length"], md["llama.attention.head_count"]
    head_dim = md.get("llama.attention.key_length", hidden // heads)
    if md.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError("rope.dimension_count != head_dim: partial RoPE is not supported")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": md["llama.block_count"],
        "intermediate_size": md["llama.feed_forward_length"],
        "num_attention_heads": heads,
        "num_key_value_heads": md.get("llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": md["llama.attention.layer_norm_rms_epsilon"],
        "vocab_size": md.get("llama.vocab_size") or tensors["token_embd.weight"].shape[0],
        "rope_theta": md.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": md["llama.context_length"],
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if md.get("llama.rope.scaling.type", "none") != "none":
        config["rope_scaling"] = {
            "type": md["llama.rope.scaling.type"],
            "factor": md["llama.rope.scaling.factor"],
        }
        if "llama.rope.scaling.original_context_length" in md:
            original = md["llama.rope.scaling.original_context_length"]
            config["rope_scaling"]["original_max_position_embeddings"] = original
    for name in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{name}" in md:
            config[name] = md[f"tokenizer.ggml.{name}"]
    return config


def _hf_name(name: str) -> str:
    """The HF LLaMA name of a llama.cpp tensor name."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if match and match[2] in _LAYER_NAMES:
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.weight"
    base = name.removesuffix(".weight")
    if base != name and base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.weight"
    raise CheckpointError(f"unknown GGUF tensor {name!r:.100}: no Hugging Face LLaMA name for it")


def _dequantized(tensors: dict[str, mx.array], dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """Tensors by GGUF name, quantized ones (weight + .scales/.biases) dequantized."""
    out = {}
    for name, weight in tensors.items():
        base, _, kind = name.rpartition(".")
        if kind in ("scales", "biases") and f"{base}.weight" in tensors:
            continue
        if f"{base}.scales" in tensors:
            if weight.ndim < 2:  # llama.cpp quantizes only matrices; mx.dequantize needs one
                raise CheckpointError(f"{name} is quantized but has one dimension")
            scales = tensors[f"{base}.scales"]
            # scale/bias in the target dtype, so float32 results are not rounded through float16
            target = dtype or scales.dtype
            weight = mx.dequantize(
                weight,
                scales.astype(target),
                tensors[f"{base}.biases"].astype(target),
                group_size=_GROUP_SIZE,
                bits=weight.shape[-1] // scales.shape[-1],  # 32-bit words per 32-value group
            )
        out[name] = weight if dtype is None else weight.astype(dtype)
    return out


def _unpermute(name: str, weight: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's per-head Q/K row interleave, for HF's rotate-half RoPE."""
    if weight.ndim != 2 or weight.shape[0] % (2 * n_head):
        raise CheckpointError(f"{name} of shape {weight.shape} does not split into {n_head} heads")
    rows, cols = weight.shape
    halves = weight.reshape(n_head, rows // n_head // 2, 2, cols)
    return halves.swapaxes(1, 2).reshape(rows, cols)


def _tokenizer(md: dict) -> Tokenizer:
    """A `tokenizers` Tokenizer from the tokenizer.ggml.* metadata."""
    kind = md.get("tokenizer.ggml.model")
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"].tolist()
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(md, tokens)
    else:
        tokenizer = _sentencepiece_bpe(md, tokens, types)
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types)
            if k in (_UNKNOWN, _CONTROL)
        ]
    )
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    )
    post_processor = _post_processor(md, tokens)
    if post_processor is not None:
        tokenizer.post_processor = post_processor
    return tokenizer


def _check_tokenizer(md: dict) -> None:
    """Refuse tokenizer.ggml.* values that would make building the tokenizer fail (or panic, as
    the tokenizers library does on a merge whose result is not a token)."""
    kind = md["tokenizer.ggml.model"]
    if not isinstance(kind, str) or kind not in ("gpt2", "llama"):
        raise CheckpointError(f"unsupported tokenizer model {kind!r:.50}: only 'gpt2' and 'llama'")
    tokens = md.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError("tokenizer.ggml.tokens is not a list of strings")
    _check_per_token(md, "token_type", mx.integer, len(tokens))
    if kind == "llama":
        _check_per_token(md, "scores", mx.floating, len(tokens))
    for key in _TOKEN_IDS:
        value = md.get(f"tokenizer.ggml.{key}", 0)
        if type(value) is not int or not 0 <= value < len(tokens):
            raise CheckpointError(
                f"tokenizer.ggml.{key} {value!r:.50} is not one of the {len(tokens)} token ids"
            )
    for key in _FLAGS:
        if not isinstance(md.get(f"tokenizer.ggml.{key}", False), bool):
            raise CheckpointError(f"tokenizer.ggml.{key} is not a bool")
    add_bos = md.get("tokenizer.ggml.add_bos_token", kind == "llama")
    for needed, key in (
        (add_bos, "bos_token_id"),
        (md.get("tokenizer.ggml.add_eos_token"), "eos_token_id"),
    ):
        if needed and f"tokenizer.ggml.{key}" not in md:
            raise CheckpointError(f"tokenizer adds a token but has no tokenizer.ggml.{key}")
    if not isinstance(md.get("tokenizer.chat_template", ""), str):
        raise CheckpointError("tokenizer.chat_template is not a string")
    if kind == "gpt2":
        _check_byte_level(md, set(tokens))


def _check_per_token(md: dict, key: str, kind: mx.DtypeCategory, n_tokens: int) -> None:
    value = md.get(f"tokenizer.ggml.{key}")
    if not (
        isinstance(value, mx.array)
        and value.shape == (n_tokens,)
        and mx.issubdtype(value.dtype, kind)
    ):
        raise CheckpointError(f"tokenizer.ggml.{key} is not an array with one value per token")


def _check_byte_level(md: dict, vocab: set[str]) -> None:
    pre = md.get("tokenizer.ggml.pre")
    if not isinstance(pre, str) or pre not in _BYTE_LEVEL_SPLITS:
        raise CheckpointError(
            f"unsupported pre-tokenizer {pre!r:.50}: supported {sorted(_BYTE_LEVEL_SPLITS)}"
        )
    merges = md.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise CheckpointError("tokenizer.ggml.merges is not a list of strings")
    for merge in merges:
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2 or not {*parts, "".join(parts)} <= vocab:
            raise CheckpointError(f"merge {merge!r:.100} is not two tokens that make a token")


def _byte_level_bpe(md: dict, tokens: list[str]) -> Tokenizer:
    """GPT-2 style byte-level BPE: the file lists merges, tokens already in byte alphabet."""
    pre = md["tokenizer.ggml.pre"]
    merges = [tuple(merge.split(" ")) for merge in md["tokenizer.ggml.merges"]]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _BYTE_LEVEL_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(md: dict, tokens: list[str], types: list[int]) -> Tokenizer:
    """SentencePiece BPE with byte fallback, laid out like HF's LlamaTokenizerFast."""
    vocab = {token: i for i, token in enumerate(tokens)}
    unk = tokens[md.get("tokenizer.ggml.unknown_token_id", 0)]
    merges = _sentencepiece_merges(tokens, types, md["tokenizer.ggml.scores"].tolist(), vocab)
    tokenizer = Tokenizer(
        models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    prefix = md.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    return tokenizer


def _sentencepiece_merges(
    tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """SentencePiece GGUFs list no merges: every split of a normal token into two vocab pieces,
    ranked by the token's score, the order in which llama.cpp's SPM tokenizer merges."""
    ranked = [
        (-score, vocab[token], token[:i], token[i:])
        for token, kind, score in zip(tokens, types, scores)
        if kind == _NORMAL
        for i in range(1, len(token))
        if token[:i] in vocab and token[i:] in vocab
    ]
    return [(left, right) for *_, left, right in sorted(ranked)]


def _post_processor(md: dict, tokens: list[str]) -> processors.TemplateProcessing | None:
    """BOS/EOS insertion as the file's add_bos/add_eos flags say (llama.cpp's defaults)."""
    add_bos = md.get("tokenizer.ggml.add_bos_token", md["tokenizer.ggml.model"] == "llama")
    bos = [md["tokenizer.ggml.bos_token_id"]] if add_bos else []
    eos = [md["tokenizer.ggml.eos_token_id"]] if md.get("tokenizer.ggml.add_eos_token") else []
    if not bos + eos:
        return None

    def template(sequence: str) -> str:
        return " ".join([tokens[i] for i in bos] + [sequence] + [tokens[i] for i in eos])

    return processors.TemplateProcessing(
        single=template("$A"),
        pair=f"{template('$A')} {template('$B:1')}",
        special_tokens=[(tokens[i], i) for i in bos + eos],
    )


def _tokenizer_config(md: dict) -> dict:
    """tokenizer_config.json: special tokens and chat template; tokenizer.json does the rest."""
    tokens = md["tokenizer.ggml.tokens"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        if f"tokenizer.ggml.{key}" in md:
            config[name] = tokens[md[f"tokenizer.ggml.{key}"]]
    if "tokenizer.chat_template" in md:
        config["chat_template"] = md["tokenizer.chat_template"]
    return config
