"""The HTTP front: routes, API-key check, CORS, body limit, SSE streaming (Starlette on uvicorn).

Routes: ``GET /`` and ``/static/*`` (the chat page, ``page``; public), ``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /health`` (public),
``GET /v1/memories/{id}``, ``DELETE /v1/memories/{id}``, ``GET|PUT /v1/memories/{id}/state``
(export / import of the state file).  Generation runs in one worker
thread per request (the Engine is blocking C code); the event loop only moves events
from that thread to the client.  Every failure a client sees is OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..engine import Engine
from ..errors import StateFileError, StateMismatchError
from ..statefile import MAX_FILE_BYTES, validate_state_bytes
from .completion import Outcome, SamplingDefaults, as_api_error, run_completion
from .memories import MemoryIdentity, MemoryPool, check_memory_id, memory_file_name
from .page import PAGE_PATHS
from .page import ROUTES as PAGE_ROUTES
from .protocol import ApiError, Limits, chunk_body, completion_body, completion_id, error_body, parse_chat_request

PUBLIC_PATHS = frozenset({"/health", *PAGE_PATHS})  # the page holds no secret; its API calls send the key
MEMORY_HEADER = "x-memory-id"


@dataclass
class ServerState:
    """Everything the routes share; built by ``cli/serve.py`` before the server starts."""

    engine: Engine
    pool: MemoryPool
    model_name: str
    limits: Limits = field(default_factory=Limits)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    max_body_bytes: int = 1024 * 1024
    started: int = field(default_factory=lambda: int(time.time()))
    runs: set[threading.Event] = field(default_factory=set)  # cancel flags of running completions
    runs_lock: threading.Lock = field(default_factory=threading.Lock)

    _identity: MemoryIdentity | None = None

    def identity(self) -> MemoryIdentity:
        """The adapter/model identity an imported state file must have (computed once, on first use)."""
        if self._identity is None:
            self._identity = MemoryIdentity.of(self.engine)
        return self._identity

    def stop_all(self) -> None:
        """Stop every running generation (each one saves its memory as it ends)."""
        with self.runs_lock:
            for cancel in self.runs:
                cancel.set()


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class ApiKeyMiddleware:
    """Every route but /health and the page's files needs the key, as ``Authorization: Bearer K`` or ``x-api-key: K``."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _allowed(self, scope: Scope) -> bool:
        given: list[bytes] = []
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given.append(value[7:].strip())
            elif name == b"x-api-key":
                given.append(value.strip())
        # compare_digest on every pair: no early exit that would time the key
        return any(hmac.compare_digest(g, k) for g in given for k in self.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in PUBLIC_PATHS or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        err = ApiError(401, "invalid or missing API key (send Authorization: Bearer <key> or x-api-key)",
                       type="authentication_error", code="invalid_api_key")
        await _error(err)(scope, receive, send)


class _Run:
    """One completion's worker thread and its event queue (thread -> event loop)."""

    def __init__(self, state: ServerState) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancel = threading.Event()
        self.state = state

    def emit(self, kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    def start(self, memory_id: str | None, req: Any) -> None:
        with self.state.runs_lock:
            self.state.runs.add(self.cancel)

        def work() -> None:
            try:
                run_completion(self.state.pool, memory_id, req, self.state.sampling, self.emit, self.cancel)
            finally:
                with self.state.runs_lock:
                    self.state.runs.discard(self.cancel)

        threading.Thread(target=work, name="completion", daemon=True).start()

    async def next(self) -> tuple[str, Any]:
        return await self.queue.get()


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON (at most ``limit`` bytes)."""
    data = await _read_body(request, limit)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def _memory_id(request: Request, user: str | None) -> str | None:
    header = request.headers.get(MEMORY_HEADER)
    if header is not None:
        return check_memory_id(header, "X-Memory-Id")
    if user is not None:
        return check_memory_id(user, "user")
    return None


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    req = parse_chat_request(await _read_json(request, state.max_body_bytes), state.limits)
    memory_id = _memory_id(request, req.user)
    run = _Run(state)
    run.start(memory_id, req)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, run.cancel))
    try:
        kind, value = await run.next()
        if kind == "error":
            return _error(value)
        cid, model = completion_id(), state.model_name
        if req.stream:
            watcher.cancel()  # from here on the StreamingResponse listens for the disconnect itself
            return StreamingResponse(_stream(run, cid, model, req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text: list[str] = []
        while True:
            kind, value = await run.next()
            if kind == "delta":
                text.append(value)
            elif kind == "error":
                return _error(value)
            elif kind == "done":
                out: Outcome = value
                return JSONResponse(completion_body(cid, model, out.text, out.finish_reason, out.prompt_tokens,
                                                    out.completion_tokens, out.memory))
    finally:
        watcher.cancel()


async def _cancel_on_disconnect(request: Request, cancel: threading.Event) -> None:
    """Stop the generation when the client leaves before its response starts, or mid non-streaming reply.

    Why this works: the body has been read, so the next ASGI message is ``http.disconnect``.
    A client gone before generation began leaves its memory untouched; one gone later gets
    the part already generated written and saved, as a stream cut short does.
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


async def _stream(run: _Run, cid: str, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks; leaving early (client gone, server stopping) cancels generation, which saves."""
    created = int(time.time())
    try:
        yield _sse(chunk_body(cid, model, created, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await run.next()
            if kind == "delta":
                yield _sse(chunk_body(cid, model, created, {"content": value}))
            elif kind == "error":
                yield _sse(value.body())
                return
            elif kind == "done":
                out: Outcome = value
                final = chunk_body(cid, model, created, {}, out.finish_reason)
                if out.memory is not None:
                    final["memory"] = out.memory
                yield _sse(final)
                if include_usage:
                    usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                             "total_tokens": out.prompt_tokens + out.completion_tokens}
                    yield _sse(chunk_body(cid, model, created, {}, usage_=usage, empty_choices=True))
                yield _sse("[DONE]")
                return
    finally:
        run.cancel.set()


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "deltamem-edge"}]})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def memory_info(request: Request) -> Response:
    state: ServerState = request.app.state.server
    memory_id = check_memory_id(request.path_params["memory_id"], "memory_id")
    try:
        info = await run_in_threadpool(state.pool.info, memory_id)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is the client's answer, not a crash
        return _error(as_api_error(exc))
    if info is None:
        return _error(_not_found())
    return JSONResponse(info)


async def memory_delete(request: Request) -> Response:
    state: ServerState = request.app.state.server
    memory_id = check_memory_id(request.path_params["memory_id"], "memory_id")
    try:
        deleted = await run_in_threadpool(state.pool.delete, memory_id)
    except Exception as exc:  # noqa: BLE001
        return _error(as_api_error(exc))
    if not deleted:
        return _error(_not_found())
    return JSONResponse({"object": "memory.deleted", "id": memory_id, "deleted": True})


async def memory_export(request: Request) -> Response:
    """The memory's state file as it is on disk (the last completed turn): back it up, move it."""
    state: ServerState = request.app.state.server
    memory_id = check_memory_id(request.path_params["memory_id"], "memory_id")
    data = await run_in_threadpool(state.pool.export_state, memory_id)  # a corrupt file: 409, as for info
    if data is None:
        return _error(_not_found())
    return Response(data, media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{memory_file_name(memory_id)}"'})


async def memory_import(request: Request) -> Response:
    """Replace a memory by an uploaded state file, only if a load would accept it (else 400, nothing changed)."""
    state: ServerState = request.app.state.server
    memory_id = check_memory_id(request.path_params["memory_id"], "memory_id")
    data = await _read_body(request, min(state.max_body_bytes, MAX_FILE_BYTES))
    identity = await run_in_threadpool(state.identity)
    try:  # checked before waiting for the memory: a bad upload disturbs nothing
        await run_in_threadpool(lambda: validate_state_bytes(
            data, adapter_fp=identity.adapter_fp, model_fp=identity.model_fp, shape=identity.shape))
    except StateMismatchError as exc:
        return _error(ApiError(400, f"{exc.args[0]}; the memory was left unchanged", param="body",
                               code="memory_mismatch"))
    except StateFileError as exc:
        return _error(ApiError(400, f"{exc.args[0]}; the memory was left unchanged", param="body",
                               code="invalid_state_file"))
    existed = await run_in_threadpool(state.pool.import_state, memory_id, data, identity)
    info = await run_in_threadpool(state.pool.info, memory_id)
    return JSONResponse(info, status_code=200 if existed else 201)


def _not_found() -> ApiError:
    return ApiError(404, "no memory with this id", type="not_found_error", param="memory_id", code="memory_not_found")


async def _api_error(request: Request, exc: Exception) -> Response:
    return _error(exc if isinstance(exc, ApiError) else as_api_error(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(status, "server_error")
    return JSONResponse(error_body(str(getattr(exc, "detail", "error")), type=kind, code=str(status)),
                        status_code=status)


def create_app(state: ServerState, *, api_keys: Sequence[str] = (), cors_origins: Sequence[str] = ()) -> Starlette:
    """The ASGI app.  CORS is off unless origins are named; with keys, all but /health and the page need one."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.stop_all()
        resident = state.pool.stats()["resident"]
        await run_in_threadpool(state.pool.close)
        b = state.engine.batcher
        decode = (f"{b.tokens} generated tokens in {b.steps} decode steps" if state.engine.batches_sessions
                  else "one decode per user and token (unified KV cache)")
        state.engine.close()
        # one line a supervisor (and the tests) can check: shutdown went through, files closed
        print(f"stopped: {resident} open memories closed (each saved after its last turn); {decode}",
              file=sys.stderr, flush=True)

    middleware = []
    if cors_origins:  # outermost, so a browser's preflight (which carries no key) is answered
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins),
                                     allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type", "X-Api-Key", "X-Memory-Id"]))
    middleware.append(Middleware(ApiKeyMiddleware, keys=list(api_keys)))
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/memories/{memory_id}", memory_info, methods=["GET"]),
        Route("/v1/memories/{memory_id}", memory_delete, methods=["DELETE"]),
        Route("/v1/memories/{memory_id}/state", memory_export, methods=["GET"]),
        Route("/v1/memories/{memory_id}/state", memory_import, methods=["PUT"]),
        *PAGE_ROUTES,
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _api_error})
    app.state.server = state
    return app
