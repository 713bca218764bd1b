"""The service's errors: every one is ``{"error": <one line>, "field": <the field or null>}`` JSON.

``ApiError`` is what the routes and checks raise; ``install_errors`` answers it, FastAPI's
validation errors, unknown routes and anything unexpected in that one shape, with no stack trace;
``BodyLimit`` answers 413 before an oversized body is read.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("margin.serving.server")  # the service's one log, whichever module writes


class ApiError(Exception):
    """An error answered as ``{"error": message, "field": field}`` with an HTTP status."""

    def __init__(self, status: int, message: str, field: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def _error(status: int, message: str, field: str | None, headers=None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def install_errors(app: FastAPI) -> None:
    """Every error is ``{"error", "field"}`` JSON; none carries a stack trace."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            name, message = "body", f"body: not valid JSON ({first.get('ctx', {}).get('error')})"
        elif not loc and first.get("type") == "model_attributes_type":  # a list, or not JSON
            name, message = "body", "body: send a JSON object with Content-Type: application/json"
        else:
            name = ".".join(loc) or "body"
            message = f"{name}: {first.get('msg', 'invalid')}"
        return _error(422, message, name)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {
            404: f"no such endpoint {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }
        message = messages.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, None, exc.headers)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return _error(500, "internal error", None)


class BodyLimit:
    """ASGI middleware: read at most ``max_bytes`` of a request body, else answer 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        response = _error(413, f"body: larger than {self.max_bytes} bytes", "body")
        await response(scope, receive, send)
