"""Python clients for the pdserve public gRPC API (`pdserve.v1.Generation`).

    client = PdserveClient("127.0.0.1:50051")
    client.wait_ready(timeout=30)
    for event in client.generate("Hello", max_tokens=16, temperature=0):
        if isinstance(event, GenerateChunk):
            print(event.text, end="")
        else:  # GenerateComplete: finish reason, usage and server timings
            print(event.finish_reason, event.usage)

`AsyncPdserveClient` is the same over grpc.aio. Every gRPC failure, and an
`Error` event inside a stream, surfaces as `PdserveError` with the status code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.v1 import generate_pb2, generate_pb2_grpc

SERVICE_NAME = "pdserve.v1.Generation"

# Long prompts sent as token ids can pass gRPC's 4 MiB default.
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]

_FINISH_REASONS = {
    generate_pb2.FINISH_REASON_UNSPECIFIED: "unspecified",
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_LENGTH: "length",
    generate_pb2.FINISH_REASON_ABORT: "abort",
}

_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


class PdserveError(Exception):
    """A failed call: the gRPC status code, the server's message and the request id if known."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None) -> None:
        self.code = code
        self.message = message
        self.request_id = request_id
        where = f" (request {request_id})" if request_id else ""
        super().__init__(f"{code.name}: {message}{where}")

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, request_id: str | None = None) -> PdserveError:
        # grpc.RpcError raised by a call is also a grpc.Call with code()/details().
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", request_id)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Timings:
    """Server-side phase durations in milliseconds."""

    queue_ms: float
    prefill_ms: float
    kv_transfer_ms: float
    decode_ms: float
    ttft_ms: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability (raw logits), its rank and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class GenerateChunk:
    """New tokens (and their text) since the previous chunk."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked for
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # first chunk, when asked for
    index: int = 0  # which of the request's n samples


@dataclass(frozen=True)
class GenerateComplete:
    """The last event of a successful stream."""

    request_id: str
    finish_reason: str  # "stop" | "length" | "abort" | "unspecified"
    usage: Usage
    timings: Timings
    index: int = 0  # which of the request's n samples


GenerateEvent = GenerateChunk | GenerateComplete


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    vocab_size: int
    max_model_len: int
    block_size: int
    eos_token_id: int | None
    num_prefill_workers: int
    num_decode_workers: int


def build_generate_request(
    prompt: str | Sequence[int],
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    min_tokens: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repetition_penalty: float | None = None,
    min_p: float | None = None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    n: int | None = None,
    request_id: str | None = None,
) -> generate_pb2.GenerateRequest:
    """The request message; None leaves a sampling field unset (the server's default)."""
    sampling = generate_pb2.SamplingParams(
        stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos
    )
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("seed", seed),
        ("min_tokens", min_tokens),
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
        ("repetition_penalty", repetition_penalty),
        ("min_p", min_p),
        ("logprobs", logprobs),
        ("prompt_logprobs", prompt_logprobs),
        ("n", n),
    ):
        if value is not None:
            setattr(sampling, name, value)
    request = generate_pb2.GenerateRequest(request_id=request_id or "", sampling=sampling)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(int(token) for token in prompt)
    return request


def event_from_response(response: generate_pb2.GenerateResponse) -> GenerateEvent:
    """Convert one streamed message; an `Error` event raises PdserveError."""
    kind = response.WhichOneof("event")
    if kind == "chunk":
        chunk = response.chunk
        return GenerateChunk(
            response.request_id,
            list(chunk.token_ids),
            chunk.text,
            _logprobs_from_proto(chunk.logprobs),
            _logprobs_from_proto(chunk.prompt_logprobs),
            response.index,
        )
    if kind == "complete":
        complete = response.complete
        usage, timings = complete.usage, complete.timings
        return GenerateComplete(
            request_id=response.request_id,
            finish_reason=_FINISH_REASONS.get(complete.finish_reason, "unspecified"),
            usage=Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
            timings=Timings(
                timings.queue_ms,
                timings.prefill_ms,
                timings.kv_transfer_ms,
                timings.decode_ms,
                timings.ttft_ms,
            ),
            index=response.index,
        )
    if kind == "error":
        code = _STATUS_BY_NUMBER.get(response.error.code, grpc.StatusCode.UNKNOWN)
        raise PdserveError(code, response.error.message, response.request_id or None)
    raise PdserveError(
        grpc.StatusCode.INTERNAL, "server sent an empty GenerateResponse", response.request_id or None
    )


def _logprobs_from_proto(logprobs) -> list[TokenLogprob]:
    return [
        TokenLogprob(lp.token_id, lp.logprob, lp.rank, [(t.token_id, t.logprob) for t in lp.top])
        for lp in logprobs
    ]


def _model_info_from_proto(info: generate_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model_name=info.model_name,
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        block_size=info.block_size,
        eos_token_id=info.eos_token_id if info.HasField("eos_token_id") else None,
        num_prefill_workers=info.num_prefill_workers,
        num_decode_workers=info.num_decode_workers,
    )


def _not_ready_error(target: str, timeout: float, last: str) -> PdserveError:
    return PdserveError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"{SERVICE_NAME} at {target} not serving after {timeout:g} s (last: {last})",
    )


class PdserveClient:
    """Blocking client over one gRPC channel. Use as a context manager or call close()."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = generate_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Iterator[GenerateEvent]:
        """Stream events: GenerateChunk..., then one GenerateComplete.

        A str prompt is tokenized by the router; a list of ints is sent as token ids.
        `sampling` takes `build_generate_request`'s keywords (max_tokens, temperature,
        ..., logprobs); None leaves a sampling field to the server's default. `timeout` bounds the
        whole stream (seconds). Leaving the loop early cancels the call.
        """
        request = build_generate_request(prompt, request_id=request_id, **sampling)
        call = self._stub.Generate(request, timeout=timeout)
        try:
            for response in call:
                yield event_from_response(response)
        except grpc.RpcError as error:
            raise PdserveError.from_rpc_error(error, request.request_id or None) from None
        finally:
            call.cancel()  # no-op when the stream already ended

    def abort(self, request_id: str, timeout: float | None = 10.0) -> bool:
        """Stop a running request; False if the server knows no such running request."""
        try:
            return self._stub.Abort(generate_pb2.AbortRequest(request_id=request_id), timeout=timeout).found
        except grpc.RpcError as error:
            raise PdserveError.from_rpc_error(error, request_id) from None

    def model_info(self, timeout: float | None = 10.0) -> ModelInfo:
        try:
            return _model_info_from_proto(
                self._stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=timeout)
            )
        except grpc.RpcError as error:
            raise PdserveError.from_rpc_error(error) from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the health service reports SERVING for pdserve.v1.Generation."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _not_ready_error(self.target, timeout, last)
            try:
                reply = self._health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=min(remaining, 2.0)
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PdserveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncPdserveClient:
    """asyncio client over one grpc.aio channel; create it inside the running event loop."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = generate_pb2_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def generate(
        self,
        prompt: str | Sequence[int],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncIterator[GenerateEvent]:
        """Async version of PdserveClient.generate."""
        request = build_generate_request(prompt, request_id=request_id, **sampling)
        call = self._stub.Generate(request, timeout=timeout)
        try:
            async for response in call:
                yield event_from_response(response)
        except grpc.RpcError as error:
            raise PdserveError.from_rpc_error(error, request.request_id or None) from None
        finally:
            call.cancel()

    async def abort(self, request_id: str, timeout: float | None = 10.0) -> bool:
        try:
            reply = await self._stub.Abort(generate_pb2.AbortRequest(request_id=request_id), timeout=timeout)
        except grpc.RpcError as error:
            raise PdserveError.from_rpc_error(error, request_id) from None
        return reply.found

    async def model_info(self, timeout: float | None = 10.0) -> ModelInfo:
        try:
            reply = await self._stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=timeout)
        except grpc.RpcError as error:
            raise PdserveError.from_rpc_error(error) from None
        return _model_info_from_proto(reply)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = "no answer"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _not_ready_error(self.target, timeout, last)
            try:
                reply = await self._health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=min(remaining, 2.0)
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"
            await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncPdserveClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
