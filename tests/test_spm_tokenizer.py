"""The tiny SentencePiece tokenizer of the fixtures loads through mlx_lm next to our config."""

import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from mlx_lm.utils import load_tokenizer

SPM_DIR = Path(__file__).parent / "fixtures" / "spm_tokenizer"
VOCAB_SIZE = 384
SENTENCE = "I had heard that Kiyo was of a decent, well-to-do family, 10 years ago."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The two fixture files beside a config.json that transformers does not know."""
    model_dir = tmp_path_factory.mktemp("sharedllm")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SPM_DIR / name, model_dir)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "sharedllm"}))
    return load_tokenizer(model_dir)


def test_model_is_llama_style_with_384_pieces():
    sp = spm.SentencePieceProcessor(model_file=str(SPM_DIR / "tokenizer.model"))
    assert sp.vocab_size() == VOCAB_SIZE
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece(3) == "<0x00>"  # byte fallback


def test_special_ids(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.eos_token_ids == {2}


@pytest.mark.parametrize("text", [SENTENCE, "Botchan 坊っちゃん, café."])
def test_round_trip_matches_sentencepiece(tokenizer, text):
    ids = tokenizer.encode(text)
    sp = spm.SentencePieceProcessor(model_file=str(SPM_DIR / "tokenizer.model"))
    assert ids == [1, *sp.encode(text)]
    assert max(ids) < VOCAB_SIZE
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_detokenizer_streams_the_same_text(tokenizer):
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    segments = []
    for token in tokenizer.encode(SENTENCE, add_special_tokens=False):
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    assert "".join(segments) == detokenizer.text == SENTENCE


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": SENTENCE}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == f"<s>user: {SENTENCE}\nassistant:"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == 1 and ids[1] != 1  # one bos, from the template
    assert tokenizer.decode(ids) == text
