"""The CLI's compress-once, ask-many path, its saved-tree formats, and its input errors."""

import shutil

import pytest
from click.testing import CliRunner
from conftest import SPM_TOKENIZER, run_cli, write_hf_llama
from test_generate import _one_line_error, book, invoke, spm_model  # noqa: F401

from mlx_sharedllm.cli import generate_cli
from mlx_sharedllm.cli.main import cli
from mlx_sharedllm.tree import ContextTree


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A stacked tiny LLaMA with head_dim 32, so its trees can be stored in 8 bits."""
    root = tmp_path_factory.mktemp("wide")
    write_hf_llama(root / "base", hidden_size=128, intermediate_size=192)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SPM_TOKENIZER / name, root / "base" / name)
    args = ["--stack-from-one", "2", "--init", "copy", "--chunk-len", "32"]
    result = run_cli("convert", str(root / "base"), str(root / "out"), *args)
    assert result.exit_code == 0, result.output
    return root / "out"


def stats(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def compress(*args):
    return CliRunner().invoke(cli, ["compress", *args])


@pytest.mark.parametrize("bits, expected", [(None, 8), ("float", None), ("4", 4)])
def test_saved_trees_are_8_bit_unless_asked(wide_model, book, tmp_path, bits, expected):  # noqa: F811
    saved = tmp_path / "book.tree"
    extra = [] if bits is None else ["--tree-bits", bits]
    args = ["--model", str(wide_model), "--max-tokens", "2", "--prompt", "Who?"]
    result = invoke(
        *args, "--file", str(book), "--save-context", str(saved), "--tree-group-size", "32",
        *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    tree = ContextTree.load(saved)
    assert tree.layers[0].fmt.bits == expected
    kind = "float" if expected is None else f"{expected}-bit"
    assert f"saved the compressed context ({kind}) to {saved}" in result.stderr
    assert " MB" in result.stderr
    assert "compressed at" in stats(result)
    again = invoke(*args, "--context", str(saved))
    assert again.exit_code == 0, again.output
    assert f"loaded from {saved}" in stats(again)
    assert again.stdout == result.stdout


def test_a_head_dim_the_group_does_not_divide_saves_float(spm_model, book, tmp_path):  # noqa: F811
    saved = tmp_path / "book.tree"
    result = compress("--model", str(spm_model), "--file", str(book), "--out", str(saved),
                      "--tree-group-size", "128")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "saving the tree in float" in result.stderr
    assert ContextTree.load(saved).layers[0].fmt.bits is None


def test_compress_command_then_generate_from_the_tree(wide_model, book, tmp_path):  # noqa: F811
    saved = tmp_path / "book.tree"
    made = compress("--model", str(wide_model), "--file", str(book), "--out", str(saved),
                    "--tree-group-size", "32")  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "context:" in made.stderr and "saved the compressed context (8-bit)" in made.stderr
    args = ["--model", str(wide_model), "--max-tokens", "3", "--prompt", "Who?"]
    direct = invoke(*args, "--file", str(book), "--save-context", str(tmp_path / "b.tree"),
                    "--tree-group-size", "32")  # fmt: skip
    from_tree = invoke(*args, "--context", str(saved))
    assert from_tree.exit_code == 0, from_tree.output
    assert ContextTree.load(saved).n_chunks == ContextTree.load(tmp_path / "b.tree").n_chunks
    assert "loaded from" in stats(from_tree)
    assert direct.exit_code == 0


def test_a_tree_from_another_model_is_refused(spm_model, book, tmp_path):  # noqa: F811
    import json
    import shutil

    saved = tmp_path / "book.tree"
    assert compress("--model", str(spm_model), "--file", str(book), "--out", str(saved),
                    "--tree-bits", "float").exit_code == 0  # fmt: skip
    other = tmp_path / "other"
    shutil.copytree(spm_model, other)
    config = json.loads((other / "config.json").read_text())
    config["chunk_len"] = 32
    (other / "config.json").write_text(json.dumps(config))
    result = invoke("--model", str(other), "--prompt", "Who?", "--context", str(saved))
    _one_line_error(result, "was compressed by a different model")


def test_compress_errors(spm_model, tmp_path):  # noqa: F811
    short = tmp_path / "short.txt"
    short.write_text("just a few words.")
    result = compress("--model", str(spm_model), "--file", str(short), "--out",
                      str(tmp_path / "x.tree"))  # fmt: skip
    _one_line_error(result, "shorter than one chunk")
    missing = compress("--model", str(spm_model), "--file", str(short))
    assert missing.exit_code != 0 and "--out" in missing.output


@pytest.mark.parametrize("command", ["generate", "compress"])
def test_a_directory_or_a_device_gets_its_own_error(spm_model, tmp_path, command):  # noqa: F811
    extra = ["--prompt", "Hi"] if command == "generate" else ["--out", str(tmp_path / "x")]
    run = lambda path: CliRunner().invoke(  # noqa: E731
        cli, [command, "--model", str(spm_model), "--file", path, *extra]
    )
    _one_line_error(run(str(tmp_path)), "is a directory")
    _one_line_error(run("/dev/zero"), "not a regular file")
    _one_line_error(run(str(tmp_path / "nothing.txt")), "no such file")


def test_the_prompt_is_checked_before_the_context_is_read(spm_model, book, monkeypatch):  # noqa: F811
    def never(*args):
        raise AssertionError("the context was read before the prompt was checked")

    monkeypatch.setattr(generate_cli, "_tokenize", never)
    result = invoke("--model", str(spm_model), "--file", str(book), "--prompt", "the river " * 400)
    _one_line_error(result, "longer than the model's window")


def test_stdin_is_tokenized_as_the_file_is(spm_model, book):  # noqa: F811
    from mlx_sharedllm.cli.inputs import read_text_file
    from mlx_sharedllm.generate import tokenize_pieces
    from mlx_sharedllm.loading import load

    _, tokenizer = load(spm_model)
    source = read_text_file(str(book), "utf-8")
    expected = tokenize_pieces(tokenizer, source.pieces())
    assert (generate_cli._tokenize(tokenizer, source) == expected).all()
    args = ["--model", str(spm_model), "--prompt", "Who?", "--max-tokens", "2"]
    piped = invoke(*args, "--file", "-", input=book.read_text())
    given = invoke(*args, "--file", str(book))
    assert piped.exit_code == 0, piped.output
    assert piped.stdout == given.stdout


# The entry point, started once the interpreter is up (Python's own start-up is not ours).
ENTRY = (
    "import sys; from mlx_sharedllm.cli import main; "
    "sys.stderr.write('ready\\n'); sys.stderr.flush(); sys.argv[1:] = ['--help']; main()"
)


@pytest.mark.parametrize("delay", [0.2, 0.5])
def test_ctrl_c_while_the_command_starts_exits_130_without_a_traceback(delay):
    import signal
    import subprocess
    import sys
    import time

    def default_sigint():
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen(
        [sys.executable, "-c", ENTRY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_sigint,
    )
    assert process.stderr.readline() == b"ready\n"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    if process.returncode == 0:  # it finished first: nothing to interrupt
        return
    assert process.returncode == 130, (process.returncode, err.decode())
    assert b"Traceback" not in err and b"interrupted" in err
