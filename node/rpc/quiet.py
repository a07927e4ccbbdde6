"""grpc.aio's server logs an ERROR with a traceback when a streaming call's handler ends just as its client
went away: the status it then sends has no call left to go to ("ExecuteBatchError raised in core by servicer
method [...]", from `grpc._cython.cygrpc`). Nothing failed on the node's side (the session was freed when the
stream ended), so `quiet_departed_clients` turns that record into one DEBUG line; other gRPC errors stay."""

from __future__ import annotations

import logging

GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
DEPARTED = "ExecuteBatchError raised in core by servicer method"


class DepartedClientFilter(logging.Filter):
    """Rewrites grpc's record for a status sent after the client left as a one-line DEBUG record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno >= logging.ERROR and message.startswith(DEPARTED):
            method = message[len(DEPARTED):].strip()
            record.msg, record.args = "a client left before the status of %s was sent", (method,)
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def quiet_departed_clients() -> None:
    """Install the filter on gRPC's core logger (once per process)."""
    logger = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, DepartedClientFilter) for f in logger.filters):
        logger.addFilter(DepartedClientFilter())
