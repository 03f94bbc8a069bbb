"""Two questions about Botchan through `mlx-sharedllm serve` and the openai client: the
first compresses the book, the second reads the cached tree.

    python benchmarks/server_botchan.py [--model PATH] [--out benchmarks/results/server_botchan.log]

The whole book goes in the user's message, as an unmodified OpenAI client sends it; the
server compresses the long part once and keeps its tree.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

QUESTIONS = ("Who is the narrator, and where does he go to teach?", "Who is Kiyo?")


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def start(model: str | None, port: int, cache: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlx_sharedllm", "serve", "--port", str(port)]
    command += ["--cache-dir", cache] + (["--model", model] if model else [])
    return subprocess.Popen(command, stderr=subprocess.DEVNULL)


def wait_ready(client: openai.OpenAI, process: subprocess.Popen) -> float:
    tic = time.perf_counter()
    while True:
        try:
            client.models.list()
            return time.perf_counter() - tic
        except openai.APIConnectionError:
            if process.poll() is not None:
                raise SystemExit("the server exited") from None
            time.sleep(0.5)


def ask(client: openai.OpenAI, book: str, question: str) -> tuple[float, object]:
    tic = time.perf_counter()
    response = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": f"{book}\n\n{question}"}],
        max_tokens=64,
    )
    return time.perf_counter() - tic, response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from mlx_sharedllm.assets import demo_book

    book = Path(demo_book()).read_text()
    port, lines = free_port(), []
    with tempfile.TemporaryDirectory() as cache:
        process = start(args.model, port, cache)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600
        )
        try:
            lines.append(f"server ready in {wait_ready(client, process):.1f} s")
            for i, question in enumerate(QUESTIONS, 1):
                seconds, r = ask(client, book, question)
                ext = r.usage.model_extra["sharedllm"]
                lines.append(
                    f"question {i}: {seconds:.1f} s (cache hit {ext['cache_hit']}, compress "
                    f"{ext['compress_seconds']:.1f} s, {ext['context_tokens']:,} context tokens, "
                    f"{ext['chunks']} chunks, {ext['reread_tokens']} re-read, prompt "
                    f"{r.usage.prompt_tokens} tokens, {r.usage.completion_tokens} generated)"
                )
                lines.append(f"  Q: {question}\n  A: {r.choices[0].message.content!r}")
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(60)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lines.append(f"server peak RSS {peak:,.0f} MB; {os.cpu_count()} CPUs")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
