"""OpenAI's wire format: request fields checked and mapped to the samplers, responses and
errors in OpenAI's shapes."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..plan import MAX_TOKENS

# Fields this server does not implement, with the values that mean "not used".
UNSUPPORTED = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "suffix": (None, ""),
}
MAX_STOPS = 4


class ApiError(Exception):
    """A request the server refuses, with its HTTP status, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Sampling:
    """The sampling fields of a request, as `stream_generate` takes them."""

    max_tokens: int | None = None
    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    top_k: int = 0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def options(self, max_tokens: int) -> dict[str, Any]:
        """Keyword arguments for `stream_generate`."""
        return {
            "max_tokens": max_tokens,
            "temp": self.temp,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
        }


def _number(body: dict, name: str, default: float | None, low: float, high: float) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number from {low} to {high}", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}", param=name)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} strings", param="stop")
    return tuple(stops)


def check_supported(body: dict) -> None:
    """Refuse a field this server does not implement, when it asks for something."""
    for name, unused in UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")


def parse_sampling(body: dict) -> Sampling:
    """The sampling fields, checked. Decoding is greedy unless a temperature is given."""
    check_supported(body)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    max_tokens = _integer(body, "max_completion_tokens", 1, MAX_TOKENS)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, MAX_TOKENS)
    return Sampling(
        max_tokens=max_tokens,
        temp=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=0.0 if top_p >= 1.0 else top_p,
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        top_k=_integer(body, "top_k", 0, 1 << 30) or 0,
        repetition_penalty=_number(body, "repetition_penalty", None, 1e-6, 100.0),
        seed=_integer(body, "seed", 0, 2**64 - 1),
        stop=_stops(body),
    )


def _content(message: dict, index: int) -> str:
    """A message's text: a string, or a list of parts whose text parts are joined."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise ApiError(400, "only text content is supported", param=f"messages[{index}].content")


def parse_messages(body: dict) -> list[dict[str, str]]:
    """The chat messages as {"role", "content"} strings, checked."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, "each message needs a role", param=f"messages[{i}]")
        parsed.append({"role": message["role"], "content": _content(message, i)})
    return parsed


def parse_prompt(body: dict) -> str:
    """A completion's prompt: a string (or a list holding one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    return prompt


def parse_documents(body: dict) -> list[str]:
    """The ids of documents named by a request (the `documents` extension)."""
    documents = body.get("documents", [])
    if not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
        raise ApiError(400, "documents must be a list of document ids", param="documents")
    return list(dict.fromkeys(documents))


def parse_flag(body: dict, name: str) -> bool:
    """An optional true/false extension field."""
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", param=name)
    return value


def parse_text(body: dict) -> str:
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "text must be a non-empty string", param="text")
    return text


class StopText:
    """Cuts generated text at the first stop string, holding back a tail that might begin
    one, so a streamed stop string is never sent."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to send, and whether a stop string was met."""
        held = self.held + text
        found = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return held[: min(found)], True
        keep = max((_overlap(held, s) for s in self.stops), default=0)
        self.held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


class Shapes:
    """The response objects of one chat (`chat=True`) or text completion."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model, self.created = chat, model, int(time.time())
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _object(self, kind: str, choices: list, usage: dict | None = None) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        return body if usage is None else {**body, "usage": usage}

    def whole(self, text: str, finish: str | None, usage: dict) -> dict[str, Any]:
        """The complete (not streamed) response."""
        if self.chat:
            choice = {"message": {"role": "assistant", "content": text}}
            return self._object("chat.completion", [self._choice(choice, finish)], usage)
        choice = self._choice({"text": text, "logprobs": None}, finish)
        return self._object("text_completion", [choice], usage)

    def chunk(self, text: str, finish: str | None = None, usage: dict | None = None) -> dict:
        """One streamed piece of the answer (the last one has `finish` and `usage`)."""
        if self.chat:
            delta = {"content": text} if text or finish is None else {}
            choice = self._choice({"delta": delta}, finish)
            return self._object("chat.completion.chunk", [choice], usage)
        choice = self._choice({"text": text, "logprobs": None}, finish)
        return self._object("text_completion", [choice], usage)

    def first(self) -> dict | None:
        """The chunk that opens a streamed chat answer (its role)."""
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": ""}
        return self._object("chat.completion.chunk", [self._choice({"delta": delta}, None)])

    @staticmethod
    def _choice(fields: dict, finish: str | None) -> dict:
        return {"index": 0, **fields, "finish_reason": finish}
