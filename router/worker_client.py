"""The calls the router makes on a worker, typed: `WorkerClient`, and its two adapters.

`RayWorkerClient` reaches a worker hosted in a Ray actor (`deploy.actors.WorkerActor`
forwards each call to the plain worker object); `LocalWorkerClient` an in-process worker.
Both answer the same `WorkerClient` protocol, so the router neither knows nor names
(by string) how a worker is reached. A call a worker's role does not answer (`prefill`
on a decode worker) fails with AttributeError. A call on a worker that is gone (its
process died, or is restarting) raises `WorkerLost`, whatever carries the call.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pdserve.engine.core.outputs import KVSnapshot, PrefillResult, StepBatch
    from pdserve.engine.core.sampling_params import SamplingParams
    from pdserve.transfer.contract import KVHandle


class WorkerLost(Exception):
    """The worker a call went to is gone: its process died or is being restarted."""

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"worker {worker_id} is gone: {reason}")
        self.worker_id = worker_id
        self.reason = reason


class WorkerClient(Protocol):
    """What the router asks of a worker. Every call may raise if the worker is gone."""

    worker_id: str

    async def poll(self, timeout_s: float) -> StepBatch:
        """Outputs, KV events and load since the last poll; waits up to timeout_s for outputs."""
        ...

    async def abort(self, req_id: str) -> bool: ...

    async def kv_snapshot(self) -> KVSnapshot: ...

    async def prefill(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, handle: KVHandle | None
    ) -> PrefillResult:
        """Prefill role: compute the prompt, answer with the first token; the KV goes to
        `handle`'s decode worker (None: nothing to ship)."""
        ...

    async def reserve(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> KVHandle | None:
        """Decode role: reserve blocks for a prompt whose KV comes from a prefill worker;
        None when the worker has no room now."""
        ...

    async def add_local(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Decode or co-located role: prefill and decode here."""
        ...


class RayWorkerClient:
    """A worker in a Ray actor: each call is the actor method of the same name."""

    def __init__(self, worker_id: str, handle: Any) -> None:
        self.worker_id = worker_id
        self.handle = handle

    async def _answer(self, ref: Any) -> Any:
        """The call's result; Ray's "actor died / unavailable" errors become WorkerLost."""
        from ray.exceptions import RayActorError

        try:
            return await ref
        except RayActorError as exc:
            raise WorkerLost(self.worker_id, f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc

    async def poll(self, timeout_s: float) -> StepBatch:
        return await self._answer(self.handle.poll.remote(timeout_s))

    async def abort(self, req_id: str) -> bool:
        return await self._answer(self.handle.abort.remote(req_id))

    async def kv_snapshot(self) -> KVSnapshot:
        return await self._answer(self.handle.kv_snapshot.remote())

    async def prefill(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, handle: KVHandle | None
    ) -> PrefillResult:
        return await self._answer(self.handle.prefill.remote(req_id, prompt_token_ids, params, handle))

    async def reserve(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> KVHandle | None:
        return await self._answer(self.handle.reserve.remote(req_id, prompt_token_ids, params))

    async def add_local(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        await self._answer(self.handle.add_local.remote(req_id, prompt_token_ids, params))


class LocalWorkerClient:
    """A worker object in this process; its calls block, so they run in threads."""

    def __init__(self, worker: Any) -> None:
        self.worker_id: str = worker.worker_id
        self.worker = worker

    async def poll(self, timeout_s: float) -> StepBatch:
        return await asyncio.to_thread(self.worker.poll, timeout_s)

    async def abort(self, req_id: str) -> bool:
        return await asyncio.to_thread(self.worker.abort, req_id)

    async def kv_snapshot(self) -> KVSnapshot:
        return await asyncio.to_thread(self.worker.kv_snapshot)

    async def prefill(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, handle: KVHandle | None
    ) -> PrefillResult:
        # The worker answers with a Future that resolves at the first token.
        return await asyncio.wrap_future(self.worker.prefill(req_id, prompt_token_ids, params, handle))

    async def reserve(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> KVHandle | None:
        return await asyncio.to_thread(self.worker.reserve, req_id, prompt_token_ids, params)

    async def add_local(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        await asyncio.to_thread(self.worker.add_local, req_id, prompt_token_ids, params)
