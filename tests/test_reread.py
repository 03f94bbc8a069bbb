"""Re-reading: candidate passages, the two rankings and their fusion, the budget, the tree's
tokens, and generate's running text."""

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
from test_generate import book, loaded, spm_model  # noqa: F401  (fixtures)
from test_long_trees import movable_model

from mlx_sharedllm.adapters import load_adapter, save_adapter
from mlx_sharedllm.distractors import arrange
from mlx_sharedllm.generate import (
    REREAD_MESSAGE,
    encode_prompt,
    generate,
    reread_passages,
    stream_generate,
)
from mlx_sharedllm.reread import (
    REREAD_SEPARATOR,
    Passage,
    candidates,
    choose,
    choose_passages,
    combine,
    focus,
    lexical_scores,
    question_words,
    reread_text,
    stems_of,
    token_terms,
    tokens_in_order,
)
from mlx_sharedllm.selection import keep_chunks
from mlx_sharedllm.settings import PASSAGE_TOKENS, Settings
from mlx_sharedllm.tree import ContextTree

RUNNING = np.array([1, 2, 3], np.int32)


def _tree(model, n=6, seed=0, rare=None):
    tokens = np.random.default_rng(seed).integers(13, 48, n * 64 + 5).astype(np.int32)
    if rare is not None:  # words found nowhere else, at this place
        tokens[rare : rare + 4] = [60, 61, 62, 63]
    return model.compress(mx.array(tokens), mx.array(RUNNING)), tokens


def _words(ids):
    """A fake tokenizer's words: token t is the word 'w{t}', tokens 0-12 are punctuation."""
    return ["" if t < 13 else f"w{t}" for t in np.asarray(ids).tolist()]


def test_the_tree_keeps_its_tokens_through_save_selection_and_arrangement(tmp_path):
    model = movable_model()
    tree, tokens = _tree(model)
    n = tree.n_chunks
    assert np.array_equal(np.array(tree.tokens), tokens[: n * 64].reshape(n, 64))
    tree.save(tmp_path / "t.tree")
    assert np.array_equal(
        np.array(ContextTree.load(tmp_path / "t.tree").tokens), tokens[: n * 64].reshape(n, 64)
    )
    kept = keep_chunks(tree, [1, 4])
    assert np.array_equal(np.array(kept.tokens), np.array(tree.tokens)[[1, 4]])
    moved = arrange(model, [(tree, 3), (tree, 0)])
    assert np.array_equal(np.array(moved.tokens), np.array(tree.tokens)[[3, 0]])


def test_candidates_are_token_windows_where_entries_are_tokens_else_chunks():
    model = movable_model()
    tree, _ = _tree(model, n=6)
    assert tokens_in_order(tree)
    starts, ends, bounds = candidates(tree)
    total = 6 * 64
    assert np.all(ends - starts == PASSAGE_TOKENS) and ends[-1] == total
    assert np.all(np.diff(starts) <= PASSAGE_TOKENS // 2)
    assert np.array_equal(bounds, np.stack([starts, ends]))
    coarse = dataclasses.replace(tree, meta={**tree.meta, "config": {"tree_depth": 3}})
    starts, ends, bounds = candidates(coarse)
    assert np.array_equal(starts, np.arange(6) * 64) and np.array_equal(ends, starts + 64)
    t = tree.entries_per_chunk
    assert np.array_equal(bounds, np.stack([np.arange(6) * t, np.arange(1, 7) * t]))


def test_lexical_ranking_finds_the_passage_with_the_questions_rare_words():
    rng = np.random.default_rng(0)
    context = rng.integers(13, 40, 1000)
    context[700:703] = [90, 91, 92]  # the question's rare words, once in the text
    starts = np.arange(0, 1000 - 100 + 1, 50)
    question = np.array([5, 90, 91, 92, 13])  # punctuation and a common word too
    scores = lexical_scores(context, starts, starts + 100, question, _words)
    best = starts[np.argmax(scores)]
    assert best <= 700 and best + 100 >= 703
    assert scores.max() > 3 * np.median(scores)
    # A question with no words scores every passage 0.
    assert not lexical_scores(context, starts, starts + 100, np.array([1, 2]), _words).any()


def test_words_decide_and_attention_breaks_ties_or_ranks_alone():
    lexical = np.array([2.0, 2.0, 0.5, 0.0])
    attention = np.array([0.1, 0.3, 0.9, 0.2])
    score = combine(lexical, attention)
    assert list(np.argsort(-score)) == [1, 0, 2, 3]
    # No passage holds a word of the question: the heads rank alone.
    assert list(np.argsort(-combine(np.zeros(4), attention))) == [2, 1, 3, 0]
    assert list(np.argsort(-combine(lexical, None))[:2]) == [0, 1]


def test_passages_fit_the_budget_and_overlapping_or_touching_ones_merge():
    starts = np.arange(0, 1000, 50)
    ends = starts + 100
    scores = np.zeros(len(starts))
    scores[[4, 6, 12, 5]] = [4, 3, 2, 1]  # windows 200-300, 300-400, 600-700; 250-350 inside
    chosen = choose_passages(scores, starts, ends, 300)
    assert chosen == [Passage(200, 400), Passage(600, 700)]
    assert sum(p.end - p.start for p in chosen) <= 300
    assert choose_passages(scores, starts, ends, 99) == []
    # A window that overlaps a chosen one costs only its new tokens: a fact that the
    # best window's edge cuts (at 290-310) is read whole from the next one.
    scores[:] = 0
    scores[[4, 5, 15]] = [4, 3, 2]  # 200-300, then 250-350 (50 new), then 750-850
    assert choose_passages(scores, starts, ends, 150) == [Passage(200, 350)]
    assert choose_passages(scores, starts, ends, 250) == [Passage(200, 350), Passage(750, 850)]


def test_choose_puts_the_best_passage_last_and_needs_the_trees_tokens():
    model = movable_model()
    tree, tokens = _tree(model, n=8, seed=2, rare=300)
    question = tokens[300:304]
    passages = choose(model, tree, RUNNING, 2 * PASSAGE_TOKENS, question, _words)
    assert sum(p.end - p.start for p in passages) <= 2 * PASSAGE_TOKENS
    last = passages[-1]
    assert last.start <= 300 and last.end >= 304
    with pytest.raises(ValueError, match="does not keep its tokens"):
        choose(model, dataclasses.replace(tree, tokens=None), RUNNING, 256, question, _words)


def test_the_remainder_is_a_candidate_too():
    model = movable_model()
    tree, tokens = _tree(model, n=4, seed=4)
    remainder = np.array([13, 14, 95, 96, 97, 15], np.int32)
    passages = choose(
        model, tree, RUNNING, 2 * PASSAGE_TOKENS, np.array([95, 96, 97]), _words, remainder
    )
    # Its words are found nowhere else: it is the best passage, so it comes last.
    assert passages[-1] == Passage(4 * 64, 4 * 64 + len(remainder))


class _Pieces:
    """A tokenizer whose token i is PIECES[i]."""

    PIECES = (" Teaching", " the", "ers", ",", " Shikoku", " TEACHER", "'s")

    def decode(self, ids: list[int]) -> str:
        return "".join(self.PIECES[i] for i in ids)


def test_token_terms_are_stems_and_stopwords_are_none():
    terms = token_terms(_Pieces())(np.arange(len(_Pieces.PIECES)))
    assert terms == ["teach", "", "er", "", "shikoku", "teacher", "s"]


def test_question_words_are_the_stems_of_content_words_the_context_seldom_uses():
    context = "The old mill stood by the river. " * 30 + "Marchetti kept crates 654 there."
    words = question_words("Which crate did Marchetti keep by the old mills? Be brief.", context)
    # 'the', 'old', 'mill(s)' stand 30+ times; 'be' is too short; 'which', 'did' say what
    # is asked, not where; a word the context lacks stays (it selects nothing)
    assert set(words) == {"crate", "marchetti", "keep", "brief"}
    # a word that stands k times weighs 1/k (one the context lacks weighs 1)
    assert words["crate"] == pytest.approx(1.0) and words["brief"] == pytest.approx(1.0)
    assert question_words("Which crates?", context + " Crates.")["crate"] == pytest.approx(0.5)
    assert set(question_words("Ça va, Zoë?", "zoë est là.")) == {"zoë"}
    assert stems_of("Drawers, drawer; TEACHING teach") == ["drawer", "drawer", "teach", "teach"]


def test_focus_keeps_the_sentences_whose_words_weigh_near_the_most():
    passage = (
        "It rained all week. The Marchetti aviary is listed under folio 654! Nobody came.\n\n"
        "Dinner was at 8; the soup was cold. Was Marchetti there? No."
    )
    decoy = "The Fonseca aviary is listed under folio 17. The Marchetti aviary? Gone."
    assert focus([passage], {"marchetti": 1.0}) == [
        ["The Marchetti aviary is listed under folio 654!", "Was Marchetti there?"]
    ]
    # The asked-for fact holds the key and the attribute; a decoy holds less of them (the
    # rare key weighs most), and a passage left with no such sentence is dropped.
    words = {"marchetti": 2.0, "aviari": 1.0, "folio": 1.0}  # 4.0 for the fact
    assert focus([decoy, passage], words) == [
        ["The Marchetti aviary?"],  # 3.0
        ["The Marchetti aviary is listed under folio 654!"],
    ]  # the decoy (2.0) and "Was Marchetti there?" (2.0) fall below 0.6 of the best
    assert focus([decoy, passage], {"marchetti": 4.0, "folio": 1.0}) == [
        ["The Marchetti aviary?"],
        ["The Marchetti aviary is listed under folio 654!", "Was Marchetti there?"],
    ]
    assert focus([decoy, passage], {"zeppelin": 1.0}) == []
    assert focus([passage], {}) == []
    assert focus([], {"marchetti": 1.0}) == []


def test_a_decoy_weighs_too_little_to_be_kept_and_a_keys_other_values_are():
    filler = "The weather was mild and the roads were long. " * 40
    facts = (
        "Ana Okafor is listed with shelf mark 1234. Bo Lindqvist has shelf mark 5678 on "
        "file. The shelf mark on file for Cy Dumont is 9012."
    )
    words = question_words("Which shelf mark is on file for Ana Okafor?", filler + facts)
    assert reread_text([facts], words) == "1. Ana Okafor is listed with shelf mark 1234."
    values = (
        "Ana Okafor is listed with shelf mark 1234. Ana Okafor also has shelf mark 5678 on "
        "file. Another shelf mark on file for Ana Okafor is 9012."
    )
    words = question_words("Which shelf marks are on file for Ana Okafor?", filler + values)
    assert reread_text([values], words).splitlines()[2].startswith("3. Another shelf mark")


def test_reread_text_numbers_one_sentence_a_line_or_gives_the_whole_passages():
    first = "Ana has shelf mark 1 on file. It rained."
    second = "Ana is listed with shelf mark 2. Bob has shelf mark 9 on file."
    words = {"ana": 4.0, "shelf": 1.0, "mark": 1.0, "file": 1.0}
    # Ana's two values, in other words (5.0 and 6.0 of 7.0); Bob's decoy weighs 3.0
    assert reread_text([first, second], words) == (
        "1. Ana has shelf mark 1 on file.\n2. Ana is listed with shelf mark 2."
    )
    assert reread_text([first, second], {"zeppelin": 1.0}) == first + REREAD_SEPARATOR + second


def test_generate_reads_the_passages_in_the_users_message(loaded, book):  # noqa: F811
    model, tokenizer = loaded
    text = book.read_text()
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = "Who?"
    prompt_ids = encode_prompt(tokenizer, prompt)
    tree = model.compress(mx.array(ids), mx.array(prompt_ids))
    running = np.concatenate([np.array(tree.remainder), prompt_ids])
    budget = 2 * PASSAGE_TOKENS
    rereading = dataclasses.replace(model.settings, reread_tokens=budget)
    responses = list(
        stream_generate(model, tokenizer, prompt, tree, max_tokens=4, settings=rereading)
    )
    last = responses[-1]
    assert last.passages and 0 < last.reread_tokens <= budget
    passages, window = reread_passages(model, tokenizer, tree, running, prompt, budget)
    assert tuple(passages) == last.passages
    context = np.concatenate([np.array(tree.tokens).reshape(-1), np.array(tree.remainder)])
    words = question_words(prompt, tokenizer.decode(context.tolist()))
    text = reread_text(
        [tokenizer.decode(context[p.start : p.end].tolist()).strip() for p in passages], words
    )
    message = REREAD_MESSAGE.format(passages=text, prompt=prompt)
    expected = encode_prompt(tokenizer, message)
    assert np.array_equal(window, expected)
    # The answer reads that window and no tree.
    assert generate(model, tokenizer, window.tolist(), max_tokens=4) == "".join(
        r.text for r in responses
    )
    no_reread = dataclasses.replace(model.settings, reread_tokens=0)
    plain = list(stream_generate(model, tokenizer, prompt, tree, max_tokens=4, settings=no_reread))
    assert plain[-1].passages == () and plain[-1].reread_tokens == 0


def framed_question(tokenizer, tree, passages, question: str) -> str:
    """The user's message that re-reading writes: the passages' focused sentences, then
    the question."""
    context = np.concatenate([np.array(tree.tokens).reshape(-1), np.array(tree.remainder)])
    words = question_words(question, tokenizer.decode(context.tolist()))
    text = reread_text(
        [tokenizer.decode(context[p.start : p.end].tolist()).strip() for p in passages], words
    )
    return REREAD_MESSAGE.format(passages=text, prompt=question)


def test_a_conversation_rereads_in_its_last_message(loaded, book):  # noqa: F811
    model, tokenizer = loaded
    ids = tokenizer.encode(book.read_text(), add_special_tokens=False)
    conversation = [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Who?"},
    ]
    prompt_ids = encode_prompt(tokenizer, conversation)
    tree = model.compress(mx.array(ids), mx.array(prompt_ids))
    running = np.concatenate([np.array(tree.remainder), prompt_ids])
    passages, window = reread_passages(
        model, tokenizer, tree, running, conversation, 2 * PASSAGE_TOKENS
    )
    assert passages
    framed = {"role": "user", "content": framed_question(tokenizer, tree, passages, "Who?")}
    assert np.array_equal(window, encode_prompt(tokenizer, [conversation[0], framed]))
    # Without a chat template a conversation is written as "role: content" lines.
    lines = "system: Answer in one line.\nuser: Who?\nassistant:"
    assert np.array_equal(
        encode_prompt(tokenizer, conversation, chat_template=False), tokenizer.encode(lines)
    )


def test_a_conversation_that_ends_with_the_assistant_rereads_its_last_user_message(
    loaded,  # noqa: F811
    book,  # noqa: F811
):
    """A conversation whose last message is the assistant's is still a conversation: its
    question is the last user message, which re-reading frames (not read as token ids,
    nor the assistant's message taken for the question); the messages after it stay."""
    model, tokenizer = loaded
    ids = tokenizer.encode(book.read_text(), add_special_tokens=False)
    conversation = [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Who walked to school?"},
        {"role": "assistant", "content": "It was"},
    ]
    prompt_ids = encode_prompt(tokenizer, conversation)
    tree = model.compress(mx.array(ids), mx.array(prompt_ids))
    running = np.concatenate([np.array(tree.remainder), prompt_ids])
    passages, window = reread_passages(
        model, tokenizer, tree, running, conversation, 2 * PASSAGE_TOKENS
    )
    message = framed_question(tokenizer, tree, passages, "Who walked to school?")
    framed = [conversation[0], {"role": "user", "content": message}, conversation[2]]
    assert np.array_equal(window, encode_prompt(tokenizer, framed))
    rereading = dataclasses.replace(model.settings, reread_tokens=2 * PASSAGE_TOKENS)
    last = list(
        stream_generate(model, tokenizer, conversation, tree, max_tokens=2, settings=rereading)
    )[-1]
    assert last.passages == tuple(passages)


def test_a_tree_without_tokens_is_read_without_rereading(loaded, book):  # noqa: F811
    model, tokenizer = loaded
    ids = tokenizer.encode(book.read_text(), add_special_tokens=False)
    tree = dataclasses.replace(model.compress(mx.array(ids), mx.array([1, 2])), tokens=None)
    rereading = dataclasses.replace(model.settings, reread_tokens=256)
    with pytest.warns(UserWarning, match="does not keep its tokens"):
        responses = list(
            stream_generate(model, tokenizer, "Who?", tree, max_tokens=2, settings=rereading)
        )
    assert responses[-1].reread_tokens == 0


def test_the_settings_check_the_budget_and_adapters_carry_it(tmp_path):
    base = movable_model().config_dict()
    for bad in (-1, 5, 1.5):
        with pytest.raises(ValueError, match="reread_tokens"):
            Settings.from_dict({**base, "reread_tokens": bad})
    model = movable_model()
    before = model.fingerprint()
    model.settings = dataclasses.replace(model.settings, reread_tokens=512)
    assert model.fingerprint() == before  # an inference setting, not the weights
    model.freeze()
    model.layers[0].cross_attn.unfreeze()
    save_adapter(tmp_path, model, before)
    assert json.loads((tmp_path / "adapter.json").read_text())["reread_tokens"] == 512
    fresh = movable_model()
    load_adapter(fresh, tmp_path)
    assert fresh.settings.reread_tokens == 512


def test_cli_reread_tokens(spm_model, book):  # noqa: F811
    from test_generate import invoke

    args = ["--model", str(spm_model), "--file", str(book), "--prompt", "Who?"]
    result = invoke(*args, "--max-tokens", "3", "--reread-tokens", "256")
    assert result.exit_code == 0, result.output
    stats = result.stderr.strip().splitlines()[-1]
    reread = int(stats.split(" tokens re-read")[0].rsplit(" ", 1)[-1])
    assert 0 < reread <= 256
    bad = invoke(*args, "--reread-tokens", "-1")
    assert bad.exit_code != 0 and "-1" in bad.output


def test_cli_compresses_once_and_answers_from_the_saved_context(spm_model, book, tmp_path):  # noqa: F811
    from test_generate import invoke

    saved = tmp_path / "book.tree"
    args = ["--model", str(spm_model), "--max-tokens", "3", "--prompt", "Who?"]
    first = invoke(*args, "--file", str(book), "--save-context", str(saved))
    assert first.exit_code == 0, first.output
    assert saved.exists() and "saved the compressed context" in first.stderr
    again = invoke(*args, "--context", str(saved))
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout  # the same tree, the same greedy answer
    first_stats = first.stderr.strip().splitlines()[-1].split("|")
    again_stats = again.stderr.strip().splitlines()[-1].split("|")
    assert "compressed at" in first_stats[0] and f"loaded from {saved}" in again_stats[0]
    assert first_stats[1] == again_stats[1]  # the chunks, and the tokens re-read
    both = invoke(*args, "--file", str(book), "--context", str(saved))
    assert both.exit_code != 0 and "not both" in both.output
    lonely = invoke(*args, "--save-context", str(tmp_path / "x.tree"))
    assert lonely.exit_code != 0 and "needs a --file" in lonely.output
    junk = tmp_path / "junk.tree"
    junk.write_bytes(b"not a tree")
    bad = invoke(*args, "--context", str(junk))
    assert bad.exit_code != 0 and "not a readable context tree" in bad.output


def test_no_room_in_the_window_reads_the_tree_without_rereading(loaded, book):  # noqa: F811
    model, tokenizer = loaded
    ids = tokenizer.encode(book.read_text(), add_special_tokens=False)
    window = model.args.max_position_embeddings
    rereading = dataclasses.replace(model.settings, reread_tokens=256)
    responses = list(
        stream_generate(model, tokenizer, "Who?", ids, max_tokens=window, settings=rereading)
    )
    assert responses[-1].passages == () and responses[-1].reread_tokens == 0


def test_prompt_ids_outside_the_vocabulary_are_refused(loaded):  # noqa: F811
    model, tokenizer = loaded
    with pytest.raises(ValueError, match="the prompt holds token id"):
        generate(model, tokenizer, [5, 6, 10**9], max_tokens=2)
