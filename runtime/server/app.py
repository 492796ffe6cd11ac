"""The FastAPI application: routes, API-key check and OpenAI-style errors.

Every failure of a request becomes a JSON error for that request only: 400 for invalid input (naming the field),
401 for a bad key, 404 for an unknown model or route, 503 once the engine has died. Nothing a client sends can stop
the server.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.engine.async_engine import EngineDeadError
from runtime.engine.sampling_params import InvalidRequestError
from runtime.server.chat import create_chat_completion
from runtime.server.completions import create_completion
from runtime.server.protocol import ChatCompletionRequest, CompletionRequest
from runtime.server.serving import APIError, ClientDisconnected, ServerState

log = logging.getLogger(__name__)

# Not an HTTP status of the standard: what nginx logs for a client that closed the connection first.
_CLIENT_CLOSED = 499


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           err_type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(APIError(status, message, param, code, err_type).body(), status_code=status)


_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict")


def _field_path(loc: tuple) -> str:
    """Dotted field path of a pydantic error location, without 'body' and union-member tags like 'list[int]'."""
    parts = [str(p) for p in loc if p != "body"]
    while parts and (parts[-1] in _TYPE_TAGS or "[" in parts[-1]):
        parts.pop()
    return ".".join(parts)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = _field_path(first.get("loc", ()))
    alternatives = [str(e["loc"][-1]) for e in errors if _field_path(e.get("loc", ())) == param]
    if len(alternatives) > 1:  # a union field: every accepted type failed
        return f"{param}: does not match any accepted type ({', '.join(dict.fromkeys(alternatives))})", param
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param or None


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="evalpipe", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = state

    def require_key(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", err_type="authentication_error")

    def reject(status: int, message: str, param: str | None = None, code: str | None = None,
               err_type: str = "invalid_request_error") -> JSONResponse:
        state.engine.engine.metrics.on_rejected(status)
        return _error(status, message, param, code, err_type)

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return reject(exc.status, exc.message, exc.param, exc.code, exc.type)

    @app.exception_handler(InvalidRequestError)
    async def on_invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return reject(400, str(exc), exc.param)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return reject(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return reject(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(EngineDeadError)
    async def on_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return reject(503, str(exc), err_type="service_unavailable")

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(_: Request, __: ClientDisconnected) -> JSONResponse:
        return _error(_CLIENT_CLOSED, "client disconnected; request aborted")  # counted as an abort by the engine

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return reject(500, f"internal error: {exc!r}", err_type="internal_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error", "error": repr(state.engine.error)}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.engine.engine.render_metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> JSONResponse:
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "evalpipe",
                "max_model_len": state.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(state, body, request)

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(state, body, request)

    return app
