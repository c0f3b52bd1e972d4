"""Rank tasks (engine/rank_tasks.py): rank 0 runs work on a child rank beside its steps, over
the step pipe, and gets a Future. A task's result comes back; a task that raises fails its
Future naming the rank and the error; a child that dies fails the Futures of the tasks it had
and of those sent after, without hanging; the steps run as before meanwhile."""

from __future__ import annotations

import time

import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.transfer.nccl_ranks import HeadRoute, RankOutcome, RecvHeads, SendHeads

pytestmark = pytest.mark.timeout(120)


def recv_task(dtype: str = "float32", routes: tuple = ()) -> RecvHeads:
    return RecvHeads("r1", (0, 1), routes, 0, 5.0, 2, 16, 16, dtype, False)


def test_tasks_run_on_the_child_beside_its_steps_and_failures_name_it():
    llm = LLM("tiny", num_gpu_blocks=32, tensor_parallel_size=2)
    try:
        tasks = llm.engine.rank_tasks()
        assert tasks.size == 2 and tasks.here.rank == 0
        assert tasks.submit(1, recv_task()).result(30) == RankOutcome(0)  # no routes: nothing moves
        assert tasks.run_here(recv_task()) == RankOutcome(0)
        with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1: ValueError: .*no_such_dtype"):
            tasks.submit(1, recv_task("no_such_dtype")).result(30)
        # a send whose blocks are past the cache's end fails in its outcome, before any byte moves
        past_end = SendHeads("r1", (10_000,), (HeadRoute(5, 0, 1),), 0, 5.0)
        outcome = tasks.submit(1, past_end).result(30)
        assert outcome.failure.startswith("request r1: rank 1 failed to send its heads: IndexError"), outcome
        with pytest.raises(ValueError, match="no tensor-parallel rank 2"):
            tasks.submit(2, recv_task())
        out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4))  # steps go on
        assert len(out[0].token_ids) == 4
        child = llm.engine.tp_ranks._procs[0]
        child.kill()
        child.wait()
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="tensor-parallel rank 1 (exited|is gone)"):
            tasks.submit(1, recv_task()).result(30)
        assert time.monotonic() - start < 10
    finally:
        llm.shutdown()
