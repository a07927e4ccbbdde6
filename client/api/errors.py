"""Every error leaves the API in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

This module is the one place that maps exceptions to HTTP statuses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from client.routing import MissingLayersError
from client.transport import PeerError
from client.verify import VerificationError, VerificationRestart

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unknown_model(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")


def unauthorized(given: bool) -> ApiError:
    message = "Incorrect API key provided" if given else "Missing API key (send `Authorization: Bearer KEY`)"
    return ApiError(401, message, code="invalid_api_key")


def from_exception(error: BaseException, model: str) -> ApiError:
    """The API error for an exception raised while loading a model or generating with it."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, MissingLayersError):
        return ApiError(503, f"the swarm cannot run `{model}` now: {error}", type="server_error", code="missing_layers")
    if isinstance(error, PeerError):
        return ApiError(
            503, f"the swarm cannot run `{model}` now: {error}", type="server_error", code="peer_unavailable"
        )
    if isinstance(error, (VerificationError, VerificationRestart)):  # nodes disagree and nothing settles it
        return ApiError(503, f"the swarm cannot give a verified answer now: {error}", type="server_error",
                        code="verification_failed")
    if isinstance(error, (ValueError, NotImplementedError)):  # e.g. a context longer than the nodes accept
        return bad_request(str(error))
    log.error("generation with %s failed", model, exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}: {error}", type="server_error")


def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return bad_request(f"the body is not valid JSON: {message}").response()
    param = ".".join(loc) or None
    return bad_request(f"{param}: {message}" if param else message, param=param).response()


def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    return ApiError(error.status_code, str(error.detail), type=kind).response()


def _api_error(request: Request, error: ApiError) -> JSONResponse:
    return error.response()


def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}", type="server_error").response()


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
