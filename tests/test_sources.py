"""Answer sources (sources.py): exact offsets, the attention profile, ranking, and the CLI."""

# ruff: noqa: F811  (pytest fixtures imported from test_generate)

import dataclasses
import io

import mlx.core as mx
import numpy as np
import pytest
from test_generate import book, invoke, loaded, spm_model  # noqa: F401  (fixtures)

from mlx_sharedllm import reread
from mlx_sharedllm.generate import encode_prompt, stream_generate, text_pieces, tokenize_pieces
from mlx_sharedllm.reread import Passage
from mlx_sharedllm.sources import (
    TextOffsets,
    document_passages,
    find_sources,
    tokenize_with_offsets,
)

TEXTS = {
    "ascii": "The keeper opened the cabinet. Nobody had read these books in years.\n" * 40,
    "utf-8": "Café naïve 日本語 — “quoted” señor Ångström ✓ ok.\n" * 40,
    "crlf": "First line of the letter,\r\nsecond line\r\n\r\nA new paragraph.\r\n" * 40,
}


def _squash(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_offsets_are_exact_through_pieces(loaded, kind):
    """Tokens as tokenize_pieces makes them, offsets into the whole text, for a text read
    in small pieces: every token span is the text its tokens decode to."""
    _, tokenizer = loaded
    text = TEXTS[kind]
    pieces = list(text_pieces(io.StringIO(text), size=100))
    assert len(pieces) > 5
    ids, offsets = tokenize_with_offsets(tokenizer, pieces)
    np.testing.assert_array_equal(ids, tokenize_pieces(tokenizer, pieces))
    assert offsets.text == text and len(offsets.starts) == len(ids) + 1
    assert np.all(np.diff(offsets.starts) >= 0) and offsets.starts[-1] == len(text)
    checked = 0
    for a in range(0, len(ids) - 20, 20):
        decoded = tokenizer.decode(ids[a : a + 20].tolist())
        if "\ufffd" in decoded:  # a span that cuts a character's bytes
            continue
        c0, c1 = offsets.chars(a, a + 20)
        assert _squash(decoded) == _squash(text[c0:c1]), (a, decoded, text[c0:c1])
        checked += 1
    assert checked >= len(ids) // 40


def test_document_passages_undo_chunk_selection(loaded):
    model, _ = loaded
    ids = np.arange(64 * 6 + 10) % 300 + 20
    tree = model.compress(mx.array(ids), mx.array([5, 6]))
    length = tree.chunk_len
    kept = [1, 4]  # the selected tree's context: chunk 1, chunk 4, then the remainder
    spans = [Passage(10, 40), Passage(length + 5, length + 20), Passage(2 * length, 2 * length + 7)]
    doc = document_passages(spans, tree, kept)
    assert doc == [Passage(length + 10, length + 40), Passage(4 * length + 5, 4 * length + 20),
                   Passage(6 * length, 6 * length + 7)]  # fmt: skip
    assert document_passages(spans, tree, None) == spans


@pytest.fixture(scope="module")
def answered(loaded, book):  # noqa: F811
    model, tokenizer = loaded
    text = book.read_text()
    responses = list(stream_generate(model, tokenizer, "Who?", text, max_tokens=2, sources=True))
    return text, responses[-1]


def test_sources_are_slices_of_the_text(answered):
    text, last = answered
    found = last.sources
    assert found is not None and len(found.sources) >= 3
    assert abs(found.profile.sum() - 1) < 1e-4 and np.all(found.profile >= 0)
    for s in found.sources:
        assert s.excerpt == text[s.excerpt_chars[0] : s.excerpt_chars[1]]
        assert s.chars[0] <= s.excerpt_chars[0] <= s.excerpt_chars[1] <= s.chars[1]
        assert s.tokens[0] <= s.excerpt_tokens[0] < s.excerpt_tokens[1] <= s.tokens[1]
        assert s.excerpt.strip()
    chunks = [s.chunk for s in found.sources]
    assert len(set(chunks)) == len(chunks)
    unread = [s for s in found.sources if not s.reread]
    assert [s.share for s in unread] == sorted((s.share for s in unread), reverse=True)


def test_reread_chunks_come_first_with_their_passage(loaded):
    model, tokenizer = loaded
    ids = (np.arange(64 * 5 + 30) * 7) % 300 + 20
    tree = model.compress(mx.array(ids), mx.array([5, 6]))
    starts = np.concatenate([[0], np.cumsum([3] * len(ids))])
    offsets = TextOffsets("abc" * len(ids), starts)
    passages = [Passage(64 * 3 + 8, 64 * 3 + 40), Passage(64 * 5 + 2, 64 * 5 + 30)]
    found = find_sources(model, tokenizer, tree, np.array([5, 6], np.int32), passages, offsets)
    first, second = found.sources[:2]
    assert (first.chunk, first.reread, first.excerpt_tokens) == (5, True, (322, 350))
    assert first.share == 0.0 and first.tokens == (320, len(ids))  # the remainder: no entries
    assert (second.chunk, second.excerpt_tokens, second.chars) == (3, (200, 232), (576, 768))
    assert all(not s.reread for s in found.sources[2:])


def test_offsets_of_another_text_are_refused(loaded):
    model, tokenizer = loaded
    ids = np.arange(64 * 2) % 300 + 20
    tree = model.compress(mx.array(ids), mx.array([5]))
    wrong = TextOffsets("x" * 10, np.arange(11))
    with pytest.raises(ValueError, match="not of the same text"):
        find_sources(model, tokenizer, tree, np.array([5], np.int32), (), wrong)


def test_no_sources_cost_nothing(loaded, book, monkeypatch):  # noqa: F811
    """Without sources, no extra pass over the tree (re-reading off)."""
    model, tokenizer = loaded
    calls = []
    monkeypatch.setattr(
        "mlx_sharedllm.sources.attention_profile", lambda *a: calls.append(1) or None
    )
    text, no_reread = book.read_text(), dataclasses.replace(model.settings, reread_tokens=0)
    plain = list(stream_generate(model, tokenizer, "Who?", text, max_tokens=2, settings=no_reread))
    assert plain[-1].sources is None and not calls
    asked = list(
        stream_generate(
            model, tokenizer, "Who?", text, max_tokens=2, settings=no_reread, sources=True
        )
    )
    assert asked[-1].sources is not None and calls == [1]


def test_sources_reuse_the_rereading_pass(loaded, book, monkeypatch):  # noqa: F811
    """With re-reading on and every chunk read, the heads' attention over the tree is read
    once (re-reading's pass serves the sources too), and the sources are those that a
    pass of their own finds."""
    model, tokenizer = loaded
    text, question = book.read_text(), "Who walked to school?"
    rereading = dataclasses.replace(model.settings, reread_tokens=256, chunks_per_question=0)
    calls, real = [], reread.attention_profile

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for module in ("generate", "reread", "selection", "sources"):
        monkeypatch.setattr(f"mlx_sharedllm.{module}.attention_profile", counted, raising=False)
    options = dict(max_tokens=2, settings=rereading, sources=True)
    last = list(stream_generate(model, tokenizer, question, text, **options))[-1]
    assert last.passages and calls == [1]
    ids, offsets = tokenize_with_offsets(tokenizer, [text])
    prompt_ids = encode_prompt(tokenizer, question)
    tree = model.compress(mx.array(ids), mx.array(prompt_ids), settings=rereading)
    running = np.concatenate([np.array(tree.remainder), prompt_ids]).astype(np.int32)
    own = find_sources(model, tokenizer, tree, running, last.passages, offsets, settings=rereading)
    assert last.sources.sources == own.sources and len(calls) == 2
    np.testing.assert_array_equal(last.sources.profile, own.profile)


def test_profile_is_the_heads_mean_share(loaded, answered):
    model, tokenizer = loaded
    text, last = answered
    ids, _ = tokenize_with_offsets(tokenizer, [text])
    tree = model.compress(mx.array(ids), mx.array([5]))
    entries = reread.attention_profile(model, tree, np.array([5], np.int32))
    expected = entries.reshape(len(entries), tree.n_chunks, -1).sum(-1).mean(0)
    found = find_sources(model, tokenizer, tree, np.array([5], np.int32))
    np.testing.assert_allclose(found.profile, expected, atol=1e-6)


def _source_lines(output: str) -> list[str]:
    lines = output.splitlines()
    return lines[lines.index("sources:") + 1 :]


def test_cli_sources_quote_the_file(spm_model, book):
    args = ("--model", str(spm_model), "--file", str(book), "--prompt", "Who?")
    result = invoke(*args, "--max-tokens", "2", "--sources")
    assert result.exit_code == 0, result.output
    lines = _source_lines(result.stdout)
    assert len(lines) >= 3 and lines[0].startswith("[1] chars ")
    flat = " ".join(book.read_text().split())
    for line in lines:
        excerpt = line.split('): "', 1)[1].rstrip('"').removesuffix("...")
        assert excerpt in flat
    assert result.stderr.strip().splitlines()[-1].startswith("context ")
    plain = invoke(*args, "--max-tokens", "2")
    assert "sources:" not in plain.stdout


def test_cli_sources_from_a_saved_tree_give_token_offsets(spm_model, book, tmp_path):
    saved = tmp_path / "book.tree"
    args = ("--model", str(spm_model), "--prompt", "Who?", "--max-tokens", "2")
    assert invoke(*args, "--file", str(book), "--save-context", str(saved)).exit_code == 0
    result = invoke(*args, "--context", str(saved), "--sources")
    assert result.exit_code == 0, result.output
    assert _source_lines(result.stdout)[0].startswith("[1] tokens ")
    both = invoke(*args, "--context", str(saved), "--file", str(book), "--sources")
    assert both.exit_code == 0, both.output
    fresh = invoke(*args, "--file", str(book), "--sources")
    assert _source_lines(both.stdout) == _source_lines(fresh.stdout)
    assert _source_lines(both.stdout)[0].startswith("[1] chars ")
    other = tmp_path / "other.txt"
    other.write_text(book.read_text().replace("the", "a"))
    wrong = invoke(*args, "--context", str(saved), "--file", str(other), "--sources")
    assert wrong.exit_code == 1 and "Error:" in wrong.output
    unasked = invoke(*args, "--context", str(saved), "--file", str(book))
    assert unasked.exit_code == 1 and "both only with --sources" in unasked.output


def test_cli_sources_map(spm_model, book, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "map.png"
    args = ("--model", str(spm_model), "--file", str(book), "--prompt", "Who?")
    result = invoke(*args, "--max-tokens", "2", "--sources-map", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sources:" in result.stdout and f"wrote the sources map to {png}" in result.stderr


def test_cli_sources_map_without_matplotlib(spm_model, book, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    args = ("--model", str(spm_model), "--file", str(book), "--prompt", "Who?")
    result = invoke(*args, "--max-tokens", "2", "--sources-map", str(tmp_path / "m.png"))
    assert result.exit_code == 1 and "--sources-map needs matplotlib" in result.output
