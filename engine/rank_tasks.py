"""Work a worker's rank 0 hands to its tensor-parallel ranks beside their steps.

A `RankTask` is plain picklable data with a `run(context)` method (the KV transfer's rank-to-rank
sends and receives, transfer/nccl_ranks.py, are such tasks: this package never imports them;
unpickling a task in a child rank imports its module there). Rank 0 sends a child a
`RankTaskCall` down the same pipe as its step plans (`TensorParallelRanks.submit`); the child
runs the task on a thread of its own, so its steps go on meanwhile, and replies over the pipe
with a `RankTaskReply`, which a reader thread on rank 0 turns into the call's Future. A child
that exits fails its pending calls' Futures; a task that never ends is the caller's to bound
(`Future.result(timeout)`).

`RankTasks` is what a worker's transfer side sees: the ranks' count, a task run on rank 0
itself (`run_here`, on the caller's thread) and one run on a child (`submit`); a worker of one
rank has only rank 0.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class RankContext:
    """What a task may use on the rank it runs on: its rank of the worker's `size`, its KV
    cache (its heads only) and its device."""

    rank: int
    size: int
    kv_cache: torch.Tensor
    device: torch.device


class RankTask(Protocol):
    """Picklable work for one rank; `run` returns a picklable result or raises."""

    def run(self, context: RankContext) -> Any: ...


@dataclass(frozen=True)
class RankTaskCall:
    """Rank 0 -> a child: run `task` on a thread of the child, reply with `task_id`."""

    task_id: int
    task: Any


@dataclass(frozen=True)
class RankTaskReply:
    """A child -> rank 0: the task's result, or `error` (its type and message) when it raised."""

    task_id: int
    result: Any = None
    error: str | None = None


class TaskReplies:
    """Rank 0's pending task calls, one Future each, resolved by a reader thread per child pipe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_id = 0
        self._pending: dict[int, tuple[int, Future]] = {}  # task id -> (child rank, its Future)
        self._gone: set[int] = set()  # children whose pipe closed: their tasks fail at once

    def open(self, rank: int) -> tuple[int, Future]:
        future: Future = Future()
        with self._lock:
            self._next_id += 1
            if rank in self._gone:
                future.set_exception(RuntimeError(f"tensor-parallel rank {rank} exited"))
            else:
                self._pending[self._next_id] = (rank, future)
            return self._next_id, future

    def fail(self, task_id: int, error: BaseException) -> None:
        with self._lock:
            entry = self._pending.pop(task_id, None)
        if entry is not None:
            entry[1].set_exception(error)

    def read(self, rank: int, conn) -> None:
        """Until the child's pipe closes: resolve the calls it answers; then fail its others."""
        try:
            while True:
                reply = conn.recv()
                with self._lock:
                    entry = self._pending.pop(reply.task_id, None)
                if entry is None:
                    continue
                if reply.error is None:
                    entry[1].set_result(reply.result)
                else:
                    entry[1].set_exception(RuntimeError(f"tensor-parallel rank {rank}: {reply.error}"))
        except (EOFError, OSError, TypeError):  # the child exited, or rank 0 closed the pipe
            pass
        with self._lock:
            self._gone.add(rank)
            gone = [task_id for task_id, (r, _) in self._pending.items() if r == rank]
        for task_id in gone:
            self.fail(task_id, RuntimeError(f"tensor-parallel rank {rank} exited with a task in hand"))

    def start_reader(self, rank: int, conn) -> None:
        threading.Thread(target=self.read, args=(rank, conn), name=f"tp-replies-{rank}", daemon=True).start()


def run_task_in_child(
    call: RankTaskCall, context: RankContext, reply: Callable[[RankTaskReply], None]
) -> None:
    """A child rank: run `call.task` on a daemon thread of its own (a task waiting on a peer
    must not hold up this rank's steps, nor its exit) and reply when it ends."""

    def run() -> None:
        if context.device.type == "cuda":
            torch.cuda.set_device(context.device)  # per thread
        try:
            answer = RankTaskReply(call.task_id, result=call.task.run(context))
        except Exception as exc:  # noqa: BLE001 - handed to rank 0's Future
            answer = RankTaskReply(call.task_id, error=f"{type(exc).__name__}: {exc}")
        reply(answer)

    threading.Thread(target=run, name=f"rank-task-{call.task_id}", daemon=True).start()


class RankTasks:
    """A worker's ranks as its KV transfer side drives them: `size` ranks; rank 0 runs a task on
    the caller's thread (`run_here`), a child on its own (`submit`: a Future of the result)."""

    def __init__(self, here: RankContext, submit: Callable[[int, RankTask], Future] | None) -> None:
        self.here = here
        self.size = here.size
        self._submit = submit

    def run_here(self, task: RankTask) -> Any:
        return task.run(self.here)

    def submit(self, rank: int, task: RankTask) -> Future:
        if self._submit is None or not 0 < rank < self.size:
            raise ValueError(f"no tensor-parallel rank {rank} to run a task on (ranks: {self.size})")
        return self._submit(rank, task)
