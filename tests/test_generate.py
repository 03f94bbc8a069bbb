"""`generate`: the Python API for apps, saved context trees, and the CLI with its errors."""

import random
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SPM_TOKENIZER, convert_case

from mlx_sharedllm import ContextTree, load, load_context
from mlx_sharedllm.cli.main import cli
from mlx_sharedllm.generate import encode_prompt, generate, prepare_context, stream_generate

WORDS = [
    "the",
    "old",
    "man",
    "walked",
    "to",
    "school",
    "and",
    "the",
    "teacher",
    "said",
    "nothing",
    "while",
    "rain",
    "fell",
    "on",
    "the",
    "river",
    "town",
    "every",
    "morning",
    "before",
    "the",
    "bell",
    "rang",
]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A converted fixture checkpoint (chunks of 64) with a SentencePiece tokenizer."""
    out = tmp_path_factory.mktemp("spm") / "model"
    convert_case("n1_gqa", out, "--dtype", "float32", "--chunk-len", "64")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SPM_TOKENIZER / name, out / name)
    return out


@pytest.fixture(scope="module")
def loaded(spm_model):
    return load(spm_model)


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choices(WORDS, k=15)) + "." for _ in range(120))
    path = tmp_path_factory.mktemp("book") / "book.txt"
    path.write_text(text)
    return path


def invoke(*args, input=None):
    return CliRunner().invoke(cli, ["generate", *args], input=input)


def test_no_token_is_lost(loaded):
    model, tokenizer = loaded
    ids = np.arange(64 * 5 + 17) % 384
    prompt = np.array([5, 6, 7], np.int32)
    prepared = prepare_context(model, tokenizer, ids, prompt)
    assert prepared.tree.n_chunks == 5
    assert list(prepared.running) == list(ids[320:]) + [5, 6, 7]
    assert prepared.stats["context_tokens"] == len(ids)
    short = prepare_context(model, tokenizer, ids[:40], prompt)
    assert short.tree is None and list(short.running) == list(ids[:40]) + [5, 6, 7]


def test_context_as_text_tokens_or_tree_gives_the_same_answer(loaded, book, tmp_path):
    model, tokenizer = loaded
    text = book.read_text()
    prompt = "Who walked to school?"
    by_text = generate(model, tokenizer, prompt, text, max_tokens=8)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert generate(model, tokenizer, prompt, ids, max_tokens=8) == by_text
    prompt_ids = tokenizer.encode(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
    )
    tree = model.compress(mx.array(ids), mx.array(prompt_ids))
    tree.save(tmp_path / "book.tree")
    again = load_context(tmp_path / "book.tree", model)
    assert generate(model, tokenizer, prompt, again, max_tokens=8) == by_text


def test_a_conversation_is_never_read_as_token_ids(loaded, book):
    """A prompt that holds a dict is a conversation: its messages must be string roles
    and contents, and one must be the user's (the question); else a ValueError that says
    so, before any context is compressed."""
    model, tokenizer = loaded
    asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"}]
    assert np.array_equal(encode_prompt(tokenizer, tuple(asked)), encode_prompt(tokenizer, asked))
    refused = [
        ([{"role": "system", "content": "Be brief."}], "no user message"),
        ([{"role": "assistant", "content": "It was"}], "no user message"),
        ([{"role": "user"}], "message 0 "),
        ([5, {"role": "user", "content": "Who?"}], "message 0 "),
        ([*asked, {"role": "assistant", "content": None}], "message 2 "),
    ]
    for prompt, message in refused:
        with pytest.raises(ValueError, match=message):
            encode_prompt(tokenizer, prompt)
    with pytest.raises(ValueError, match="no user message"):
        generate(model, tokenizer, asked[:1], book.read_text(), max_tokens=2)


def test_stream_reports_stats_and_progress(loaded, book):
    model, tokenizer = loaded
    seen = []
    responses = list(
        stream_generate(
            model,
            tokenizer,
            "Tell me.",
            book.read_text(),
            max_tokens=5,
            progress=lambda stage, done, total: seen.append((stage, done, total)),
        )
    )
    last = responses[-1]
    assert last.chunks > 0 and last.tree_entries == last.chunks * 16
    assert last.context_tokens >= last.chunks * 64 and last.compress_tps > 0
    assert last.generation_tokens == 5 and last.finish_reason == "length"
    compress = [s for s in seen if s[0] == "compress"]
    assert compress[0][1] == 0 and compress[-1][1] == compress[-1][2] == last.chunks
    assert any(s[0] == "tokenize" for s in seen)


def test_saved_tree_round_trips_exactly(loaded, tmp_path):
    model, _ = loaded
    rng = np.random.default_rng(0)
    tree = model.compress(mx.array(rng.integers(0, 384, 64 * 3 + 9)), mx.array([1, 2, 3]))
    tree.save(tmp_path / "t.safetensors")
    back = load_context(tmp_path / "t.safetensors", model)
    for a, b in zip(
        tree.keys + tree.values + [tree.remainder], back.keys + back.values + [back.remainder]
    ):
        assert a.dtype == b.dtype and np.array_equal(np.array(a), np.array(b))
    assert (back.n_chunks, back.entries_per_chunk, back.query_position, back.meta) == (
        tree.n_chunks,
        tree.entries_per_chunk,
        tree.query_position,
        tree.meta,
    )


def test_saved_tree_refuses_another_model_and_corrupt_files(loaded, tmp_path):
    model, _ = loaded
    tree = model.compress(mx.array(np.arange(128) % 384), mx.array([1, 2, 3]))
    tree.save(tmp_path / "t.safetensors")
    other, _ = load(convert_case("n4_mha", tmp_path / "other", "--chunk-len", "64"))
    with pytest.raises(ValueError, match="different model"):
        load_context(tmp_path / "t.safetensors", other)
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable context tree"):
        ContextTree.load(tmp_path / "bad.safetensors")
    (tmp_path / "junk").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable context tree"):
        load_context(tmp_path / "junk", model)


def test_cli_generates_from_a_file(spm_model, book):
    result = invoke(
        "--model",
        str(spm_model),
        "--file",
        str(book),
        "--prompt",
        "Who?",
        "--max-tokens",
        "6",
        "--seed",
        "1",
        "--temp",
        "0.7",
        "--top-p",
        "0.9",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    stats = result.stderr.strip().splitlines()[-1]
    assert "chunks" in stats and "tree entries" in stats and "peak memory" in stats
    assert "compressing" in result.stderr


def test_cli_reads_stdin_and_prompt_file(spm_model, book, tmp_path):
    (tmp_path / "q.txt").write_text("What fell on the river?")
    result = invoke(
        "--model",
        str(spm_model),
        "--file",
        "-",
        "--prompt-file",
        str(tmp_path / "q.txt"),
        "--max-tokens",
        "4",
        "--no-chat-template",
        input=book.read_text(),
    )
    assert result.exit_code == 0, result.output
    assert " chunks" in result.stderr


def _one_line_error(result, text):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and text in errors[0], result.output


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
        ("caf\xe9 ol\xe9 ".encode("latin-1") * 50, "--encoding"),
    ],
)
def test_cli_bad_files(spm_model, tmp_path, content, message):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    result = invoke("--model", str(spm_model), "--file", str(path), "--prompt", "Hi")
    _one_line_error(result, message)


def test_cli_latin1_file_works_with_encoding(spm_model, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 ol\xe9 ".encode("latin-1") * 50)
    result = invoke(
        "--model",
        str(spm_model),
        "--file",
        str(path),
        "--prompt",
        "Hi",
        "--encoding",
        "latin-1",
        "--max-tokens",
        "2",
    )
    assert result.exit_code == 0, result.output


def test_cli_prompt_longer_than_the_window(spm_model):
    result = invoke("--model", str(spm_model), "--prompt", "the river " * 400)
    _one_line_error(result, "longer than the model's window (512)")


def test_cli_unknown_model(tmp_path):
    _one_line_error(invoke("--model", str(tmp_path / "nothing"), "--prompt", "Hi"), "unknown model")
    (tmp_path / "empty").mkdir()
    _one_line_error(invoke("--model", str(tmp_path / "empty"), "--prompt", "Hi"), "no config.json")


def test_cli_missing_or_corrupt_weights(spm_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(spm_model, broken)
    (broken / "model.safetensors").unlink()
    _one_line_error(invoke("--model", str(broken), "--prompt", "Hi"), "cannot load the model")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    _one_line_error(invoke("--model", str(broken), "--prompt", "Hi"), "cannot load the model")


def test_cli_needs_a_prompt(spm_model, book):
    _one_line_error(invoke("--model", str(spm_model), "--file", str(book)), "give a prompt")


def test_ctrl_c_stops_cleanly(spm_model, book, monkeypatch):
    from mlx_sharedllm.cli import generate_cli

    def interrupted(*args, **kwargs):
        yield from ()
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_cli, "stream_generate", interrupted)
    result = invoke("--model", str(spm_model), "--file", str(book), "--prompt", "Hi")
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "Traceback" not in result.output


@pytest.mark.slow
def test_default_model_answers_about_the_book():
    """The README's first command: the embedded SmolLM2 default on Botchan."""
    from mlx_sharedllm.assets import BOTCHAN, fetch

    result = invoke(
        "--file", str(fetch(BOTCHAN)), "--prompt", "Who is the narrator?", "--max-tokens", "12"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    stats = result.stderr.strip().splitlines()[-1]
    assert stats.startswith("context ") and "68 chunks" in stats
    # The shipped adapter is fused in: no untrained-injection note.
    assert "untrained" not in result.stderr


@pytest.mark.slow
def test_the_default_model_is_found_from_python_and_the_cli():
    from mlx_sharedllm import load
    from mlx_sharedllm.cli.main import cli
    from mlx_sharedllm.default import adapter_version, default_model

    folder = default_model(progress=False)
    assert folder.name.endswith(adapter_version())
    printed = CliRunner().invoke(cli, ["default-model"])
    assert printed.exit_code == 0 and printed.stdout.strip() == str(folder)
    model, tokenizer = load()
    assert tokenizer is not None and model.settings.reread_tokens == 512
    assert model.fingerprint() == load("default")[0].fingerprint() == load(folder)[0].fingerprint()


def test_cli_refuses_a_plan_that_does_not_fit(spm_model, book, monkeypatch):
    from mlx_sharedllm import plan_render
    from mlx_sharedllm.plan import MemoryBudget

    budget = MemoryBudget(1 << 20, "test budget")
    monkeypatch.setattr(plan_render, "memory_budget", lambda: budget)
    args = ("--model", str(spm_model), "--file", str(book), "--prompt", "Hi", "--max-tokens", "2")
    refused = invoke(*args)
    assert refused.exit_code != 0 and "--force" in refused.output
    assert "tree cache" in refused.output and "Traceback" not in refused.output
    assert invoke(*args, "--force").exit_code == 0
