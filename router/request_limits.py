"""The bounds the router's front door puts on requests and on its gRPC server.

One dataclass, filled from the deploy config's `router` section (deploy/config.py
checks the values); the servicer checks every request against it before anything
is routed, and the server takes its gRPC options from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.router.events import RouterError


@dataclass(frozen=True)
class RequestLimits:
    # Stop conditions: each stop string is matched against the tail of the text after
    # every step, so their count and length bound the work a request adds per token.
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 256
    # gRPC server: the largest message received or sent; larger requests are answered
    # RESOURCE_EXHAUSTED by gRPC itself ("Received message larger than max (N vs. M)").
    max_message_bytes: int = 16 << 20
    # gRPC server: RPCs in progress at once (streams, health checks, aborts); past it gRPC
    # answers RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!" without running a handler,
    # so an overload never piles up calls the server has accepted but cannot serve.
    max_concurrent_rpcs: int = 2048
    # gRPC core: calls received but not yet taken by the server's loop (a burst queues
    # here before the concurrency limit sees it). gRPC cancels calls past this backlog
    # (CANCELLED, no message), so it stays far above any burst; each costs a few KB.
    max_pending_rpcs: int = 65536

    @classmethod
    def from_config(cls, router_config: Any) -> RequestLimits:
        """The limits a deploy config's `router` section sets."""
        return cls(
            max_stop_strings=router_config.max_stop_strings,
            max_stop_string_chars=router_config.max_stop_string_chars,
            max_stop_token_ids=router_config.max_stop_token_ids,
            max_message_bytes=router_config.max_message_bytes,
            max_concurrent_rpcs=router_config.max_concurrent_rpcs,
            max_pending_rpcs=router_config.max_pending_rpcs,
        )

    def check_stops(self, params: SamplingParams) -> None:
        """Raise INVALID_ARGUMENT naming the bound a request's stop conditions pass."""
        if len(params.stop) > self.max_stop_strings:
            raise RouterError(
                "INVALID_ARGUMENT",
                f"sampling.stop: {len(params.stop)} stop strings, at most {self.max_stop_strings} allowed",
            )
        longest = max((len(s) for s in params.stop), default=0)
        if longest > self.max_stop_string_chars:
            raise RouterError(
                "INVALID_ARGUMENT",
                f"sampling.stop: a stop string of {longest} characters, at most "
                f"{self.max_stop_string_chars} allowed",
            )
        if len(params.stop_token_ids) > self.max_stop_token_ids:
            raise RouterError(
                "INVALID_ARGUMENT",
                f"sampling.stop_token_ids: {len(params.stop_token_ids)} ids, at most "
                f"{self.max_stop_token_ids} allowed",
            )

    def grpc_server_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # One limit, no random early cancelling between a soft and a hard one.
            ("grpc.server.max_pending_requests", self.max_pending_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", self.max_pending_rpcs),
        ]

    def describe(self) -> str:
        return (
            f"max message {self.max_message_bytes} bytes, max {self.max_concurrent_rpcs} concurrent RPCs "
            f"(and {self.max_pending_rpcs} not yet taken), "
            f"stop: at most {self.max_stop_strings} strings of {self.max_stop_string_chars} characters "
            f"and {self.max_stop_token_ids} token ids"
        )
