"""Serve a protobuf service whose requests are parsed by the handler, not by gRPC.

When a registered deserializer raises (malformed bytes, a string field that is not
UTF-8), grpc answers UNKNOWN or INTERNAL with no useful message. Here every method
of the service receives the raw bytes (no deserializer, which cannot fail) and
parses them itself: a request that does not parse is answered INVALID_ARGUMENT
naming the message type and the parser's complaint, before the servicer runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass


async def _parse_or_abort(
    request_cls: type[Message], raw: bytes, context: grpc.aio.ServicerContext
) -> Message:
    try:
        return request_cls.FromString(raw)
    except DecodeError as exc:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request: not a valid {request_cls.DESCRIPTOR.full_name} (malformed protobuf bytes, "
            f"or a string field that is not UTF-8): {exc}",
        )
        raise  # context.abort raised already; this line only tells readers and type checkers


def _unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], request_cls: type[Message]
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(await _parse_or_abort(request_cls, raw, context), context)

    return handle


def _server_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]], request_cls: type[Message]
) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        request = await _parse_or_abort(request_cls, raw, context)
        async for response in behavior(request, context):
            yield response

    return handle


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def add_strict_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Register every method of `service` on `server`, each served by the servicer's
    method of the same name (as the generated `add_*Servicer_to_server` does)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: client-streaming methods are not supported here")
        request_cls = GetMessageClass(method.input_type)
        behavior = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _server_stream(behavior, request_cls), response_serializer=_serialize
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(behavior, request_cls), response_serializer=_serialize
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
