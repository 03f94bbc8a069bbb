"""Smoke test of benchmarks/long_context.py on a tiny shape: every system runs, the records
have their keys, and the efficiency figures are finite and positive. No timing asserts."""

import importlib.util
import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "long_context.py"
TINY = [
    "--layers", "2", "--hidden", "64", "--heads", "2", "--kv-heads", "1",
    "--intermediate", "96", "--vocab", "256", "--m", "1", "--chunk-len", "256",
    "--window", "512", "--lengths", "1024,2048", "--full-max", "1024",
]  # fmt: skip


def load_bench():
    spec = importlib.util.spec_from_file_location("long_context", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_system_runs_and_the_figures_are_sane(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench, "DECODE_TOKENS", 4)
    out = tmp_path / "bench.json"
    bench.main([*TINY, "--json", str(out)])
    result = json.loads(out.read_text())
    records = result["records"]
    keys = {"system", "context_tokens", "ttft_s", "decode_tok_s", "peak_mem_bytes"}
    assert all(keys <= set(r) for r in records)
    ran = {(r["system"], r["context_tokens"]) for r in records if r["ttft_s"] is not None}
    systems = {"sharedllm", "full", "streaming", "truncate"}
    assert ran == {(s, n) for s in systems for n in (1024, 2048)} - {("full", 2048)}
    skipped = next(r for r in records if (r["system"], r["context_tokens"]) == ("full", 2048))
    assert "skipped" in skipped["note"]
    for name in ("matmul_gflops", "copy_gbs", "compress_efficiency", "decode_efficiency"):
        assert math.isfinite(result[name]) and result[name] > 0, name


def test_flop_count_of_one_chunk():
    """Selection, encodes and causal attention, counted by hand for chunk_len 8, depth 3."""
    bench = load_bench()
    a = bench.parse_args(["--hidden", "4", "--heads", "1", "--kv-heads", "1",
                          "--intermediate", "8", "--m", "1", "--chunk-len", "8"])  # fmt: skip
    ours, _ = bench.build_models(a)

    def layer(tokens, queries, pairs):  # kv: 2*4*4, q+o: 2*4*4, mlp: 3*4*8, attention 2*4
        return 2 * (32 * tokens + 128 * queries + 8 * pairs)

    select = 2 * layer(4, 1, 4) + 2 * layer(2, 1, 2)
    encode = 2 * layer(1, 1, 1) + layer(2, 2, 3) + layer(4, 4, 10)  # leaves 1, 1; then 2, 4
    assert bench.compress_flops(a, ours, 3) == 3 * (select + encode)
