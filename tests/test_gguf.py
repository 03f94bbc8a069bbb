"""convert.gguf: llama.cpp GGUF files -> HF LLaMA config, weights and tokenizer."""

import io
import json
import random
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece as spm
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.utils import load_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mlx_sharedllm.assets import DEFAULT_GGUF, fetch
from mlx_sharedllm.convert import gguf
from mlx_sharedllm.convert.gguf import read_gguf, save_gguf_tokenizer

LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 32, 64, 4, 2, 8, 64
ROPE_THETA = 500000.0
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
LAYER_SHAPES = {
    "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj.weight": (FFN, HIDDEN),
    "mlp.up_proj.weight": (FFN, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, FFN),
    "input_layernorm.weight": (HIDDEN,),
    "post_attention_layernorm.weight": (HIDDEN,),
}

_PROSE = (
    "the quick brown fox jumps over a lazy dog while capital cities of france hold paris "
    "hello world tokens merge into bytes and sentence pieces 12345 67890 alpha beta gamma"
)
_rng = random.Random(0)
CORPUS = [" ".join(_rng.choices(_PROSE.split(), k=12)) for _ in range(400)]
TEXTS = [
    "the quick brown fox",
    "Hello world, 2024 tokens!",
    "  double  spaces\nand a newline",
    "naïve café 😀 ünicode",
]


def hf_weights(tied: bool) -> dict[str, mx.array]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in LAYER_SHAPES.items()}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    rng = np.random.default_rng(0)
    return {
        name: mx.array(
            rng.normal(0, 0.2, shape) if len(shape) == 2 else 1 + rng.normal(0, 0.1, shape),
            dtype=mx.float32,
        )
        for name, shape in shapes.items()
    }


def permute(w: mx.array, n_head: int) -> mx.array:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute of Q/K rows."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def to_gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def to_gguf(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """HF weights as llama.cpp stores them: its names, Q/K rows permuted."""
    heads = {"attn_q.weight": HEADS, "attn_k.weight": KV_HEADS}
    out = {}
    for name, w in weights.items():
        gguf_name = to_gguf_name(name)
        n_head = heads.get(gguf_name.split(".", 2)[-1])
        out[gguf_name] = w if n_head is None else permute(w, n_head)
    return out


def llama_metadata(**extra) -> dict:
    u32 = {
        "llama.block_count": LAYERS,
        "llama.context_length": 128,
        "llama.embedding_length": HIDDEN,
        "llama.feed_forward_length": FFN,
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS,
        "llama.rope.dimension_count": HEAD_DIM,
        "llama.vocab_size": VOCAB,
    }
    return {
        "general.architecture": "llama",
        **{key: mx.array(value, dtype=mx.uint32) for key, value in u32.items()},
        "llama.rope.freq_base": mx.array(ROPE_THETA),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5),
        "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": mx.array(2.0),
        **extra,
    }


def write_gguf(path: Path, tensors: dict[str, mx.array], metadata: dict) -> Path:
    mx.save_gguf(str(path), tensors, metadata)
    return path


def logits(config: dict, weights: dict[str, mx.array], ids: list[int]) -> mx.array:
    model = Model(ModelArgs.from_dict(config))
    model.load_weights(list(model.sanitize(dict(weights)).items()))
    return model(mx.array([ids]))


@pytest.mark.parametrize("tied", [True, False])
def test_read_gguf_matches_hf_weights(tmp_path, tied):
    hf = hf_weights(tied)
    path = write_gguf(tmp_path / "tiny.gguf", to_gguf(hf), llama_metadata())
    config, weights = read_gguf(path)

    assert sorted(weights) == sorted(hf)
    for name, w in hf.items():
        assert weights[name].shape == w.shape and weights[name].dtype == mx.float32, name
        assert mx.array_equal(weights[name], w), name
    k_proj = hf["model.layers.0.self_attn.k_proj.weight"]
    assert not mx.array_equal(permute(k_proj, KV_HEADS), k_proj)  # else the check is empty
    reference = {
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB,
        "rope_theta": ROPE_THETA,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tied,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    assert {key: config[key] for key in reference} == reference
    ids = [1, 5, 9, 2, 33, 60, 7]
    diff = mx.abs(logits(config, weights, ids) - logits(reference, hf, ids)).max().item()
    assert diff <= 1e-5


def test_quantized_tensors_are_dequantized(monkeypatch):
    hf = hf_weights(tied=True)
    tensors = {}
    for name, w in to_gguf(hf).items():
        if w.ndim == 1:
            tensors[name] = w
            continue
        # mx.load hands Q8_0 / Q4_x blocks over as MLX affine triples with float16 scales/biases
        bits = 8 if name == "token_embd.weight" else 4
        q, scales, biases = mx.quantize(w, group_size=32, bits=bits)
        base = name.removesuffix(".weight")
        tensors |= {
            name: q,
            f"{base}.scales": scales.astype(mx.float16),
            f"{base}.biases": biases.astype(mx.float16),
        }
    monkeypatch.setattr(mx, "load", lambda path, return_metadata: (tensors, llama_metadata()))
    monkeypatch.setattr(gguf, "check_gguf_header", lambda path: list(to_gguf(hf)))

    _, weights = read_gguf("quantized.gguf")

    assert sorted(weights) == sorted(hf)
    for name, w in hf.items():
        got = weights[name]
        assert got.shape == w.shape and got.dtype == mx.float32, name
        bits = 8 if name == "model.embed_tokens.weight" else 4
        step = (w.max() - w.min()).item() / (2**bits - 1)  # one quantization step bounds the error
        assert mx.abs(got - w).max().item() <= step, name


def test_unknown_tensor_raises(tmp_path):
    tensors = to_gguf(hf_weights(tied=True)) | {"rope_freqs.weight": mx.ones((HEAD_DIM // 2,))}
    path = write_gguf(tmp_path / "extra.gguf", tensors, llama_metadata())
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        read_gguf(path)


def test_non_llama_architecture_raises(tmp_path):
    metadata = llama_metadata() | {"general.architecture": "qwen2"}
    path = write_gguf(tmp_path / "qwen.gguf", to_gguf(hf_weights(tied=True)), metadata)
    with pytest.raises(ValueError, match="qwen2"):
        read_gguf(path)


def byte_level_reference() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@pytest.mark.parametrize("pre", ["gpt-2", "smollm"])
def test_byte_level_tokenizer(tmp_path, pre):
    reference = byte_level_reference()
    if pre == "smollm":  # SmolLM2's tokenizer.json splits digits one by one first
        reference.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), reference.pre_tokenizer]
        )
    model = json.loads(reference.to_str())["model"]
    tokens, merges = sorted(model["vocab"], key=model["vocab"].get), model["merges"]
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    metadata = llama_metadata(
        **{
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": mx.array(
                [3] * 3 + [1] * (len(tokens) - 3), dtype=mx.int32
            ),
            "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
            "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
            "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
            "tokenizer.ggml.add_bos_token": mx.array(False),
            "tokenizer.chat_template": template,
        }
    )
    path = write_gguf(tmp_path / "bpe.gguf", {"output_norm.weight": mx.ones((HIDDEN,))}, metadata)
    save_gguf_tokenizer(path, tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")

    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.chat_template == template
    for text in [*TEXTS, "<|im_start|>user\nHi 12345<|im_end|>"]:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text).ids, text
        assert tokenizer.decode(ids) == text


def test_sentencepiece_tokenizer(tmp_path):
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=proto,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    ids = range(sp.get_piece_size())
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 6 byte
    types = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in ids
    ]
    metadata = llama_metadata(
        **{
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in ids],
            "tokenizer.ggml.scores": mx.array([sp.get_score(i) for i in ids]),
            "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
            "tokenizer.ggml.bos_token_id": mx.array(sp.bos_id(), dtype=mx.uint32),
            "tokenizer.ggml.eos_token_id": mx.array(sp.eos_id(), dtype=mx.uint32),
            "tokenizer.ggml.unknown_token_id": mx.array(sp.unk_id(), dtype=mx.uint32),
        }
    )
    path = write_gguf(tmp_path / "spm.gguf", {"output_norm.weight": mx.ones((HIDDEN,))}, metadata)
    save_gguf_tokenizer(path, tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")

    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == [sp.bos_id(), *sp.encode(text)], text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.slow
def test_smollm2_says_paris(tmp_path):
    path = fetch(DEFAULT_GGUF)
    config, weights = read_gguf(path)
    save_gguf_tokenizer(path, tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    model = Model(ModelArgs.from_dict(config))
    model.load_weights(list(model.sanitize(weights).items()))

    ids = tokenizer.encode("The capital of France is")
    new = []
    for _ in range(5):
        new.append(mx.argmax(model(mx.array([ids + new]))[0, -1]).item())
    assert tokenizer.decode(new).startswith(" Paris"), tokenizer.decode(new)
