"""Errors in OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, with the right status.

Handlers raise `APIError` (or one of its helpers); everything else is turned into one here: a body
that fails validation is a 400 with one line naming the field, an unknown route a 404, anything
unexpected a 500 whose message is the exception's.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ttc.serve.protocol import ErrorBody, ErrorResponse

__all__ = ["APIError", "bad_request", "not_found", "overloaded", "install", "error_json"]

log = logging.getLogger("ttc.serve")

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NOT_FIELDS = {"body", "str", "int", "float", "bool", "list", "dict", "none"}
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          500: "server_error", 503: "server_overloaded"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorBody(message=self.message, type=_TYPES.get(self.status, "server_error"),
                                             param=self.param, code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def not_found(message: str, code: str = "model_not_found") -> APIError:
    return APIError(404, message, code=code)


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(503, message, code="server_overloaded", headers={"Retry-After": str(retry_after_s)})


def error_json(error: Exception) -> str:
    """An error as a streamed event's JSON (a failure after the stream's 200 was sent)."""
    err = error if isinstance(error, APIError) else APIError(500, f"{type(error).__name__}: {error}")
    return json.dumps(err.body())


def _one_line(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first validation error as one line: "field: what is wrong" (or the JSON parser's complaint)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    # keep field names: drop "body", list indices, and the member tags a union adds (`str`, `list[int]`, ...)
    field = ".".join(str(x) for x in e.get("loc", ()) if isinstance(x, str) and _FIELD.match(x)
                     and x not in _NOT_FIELDS)
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    if e.get("type") == "missing":
        msg = "this field is required"
    elif e.get("type") == "model_attributes_type" and not field:
        msg = "the body must be a JSON object"
    return (f"{field}: {msg}" if field else msg), (field or None)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _one_line(exc)
        return bad_request(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), code=None).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return APIError(500, f"{type(exc).__name__}: {exc}").response()
