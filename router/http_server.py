"""The router's OpenAI-compatible HTTP front door, beside the gRPC one, over the same path.

    POST /v1/completions, POST /v1/chat/completions   (server-sent events with "stream": true)
    GET  /v1/models, GET /health, GET /metrics       (Prometheus text format)

An aiohttp server on the router's own asyncio loop: every request goes through
`RouterCore.generate`, exactly as a gRPC `Generate` does. aiohttp was chosen for streaming
throughput: one event loop shared with the router, no thread hop per chunk, and a write per
SSE event (`python -m pdserve.bench.http_stack` measures it against the gRPC path).

Errors answer with OpenAI's body `{"error": {"message", "type", "param", "code"}}`: a bad
field 400, an unknown model 404, overload (the admission queue is full or waited too long)
429, workers not ready or failed 503. The admission wait happens before the first byte of
a stream is sent, so overload is an HTTP status there too; a failure after the stream
started arrives as one `data: {"error": ...}` event before `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from aiohttp import web

from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.router.events import Chunk, Completion, RouterError
from pdserve.router.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pdserve.router.openai_protocol import (
    STATUS_OF_CODE,
    ParsedRequest,
    ProtocolError,
    build_sampling,
    check_prompt_ids,
    error_body,
    models_body,
    parse_chat,
    parse_completion,
)
from pdserve.router.openai_responses import ChoiceState, ResponseBuilder
from pdserve.router.service import RouterCore

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20
SHUTDOWN_TIMEOUT_S = 1.0
SSE_DONE = b"data: [DONE]\n\n"


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _json_response(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, ensure_ascii=False).encode(), status=status, content_type="application/json"
    )


def _token_id_text(token_id: int) -> str:
    return f"token_id:{token_id}"


def _usage_so_far(prompt_len: int, generated: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_len,
        "completion_tokens": generated,
        "total_tokens": prompt_len + generated,
    }


@web.middleware
async def _openai_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own refusals (unknown path, wrong method, body too large) in OpenAI's body."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err_type = "NotFoundError" if exc.status == 404 else "BadRequestError"
        return _json_response(
            error_body(f"{exc.reason}: {request.method} {request.path}", err_type, None, exc.status),
            exc.status,
        )


def _router_error_response(exc: RouterError) -> web.Response:
    status, body = _router_error_body(exc)
    return _json_response(body, status)


def _router_error_body(exc: RouterError) -> tuple[int, dict[str, Any]]:
    status, err_type = STATUS_OF_CODE.get(exc.code, (500, "InternalServerError"))
    # "sampling.max_tokens: ..." names max_tokens, "messages: ..." messages
    param = exc.message.split(":", 1)[0].rsplit(".", 1)[-1] if status == 400 and ":" in exc.message else None
    return status, error_body(exc.message, err_type, param, status)


class HttpServer:
    def __init__(self, core: RouterCore, host: str = "127.0.0.1", port: int = 0) -> None:
        self.core = core
        self.host = host
        self.port = port
        self.created = int(time.time())
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        """Bind (port 0: a free one) and serve; returns the base URL."""
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_openai_errors])
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        # handler_cancellation: a client that hangs up cancels its handler, which aborts
        # the request on the workers (RouterCore.generate's contract).
        # shutdown_timeout: stopping waits at most this long for open streams, then cancels
        # them (each aborts its request), instead of aiohttp's default minute.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(
                exc.errno, f"router.http_port: cannot bind {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        self.port = self._runner.addresses[0][1]
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- small endpoints ----------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return _json_response(models_body(self.core.model, self.created))

    async def _health(self, request: web.Request) -> web.Response:
        if self.core.ready:
            return web.Response(status=200)
        return _json_response(
            error_body("workers are not ready yet", "ServiceUnavailableError", None, 503), 503
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.core.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    # -- generation -----------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _parse(self, request: web.Request, chat: bool) -> tuple[ParsedRequest, list[int], Any]:
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProtocolError(400, f"the request body is not valid JSON: {exc}") from exc
        model = self.core.model
        parsed = parse_chat(body, model) if chat else parse_completion(body, model)
        if parsed.messages is not None:
            prompt = self.core.render_chat(parsed.messages, parsed.add_generation_prompt)
        elif parsed.prompt_text is not None:
            prompt = self.core.tokenize(parsed.prompt_text)
        else:
            prompt = parsed.prompt_token_ids
        check_prompt_ids(prompt, model)
        params = build_sampling(parsed, len(prompt), model, chat)
        return parsed, prompt, params

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            parsed, prompt, params = await self._parse(request, chat)
        except ProtocolError as exc:
            return _json_response(exc.body(), exc.status)
        except RouterError as exc:
            return _router_error_response(exc)
        token_text = _token_id_text if parsed.tokens_as_ids else self._token_text
        builder = ResponseBuilder(
            self.core.model.name, chat, prompt if parsed.return_token_ids else None, token_text
        )
        events = self.core.generate(self.core.new_request_id(), prompt, params)
        async with aclosing(events):
            try:
                # Admission happens before the first event: overload is an HTTP status.
                first = await anext(events)
            except RouterError as exc:
                return _router_error_response(exc)
            except Exception as exc:  # noqa: BLE001 - a worker failed before the first token
                log.exception("request failed")
                return _json_response(error_body(str(exc), "InternalServerError", None, 500), 500)
            if parsed.stream:
                return await self._stream(request, builder, first, events, parsed, params, len(prompt))
            return await self._collect(builder, first, events, params.logprobs is not None)

    def _token_text(self, token_id: int) -> str:
        """One token's own text, for logprobs (the tokenizer's decoding of it alone)."""
        tokenizer = self.core.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else _token_id_text(token_id)

    async def _collect(
        self,
        builder: ResponseBuilder,
        first: Chunk | Completion,
        events: AsyncIterator[Chunk | Completion],
        want_logprobs: bool,
    ) -> web.Response:
        choices: dict[int, ChoiceState] = {}
        event: Chunk | Completion | None = first
        try:
            while event is not None:
                state = choices.setdefault(event.index, ChoiceState())
                if isinstance(event, Chunk):
                    state.add(event)
                else:
                    state.done = event
                event = await anext(events, None)
        except RouterError as exc:
            return _router_error_response(exc)
        except Exception as exc:  # noqa: BLE001 - a worker failed mid-request
            log.exception("request failed")
            return _json_response(error_body(str(exc), "InternalServerError", None, 500), 500)
        return _json_response(builder.full(choices, want_logprobs))

    async def _stream(
        self,
        request: web.Request,
        builder: ResponseBuilder,
        first: Chunk | Completion,
        events: AsyncIterator[Chunk | Completion],
        parsed: ParsedRequest,
        params: SamplingParams,
        prompt_len: int,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "Connection": "keep-alive",
            }
        )
        await response.prepare(request)
        if builder.chat:
            for index in range(params.n):
                await response.write(_sse(builder.chunk(index, None, role=True)))
        # A chunk whose text is held back (an incomplete character) is skipped, unless the
        # client asked for its token ids or logprobs.
        keep_empty = builder.prompt_token_ids is not None or params.logprobs is not None
        generated, done = 0, []
        event: Chunk | Completion | None = first
        try:
            while event is not None:
                if isinstance(event, Chunk):
                    generated += len(event.token_ids)
                    if event.text or event.prompt_logprobs or (keep_empty and event.token_ids):
                        usage = _usage_so_far(prompt_len, generated) if parsed.continuous_usage else None
                        logprobs = builder.logprobs_body(event.index, event.logprobs)
                        chunk = builder.chunk(
                            event.index, event.text, None, False, event.token_ids, logprobs, usage
                        )
                        if event.prompt_logprobs:
                            chunk = builder.add_prompt_logprobs(chunk, event.prompt_logprobs)
                        await response.write(_sse(chunk))
                else:
                    done.append(event)
                    finish = builder.chunk(event.index, None if builder.chat else "", event.finish_reason)
                    await response.write(_sse(finish))
                event = await anext(events, None)
            if parsed.include_usage:
                await response.write(_sse(builder.usage_chunk(done)))
        except RouterError as exc:
            await response.write(_sse(_router_error_body(exc)[1]))
        except (ConnectionResetError, ConnectionError):
            raise  # the client left: the handler ends, `aclosing` aborts the request
        except Exception as exc:  # noqa: BLE001 - a worker failed mid-stream
            log.exception("request failed")
            await response.write(_sse(error_body(str(exc), "InternalServerError", None, 500)))
        await response.write(SSE_DONE)
        await response.write_eof()
        return response
