"""Tensor parallelism inside one worker: rank 0 plans, ranks 1..N-1 follow.

Rank 0 is the engine's own process: its `LLMEngine` keeps the one scheduler and block pool
and its `ModelRunner` holds rank 0's shard. Ranks 1..N-1 are child processes, each
with a `ModelRunner` over its shard and its KV heads. Every step rank 0 turns the scheduler's
output into a `StepPlan` (plain data: token ids, positions, slots, block tables, sampling
rows), sends it down a pipe to each child, and all ranks run the same forward; their
collectives (all-reduce after the row-parallel layers and the embedding, all-gather of the
logits, the broadcast of rank 0's sampled tokens) go through a `TPGroup` of their own.
Before the first step, on CUDA, every rank captures its decode CUDA graphs and runs the warm-up
steps together (`warm_up`: their forwards hold collectives), the same batch sizes in the same
order; a step replays the graph of the bucket its plan's batch size picks, the same on every rank.
KV moving in or out of a disaggregated worker takes the same pipe and group, between steps:
`gather_kv` (a layer range of a prefill worker's blocks, every KV head, on rank 0: the
worker gathers piece by piece as its sender ships them) and `scatter_kv` (a decode
worker's arriving chunk, each rank writing its heads), see engine/kv_heads.py. A KV transfer
that goes rank to rank (nccl) instead runs `RankTask`s on the children (`submit`: each on a
thread of the child, beside its steps, answered over the pipe; engine/rank_tasks.py).

A child that fails to start is reported with its error; one that dies later fails rank 0's
next collective (gloo sees the closed connection, or the group's timeout fires), and a child
whose parent is gone reads EOF from its pipe and exits.
"""

from __future__ import annotations

import os
import pickle
import secrets
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener
from typing import Any, TypeVar

import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.core.request import Request
from pdserve.engine.core.scheduler import SchedulerOutput
from pdserve.engine.kv_heads import (
    assemble_heads,
    check_block_ids,
    check_layers,
    pack_local,
    rank_heads,
    unpack_local,
)
from pdserve.engine.model.tp_group import DEFAULT_TIMEOUT_S, TPGroup
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.rank_tasks import (
    RankContext,
    RankTask,
    RankTaskCall,
    RankTaskReply,
    TaskReplies,
    run_task_in_child,
)
from pdserve.engine.sampled_tokens import SampledTokens
from pdserve.engine.step_plan import DeviceWarmUp, KVGather, KVScatter

_READY = "ready"
_ERROR = "error"
_AUTHKEY_ENV = "PDSERVE_TP_AUTHKEY"  # the listener's key, for the children only (not on their argv)
_T = TypeVar("_T")


def rank_device(device: str, rank: int, shared: bool = False) -> str:
    """Rank `rank`'s device: the rank-th GPU from the configured one; CPU ranks share the CPU,
    and so do `shared` ones the configured GPU (EngineConfig.tensor_parallel_shared_device)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return device
    return f"cuda:{(dev.index or 0) + (0 if shared else rank)}"  # an index: TPGroup sets the device


@dataclass(frozen=True)
class RankSpec:
    """What a child rank needs to build its runner: the model and the runner's arguments
    (those of rank 0, `num_blocks` resolved there so every rank's cache has the same blocks)."""

    model_config: ModelConfig
    device: str  # the configured device; each rank offsets it (rank_device)
    runner_kwargs: dict[str, Any]


class TensorParallelRanks:
    """Rank 0's handle on ranks 1..size-1: start them, join the group, drive their steps.

    The children are `python -m pdserve.engine.tensor_parallel` processes (not multiprocessing's
    spawn, which re-runs the parent's main script) that connect back to a listener on
    127.0.0.1 with a one-time key."""

    def __init__(
        self, size: int, device: str, timeout_s: float = DEFAULT_TIMEOUT_S, shared_device: bool = False
    ) -> None:
        self.size = size
        self._timeout_s = timeout_s
        store = TPGroup.create_store(size, timeout_s)
        authkey = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        env[_AUTHKEY_ENV] = authkey.hex()
        self._procs: list[subprocess.Popen] = []
        self._conns: list = []
        self._send_lock = threading.Lock()  # steps (loop thread) and tasks (transfer threads) share the pipes
        self._replies = TaskReplies()
        self.staged_kv_bytes = 0  # KV bytes gathered onto or scattered from rank 0 (gather_kv/scatter_kv)
        self._finalizer = weakref.finalize(self, _stop_ranks, self._procs, self._conns)
        try:
            for rank in range(1, size):
                args = [rank, size, store.port, listener.address[1], device, timeout_s, int(shared_device)]
                args = [str(a) for a in args]
                cmd = [sys.executable, "-m", "pdserve.engine.tensor_parallel", *args]
                self._procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
            self._wait_joined(store)
            by_rank = {}
            for _ in range(1, size):  # each child connects right after it reached the store
                conn = listener.accept()
                by_rank[conn.recv()] = conn
            self._conns.extend(by_rank[rank] for rank in range(1, size))
            dev = torch.device(rank_device(device, 0, shared_device))
            self.group = TPGroup(0, size, store, dev, timeout_s, shared_device)
        except BaseException:
            self.shutdown()
            raise
        finally:
            listener.close()

    def _wait_joined(self, store) -> None:
        """Until every child has reached the store (then the group forms at once), failing
        fast, with its exit code, on a child that died first."""
        deadline = time.monotonic() + self._timeout_s
        while not store.check([TPGroup.joined_key(rank) for rank in range(1, self.size)]):
            self._raise_if_dead("before joining the group")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel ranks did not start within {self._timeout_s:.0f} s")
            time.sleep(0.05)

    def _raise_if_dead(self, when: str) -> None:
        for rank, proc in enumerate(self._procs, start=1):
            if proc.poll() is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} exited (code {proc.returncode}) {when}")

    def start(self, spec: RankSpec) -> None:
        """Build every child's runner; raises with a child's error if one fails."""
        for conn in self._conns:
            conn.send(spec)
        deadline = time.monotonic() + self._timeout_s
        for rank, conn in enumerate(self._conns, start=1):
            while not conn.poll(0.1):
                self._raise_if_dead("while loading its shard")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"tensor-parallel rank {rank} did not load within {self._timeout_s:.0f} s"
                    )
            status, detail = conn.recv()
            if status != _READY:
                raise RuntimeError(f"tensor-parallel rank {rank} failed to load its shard:\n{detail}")
        for rank, conn in enumerate(self._conns, start=1):  # from now on the children answer tasks only
            self._replies.start_reader(rank, conn)

    def submit(self, rank: int, task: RankTask) -> Future:
        """Run `task` on child rank `rank` (1..size-1), on a thread of its own beside its steps
        (engine/rank_tasks.py): a Future of its result, failed if the child raised or exited."""
        task_id, future = self._replies.open(rank)
        data = pickle.dumps(RankTaskCall(task_id, task), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                self._conns[rank - 1].send_bytes(data)
        except (OSError, ValueError) as exc:
            self._replies.fail(task_id, RuntimeError(f"tensor-parallel rank {rank} is gone: {exc}"))
        return future

    def context(self, runner: ModelRunner) -> RankContext:
        """Rank 0's `RankContext` (tasks run on rank 0 itself)."""
        return RankContext(0, self.size, runner.kv_cache, runner.kv_cache.device)

    def warm_up(self, runner: ModelRunner) -> None:
        """`ModelRunner.prepare_device` on every rank at once (CUDA graphs, then the warm-up
        steps: both run the model's collectives), with rank 0's decode warm-up rows."""
        message = DeviceWarmUp(runner.decode_warm_up_rows())
        self._run_everywhere(
            message, lambda: runner.prepare_device(message.decode_rows), "while warming up (CUDA graphs)"
        )

    def execute(
        self, runner: ModelRunner, out: SchedulerOutput, requests: dict[str, Request]
    ) -> SampledTokens:
        """`ModelRunner.execute` on every rank: rank 0 plans, all run the plan."""
        runner.run_block_copies(out.block_copies)
        plan = runner.plan_step(out, requests)
        return self._run_everywhere(plan, lambda: runner.run_step(plan), "during a step")

    def gather_kv(
        self,
        runner: ModelRunner,
        block_ids: Sequence[int],
        layers: slice | None = None,
        ready: list[torch.cuda.Event] | None = None,
    ) -> torch.Tensor:
        """The KV of `block_ids` in `layers` (None: all) with all the model's KV heads,
        [L', 2, n, block_size, Hkv, D] on rank 0's device: every rank packs its heads, rank 0
        gathers them over the group. On CUDA it is complete when this returns, unless `ready`
        is given: then the event after the gather is appended there and the caller's thread
        waits for it (the engine loop goes on with its steps meanwhile)."""
        message = KVGather(list(block_ids), check_layers(runner.kv_cache.shape[0], layers))
        check_block_ids(runner.num_blocks, message.block_ids)  # before any rank indexes
        whole = self._run_everywhere(message, lambda: gather_kv_heads(runner, message), "while gathering KV")
        self.staged_kv_bytes += whole.numel() * whole.element_size()
        if whole.is_cuda:  # complete before a sender thread (its own streams) reads it
            stream = torch.cuda.current_stream(whole.device)
            if ready is None:
                stream.synchronize()
            else:
                ready.append(stream.record_event())
        return whole

    def scatter_kv(
        self, runner: ModelRunner, chunk: torch.Tensor, block_ids: Sequence[int], layers: slice
    ) -> None:
        """Write a whole-heads chunk [layers, 2, n, block_size, Hkv, D] into `block_ids` of every
        rank's cache, each rank its heads: rank 0 scatters them over the group."""
        block_ids = list(block_ids)
        check_block_ids(runner.num_blocks, block_ids)
        cache = runner.kv_cache
        expected = (
            layers.stop - layers.start,
            2,
            len(block_ids),
            cache.shape[3],
            runner.config.num_key_value_heads,
            cache.shape[5],
        )
        if tuple(chunk.shape) != expected or not 0 <= layers.start < layers.stop <= cache.shape[0]:
            raise ValueError(
                f"KV chunk of shape {tuple(chunk.shape)} for layers {layers}: expected {expected}"
            )
        chunk = chunk.to(device=cache.device, dtype=cache.dtype)
        parts = [rank_heads(chunk, rank, self.size).contiguous() for rank in range(self.size)]
        message = KVScatter(block_ids, layers.start, layers.stop, tuple(parts[0].shape))
        self.staged_kv_bytes += chunk.numel() * chunk.element_size()
        self._run_everywhere(message, lambda: scatter_kv_heads(runner, message, parts), "while scattering KV")

    def _run_everywhere(self, message: object, run_here: Callable[[], _T], when: str) -> _T:
        """Send `message` to every child rank, then `run_here()` on rank 0 (its collectives meet
        the children's); a rank that died is named."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                for conn in self._conns:
                    conn.send_bytes(data)
            return run_here()
        except (OSError, RuntimeError):  # a closed pipe, or gloo's "connection closed by peer"
            self._raise_if_dead(when)  # name the rank that died, if one did
            raise

    def shutdown(self) -> None:
        """Stop the children (idempotent)."""
        self._finalizer()


def _stop_ranks(procs: list, conns: list, grace_s: float = 5.0) -> None:
    for conn in conns:
        try:
            conn.send_bytes(b"")  # the stop message
        except (OSError, ValueError):
            pass  # the child is gone already
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for conn in conns:
        conn.close()


def _rank_main(
    rank: int, size: int, store_port: int, conn_port: int, device: str, timeout_s: float, shared: bool
) -> None:
    """A child rank: join the group, build the runner from rank 0's spec, run its plans."""
    torch.set_num_threads(max(1, torch.get_num_threads() // size))  # the ranks share the host's cores
    store = TPGroup.reach_store(rank, size, store_port, timeout_s)
    conn = Client(("127.0.0.1", conn_port), authkey=bytes.fromhex(os.environ.pop(_AUTHKEY_ENV)))
    conn.send(rank)
    try:
        here = rank_device(device, rank, shared)
        group = TPGroup(rank, size, store, torch.device(here), timeout_s, shared)
        spec: RankSpec = conn.recv()
        runner = ModelRunner(spec.model_config, device=here, tp=group, **spec.runner_kwargs)
    except EOFError:
        return  # rank 0 went away during start-up
    except Exception:
        conn.send((_ERROR, traceback.format_exc()))
        raise SystemExit(1) from None
    conn.send((_READY, None))
    context = RankContext(rank, size, runner.kv_cache, torch.device(here))
    reply_lock = threading.Lock()

    def reply(answer: RankTaskReply) -> None:
        with reply_lock:
            try:
                conn.send(answer)
            except (OSError, ValueError):
                pass  # rank 0 is gone

    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return  # rank 0 is gone
        if not data:
            return
        message = pickle.loads(data)
        if isinstance(message, KVGather):
            gather_kv_heads(runner, message)
        elif isinstance(message, KVScatter):
            scatter_kv_heads(runner, message, None)
        elif isinstance(message, RankTaskCall):
            run_task_in_child(message, context, reply)
        elif isinstance(message, DeviceWarmUp):
            runner.prepare_device(message.decode_rows)
        else:
            runner.run_step(message)


def gather_kv_heads(runner: ModelRunner, message: KVGather) -> torch.Tensor | None:
    """Every rank: pack this rank's heads of the message's blocks and layers; rank 0 gets the
    whole-heads buffer."""
    parts = runner.tp.gather_to_first(pack_local(runner.kv_cache, message.block_ids, message.layers))
    return None if parts is None else assemble_heads(parts, runner.config.num_key_value_heads)


def scatter_kv_heads(runner: ModelRunner, message: KVScatter, parts: list[torch.Tensor] | None) -> None:
    """Every rank: take its heads of rank 0's chunk (`parts[r]` there, None elsewhere) and
    write them into its blocks."""
    mine = torch.empty(message.shape, dtype=runner.kv_cache.dtype, device=runner.kv_cache.device)
    runner.tp.scatter_from_first(parts, mine)
    unpack_local(runner.kv_cache, mine, message.block_ids, slice(message.layer_start, message.layer_stop))


if __name__ == "__main__":
    _rank, _size, _store_port, _conn_port, _device, _timeout, _shared = sys.argv[1:]
    _rank_main(
        int(_rank), int(_size), int(_store_port), int(_conn_port), _device, float(_timeout), _shared == "1"
    )
