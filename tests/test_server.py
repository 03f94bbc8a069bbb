"""`mlx-sharedllm serve`: the real server on a free loopback port, driven by the official
`openai` client (raw HTTP where a client cannot send the bad input)."""

import dataclasses
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from conftest import SPM_TOKENIZER, convert_case, run_cli

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import mlx.core as mx  # noqa: E402  (after conftest, which imports mlx_sharedllm first)
from mlx.utils import tree_flatten  # noqa: E402

from mlx_sharedllm import load  # noqa: E402
from mlx_sharedllm.cli import serve_cli  # noqa: E402
from mlx_sharedllm.plan import plan_for_model_dir  # noqa: E402
from mlx_sharedllm.server import create_app, document_id, make_service  # noqa: E402
from mlx_sharedllm.server import service as service_module  # noqa: E402

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "walked", "to", "school", "with", "dog",
         "under", "sun", "rain", "tree", "house"]  # fmt: skip
QUESTION = "Who walked to school?"


def text_of(lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choices(WORDS, k=15)) + "." for _ in range(lines))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A converted fixture checkpoint (chunks of 64, window 512) with a tokenizer."""
    path = tmp_path_factory.mktemp("serve") / "model"
    convert_case("n1_gqa", path, "--dtype", "float32", "--chunk-len", "64")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SPM_TOKENIZER / name, path / name)
    model, tokenizer = load(path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def book():
    return text_of(120)


@dataclass
class Running:
    service: object
    port: int

    def client(self, key: str = "none"):
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60
        )

    def raw(self, method: str, path: str, body=None, headers=None):
        """(status, JSON body) of a request sent as given."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def wait_idle(self, timeout: float = 10.0) -> float:
        """Seconds until no job waits or runs."""
        tic = time.perf_counter()
        while self.service.engine.pending:
            assert time.perf_counter() - tic < timeout, "the model stayed busy"
            time.sleep(0.005)
        return time.perf_counter() - tic


@contextmanager
def serving(loaded, cache_dir, *, api_key=None, max_body=1 << 20, queue=16, cache_bytes=1 << 30):
    """The app under uvicorn in a thread, on a free loopback port."""
    _, model, tokenizer = loaded
    service = make_service(model, tokenizer, "tiny", cache_dir, cache_bytes, queue)
    app = create_app(service, api_key=api_key, max_body=max_body)
    config = uvicorn.Config(app, port=0, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield Running(service, server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)
        service.engine.close()


@pytest.fixture
def server(loaded, tmp_path):
    with serving(loaded, tmp_path / "cache") as running:
        yield running


def ask(client, content: str, **options):
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model="tiny", messages=messages, **options)


def extension(response) -> dict:
    return response.usage.model_extra["sharedllm"]


def add_document(client, text: str) -> dict:
    return client.post("/documents", cast_to=object, body={"text": text})


def test_chat_streaming_and_completions(server):
    client = server.client()
    whole = ask(client, QUESTION, max_tokens=6)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 6 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 6
    assert extension(whole)["chunks"] == 0 and extension(whole)["cache_hit"] is None
    chunks = list(ask(client, QUESTION, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 6

    text = client.completions.create(model="tiny", prompt="The cat", max_tokens=5)
    streamed = client.completions.create(model="tiny", prompt="The cat", max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert text.usage.completion_tokens == 5

    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": QUESTION},
    ]
    reply = client.chat.completions.create(model="any", messages=conversation, max_tokens=3)
    assert reply.usage.completion_tokens == 3
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_a_conversation_about_a_document_is_re_read_in_its_last_message(server, monkeypatch, book):
    """A conversation that ends with the user's message reaches `stream_generate` as
    messages, which puts the re-read passages in that message
    (test_reread.test_a_conversation_rereads_in_its_last_message)."""
    prompts, generate = [], service_module.stream_generate

    def recording(model, tokenizer, prompt, *args, **kwargs):
        prompts.append(prompt)
        return generate(model, tokenizer, prompt, *args, **kwargs)

    monkeypatch.setattr(service_module, "stream_generate", recording)
    rereading = dataclasses.replace(server.service.settings, reread_tokens=128)
    monkeypatch.setattr(server.service, "settings", rereading)
    client = server.client()
    doc = add_document(client, book)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": QUESTION},
    ]
    reply = client.chat.completions.create(
        model="any", messages=conversation, max_tokens=3, extra_body={"documents": [doc["id"]]}
    )
    assert prompts == [conversation] and extension(reply)["reread_tokens"] > 0
    # One that ends with the assistant's message goes as messages too (not templated into
    # token ids, which re-reading would read untemplated): its last user message asks.
    prefill = [*conversation, {"role": "assistant", "content": "It was"}]
    reply = client.chat.completions.create(
        model="any", messages=prefill, max_tokens=2, extra_body={"documents": [doc["id"]]}
    )
    assert isinstance(prompts[-1], list) and prompts[-1] == prefill
    assert extension(reply)["reread_tokens"] > 0


def test_sampling_fields_map_to_the_samplers(server):
    client = server.client()
    sampled = [
        ask(client, QUESTION, max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    options = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3}
    other = ask(client, QUESTION, max_tokens=4, temperature=0.7, seed=1, extra_body=options)
    assert other.usage.completion_tokens == 4
    full = ask(client, QUESTION, max_tokens=12).choices[0].message.content
    stop = full[len(full) // 2 :][:2]
    cut = ask(client, QUESTION, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = ask(client, QUESTION, max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.find(stop)]


def test_a_document_is_compressed_once(server, book):
    client, service = server.client(), server.service
    tic = time.perf_counter()
    first = add_document(client, book)
    compress_s = time.perf_counter() - tic
    tic = time.perf_counter()
    again = add_document(client, book)
    hit_s = time.perf_counter() - tic
    print(f"\nPOST /v1/documents: compress {compress_s * 1e3:.1f} ms, cache hit {hit_s * 1e3:.1f} "
          f"ms, {compress_s / hit_s:.1f}x")  # fmt: skip
    assert first["id"] == again["id"] == document_id(service.fingerprint, book)
    assert (first["cache_hit"], again["cache_hit"]) == (False, True)
    assert first["chunks"] > 1 and service.compressions == 1

    answer = ask(client, QUESTION, max_tokens=4, extra_body={"documents": [first["id"]]})
    assert extension(answer)["cache_hit"] is True
    assert extension(answer)["chunks"] == first["chunks"]
    assert extension(answer)["context_tokens"] == first["tokens"]
    assert "sources" not in extension(answer)
    with_sources = {"documents": [first["id"]], "sources": True}
    sources = extension(ask(client, QUESTION, max_tokens=2, extra_body=with_sources))["sources"]
    assert len(sources) >= 3 and {"chunk", "tokens", "share", "excerpt", "reread"} <= set(
        sources[0]
    )
    assert all(s["tokens"][0] <= s["excerpt_tokens"][0] < s["excerpt_tokens"][1] for s in sources)

    other = book + "\nThe dog sat under the tree."
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda _: add_document(client, other), range(2)))
    assert service.compressions == 2, "two requests for one text compress it once"
    assert sorted(d["cache_hit"] for d in together) == [False, True]

    both = {"documents": [first["id"], together[0]["id"]]}
    hits = [extension(ask(client, QUESTION, max_tokens=2, extra_body=both)) for _ in range(2)]
    assert [h["cache_hit"] for h in hits] == [False, True] and service.compressions == 3
    assert hits[0]["chunks"] >= first["chunks"] + together[0]["chunks"]


def test_a_plain_request_longer_than_the_window_is_compressed(server, book):
    client, service = server.client(), server.service
    first = ask(client, f"{book}\n\n{QUESTION}", max_tokens=4)
    assert extension(first)["chunks"] > 0 and extension(first)["cache_hit"] is False
    again = ask(client, f"{book}\n\nWhere is the dog?", max_tokens=4)
    assert extension(again)["cache_hit"] is True and service.compressions == 1
    assert again.usage.prompt_tokens < 512
    # A conversation that ends with the assistant's message is cut in its last user
    # message: the same book, the same context.
    followed = [
        {"role": "user", "content": f"{book}\n\nWho sat on the mat?"},
        {"role": "assistant", "content": "It was"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=followed, max_tokens=2)
    assert extension(reply)["cache_hit"] is True and service.compressions == 1
    completion = client.completions.create(model="tiny", prompt=f"{book}\nThe cat", max_tokens=3)
    assert completion.usage.model_extra["sharedllm"]["cache_hit"] is True
    assert add_document(client, book)["cache_hit"], "the same text posted is the same tree"


def test_trees_survive_a_restart_and_the_budget_evicts(loaded, tmp_path, book):
    cache = tmp_path / "cache"
    with serving(loaded, cache) as running:
        doc = add_document(running.client(), book)
        before = ask(
            running.client(), QUESTION, max_tokens=6, extra_body={"documents": [doc["id"]]}
        )
    with serving(loaded, cache) as running:
        client = running.client()
        assert [d["id"] for d in client.get("/documents", cast_to=object)["data"]] == [doc["id"]]
        after = ask(client, QUESTION, max_tokens=6, extra_body={"documents": [doc["id"]]})
        assert after.choices[0].message.content == before.choices[0].message.content
        assert add_document(client, book)["cache_hit"] and running.service.compressions == 0

    budget = int(doc["bytes"] * 1.5)
    with serving(loaded, tmp_path / "small", cache_bytes=budget) as running:
        client = running.client()
        old, new = (add_document(client, book + f"\nline {i}.") for i in range(2))
        with pytest.raises(openai.NotFoundError):
            client.get(f"/documents/{old['id']}", cast_to=object)
        assert client.get(f"/documents/{new['id']}", cast_to=object)["id"] == new["id"]
        assert len(list(running.service.store.folder.glob("*.tree"))) == 1
        assert running.service.store.stats()["memory_bytes"] <= budget


@contextmanager
def slow_batches(monkeypatch, model, seconds: float = 0.05):
    """Each compression batch takes `seconds` longer; yields the list of batches run."""
    batches, encode = [], model._encode_slots

    def slow(*args):
        batches.append(1)
        time.sleep(seconds)
        return encode(*args)

    monkeypatch.setattr(model, "_encode_slots", slow)
    yield batches


def stream_document(running, text: str):
    """A streamed POST /v1/documents, read until its first compressed batch is reported;
    the open connection and the chunks done by then."""
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
    conn.request("POST", "/v1/documents", body=json.dumps({"text": text, "stream": True}))
    response = conn.getresponse()
    assert response.status == 200
    while True:
        line = response.fp.readline().decode()
        assert line, "the stream ended before compressing"
        if line.startswith(": progress"):
            progress = json.loads(line.split(" ", 2)[2])
            if progress["stage"] == "compress" and progress["done"]:
                return conn, response


def test_a_client_that_leaves_cancels_compression(server, loaded, monkeypatch, book):
    with slow_batches(monkeypatch, loaded[1]) as batches:
        conn, response = stream_document(server, book)
        seen = len(batches)
        response.close()
        conn.close()
        freed = server.wait_idle()
    print(f"\ncompression cancelled {freed * 1e3:.0f} ms after the client left, "
          f"{len(batches) - seen} batches later")  # fmt: skip
    assert len(batches) <= seen + 2, "compression went on after the client left"
    assert server.service.compressions == 0 and not server.service.store.ids()
    assert ask(server.client(), QUESTION, max_tokens=3).usage.completion_tokens == 3


def test_a_client_that_leaves_cancels_generation(server, monkeypatch):
    made, generate = [], service_module.stream_generate

    def slow(*args, **kwargs):
        for response in generate(*args, **kwargs):
            made.append(1)
            time.sleep(0.02)
            yield response

    monkeypatch.setattr(service_module, "stream_generate", slow)
    stream = ask(server.client(), QUESTION, max_tokens=200, stream=True)
    for seen, _ in enumerate(stream):
        if seen == 3:
            break
    stream.close()
    server.wait_idle()
    assert len(made) <= 3 + 3, f"{len(made)} tokens made after the client left"
    assert ask(server.client(), QUESTION, max_tokens=3).usage.completion_tokens == 3


def test_a_full_queue_answers_429(loaded, tmp_path, monkeypatch, book):
    with serving(loaded, tmp_path, queue=1) as running, slow_batches(monkeypatch, loaded[1]):
        conn, _ = stream_document(running, book)
        with pytest.raises(openai.RateLimitError) as refused:
            ask(running.client(), QUESTION, max_tokens=2)
        assert refused.value.code == "queue_full"
        conn.close()
        running.wait_idle()
        assert ask(running.client(), QUESTION, max_tokens=2).usage.completion_tokens == 2


def test_a_wrong_api_key_is_refused(loaded, tmp_path):
    with serving(loaded, tmp_path, api_key="sekret") as running:
        with pytest.raises(openai.AuthenticationError) as refused:
            ask(running.client("wrong"), QUESTION, max_tokens=2)
        assert refused.value.code == "invalid_api_key"
        status, body = running.raw("GET", "/v1/models")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert ask(running.client("sekret"), QUESTION, max_tokens=2).choices[0].message.content
        assert running.raw("GET", "/health")[0] == 200


def test_bad_input_gets_a_4xx_in_openai_shape(server, book):
    client = server.client()
    doc = add_document(client, book)
    chat = "/v1/chat/completions"
    good = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
    too_long = {"role": "user", "content": "walked " * 600}
    cases = [
        ("POST", chat, b'{"messages": [', 400, None),
        ("POST", chat, b"[1, 2]", 400, None),
        ("POST", chat, b"\xff\xfe", 400, None),
        ("POST", chat, {"messages": []}, 400, "messages"),
        ("POST", chat, {"messages": [{"role": "system", "content": "Be brief."}]}, 400,
         "messages"),
        ("POST", chat, {**good, "documents": ["0" * 64]}, 404, "documents"),
        ("POST", chat, {**good, "messages": [too_long], "documents": [doc["id"]]}, 400,
         "messages"),
        ("POST", chat, {**good, "max_tokens": 4096}, 400, "max_tokens"),
        ("POST", chat, {**good, "n": 2}, 400, "n"),
        ("POST", chat, {**good, "temperature": -1}, 400, "temperature"),
        ("POST", chat, {**good, "stop": [1]}, 400, "stop"),
        ("POST", chat, {**good, "sources": "yes"}, 400, "sources"),
        ("POST", "/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("POST", "/v1/documents", {"text": "too short"}, 400, "text"),
        ("GET", "/v1/documents/" + "0" * 64, None, 404, "documents"),
        ("GET", "/v1/nowhere", None, 404, None),
        ("GET", chat, None, 405, None),
    ]  # fmt: skip
    for method, path, body, status, param in cases:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        got, answer = server.raw(method, path, data)
        assert got == status, (path, body, answer)
        error = answer["error"]
        assert isinstance(error["message"], str) and error["type"], answer
        if param:
            assert error["param"] == param, answer
    system_only = {"messages": [{"role": "system", "content": "Be brief."}]}
    message = server.raw("POST", chat, json.dumps(system_only).encode())[1]["error"]["message"]
    assert "no user message" in message
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", chat)
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"]
    conn.close()
    with pytest.raises(openai.NotFoundError):
        ask(client, QUESTION, max_tokens=2, extra_body={"documents": ["nope"]})
    assert ask(client, QUESTION, max_tokens=2).usage.completion_tokens == 2
    assert server.raw("GET", "/health")[1]["status"] == "ok"


def test_load_mixed_documents(loaded, tmp_path, book):
    """8 clients x 5 requests, mixed documents: every answer complete and the same as
    asked alone; MLX's peak memory within the plan plus the cache budget (beyond what
    earlier tests in this process still hold, which the plan knows nothing of)."""
    budget = 64 << 20
    weights = sum(v.nbytes for _, v in tree_flatten(loaded[1].parameters()))
    elsewhere = max(0, mx.get_active_memory() - weights)
    with serving(loaded, tmp_path, cache_bytes=budget) as running:
        client = running.client()
        added = [add_document(client, text_of(90, seed)) for seed in (1, 2)]
        docs = [d["id"] for d in added]
        kinds = [
            {"extra_body": {"documents": docs[:1]}},
            {"extra_body": {"documents": docs[1:]}},
            {"extra_body": {"documents": docs}},
            {},
            {"long": True},
        ]

        def request(kind: dict):
            content = f"{book}\n\n{QUESTION}" if kind.get("long") else QUESTION
            options = {k: v for k, v in kind.items() if k != "long"}
            response = ask(client, content, max_tokens=8, **options)
            return response.choices[0].message.content, response.usage.completion_tokens

        alone = [request(kind) for kind in kinds]
        mx.reset_peak_memory()
        jobs = [kinds[(c + r) % len(kinds)] for c in range(8) for r in range(5)]
        tic = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(request, jobs))
        seconds = time.perf_counter() - tic
        peak = mx.get_peak_memory()
    expected = [alone[kinds.index(kind)] for kind in jobs]
    assert answers == expected and all(n == 8 for _, n in answers)
    plan = plan_for_model_dir(loaded[0], sum(d["tokens"] for d in added)).total
    print(f"\nload: 40 requests from 8 clients in {seconds:.2f} s ({40 / seconds:.1f}/s); "
          f"MLX peak {peak / 1e6:.1f} MB, plan {plan / 1e6:.1f} MB + cache "
          f"{budget / 1e6:.0f} MB, {elsewhere / 1e6:.1f} MB held by earlier tests")  # fmt: skip
    assert peak - elsewhere <= plan + budget


def test_the_serve_command(loaded, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "mlx_sharedllm", "serve", "--model", str(loaded[0]),
               "--port", str(port), "--cache-dir", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "MLX_SHAREDLLM_API_KEY": "k"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        running = Running(None, port)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert running.raw("GET", "/health")[1]["status"] == "ok"
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert ask(running.client("k"), QUESTION, max_tokens=2).usage.completion_tokens == 2
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert f"on http://127.0.0.1:{port}/v1" in stderr


def test_serve_without_the_server_packages_says_what_to_install(monkeypatch):
    monkeypatch.setattr(serve_cli, "missing_packages", lambda: ["uvicorn"])
    result = run_cli("serve")
    assert result.exit_code == 1
    assert "pip install 'mlx-sharedllm[server]'" in result.output
