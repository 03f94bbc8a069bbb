"""The reading suite's data (benchmarks/suite_data.py): plans, insertion, matchers, texts."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import suite_data as sd  # noqa: E402
from sources import BOOKS  # noqa: E402  (suite_data puts recipes/smollm2 on sys.path)

from mlx_sharedllm.assets import cache_home  # noqa: E402

SMOLLM2 = cache_home() / "models" / "SmolLM2-135M-Instruct-stacked-m19-heads4-keepall-float32"
SPM_DIR = Path(__file__).parent / "fixtures" / "spm_tokenizer"
NOUNS = ("river", "stone", "clerk", "garden", "window", "letter", "candle", "road", "field")
VERBS = ("watched", "crossed", "found", "carried", "opened", "left", "followed", "passed")


def question(kind: str, *answers: str, task: str = "single") -> sd.Question:
    return sd.Question(task, "?", answers, kind, ())


# -- matchers and statistics --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The number is 48213.", True),
        ("48,213", True),
        ("It is 48 213, I think.", True),
        ("Berth48213!", True),
        ("148213", False),
        ("482130", False),
        ("48,2130", False),
        ("4821", False),
        ("", False),
    ],
)
def test_number_matches_whole_numbers_only(text, expected):
    assert sd.is_correct(question("number", "48213"), text) is expected


def test_number_finds_a_group_inside_a_joined_list():
    assert sd.is_correct(question("number", "123"), "in 3 123 ways")
    assert sd.is_correct(question("number", "3123"), "in 3 123 ways")


def test_word_matches_whole_words_case_insensitively():
    q = question("word", "tamarind")
    assert sd.is_correct(q, "It was Tamarind.")
    assert sd.is_correct(q, '"tamarind"')
    assert not sd.is_correct(q, "tamarinds")
    assert not sd.is_correct(q, "tamarin")


def test_phrase_needs_every_content_word_in_any_order():
    q = question("phrase", "the wobbly paisley trombone")
    assert sd.is_correct(q, "Trombone, paisley and wobbly.")
    assert sd.is_correct(q, "a wobbly paisley trombone")
    assert not sd.is_correct(q, "the wobbly trombone")
    assert not sd.is_correct(q, "wobblyish paisley trombones")


def test_multivalue_needs_every_value():
    q = question("number", "38481955", "31543249", "87403681", task="multivalue")
    assert sd.is_correct(q, "87403681, 38481955 and 31543249")
    assert not sd.is_correct(q, "38481955, 31543249")


def test_book_question_needs_every_group():
    q = sd.BookQuestion("?", ((r"school",), (r"shikoku|country",)), "x" * 20, "")
    assert sd.is_correct(q, "A middle SCHOOL on Shikoku.")
    assert sd.is_correct(q, "a school in the country")
    assert not sd.is_correct(q, "a school in Tokyo")
    assert not sd.is_correct(q, "Shikoku")


def test_wilson_interval():
    assert sd.wilson(0, 0) == (0.0, 1.0)
    low, high = sd.wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(1.96**2 / (10 + 1.96**2))
    low, high = sd.wilson(10, 10)
    assert high == 1.0 and low == pytest.approx(10 / (10 + 1.96**2))
    assert sd.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert sd.wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)


# -- plans --------------------------------------------------------------------------------


def plan(seed: int = 0, split: str = "test") -> sd.HaystackPlan:
    return sd.plan_haystack(np.random.default_rng(seed), split)


def decoys(p: sd.HaystackPlan) -> list[int]:
    asked = {i for q in p.questions for i in q.facts}
    return [i for i in range(len(p.facts)) if i not in asked]


def shape(kind: str, value: str) -> tuple[str, int]:
    return kind, len(value) if kind == "number" else len(value.split())


def stated(fact: sd.Fact) -> tuple[str, str]:
    """(kind, value) of what a fact states: a quoted word or phrase, else a number."""
    quoted = re.findall(r'"([^"]+)"', fact.text)
    if not quoted:
        return "number", re.findall(r"\d+", fact.text)[-1]
    return ("word" if len(quoted[-1].split()) == 1 else "phrase"), quoted[-1]


def test_plan_is_deterministic():
    assert plan(3) == plan(3)
    assert plan(3) != plan(4)
    assert plan(3, "dev") != plan(3, "test")
    with pytest.raises(ValueError):
        plan(3, "train")


@pytest.mark.parametrize("seed", range(20))
def test_plan_groups_and_answers(seed):
    p = plan(seed)
    tasks = [q.task for q in p.questions]
    assert sorted(set(tasks)) == sorted(sd.TASKS)
    assert tasks.count("facts") == 4 and len(tasks) == 9
    assert len({int(f.depth * sd.GROUPS) for f in p.facts}) == sd.GROUPS
    assert all(0 <= f.depth <= 1 for f in p.facts)
    for q in p.questions:
        evidence = " ".join(p.facts[i].text for i in q.facts)
        assert sd.is_correct(q, evidence), (q, evidence)
        assert not any(a.lower() in q.prompt.lower() for a in q.answers)
        assert q.prompt.endswith((".", "?")) and len(q.answers) == len(q.facts)
        for answer in q.answers:
            if q.kind == "number":
                assert 3 <= len(answer) <= 9 and sum(map(int, answer)) % 2 == 1
    multivalue = next(q for q in p.questions if q.task == "multivalue")
    assert len(set(multivalue.answers)) == 3
    spread = [p.facts[i].depth for i in multivalue.facts]
    assert max(spread) - min(spread) <= 2 * sd.CLUSTER


def test_every_task_and_length_gets_its_questions():
    assert sd.questions_per_task(plan(0)) == 1
    sizes = [9000, 20000, 40000, 70000, 140000]  # 5 texts reach 8K, 1 reaches 128K
    lengths = [8192, 16384, 32768, 65536, 131072, 262144]
    counts = sd.haystacks_per_length(lengths, sizes, per_cell=10, least=2, per_task=1)
    assert counts == {8192: 2, 16384: 3, 32768: 4, 65536: 5, 131072: 10}
    for length, h in counts.items():
        reach = sum(s >= length for s in sizes)
        assert h * reach >= 10 and (h - 1) * reach < 10 or h == 2
    assert sd.haystacks_per_length([8192], sizes, per_cell=0, least=1, per_task=1) == {8192: 1}


@pytest.mark.parametrize("seed", range(20))
def test_decoys_share_shape_and_attribute_not_value(seed):
    p = plan(seed)
    found = decoys(p)
    assert len(found) == 3
    multikey = next(q for q in p.questions if q.task == "multikey")
    asked = p.facts[multikey.facts[0]]
    near = [i for i in found if abs(p.facts[i].depth - asked.depth) <= sd.CLUSTER + 1e-9]
    assert len(near) == 2
    attrs = [a for a in sd.ATTRIBUTES["number"] if a in multikey.prompt]
    for i in near:
        kind, value = stated(p.facts[i])
        assert shape(kind, value) == shape("number", multikey.answers[0])
        assert value != multikey.answers[0]
        assert any(a in p.facts[i].text for a in attrs)
    (far,) = set(found) - set(near)
    kind, value = stated(p.facts[far])
    matches = [
        q
        for q in p.questions
        if q.task == "facts"
        and shape(kind, value) == shape(q.kind, q.answers[0])
        and any(a in p.facts[far].text and a in q.prompt for a in sd.ATTRIBUTES[q.kind])
    ]
    assert matches and all(not sd.is_correct(q, p.facts[far].text) for q in matches)


def test_dev_and_test_plans_draw_keys_from_separate_halves():
    dev = {*sd.FIRST_NAMES[0::2], *sd.SURNAMES[0::2]}
    test = {*sd.FIRST_NAMES[1::2], *sd.SURNAMES[1::2]}
    for seed in range(5):
        test_words = set(re.findall(r"\w+", " ".join(f.text for f in plan(seed, "test").facts)))
        dev_words = set(re.findall(r"\w+", " ".join(f.text for f in plan(seed, "dev").facts)))
        assert test_words & test and not test_words & dev
        assert dev_words & dev and not dev_words & test


def test_vocabulary_is_not_training_vocabulary():
    import needles

    training = {w.lower() for words in needles.TRAIN_WORDS.values() for w in words}
    training |= {w.lower() for words in needles.VARIED_KEYS.values() for w in words}
    ours = sd.WORDS + sd.PHRASE_ADJECTIVES + sd.PHRASE_NOUNS + sd.FIRST_NAMES + sd.SURNAMES
    ours += sd.PLACES + sd.MATERIALS + sd.OBJECTS
    assert not {w.lower() for w in ours} & training
    assert not set(sd.ATTRIBUTES["number"]) & set(needles.VARIED_ATTRIBUTES)


# -- insertion ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer when it is here, else the tiny SentencePiece fixture."""
    from mlx_lm.utils import load_tokenizer

    if (SMOLLM2 / "tokenizer.json").exists():
        return load_tokenizer(SMOLLM2)
    folder = tmp_path_factory.mktemp("spm")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SPM_DIR / name, folder)
    (folder / "config.json").write_text('{"model_type": "sharedllm"}')
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def haystack(tokenizer) -> np.ndarray:
    """About 8K tokens of plain sentences, some paragraphs."""
    rng = np.random.default_rng(0)
    sentences = []
    for i in range(900):
        a, b = rng.choice(NOUNS, 2)
        end = "\n\n" if i % 7 == 6 else " "
        sentences.append(f"The {a} {rng.choice(VERBS)} the {b} at {i}.{end}")
    ids = tokenizer.encode("".join(sentences), add_special_tokens=False)
    return np.asarray(ids[:8000], np.int32)


def check_insertion(tokenizer, ids, facts, chunk_len):
    new, spans = sd.insert_facts(tokenizer, ids, facts, chunk_len)
    assert new.shape == ids.shape and new.dtype == ids.dtype
    chunks = sd.fact_chunks(spans, chunk_len)
    for fact, (start, end), k in zip(facts, spans, chunks):
        assert tokenizer.decode(new[start:end].tolist()).strip() == fact.text
        assert start // chunk_len == (end - 1) // chunk_len == k
    holders = {k: [] for k in chunks}
    for (start, end), k in zip(spans, chunks):
        holders[k].append((start, end))
    for k in range(-(-len(ids) // chunk_len)):
        part = slice(k * chunk_len, (k + 1) * chunk_len)
        if k not in holders:
            assert np.array_equal(new[part], ids[part])
            continue
        keep = np.ones(len(new), bool)
        for start, end in holders[k]:
            keep[start:end] = False
        rest, original = new[part][keep[part]], ids[part]
        # What is left of the haystack is the original chunk, in order, with tokens cut
        # from its edges (or, without room there, from between its facts).
        it = iter(original.tolist())
        assert all(token in it for token in rest.tolist())
    return new, spans


def test_insert_plan_keeps_length_and_chunks(tokenizer, haystack):
    for seed in range(3):
        facts = plan(seed).facts
        longest = max(len(sd.encode_fact(tokenizer, f.text)) for f in facts)
        check_insertion(tokenizer, haystack, facts, max(256, 4 * longest))


def test_insert_several_facts_in_one_chunk(tokenizer, haystack):
    facts = plan(0).facts[:4]
    chunk_len = 1024
    depths = (0.4, 0.4, 0.4 + 300 / len(haystack), 0.4 + 700 / len(haystack))
    crowded = [sd.Fact(f.text, d) for f, d in zip(facts, depths)]
    new, spans = check_insertion(tokenizer, haystack, crowded, chunk_len)
    assert len(set(sd.fact_chunks(spans, chunk_len))) < len(crowded)
    assert spans[0][1] <= spans[1][0]  # same spot: in the order given


def test_insert_at_the_edges_and_in_a_short_last_chunk(tokenizer, haystack):
    facts = plan(1).facts
    edges = [sd.Fact(facts[0].text, 0.0), sd.Fact(facts[1].text, 1.0)]
    check_insertion(tokenizer, haystack[:7900], edges, 512)


def test_a_chunk_keeps_its_length_without_cutting_into_the_text_around_a_fact():
    labels = np.full(100, -1)
    labels[5:10], labels[60:70] = 0, 1  # a fact in the first half, one in the second
    # The second-half fact's tokens would go from the start, across the first fact.
    keep = sd._cut(labels, front=10, back=5, margin=0)
    assert keep[5:70].all() and (~keep).sum() == 15
    assert not keep[:5].any() and not keep[90:].any()
    labels = np.full(100, -1)
    labels[:5], labels[95:] = 0, 1  # no room at either edge: the middle goes
    keep = sd._cut(labels, front=5, back=5, margin=0)
    assert keep[:45].all() and not keep[45:55].any() and keep[55:].all()
    assert sd._cut(labels, front=50, back=50, margin=0) is None
    with pytest.raises(ValueError):
        sd._kept(labels, front=50, back=50)
    labels = np.full(100, -1)
    labels[40:50] = 0  # nothing to move: the cuts stay where they were
    keep = sd._cut(labels, front=4, back=6, margin=0)
    assert not keep[:4].any() and keep[4:94].all() and not keep[94:].any()


def test_a_cut_keeps_a_margin_beside_every_fact_and_shrinks_it_only_without_room():
    labels = np.full(400, -1)
    labels[16:26], labels[300:310] = 0, 1
    # The start cannot go: the 16 tokens before the first fact are within its margin (the
    # sentence that fact follows), so the whole cut goes from the end, short of the margin.
    keep = sd._kept(labels, front=10, back=10)
    assert keep[: 310 + sd.MARGIN].all() and not keep[380:].any() and (~keep).sum() == 20
    labels = np.full(100, -1)
    labels[:5], labels[95:] = 0, 1  # 89 tokens between: two full margins do not fit
    keep = sd._kept(labels, front=5, back=5)
    assert (~keep).sum() == 10
    cut = np.flatnonzero(~keep)
    assert cut.min() > 4 + sd.MARGIN // 2 and cut.max() < 95 - sd.MARGIN // 2


def test_insert_refuses_facts_longer_than_their_chunk(tokenizer, haystack):
    text = max((f.text for f in plan(2).facts), key=len)
    length = len(sd.encode_fact(tokenizer, text))
    with pytest.raises(ValueError):
        sd.insert_facts(tokenizer, haystack, [sd.Fact(text, 0.5)] * 3, 2 * length)


def test_facts_go_between_sentences_never_inside_a_word_or_a_name_in_code(tokenizer):
    text = (
        "- Fixed ``astropy.units.Quantity`` in ``np.linalg``. [#19104]\n\n"
        "- Version 1.5.2 of e.g. the parser. Done! Ask?--yes. The end."
    )
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
    ends = sd.sentence_ends(tokenizer, ids)
    before = [tokenizer.decode(ids[:e].tolist()) for e in ends]
    # The character that follows each end (decoded with the text before it, so that a
    # SentencePiece token's leading space shows).
    after = [tokenizer.decode(ids[: e + 1].tolist())[len(b) :][:1] for e, b in zip(ends, before)]
    assert all(not a.isalnum() and a != "_" for a in after), after
    assert any(b.endswith("``np.linalg``.") for b in before)
    assert any(b.endswith("Done!") for b in before)
    assert any(b.endswith("The end.") for b in before) and len(ids) in ends
    assert not any(b.endswith(("astropy.", "1.", "e.")) for b in before)
    # Every such end is one the plain token rule found.
    assert set(ends.tolist()) <= set(sd.token_sentence_ends(tokenizer, ids).tolist())


# -- book questions -----------------------------------------------------------------------


@pytest.mark.parametrize("questions", [sd.BOOK_QUESTIONS, sd.DEV_BOOK_QUESTIONS])
def test_book_questions_accept_their_references(questions):
    prompts = [q.prompt for q in questions]
    assert len(prompts) >= 10 and len(set(prompts)) == len(prompts)
    for q in questions:
        assert 20 <= len(q.evidence) <= 120
        for group in q.accept:
            assert any(re.search(p, q.reference, re.I) for p in group), (q.prompt, group)
        assert not sd.is_correct(q, "I do not know.")
    assert "Who is the narrator, and where does he go to teach?" in [
        q.prompt for q in sd.BOOK_QUESTIONS
    ]


# -- texts (fetched from their pins; skipped when they cannot be fetched) -----------------


@pytest.fixture(scope="module")
def loaded():
    try:
        return {name: sd.load_text(name) for name in sd.TEXTS}
    except Exception as error:  # no network, no cache
        pytest.skip(f"texts unavailable: {error}")


def test_registry():
    assert sd.texts("dev") == ["war-and-peace", "sherlock-holmes", "pip-news"]
    assert set(sd.texts("test")) >= {
        "botchan-heldout",
        "lcet10",
        "paradise-lost",
        "as-you-like-it",
        "astropy-changes",
    }
    assert sd.BOOK_TEXT not in sd.texts("test") and sd.TEXTS[sd.BOOK_TEXT].split == "test"
    assert not set(sd.texts("dev")) & set(sd.texts("test"))
    assert not set(sd.texts("test")) & {"botchan-train", *(book.name for book in BOOKS)}
    for text in sd.TEXTS.values():
        assert text.kind in ("novel", "nonfiction", "verse", "drama", "list")
        assert text.split in ("dev", "test") and text.licence and text.note


def test_texts_are_clean(loaded):
    for name, text in loaded.items():
        assert len(text) > 50_000, name
        assert "\r" not in text and "Project Gutenberg" not in text, name
        assert text.endswith("\n") and not text.startswith("\n"), name


def test_test_texts_are_not_training_texts(loaded):
    training = sd._training()
    assert not set(sd.texts("test")) & set(training)
    for name in sd.texts("test"):
        text = loaded[name]
        for at in (0, 1000, len(text) // 2, len(text) - 400):
            piece = text[at : at + 200]
            assert not any(piece in t for t in training.values()), (name, at)


def test_values_do_not_occur_in_the_texts(loaded):
    words = sd.WORDS + sd.PHRASE_ADJECTIVES + sd.PHRASE_NOUNS + sd.FIRST_NAMES + sd.SURNAMES
    pattern = re.compile(r"\b(?:" + "|".join(words) + r")\b", re.I)
    for name, text in loaded.items():
        assert not pattern.search(text), (name, pattern.search(text))


def test_book_evidence_is_verbatim(loaded):
    book = loaded[sd.BOOK_TEXT]
    for q in sd.BOOK_QUESTIONS:
        assert book.count(q.evidence) >= 1, q.evidence
    assert loaded["botchan-heldout"] in book
    # the dev questions ask about War and Peace's first 64K tokens (about 280K characters)
    dev_book = loaded[sd.DEV_BOOK_TEXT]
    for q in sd.DEV_BOOK_QUESTIONS:
        assert 0 <= dev_book.find(q.evidence) < 270_000, q.evidence


def _read_suite():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "read_suite", ROOT / "benchmarks" / "read_suite.py"
    )
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    return suite


def test_an_answer_has_room_for_every_value_asked():
    suite = _read_suite()
    plan = sd.plan_haystack(np.random.default_rng(3), "test")
    for q in plan.questions:
        values = 3 if q.task == "multivalue" else 1
        assert suite.answer_tokens(q) == suite.MAX_TOKENS * values == 40 * values
    assert suite.answer_tokens(sd.BOOK_QUESTIONS[0]) == suite.MAX_TOKENS


def test_the_oracle_reads_exactly_the_chunks_that_hold_the_facts(tokenizer, haystack):
    suite = _read_suite()
    facts = [sd.Fact("Alpha Quennell keeps tag 123.", 0.3), sd.Fact("Gamma is 456.", 0.8)]
    new, spans = sd.insert_facts(tokenizer, haystack, facts, 1024)
    chunks = sd.fact_chunks(spans, 1024)
    prompt = np.array([7, 8, 9], np.int32)
    window = suite.oracle_window(new, chunks + chunks[:1], 1024, prompt)
    held = sorted(set(chunks))
    assert len(window) == 1024 * len(held) + 3 and np.array_equal(window[-3:], prompt)
    for (start, end), chunk in zip(spans, chunks):
        offset = held.index(chunk) * 1024 + start - chunk * 1024
        assert np.array_equal(window[offset : offset + end - start], new[start:end])


def test_the_report_labels_each_file_and_reads_retrieval_of_the_default_only(tmp_path):
    suite = _read_suite()
    row = {"task": "facts", "length": 8192, "system": "sharedllm", "correct": True}
    (tmp_path / "a.jsonl").write_text(json.dumps({**row, "reread_found": True}) + "\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({**row, "correct": False, "reread_found": False}) + "\n"
    )
    text = suite.report(
        [str(tmp_path / "a.jsonl"), f"{tmp_path / 'b.jsonl'}=no adapter"], None, None
    )
    assert "| sharedllm | 1.00" in text and "| no adapter | 0.00" in text
    assert "| held | 1.00" in text  # the labelled run's retrieval is not mixed in


# -- the dev probe of other needle kinds (benchmarks/probe_kinds.py) ----------------------


def test_probe_kinds_draw_fresh_facts_and_score_values_leniently(tokenizer, haystack):
    import probe_kinds as pk

    pk.check_pools()  # no name, key or value word is the suite's
    asked = pk.probes(np.random.default_rng(3))
    assert len({p.kind for p in asked}) == len(asked) == 10
    for p in asked:
        assert all(w.lower() in p.fact.lower().replace(",", "") for w in p.want), p
        assert pk.found(p.want, f"It says: {p.fact}")
        assert not pk.found(p.want, p.question)  # the question never gives the answer away
    assert pk.found(("13368",), "The orchard has 13,368 trees.")
    assert pk.found(("NV-3967",), "the code is nv-3967")
    assert not pk.found(("24", "March", "1722"), "It was sealed on 24 March 1721.")
    assert not pk.found(("4", "March", "1722"), "It was sealed on 24 March 1722.")
    assert not pk.found(("mauve",), "a mauves shade") and pk.found(("mauve",), "Mauve.")
    facts = [sd.Fact(p.fact, d) for p, d in zip(asked, np.linspace(0.05, 0.95, len(asked)))]
    check_insertion(tokenizer, haystack, facts, 512)


def test_reader_alone_builds_the_message_that_focus_gives_a_needle_question():
    import reader_alone as ra

    from mlx_sharedllm.generate import REREAD_MESSAGE

    plan = sd.plan_haystack(np.random.default_rng([7, 0]), "dev")
    q = next(q for q in plan.questions if q.task == "multivalue")
    facts = sorted((plan.facts[i] for i in q.facts), key=lambda f: f.depth)
    lines = "\n".join(f"{i}. {f.text}" for i, f in enumerate(facts, 1))
    assert ra.message(q, plan, "shipped") == REREAD_MESSAGE.format(passages=lines, prompt=q.prompt)
    first = ra.message(q, plan, "question-first")
    assert first.startswith(f"Question: {q.prompt}") and first.endswith(f"Question: {q.prompt}")
    system, user = ra.message(q, plan, "system")
    assert system["role"] == "system" and user["content"] == ra.message(q, plan, "shipped")


# -- the reader's training examples (recipes/smollm2/reader_data.py) ---------------------


def test_reader_examples_answer_from_their_lines_with_words_new_to_the_suite_and_probe():
    import probe_kinds as pk
    import reader_data as rd

    pools = (sd.FIRST_NAMES, sd.SURNAMES, sd.PLACES, sd.MATERIALS, sd.OBJECTS, sd.WORDS,
             sd.PHRASE_ADJECTIVES, sd.PHRASE_NOUNS)  # fmt: skip
    suite = {w.lower() for pool in pools for w in pool}
    suite |= {w for attrs in sd.ATTRIBUTES.values() for a in attrs for w in a.split()}
    probe = {w.lower() for pool in (pk.FIRST, pk.LAST, pk.TOWNS, pk.ADJECTIVES, pk.NOUNS,
             pk.COLOURS) for item in pool for w in item.split()}  # fmt: skip
    assert not rd.pool_words() & (suite | probe)
    filler = rd.filler_sentences("Short. " + " ".join(f"{n} {v} the {n}." for n, v in
                                 zip(NOUNS, VERBS)) * 2 + " " + "word " * 60 + ".")  # fmt: skip
    assert filler and all(6 <= len(s.split()) <= 50 for s in filler)
    kinds = set()
    for seed in range(200):
        e = rd.reader_example(np.random.default_rng(seed), filler, list_share=0.3)
        text = "\n".join(e.lines)
        assert e.question.strip() and e.question.endswith((".", "?"))
        assert all(v.lower() in e.answer.lower() for v in e.values)
        at = [text.lower().index(v.lower()) for v in e.values]
        assert at == sorted(at)  # listed in the order the lines give them
        if e.question.startswith(("Whose", "Which one")):
            kinds.add("who")
        else:
            kinds.add("list" if len(e.values) > 1 else "single")
            facts = [line for line in e.lines if any(v in line for v in e.values)]
            assert len(facts) == len(e.values)
            assert all(e.key.lower() in line.lower() for line in facts)
    assert kinds == {"who", "list", "single"}
