"""Errors the runtime raises for bad requests; the servicer maps each kind to a gRPC status."""

from __future__ import annotations


class RequestError(Exception):
    """A request the node refuses; `kind` names the gRPC status it maps to."""

    kind = "INVALID_ARGUMENT"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(RequestError):
    kind = "INVALID_ARGUMENT"


class NotFound(RequestError):
    kind = "NOT_FOUND"


class OutOfRange(RequestError):
    kind = "OUT_OF_RANGE"


class Exhausted(RequestError):
    kind = "RESOURCE_EXHAUSTED"


class AlreadyExists(RequestError):
    kind = "ALREADY_EXISTS"


class FailedPrecondition(RequestError):
    kind = "FAILED_PRECONDITION"


class Unavailable(RequestError):
    kind = "UNAVAILABLE"


class Full(Exhausted):
    """RESOURCE_EXHAUSTED for now: room may free up when other sessions close (an open may wait for it)."""
