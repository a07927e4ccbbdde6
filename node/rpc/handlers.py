"""Register a gRPC service so that request bytes which do not parse get INVALID_ARGUMENT.

The generated `add_*Servicer_to_server` functions parse requests with `Message.FromString`; bytes that
do not parse end the call there, before any of our code runs, with UNKNOWN ("Unexpected DecodeError").
`add_service` registers every method of a service from its descriptor instead, with a parser that never
raises: bytes that do not parse become `Malformed`, and the call ends with INVALID_ARGUMENT naming the
message type. Methods added to the proto later are picked up without changes here."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from node.rpc.checks import details
from node.runtime.errors import InvalidRequest


@dataclass(frozen=True)
class Malformed:
    """Request bytes that did not parse as `type_name`."""

    type_name: str
    error: str

    @property
    def message(self) -> str:
        return details(f"malformed {self.type_name}: {self.error}")


def _parser(message_class, type_name: str) -> Callable[[bytes], object]:
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as error:  # DecodeError, and whatever else the parser finds wrong
            return Malformed(type_name, str(error) or type(error).__name__)

    return parse


async def _checked(requests: AsyncIterator) -> AsyncIterator:
    """A request stream that raises InvalidRequest (the servicer's INVALID_ARGUMENT) at a malformed message."""
    async for request in requests:
        if isinstance(request, Malformed):
            raise InvalidRequest(request.message)
        yield request


async def _finish(result, context):
    """A handler's result: written out (an async generator of replies), awaited (a coroutine) or as is."""
    if inspect.isasyncgen(result):
        async for reply in result:
            await context.write(reply)
        return None
    return await result if inspect.isawaitable(result) else result


def _wrap(impl, streaming_request: bool, on_error: Callable[[str], None] | None):
    async def handler(request, context):
        if streaming_request:
            return await _finish(impl(_checked(request), context), context)
        if isinstance(request, Malformed):
            if on_error is not None:
                on_error(grpc.StatusCode.INVALID_ARGUMENT.name)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await _finish(impl(request, context), context)

    return handler


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer,
                on_error: Callable[[str], None] | None = None) -> None:
    """Serve `servicer`'s methods for every RPC of `service` that it implements.

    `on_error(code_name)` is told of each call refused here (for the node's error metrics)."""
    handlers = {}
    for method in service.methods:
        impl = getattr(servicer, method.name, None)
        if impl is None:
            continue
        request_class = message_factory.GetMessageClass(method.input_type)
        reply_class = message_factory.GetMessageClass(method.output_type)
        factory = _FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            _wrap(impl, method.client_streaming, on_error),
            request_deserializer=_parser(request_class, method.input_type.full_name),
            response_serializer=reply_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
