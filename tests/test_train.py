"""Training the injection: the proof that it learns, exact resume, adapters, data errors.

The proof task: the context is a haystack (a fixed 8-token phrase repeated, like the
passkey tests) holding four facts "value key", one per 32-token region; the running text
asks "Q key" and the answer is the value, which appears only in the compressed context.
"""

import dataclasses
import json
import os
import shutil
import signal
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SPM_TOKENIZER, assert_close, run_cli, write_hf_llama
from mlx.utils import tree_flatten

from mlx_sharedllm import SharedLLM, load, train_data
from mlx_sharedllm.adapters import (
    add_lora,
    fuse,
    load_adapter,
    read_adapter,
    save_adapter,
    set_trainable,
)
from mlx_sharedllm.cli.train_cli import fuse_command, train_command
from mlx_sharedllm.generate import generate
from mlx_sharedllm.losses import example_loss
from mlx_sharedllm.model import AttentionTap
from mlx_sharedllm.settings import read_config
from mlx_sharedllm.train import TrainConfig, make_optimizer, train
from mlx_sharedllm.train_data import (
    DataError,
    Example,
    Instructions,
    Mixture,
    TextLM,
    build_tree,
    draw_splits,
)
from mlx_sharedllm.tree import downsample_index, plan_segments

# -- the synthetic retrieval task ---------------------------------------------------

Q, KEYS, VALUES, FILLER, VOCAB = 0, 1, 5, 13, 64
N_KEYS, N_VALUES, CHUNK, N_CHUNKS, REGION = 4, 8, 64, 2, 32
PHRASE = np.random.default_rng(99).integers(FILLER, VOCAB, 8)


def facts_context(rng: np.random.Generator) -> tuple[np.ndarray, dict[int, int]]:
    """A haystack with a fact "value key" in every 32-token region.

    Keys sit at region offsets 8 or 24: on the downsampling grid of every segment the
    tree can make (depth 2, last_p 4), with the value just before them in the same
    segment, whichever half the policy keeps.
    """
    context = np.resize(PHRASE, N_CHUNKS * CHUNK).astype(np.int32)
    keys, values = rng.permutation(N_KEYS), rng.integers(0, N_VALUES, N_KEYS)
    at = np.arange(N_KEYS) * REGION + rng.choice([8, 24], N_KEYS)
    context[at], context[at - 1] = KEYS + keys, VALUES + values
    return context.reshape(N_CHUNKS, CHUNK), dict(zip(keys.tolist(), values.tolist()))


class Facts:
    """Examples on the fly: the running text asks for every key, "Q key value" each; the
    loss is on the values."""

    split_sigma = 0.1

    def __init__(self, seed: int):
        self.seed = seed

    def examples(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        while True:
            context, facts = facts_context(rng)
            order = rng.permutation(N_KEYS)
            text = np.array([t for k in order for t in (Q, KEYS + k, VALUES + facts[k])])
            mask = ((text[1:] >= VALUES) & (text[1:] < FILLER)).astype(np.float32)
            yield Example(context, text[:-1], text[:-1], text[1:], mask)


def facts_model(seed: int = 0, **tree) -> SharedLLM:
    """A random SharedLLM: upper 3 layers, a separate random 2-layer lower model, M = 2;
    `tree` overrides config.json's keys (the tree settings, chunk_len, injection_layers)."""
    llama = dict(
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    )
    params = dict(
        upper=llama,
        lower={**llama, "num_hidden_layers": 2},
        num_injection_layers=2,
        tree_depth=2,
        last_p=4,
        chunk_len=CHUNK,
        policy="query",
    )
    mx.random.seed(seed)
    model = SharedLLM(*read_config({**params, **tree}))
    mx.eval(model.parameters())
    return model


def exact_match(model: SharedLLM, seed: int, count: int, other_context: bool) -> float:
    """Accuracy on "Q key" -> value, with the example's own tree or another context's."""
    rng = np.random.default_rng(seed)
    items = [facts_context(rng) for _ in range(count + 1)]
    right = 0
    for i in range(count):
        context, facts = items[i + 1] if other_context else items[i]
        key = int(rng.integers(N_KEYS))
        prompt = mx.array([Q, KEYS + key])
        tree = model.compress(mx.array(context), prompt)
        answer = mx.argmax(model(prompt[None], tree=tree)[0, -1]).item()
        right += answer == VALUES + items[i][1][key]
    return right / count


def test_injection_learns_retrieval_from_the_compressed_context(tmp_path):
    model = facts_model()
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if "cross_attn" not in k}
    tree = model.compress(mx.array(facts_context(np.random.default_rng(0))[0]), mx.array([Q, 1]))
    assert tree.n_chunks == 2 and tree.entries_per_chunk == 12  # 64 tokens -> 4 + 4 + 4
    config = TrainConfig(
        steps=300,
        grad_accum=16,
        learning_rate=3e-3,
        warmup=30,
        min_lr=1.5e-4,
        weight_decay=0.0,
        train=("injection", "head"),
        split_noise=0.0,  # the facts sit on the exact-split downsampling grid
        eval_every=100,
        eval_examples=16,
        save_every=300,
    )
    tic = time.perf_counter()
    result = train(model, Facts(0), tmp_path, config, eval_data=Facts(1), progress=False)
    seconds = time.perf_counter() - tic
    accuracy = exact_match(model, 7, 200, other_context=False)
    other = exact_match(model, 7, 200, other_context=True)
    print(
        f"\nexact match {accuracy:.3f} with the right context, {other:.3f} with another "
        f"context (chance {1 / N_VALUES:.3f}); training {seconds:.0f}s, "
        f"loss {result.loss:.3f}, eval loss {result.eval_loss:.3f}"
    )
    assert accuracy >= 0.9
    assert other <= 0.3
    for name, value in tree_flatten(model.parameters()):
        if name in frozen and not name.startswith("lm_head"):
            assert np.array_equal(np.array(value), frozen[name]), f"{name} changed"


# -- exact resume ---------------------------------------------------------------------

RESUME = dict(
    steps=6,
    grad_accum=2,
    learning_rate=1e-3,
    warmup=2,
    eval_every=3,
    eval_examples=2,
    save_every=3,
    split_noise=0.1,
)


class Stop(Exception):
    pass


def _stop_at(step: int, signal_it: bool = False):
    def callback(info):
        if info.step == step and signal_it:
            os.kill(os.getpid(), signal.SIGINT)
        elif info.step == step:
            raise Stop

    return callback


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _losses(out) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in _log(out)]


def test_an_interrupted_run_resumes_exactly(tmp_path):
    config = TrainConfig(**RESUME)
    whole = train(facts_model(), Facts(0), tmp_path / "a", config, Facts(1), progress=False)

    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C: the step finishes and is saved
        train(facts_model(), Facts(0), out, config, Facts(1), False, False, _stop_at(2, True))
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    with pytest.raises(Stop):  # a crash in step 5: the checkpoint of step 3 survives
        train(facts_model(), Facts(0), out, config, Facts(1), True, False, _stop_at(5))
    with pytest.raises(FileExistsError):
        train(facts_model(), Facts(0), out, config, Facts(1), progress=False)
    resumed = train(facts_model(), Facts(0), out, config, Facts(1), resume=True, progress=False)

    assert resumed.loss == whole.loss and resumed.eval_loss == whole.eval_loss
    assert _losses(out) == _losses(tmp_path / "a")
    a = mx.load(str(tmp_path / "a" / "adapter.safetensors"))
    b = mx.load(str(out / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    assert all("cross_attn" in k for k in a)

    stopped = train(facts_model(), Facts(0), tmp_path / "c", config, Facts(1), stop_after=3)
    assert stopped.steps == 3 and (tmp_path / "c" / "adapter.safetensors").exists()
    train(facts_model(), Facts(0), tmp_path / "c", config, Facts(1), resume=True)
    assert _losses(tmp_path / "c") == _losses(tmp_path / "a")


def test_schedule_warmup_then_cosine():
    config = TrainConfig(steps=10, learning_rate=1.0, warmup=4, min_lr=0.1)
    schedule = make_optimizer(config)._schedulers["learning_rate"]
    lrs = [schedule(mx.array(s)).item() for s in range(11)]
    assert lrs[0] == pytest.approx(0.25) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[10] == pytest.approx(0.1)


# -- split noise ------------------------------------------------------------------------


def test_split_draws_are_clipped_and_centred():
    rng = np.random.default_rng(0)
    assert draw_splits(64, 3, 0.0, rng) == [32, 16]
    draws = np.array([draw_splits(64, 3, 0.2, rng) for _ in range(2000)])
    assert draws[:, 0].min() >= 1 and (64 - draws[:, 0]).min() >= 4
    assert (64 - draws.sum(1)).min() >= 2  # the last node still has two leaves
    assert abs(draws[:, 0].mean() - 32) < 1 and 10 < draws[:, 0].std() < 14


@pytest.mark.parametrize("layout", ["paper", "reference"])
def test_noisy_plan_without_noise_is_the_tree_plan(layout):
    rng = np.random.default_rng(1)
    keeps = [rng.integers(0, 2, 5) for _ in range(3)]

    def chooser():
        calls = iter(keeps)
        return lambda node, half: next(calls)

    exact = plan_segments(5, 64, 4, layout, chooser())
    noisy = plan_segments(5, 64, 4, layout, chooser(), [32, 16, 8])
    assert exact.lengths == noisy.lengths
    assert np.array_equal(exact.source, noisy.source) and np.array_equal(exact.start, noisy.start)


def test_noisy_trees_are_regular_and_cover_their_chunk():
    model = facts_model()
    sizes = [23, 24]  # 64 -> preserved 23, kept 41 -> preserved 24, leaves 8 + 8 of 17
    plan = plan_segments(2, 64, 3, "paper", lambda node, half: np.array([0, 1]), sizes)
    for j in range(2):
        covered = np.zeros(64, int)
        for start, length in zip(plan.start[j], plan.lengths):
            covered[start : start + length] += 1
        assert covered.max() == 1 and covered.sum() == 63  # the odd last node drops one
    model.settings = dataclasses.replace(model.settings, tree_depth=3)
    context, query = mx.array(facts_context(np.random.default_rng(0))[0]), mx.array([Q, 1])
    tree = model.compress(context, query, splits=sizes)
    assert tree.entries_per_chunk == sum(len(downsample_index(n, 4)) for n in plan.lengths)
    example = next(Facts(0).examples(0))
    trees = [build_tree(model, example, 0.2, np.random.default_rng(s)) for s in range(4)]
    assert len({t.entries_per_chunk for t in trees}) > 1
    plain = build_tree(model, example, 0.0, np.random.default_rng(0))
    same = model.compress(mx.array(example.context), mx.array(example.query))
    assert all(mx.array_equal(a, b) for a, b in zip(plain.keys, same.keys))


# -- data --------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character, for data tests that need no real tokenizer."""

    eos_token_id = 1
    has_chat_template = False

    def encode(self, text, add_special_tokens=True):
        return [2 + ord(c) % 60 for c in text]


@pytest.mark.parametrize("piece_chars", [1 << 20, 7])
def test_language_modelling_windows(tmp_path, monkeypatch, piece_chars):
    monkeypatch.setattr(train_data, "PIECE_CHARS", piece_chars)
    text = "".join(chr(ord("a") + i % 26) for i in range(400))
    path = tmp_path / "book.txt"
    path.write_text("\n".join(text[i : i + 50] for i in range(0, 400, 50)))
    ids = np.array(CharTokenizer().encode(path.read_text()))
    source = TextLM([path], CharTokenizer(), 16, context_chunks=3, window=20, shuffle_buffer=1)
    examples = list(source.examples(0))
    assert len(examples) == (len(ids) - 48 - 1) // 20
    for i, ex in enumerate(examples):
        start = i * 20
        assert np.array_equal(ex.context.reshape(-1), ids[start : start + 48])
        assert np.array_equal(ex.inputs, ids[start + 48 : start + 68])
        assert np.array_equal(ex.targets, ids[start + 49 : start + 69])
        assert np.array_equal(ex.query, ex.inputs) and ex.mask.sum() == 20


def test_instruction_example_keeps_the_remainder_and_masks_the_prompt(tmp_path):
    path = tmp_path / "sft.jsonl"
    record = {"context": list(range(2, 152)), "prompt": [7, 8, 9], "response": "ok"}
    path.write_text(json.dumps(record) + "\n\n")
    (ex,) = list(Instructions([path], CharTokenizer(), 64).examples(0))
    running = list(range(130, 152)) + [7, 8, 9] + CharTokenizer().encode("ok") + [1]
    assert ex.context.shape == (2, 64) and list(ex.query) == [7, 8, 9]
    assert list(ex.inputs) == running[:-1] and list(ex.targets) == running[1:]
    assert list(ex.mask) == [0] * 24 + [1] * 3


def test_loss_scores_only_the_masked_positions():
    """The loss computes logits at the scored positions only, and equals the masked sum
    of the full logits' cross-entropy (its gradient too)."""
    model, rng = facts_model(), np.random.default_rng(3)
    context, _ = facts_context(rng)
    tree = model.compress(mx.array(context), mx.array([Q, KEYS]))
    inputs, targets = (mx.array(rng.integers(FILLER, VOCAB, 40)) for _ in range(2))
    mask = mx.array((np.arange(40) % 7 == 3).astype(np.float32))

    def full(model, inputs, targets, mask, tree):
        logits = model(inputs[None], tree=tree)[0]
        return (nn.losses.cross_entropy(logits, targets) * mask).sum()

    for fn_mask in (mask, mx.ones(40)):
        (ours, attn), ours_grad = nn.value_and_grad(model, example_loss)(
            model, inputs, targets, fn_mask, tree
        )
        theirs, theirs_grad = nn.value_and_grad(model, full)(model, inputs, targets, fn_mask, tree)
        assert attn.item() == 0 and abs(ours.item() - theirs.item()) < 1e-4 * abs(theirs.item())
        for (name, a), (_, b) in zip(tree_flatten(ours_grad), tree_flatten(theirs_grad)):
            assert mx.allclose(a, b, atol=1e-5, rtol=1e-4).item(), name


def _jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


GOOD = {"context": "x" * 80, "prompt": "q", "response": "a"}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "missing.jsonl: no such file"),
        ("empty.jsonl", "", "empty.jsonl: no records"),
        (
            "field.jsonl",
            _jsonl(GOOD, {"context": "x", "prompt": "q"}),
            "field.jsonl:2: .*'response'",
        ),
        ("bad.jsonl", _jsonl(GOOD, "{oops"), "bad.jsonl:2: not valid JSON"),
        ("type.jsonl", _jsonl({**GOOD, "prompt": 3}), "type.jsonl:1: 'prompt' must be"),
        ("short.jsonl", _jsonl(GOOD, {**GOOD, "context": "tiny"}), "short.jsonl:2: the context"),
        ("latin.jsonl", _jsonl(GOOD, "").encode() + b"\xe9\n", "latin.jsonl:3: not valid utf-8"),
    ],
)
def test_bad_instruction_data_names_file_and_line(tmp_path, monkeypatch, name, content, message):
    monkeypatch.setattr(train_data, "READ_BYTES", 5)  # lines arrive in several reads
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        list(Instructions([path], CharTokenizer(), 64).examples(0))


def test_bad_text_data(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(DataError, match="short.txt: too short"):
        list(TextLM([short], CharTokenizer(), 16).examples(0))
    with pytest.raises(DataError, match="no such file"):
        TextLM([tmp_path], CharTokenizer(), 16)


# -- adapters: train (CLI) -> generate, fuse ---------------------------------------------


@pytest.fixture(scope="module")
def zero_model(tmp_path_factory):
    """A tiny LLaMA stacked from one with untrained (zero) injection, and a tokenizer."""
    root = tmp_path_factory.mktemp("zero")
    write_hf_llama(root / "hf")
    args = ("--stack-from-one", "2", "--init", "zero", "--chunk-len", "64", "--dtype", "float32")
    assert run_cli("convert", str(root / "hf"), str(root / "model"), *args).exit_code == 0
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SPM_TOKENIZER / name, root / "model" / name)
    return root / "model"


TEXT = " ".join(["the old man walked to the river and the bell rang"] * 30)


def test_adapter_from_train_works_in_generate_and_fuse(zero_model, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(_jsonl({"context": TEXT, "prompt": "Who walked?", "response": "the old man"}))
    out = tmp_path / "run"
    args = ["--model", str(zero_model), "--data", str(data), "--eval-data", str(data), "-o"]
    args += [str(out), "--steps", "2", "--grad-accum", "2", "--lr", "1e-2", "--warmup", "0"]
    result = CliRunner().invoke(train_command, [*args, "--eval-examples", "1"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2] and "eval_loss" in log[-1]

    model, tokenizer = load(zero_model)
    base = model(mx.array([[5, 6, 7]]), tree=model.compress(mx.arange(64) % 300, mx.array([5])))
    meta = load_adapter(model, out)
    assert model.injection == "trained" and meta["step"] == 2
    tree = model.compress(mx.arange(64) % 300, mx.array([5]))
    adapted = model(mx.array([[5, 6, 7]]), tree=tree)
    assert not mx.allclose(base, adapted)
    assert isinstance(generate(model, tokenizer, "Who?", context=TEXT, max_tokens=3), str)
    with pytest.raises(ValueError, match="different model"):
        load_adapter(facts_model(), out / "adapter.json")

    fused = tmp_path / "fused"
    result = CliRunner().invoke(fuse_command, [str(out), str(fused), "--model", str(zero_model)])
    assert result.exit_code == 0, result.output
    reloaded, _ = load(fused)
    assert reloaded.injection == reloaded.config.injection == "trained"
    assert mx.allclose(reloaded(mx.array([[5, 6, 7]]), tree=tree), adapted, atol=1e-5)
    with pytest.raises(FileExistsError):
        fuse(zero_model, out, fused)
    prompt = ["--prompt", "Who walked?", "--max-tokens", "3", "--file"]
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    rereads = run_cli("generate", "--model", str(zero_model), *prompt, str(book))
    assert rereads.exit_code == 0 and "untrained" not in rereads.output  # re-reading is on
    off = ["--reread-tokens", "0"]
    untrained = run_cli("generate", "--model", str(zero_model), *off, *prompt, str(book))
    assert "untrained" in untrained.output
    trained = run_cli("generate", "--model", str(fused), *prompt, str(book))
    assert trained.exit_code == 0 and "untrained" not in trained.output


def test_cli_language_modelling_and_one_line_errors(zero_model, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    base = ["--model", str(zero_model), "--steps", "1", "--grad-accum", "1"]
    lm = ["--data", str(book), "-o", str(tmp_path / "lm"), "--context-chunks", "1"]
    result = CliRunner().invoke(train_command, [*base, *lm, "--window", "16"])
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(train_command, [*base, *lm, "--window", "16"])
    assert again.exit_code == 1
    assert "holds a checkpoint: resume it (--resume), or use another folder" in again.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_jsonl(GOOD, {"prompt": "q", "response": "a"}))
    result = CliRunner().invoke(train_command, [*base, "--data", str(bad), "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert (
        result.output.strip()
        .splitlines()[-1]
        .endswith("bad.jsonl:2: the record has no 'context' field")
    )


def test_injection_layers_train_alone_and_must_exist(zero_model, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    args = ["--model", str(zero_model), "--data", str(book), "--steps", "1", "--grad-accum", "1"]
    args += ["--context-chunks", "1", "--window", "16"]
    result = CliRunner().invoke(
        train_command, [*args, "-o", str(tmp_path / "one"), "--injection-layers", "1"]
    )
    assert result.exit_code == 0, result.output
    meta, weights = read_adapter(tmp_path / "one")
    assert meta["injection_layers"] == [1]
    assert weights and all(k.startswith("model.layers.1.cross_attn.") for k in weights)
    result = CliRunner().invoke(
        train_command, [*args, "-o", str(tmp_path / "bad"), "--injection-layers", "2"]
    )
    assert result.exit_code == 1
    assert "injection layers [2] are not among this model's 0..1" in result.output
    resumed = [*args, "-o", str(tmp_path / "one"), "--resume", "--steps", "2"]
    result = CliRunner().invoke(train_command, resumed)
    assert result.exit_code == 1 and "trained injection_layers [1], not None" in result.output


class Numbered:
    """`count` examples per epoch whose context holds (tag, epoch, index)."""

    def __init__(self, tag: int, count: int, sigma: float):
        self.tag, self.count, self.split_sigma = tag, count, sigma

    def examples(self, epoch: int):
        for i in range(self.count):
            ids = np.array([[self.tag, epoch, i]], np.int32)
            yield Example(ids, ids[0], ids[0], ids[0], np.ones(3, np.float32))


def test_mixture_interleaves_every_example_once_with_its_sources_noise():
    mix = Mixture([Numbered(0, 30, 0.2), Numbered(1, 90, 0.1)], [0.25, 0.75], seed=3)
    examples = list(mix.examples(0))
    tags = [int(ex.context[0, 0]) for ex in examples]
    assert sorted((t, int(ex.context[0, 2])) for t, ex in zip(tags, examples)) == sorted(
        [(0, i) for i in range(30)] + [(1, i) for i in range(90)]
    )
    # In proportion: source 0 is a quarter of the first 60 draws, give or take.
    assert 5 <= tags[:60].count(0) <= 25
    assert {ex.split_sigma for ex in examples if ex.context[0, 0] == 0} == {0.2}
    assert {ex.split_sigma for ex in examples if ex.context[0, 0] == 1} == {0.1}
    again = [int(ex.context[0, 0]) for ex in mix.examples(0)]
    assert again == tags and [int(e.context[0, 0]) for e in mix.examples(1)] != tags
    with pytest.raises(ValueError, match="positive"):
        Mixture([Numbered(0, 1, 0.1)], [0.0])


def test_cli_mixes_text_and_instruction_files(zero_model, tmp_path):
    book, sft = tmp_path / "book.txt", tmp_path / "qa.jsonl"
    book.write_text(TEXT)
    sft.write_text(_jsonl(GOOD))
    args = ["--model", str(zero_model), "--steps", "2", "--grad-accum", "2", "--window", "16"]
    args += ["--data", str(book), "--data", str(sft), "--context-chunks", "1"]
    result = CliRunner().invoke(
        train_command,
        [*args, "--lm-weight", "0.5", "--eval-data", str(sft), "-o", str(tmp_path / "o")],
    )
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and "eval_loss" in log[-1]
    only_text = CliRunner().invoke(
        train_command, [*args[:6], "--data", str(book), "--task", "mix", "-o", str(tmp_path / "p")]
    )
    assert only_text.exit_code == 1 and "needs both" in only_text.output


def test_instruction_turns_score_every_response(tmp_path):
    tok = CharTokenizer()
    record = {
        "context": "c" * 40,
        "turns": [{"prompt": "ab", "response": "xy"}, {"prompt": "q", "response": "z"}],
    }
    path = tmp_path / "turns.jsonl"
    path.write_text(_jsonl(record))
    (example,) = Instructions([path], tok, 16, chat_template=False).examples(0)
    running = np.concatenate([example.inputs[:1], example.targets])
    eos = tok.eos_token_id
    expected = tok.encode("c" * 8) + tok.encode("ab") + tok.encode("xy") + [eos]
    expected += tok.encode("q") + tok.encode("z") + [eos]
    assert running.tolist() == expected
    scored = [t for t, m in zip(example.targets.tolist(), example.mask) if m]
    assert scored == tok.encode("xy") + [eos] + tok.encode("z") + [eos]
    assert example.query.tolist() == tok.encode("ab")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_jsonl({"context": "c" * 40, "turns": [{"prompt": "a"}]}))
    with pytest.raises(DataError, match="bad.jsonl:1: turn 0: the record has no 'response'"):
        Instructions([bad], tok, 16, chat_template=False)


# -- the attention loss: teaching the injection where to look ------------------------------


def test_evidence_marks_the_rows_that_copy_and_the_tokens_they_copy(tmp_path):
    tok = CharTokenizer()
    context = list(range(2, 42))  # 40 ids: 2 chunks of 16 in the tree, 8 running
    record = {
        "context": context,
        "turns": [
            {"prompt": [7, 8], "response": [7, 8, 9], "evidence": [5, 8]},
            {"prompt": [9], "response": [34, 35], "evidence": [32, 34]},  # in the tail
            {"prompt": [9], "response": [32, 33, 34], "evidence": [30, 33]},  # the tree's end
        ],
    }
    path = tmp_path / "ev.jsonl"
    path.write_text(_jsonl(record))
    (ex,) = Instructions([path], tok, 16, chat_template=False).examples(0)
    running = np.concatenate([ex.inputs[:1], ex.targets])
    for row, entry in ex.attend:
        assert ex.mask[row] == 1  # the row predicts a response token ...
        assert running[row + 1] == context[entry]  # ... that the context holds there
    assert ex.attend[:, 1].tolist() == [5, 6, 7, 30, 31]
    assert ex.attend[:, 0].tolist() == [9, 10, 11, 16, 17]  # id responses get no EOS
    bad = {**record, "turns": [{"prompt": "a", "response": "b", "evidence": [3, 99]}]}
    path.write_text(_jsonl(bad))
    with pytest.raises(DataError, match="ev.jsonl:1: turn 0: 'evidence' ends after the context"):
        Instructions([path], tok, 16, chat_template=False)
    path.write_text(_jsonl({**GOOD, "evidence": [4, 2]}))
    with pytest.raises(DataError, match="ev.jsonl:1: 'evidence' must be"):
        Instructions([path], tok, 16, chat_template=False)


def test_tapped_attention_is_the_injection_attention():
    """exp(log_attention) @ V is what the injection block computes."""
    model, rng = facts_model(), np.random.default_rng(4)
    context, _ = facts_context(rng)
    tree = model.compress(mx.array(context), mx.array([Q, KEYS]))
    block, cache = model.layers[1].cross_attn, tree.layer(1)
    q = mx.random.normal((1, 4, 5, 16))
    logprobs = block.log_attention(q, cache)
    keys, values = cache.dequantized()
    assert logprobs.shape == (1, 4, 5, keys.shape[2])
    assert mx.allclose(mx.exp(logprobs).sum(-1), mx.ones((1, 4, 5)), atol=1e-5).item()
    ours = mx.exp(logprobs) @ values
    theirs = mx.fast.scaled_dot_product_attention(q, keys, values, scale=block.scale)
    assert mx.allclose(ours, theirs, atol=1e-5).item()


class Repeat:
    """The same example, again and again."""

    split_sigma = 0.0

    def __init__(self, example: Example):
        self.example = example

    def examples(self, epoch: int):
        while True:
            yield self.example


def _evidence_example(rng) -> Example:
    context, facts = facts_context(rng)
    key = next(iter(facts))
    at = int(np.flatnonzero(context.reshape(-1) == KEYS + key)[0]) - 1  # its value
    text = np.array([Q, KEYS + key, VALUES + facts[key]])
    mask = np.array([0, 1], np.float32)
    return Example(context, text[:2], text[:-1], text[1:], mask, attend=np.array([[1, at]]))


def _attention_on(model, example, layer: int, head: int) -> float:
    tree = build_tree(model, example, 0.0, np.random.default_rng(0))
    tap = AttentionTap(mx.array([1]))
    model.model(mx.array(example.inputs[None]), tree, [None] * len(model.layers), tap)
    return mx.exp(tap.logprobs[layer][0, head, 0, int(example.attend[0, 1])]).item()


def test_attention_loss_teaches_the_heads_to_look_at_the_evidence(tmp_path):
    model = facts_model(tree_depth=1, last_p=0)  # a tree that keeps every token
    example = _evidence_example(np.random.default_rng(5))
    before = [_attention_on(model, example, 1, h) for h in range(4)]
    config = TrainConfig(
        steps=15,
        grad_accum=1,
        learning_rate=3e-2,
        warmup=0,
        attention_loss=1.0,
        attention_heads=((1, 2),),
        injection_layers=(1,),
    )
    train(model, Repeat(example), tmp_path, config, progress=False)
    logged = [r["attention_loss"] for r in _log(tmp_path)]
    assert logged[-1] < 0.2 * logged[0]
    after = [_attention_on(model, example, 1, h) for h in range(4)]
    assert before[2] < 0.2 and after[2] > 0.8, (before, after)
    assert max(after[h] for h in (0, 1, 3)) < 0.5  # untaught heads learn no such focus


def test_attention_loss_needs_a_tree_of_every_token(tmp_path):
    model = facts_model()  # depth 2, last_p 4: a tree of some tokens
    example = _evidence_example(np.random.default_rng(5))
    config = TrainConfig(steps=1, grad_accum=1, attention_loss=1.0)
    with pytest.raises(ValueError, match="keeps every context token in order"):
        train(model, Repeat(example), tmp_path, config, progress=False)


def test_attention_heads_must_be_training_heads(zero_model, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(_jsonl({"context": TEXT, "prompt": "Who?", "response": "the old man"}))
    args = ["--model", str(zero_model), "--data", str(data), "--steps", "1", "--grad-accum", "1"]
    args += ["--attention-loss", "1", "--injection-layers", "1", "-o", str(tmp_path / "r")]
    result = CliRunner().invoke(train_command, [*args, "--attention-heads", "0.1"])
    assert result.exit_code == 1 and "attention heads ['0.1'] are not heads of" in result.output
    result = CliRunner().invoke(train_command, [*args, "--attention-heads", "1-2"])
    assert result.exit_code == 2 and "heads must look like '17.3,18.6'" in result.output


def test_the_description_is_never_replaced_and_adapters_carry_settings(tmp_path):
    """A model's description cannot change, in place or by replacing it; an adapter's
    settings become the model's settings, which decoding (and its log scale) reads."""
    model = facts_model()
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.chunk_len = 64
    with pytest.raises(AttributeError):
        model.config = dataclasses.replace(model.config, chunk_len=64)
    set_trainable(model, ("injection",))
    model.settings = dataclasses.replace(model.settings, log_scale_entries=16)
    save_adapter(tmp_path / "a", model, model.fingerprint())
    fresh = facts_model()
    config, inputs = fresh.config, mx.array([[5, 6, 7]])
    tree = fresh.compress(mx.arange(4 * CHUNK) % VOCAB, mx.array([5]))
    sharpened = fresh(inputs, tree, settings=model.settings)
    load_adapter(fresh, tmp_path / "a", check_fingerprint=False)
    assert fresh.config is config and fresh.settings.log_scale_entries == 16
    assert fresh.injection == "trained" and tree.num_entries > 16
    assert mx.allclose(fresh(inputs, tree), sharpened)
    assert not mx.allclose(fresh(inputs, tree, settings=facts_model().settings), sharpened)


def test_a_reader_lora_on_the_upper_layers_loads_fused_and_leaves_the_tree(zero_model, tmp_path):
    model, _ = load(zero_model)
    context = mx.arange(64) % 300
    tree = model.compress(context, mx.array([5]))
    fingerprint = model.fingerprint()
    model.freeze()
    m, n = model.config.num_injection_layers, len(model.layers)
    with pytest.raises(ValueError, match="only the upper layers"):
        add_lora(model, (m - 1,), rank=2, scale=4.0)
    add_lora(model, tuple(range(m, n)), rank=2, scale=4.0)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    assert {int(k.split(".")[2]) for k in trainable} == set(range(m, n))
    rng = np.random.default_rng(0)
    model.load_weights(
        [(k, mx.array(rng.normal(0, 0.05, v.shape), v.dtype)) for k, v in trainable.items()],
        strict=False,
    )
    inputs = mx.array([[5, 6, 7]])
    adapted = model(inputs, tree=tree)
    save_adapter(tmp_path / "a", model, fingerprint, extra={"lora_scale": 4.0})

    fresh, _ = load(zero_model)
    assert not mx.allclose(fresh(inputs, tree=tree), adapted, atol=1e-4)
    load_adapter(fresh, tmp_path / "a")
    assert_close(fresh(inputs, tree=tree), adapted, atol=1e-5)
    # The compressor is below the LoRA: the same context gives the same tree.
    again = fresh.compress(context, mx.array([5]))
    for ours, theirs in zip(again.keys, tree.keys):
        assert_close(ours, theirs, atol=0)

    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    weights = mx.load(str(tmp_path / "a" / "adapter.safetensors"))
    broken = {
        "no scale": ({k: v for k, v in meta.items() if k != "lora_scale"}, weights, "lora_scale"),
        "one factor": (meta, {k: v for k, v in weights.items() if "q_proj.lora_b" not in k}, None),
    }
    for name, (bad_meta, bad_weights, message) in broken.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        if message is None:
            listed = {k: list(v.shape) for k, v in bad_weights.items()}
            bad_meta = {**bad_meta, "parameters": listed}
            message = "one LoRA factor without the other"
        mx.save_safetensors(str(folder / "adapter.safetensors"), bad_weights)
        (folder / "adapter.json").write_text(json.dumps(bad_meta))
        with pytest.raises(ValueError, match=message):
            load_adapter(load(zero_model)[0], folder)
