"""Data-parallel `train` under `mlx.launch`: two ring processes on loopback train as one
process of the same global batch, resume on another number of processes, and stop
when one of them dies."""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SPM_TOKENIZER, run_cli, write_hf_llama

from mlx_sharedllm.cli.train_cli import train_command

HERE = Path(__file__).parent
WORDS = [
    "the",
    "old",
    "man",
    "walked",
    "to",
    "the",
    "river",
    "and",
    "the",
    "bell",
    "rang",
    "while",
    "a",
    "red",
    "fox",
    "slept",
]
STEPS = 4


def _free_ports() -> int:
    """A port p such that p and p + 1 are free (the ring listens on one per process)."""
    for _ in range(100):
        port = random.randint(20000, 60000)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no two free ports")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model whose chunks can be moved (for distractors), data, distractor text."""
    root = tmp_path_factory.mktemp("dist")
    write_hf_llama(root / "hf")
    args = ("--stack-from-one", "2", "--chunk-len", "64", "--dtype", "float32")
    result = run_cli("convert", str(root / "hf"), str(root / "model"), *args, "--policy", "right")
    assert result.exit_code == 0, result.output
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SPM_TOKENIZER / name, root / "model" / name)
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        context = " ".join(rng.choice(WORDS, 120))
        records.append({"context": context, "prompt": f"Word {i}?", "response": WORDS[i]})
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "book.txt").write_text(" ".join(rng.choice(WORDS, 400)))
    return root


def _args(root: Path, out: Path, grad_accum: int, *extra: str) -> list[str]:
    args = ["--model", str(root / "model"), "--data", str(root / "qa.jsonl"), "-o", str(out)]
    args += ["--eval-data", str(root / "qa.jsonl"), "--eval-examples", "3", "--eval-every", "2"]
    args += ["--steps", str(STEPS), "--save-every", "2", "--lr", "1e-3", "--warmup", "1"]
    args += ["--distractors", str(root / "book.txt"), "--distractor-chunks", "4"]
    return [*args, "--grad-accum", str(grad_accum), *extra]


def _launch(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlx_sharedllm.launch", "-n", "2", "--backend", "ring"]
    command += ["--starting-port", str(_free_ports()), "--python", sys.executable]
    command += [str(HERE / "dist_train.py"), *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
    )


def _one_process(args: list[str]):
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    return result


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, base: Path) -> None:
    """The same adapter to 1e-5 (of weights that training moved far more), and the same
    log (losses to 1e-5 relative). The sums of gradients differ only in their order."""
    x, y = mx.load(str(a / "adapter.safetensors")), mx.load(str(b / "adapter.safetensors"))
    start = mx.load(str(base / "model.safetensors"))
    assert x.keys() == y.keys()
    diff = max(mx.abs(x[k] - y[k]).max().item() for k in x)
    moved = min(mx.abs(x[k] - start[k]).max().item() for k in x)
    print(f"adapter max diff {diff:.3g}, every weight moved at least {moved:.3g}")
    assert diff <= 1e-5 and moved > 1e-3
    for r, s in zip(_log(a), _log(b), strict=True):
        assert (r["step"], r["learning_rate"]) == (s["step"], s["learning_rate"])
        for key in ("loss", "eval_loss"):
            assert (key in r) == (key in s)
            if key in r:
                assert r[key] == pytest.approx(s[key], rel=1e-5)


@pytest.fixture(scope="module")
def reference(setup):
    """One process, a batch of 4: the run that two processes of 2 must equal."""
    out = setup / "one"
    _one_process(_args(setup, out, 4))
    return out


def test_two_processes_train_as_one_with_the_same_global_batch(setup, reference):
    out = setup / "two"
    start = time.perf_counter()
    result = _launch(_args(setup, out, 2))
    print(f"2 processes: {time.perf_counter() - start:.1f}s")
    assert result.returncode == 0, result.stderr
    assert "2 processes, 2 examples each per step: a global batch of 4" in result.stderr
    assert result.stderr.count("trained 4 steps") == 1  # rank 0 alone reports
    assert [r["batch"] for r in _log(out)] == [4] * STEPS
    assert_same_run(out, reference, setup / "model")


def test_a_run_resumes_on_another_number_of_processes(setup, reference):
    out = setup / "resumed"
    result = _launch(_args(setup, out, 2, "--stop-after", "2"))
    assert result.returncode == 0, result.stderr
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["step"], state["processes"]) == (2, 2)
    _one_process(_args(setup, out, 4, "--resume"))  # the same global batch, one process
    assert_same_run(out, reference, setup / "model")


@pytest.mark.slow
def test_a_dead_process_stops_the_run_and_its_checkpoint_resumes(setup, reference):
    out = setup / "killed"
    start = time.perf_counter()
    result = _launch(_args(setup, out, 2), timeout=60, DIE_AFTER="3")
    elapsed = time.perf_counter() - start
    print(f"stopped in {elapsed:.1f}s\n{result.stderr}")
    assert result.returncode == 1
    assert "Node with rank 1 was killed" in result.stderr or "rank 1 exited" in result.stderr
    assert "rank 0:" in result.stderr and "resumes with --resume" in result.stderr
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    result = _launch(_args(setup, out, 2, "--resume"))
    assert result.returncode == 0, result.stderr
    assert_same_run(out, reference, setup / "model")


@pytest.mark.slow
def test_a_process_that_stops_answering_ends_the_run_after_the_timeout(setup):
    out = setup / "hung"
    start = time.perf_counter()
    args = _args(setup, out, 2, "--peer-timeout", "2")
    result = _launch(args, timeout=60, DIE_AFTER="3", HANG="1")
    elapsed = time.perf_counter() - start
    print(f"stopped in {elapsed:.1f}s\n{result.stderr}")
    assert result.returncode == 1 and elapsed < 30
    assert "rank 0: no answer from the other processes for 2s" in result.stderr
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2


class _TwoProcesses:
    """A stand-in group: rank 0 of 2, for World's local logic (no collectives run)."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 2


def test_the_launchers_sigterm_after_an_error_lets_the_error_be_reported():
    """mlx.launch sends SIGTERM to every process once one fails; a process already
    leaving with PeerLost must live to print it (CI once lost the message to this race)."""
    import signal

    from mlx_sharedllm.distributed import PeerLost, World

    world = World(_TwoProcesses(), timeout=60)
    before = signal.getsignal(signal.SIGTERM)
    try:
        stopped = pytest.raises(PeerLost, match="rank 0: stopped by the launcher")
        with stopped, world.watch():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler raises at the next bytecode
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: this test goes on
        with pytest.raises(PeerLost), world.watch():
            raise PeerLost("rank 0: another process stopped")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        with world.watch():
            pass
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # what it found
    finally:
        signal.signal(signal.SIGTERM, before)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with world.watch():
        assert signal.getsignal(signal.SIGTERM) == world._terminated
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    signal.signal(signal.SIGTERM, before)
