"""The HTTP side: OpenAI-compatible routes on Starlette, served by uvicorn.

Handlers check a request and queue it as a job on the model's worker (engine.py); they
never call MLX. A client that disconnects cancels its job.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .api import (
    ApiError,
    Shapes,
    parse_documents,
    parse_flag,
    parse_messages,
    parse_prompt,
    parse_sampling,
    parse_text,
)
from .engine import Busy, Job
from .service import Ask, Service

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20
Event = tuple[str, Any]


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def internal(error: BaseException) -> ApiError:
    """An unexpected failure, logged, as a 500 in OpenAI's shape."""
    if isinstance(error, ApiError):
        return error
    log.error("request failed", exc_info=error)
    return ApiError(500, f"internal error: {error}", kind="server_error")


class Answer:
    """Renders a chat or text completion from its job's events."""

    def __init__(self, shapes: Shapes):
        self.shapes = shapes

    def opening(self) -> list[dict]:
        first = self.shapes.first()
        return [] if first is None else [first]

    def piece(self, text: str) -> dict:
        return self.shapes.chunk(text)

    def closing(self, result: dict) -> dict:
        return self.shapes.chunk("", result["finish_reason"], result["usage"])

    def whole(self, texts: list[str], result: dict) -> dict:
        return self.shapes.whole("".join(texts), result["finish_reason"], result["usage"])


class Document:
    """Renders a document's description (streamed: after the progress comments)."""

    def opening(self) -> list[dict]:
        return []

    def closing(self, result: dict) -> dict:
        return result

    def whole(self, texts: list[str], result: dict) -> dict:
        return result


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class JobStream(StreamingResponse):
    """Server-sent events of a job; the job is cancelled if the stream ends early."""

    def __init__(self, job: Job, content: AsyncIterator[str]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def _sse(job: Job, first: Event, render: Answer | Document) -> AsyncIterator[str]:
    """Progress as SSE comments (which OpenAI clients skip), then the render's data."""
    for obj in render.opening():
        yield _data(obj)
    kind, value = first
    while True:
        if kind == "progress":
            yield f": progress {json.dumps(value)}\n\n"
        elif kind == "text":
            yield _data(render.piece(value))
        elif kind == "done":
            yield _data(render.closing(value))
            yield "data: [DONE]\n\n"
            return
        elif kind == "error":
            yield _data(internal(value).body())
            return
        else:
            return
        kind, value = await job.events.get()


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(job: Job, gone: asyncio.Task) -> Event:
    """The job's next event, or "cancelled" (and the job cancelled) if the client left."""
    getter = asyncio.ensure_future(job.events.get())
    await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    job.cancel()
    return "cancelled", None


class Routes:
    """The endpoints, around one Service."""

    def __init__(self, service: Service, api_key: str | None, max_body: int):
        self.service, self.api_key, self.max_body = service, api_key, max_body

    def guarded(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """The handler behind the API key check, with its ApiErrors as responses."""

        async def endpoint(request: Request) -> Response:
            try:
                self._check_key(request)
                return await handler(request)
            except ApiError as e:
                return error_response(e)

        return endpoint

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401, "invalid API key", code="invalid_api_key", kind="authentication_error"
            )

    async def _json(self, request: Request) -> dict:
        """The request's JSON object, read up to `max_body` bytes."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large()
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > self.max_body:
                raise self._too_large()
        try:
            data = json.loads(body)
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    def _too_large(self) -> ApiError:
        return ApiError(
            413, f"the body is larger than {self.max_body:,} bytes", code="body_too_large"
        )

    async def _run(
        self, request: Request, work: Callable[[Job], Any], render: Answer | Document, stream: bool
    ) -> Response:
        """Queue the work; answer with its events streamed, or whole when it is done. An
        error before the first streamed event is an HTTP error status."""
        try:
            job = self.service.engine.submit(work)
        except Busy:
            raise ApiError(
                429,
                f"the server is busy ({self.service.engine.limit} requests queued or running)",
                code="queue_full",
                kind="rate_limit_error",
            ) from None
        gone = asyncio.create_task(_disconnected(request))
        try:
            event, texts = await _next(job, gone), []
            while not stream and event[0] in ("progress", "text"):
                if event[0] == "text":
                    texts.append(event[1])
                event = await _next(job, gone)
        finally:
            gone.cancel()
        kind, value = event
        if kind == "error":
            return error_response(internal(value))
        if kind == "cancelled":
            return Response(status_code=499)
        if stream:
            return JobStream(job, _sse(job, event, render))
        return JSONResponse(render.whole(texts, value))

    def _known_documents(self, doc_ids: list[str]) -> None:
        for doc_id in doc_ids:
            if doc_id not in self.service.store:
                raise ApiError(
                    404, f"no document {doc_id}", param="documents", code="document_not_found"
                )

    async def chat(self, request: Request) -> Response:
        body = await self._json(request)
        ask = Ask(parse_sampling(body), messages=parse_messages(body))
        return await self._answer(request, body, ask, chat=True)

    async def completions(self, request: Request) -> Response:
        body = await self._json(request)
        ask = Ask(parse_sampling(body), prompt=parse_prompt(body))
        return await self._answer(request, body, ask, chat=False)

    async def _answer(self, request: Request, body: dict, ask: Ask, chat: bool) -> Response:
        ask.documents = parse_documents(body)
        ask.sources = parse_flag(body, "sources")
        self._known_documents(ask.documents)
        render = Answer(Shapes(chat, self.service.name))
        work = lambda job: self.service.answer(job, ask)  # noqa: E731
        return await self._run(request, work, render, bool(body.get("stream")))

    async def add_document(self, request: Request) -> Response:
        body = await self._json(request)
        text = parse_text(body)
        work = lambda job: self.service.add_document(job, text)  # noqa: E731
        return await self._run(request, work, Document(), bool(body.get("stream")))

    async def list_documents(self, request: Request) -> Response:
        data = [{"id": d, "object": "document"} for d in self.service.store.ids()]
        return JSONResponse({"object": "list", "data": data})

    async def get_document(self, request: Request) -> Response:
        doc_id = request.path_params["doc_id"]
        self._known_documents([doc_id])
        return JSONResponse({"id": doc_id, "object": "document"})

    async def delete_document(self, request: Request) -> Response:
        doc_id = request.path_params["doc_id"]
        self._known_documents([doc_id])
        self.service.store.delete(doc_id)
        return JSONResponse({"id": doc_id, "object": "document", "deleted": True})

    async def models(self, request: Request) -> Response:
        model = {"id": self.service.name, "object": "model", "created": 0, "owned_by": "local"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        service = self.service
        return JSONResponse(
            {
                "status": "ok",
                "model": service.name,
                "fingerprint": service.fingerprint,
                "pending": service.engine.pending,
                "compressions": service.compressions,
                "cache": service.store.stats(),
            }
        )


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return error_response(ApiError(exc.status_code, str(exc.detail)))


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_response(internal(exc))


def create_app(
    service: Service, *, api_key: str | None = None, max_body: int = MAX_BODY_BYTES
) -> Starlette:
    """The Starlette app serving `service`."""
    r = Routes(service, api_key, max_body)
    guard = r.guarded
    routes = [
        Route("/health", r.health, methods=["GET"]),
        Route("/v1/models", guard(r.models), methods=["GET"]),
        Route("/v1/chat/completions", guard(r.chat), methods=["POST"]),
        Route("/v1/completions", guard(r.completions), methods=["POST"]),
        Route("/v1/documents", guard(r.add_document), methods=["POST"]),
        Route("/v1/documents", guard(r.list_documents), methods=["GET"]),
        Route("/v1/documents/{doc_id}", guard(r.get_document), methods=["GET"]),
        Route("/v1/documents/{doc_id}", guard(r.delete_document), methods=["DELETE"]),
    ]
    handlers = {HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)
