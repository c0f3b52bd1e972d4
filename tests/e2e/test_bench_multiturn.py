"""`bench serve --dataset multi-turn` against a real in-process deployment (one co-located
worker, gRPC API): with conversations that outgrow the GPU cache, the prefix cache's host
tier serves more of each turn's prompt than the GPU cache alone."""

from __future__ import annotations

import asyncio
import json

import pytest

from pdserve.bench import serve
from pdserve.bench.datasets import Conversation, sample_multi_turn
from pdserve.bench.multiturn import run_multi_turn
from pdserve.engine.config import EngineConfig
from tests.inprocess import InProcessDeployment

# 6 conversations of 4 turns grow to 32 + 4 * 32 + 4 * 8 = 192 tokens (12 blocks) each: 72
# blocks in all against a GPU cache of 32 (two requests in flight need at most 24).
CONVERSATIONS = dict(num_conversations=6, num_turns=4, system_len=32, user_len=32, output_len=8)
GPU_BLOCKS, HOST_BLOCKS, IN_FLIGHT = 32, 128, 2


def _serve(num_host_blocks: int, conversations: list[Conversation]) -> tuple[dict, bool]:
    engine = EngineConfig(
        model="tiny", num_gpu_blocks=GPU_BLOCKS, num_host_blocks=num_host_blocks, max_num_seqs=8
    )
    deployment = InProcessDeployment(num_prefill=0, num_decode=1, engine=engine, http=False)
    try:
        metrics = asyncio.run(
            run_multi_turn(
                lambda: serve.open_sender("pdserve", deployment.url), conversations, IN_FLIGHT, timeout=120
            )
        )
        return metrics, deployment.all_blocks_free()
    finally:
        deployment.close()


def best_later_turn_hit_rate(conversations: list[Conversation]) -> float:
    """Cached / prompt tokens of turns after the first if every computed full block were kept."""
    cached = prompt = 0
    for c in conversations:
        length = len(c.system_prompt) + len(c.user_messages[0])
        for turn in range(1, c.num_turns):
            computed = length + c.output_len - 1  # the previous prompt and reply, bar its last token
            length += c.output_len + len(c.user_messages[turn])
            cached += computed // 16 * 16
            prompt += length
    return cached / prompt


@pytest.mark.timeout(240)
def test_host_tier_raises_the_multi_turn_hit_rate() -> None:
    conversations = sample_multi_turn(**CONVERSATIONS, vocab_size=256, seed=3)
    off, off_freed = _serve(0, conversations)
    on, on_freed = _serve(HOST_BLOCKS, conversations)
    for metrics in (off, on):
        assert metrics["completed"] == 24 and metrics["failed"] == 0, metrics["errors"]
        assert metrics["total_output_tokens"] == 24 * 8
        assert len(metrics["prefix_hit_rate_by_turn"]) == 4
    assert off_freed and on_freed  # nothing leaked on either side
    # With the tier, a later turn finds every full block of its earlier conversation (the
    # reply's last token was sampled, never fed, so its KV is not there): the most any
    # cache could serve. Without it, the GPU cache has evicted much of that.
    best = best_later_turn_hit_rate(conversations)
    print(
        f"later-turn hit rate: tier off {off['prefix_hit_rate_later_turns']:.3f}, on "
        f"{on['prefix_hit_rate_later_turns']:.3f}, best {best:.3f}"
    )
    assert on["prefix_hit_rate_later_turns"] == pytest.approx(best)
    assert on["prefix_hit_rate_later_turns"] > off["prefix_hit_rate_later_turns"] + 0.2
    assert on["prefix_hit_rate"] > off["prefix_hit_rate"]
    # Turn 0: only the shared system prompt can hit, tier or not.
    assert on["prefix_hit_rate_by_turn"][0] <= 32 / 64


@pytest.mark.timeout(120)
def test_a_failed_turn_ends_its_conversation() -> None:
    """A turn the server rejects (past the model's 4,096 positions) is counted failed, and
    the conversation's later turns, which would resend it, are not sent."""
    too_long = Conversation([1] * 16, [[2] * 3000, [3] * 3000, [4] * 8], output_len=4)
    fine = sample_multi_turn(1, 3, 16, 16, 4, vocab_size=256, seed=1)
    deployment = InProcessDeployment(num_prefill=0, num_decode=1, http=False)
    try:
        metrics = asyncio.run(
            run_multi_turn(lambda: serve.open_sender("pdserve", deployment.url), [too_long, *fine], 2)
        )
    finally:
        deployment.close()
    assert metrics["completed"] == 1 + 3 and metrics["failed"] == 2
    errors = [e for e in metrics["errors"] if e]
    assert len(errors) == 2 and errors[1] == "turn 2 not sent: an earlier turn failed", errors
    assert "4096" in errors[0] or "max_model_len" in errors[0] or "long" in errors[0], errors[0]


@pytest.mark.timeout(120)
def test_bench_serve_runs_the_multi_turn_dataset(tmp_path, capsys) -> None:
    """The CLI path: `bench serve --dataset multi-turn` prints and saves the hit rates."""
    engine = EngineConfig(model="tiny", num_gpu_blocks=64, num_host_blocks=64)
    deployment = InProcessDeployment(num_prefill=0, num_decode=1, engine=engine, http=False)
    try:
        argv = ["--url", deployment.url, "--dataset", "multi-turn", "--multi-turn-num-conversations", "3"]
        argv += ["--multi-turn-turns", "3", "--multi-turn-system-len", "16", "--multi-turn-user-len", "20"]
        argv += ["--multi-turn-output-len", "5", "--max-concurrency", "2", "--disable-tqdm"]
        argv += ["--save-result", "--result-dir", str(tmp_path), "--result-filename", "mt.json"]
        assert serve.main(argv) == 0
        out = capsys.readouterr().out
        # Conversations have no arrival rate: a run that asks for one is refused, not ignored.
        assert serve.main([*argv, "--request-rate", "4"]) == 1
        assert "--request-rate does not apply to --dataset multi-turn" in capsys.readouterr().err
    finally:
        deployment.close()
    assert "Prefix hit rate (cached/prompt tokens):" in out and "Conversations x turns: 3 x 3" in out
    saved = json.loads((tmp_path / "mt.json").read_text())
    assert saved["dataset"] == "multi-turn" and saved["completed"] == 9 and saved["failed"] == 0
    # Turn 0 prompts are 36 tokens: the 16-token system prompt hits after the first request.
    assert saved["input_lens"][:3] == [36, 36 + 5 + 20, 36 + 2 * (5 + 20)]
    assert saved["prefix_hit_rate"] == saved["total_cached_tokens"] / saved["total_input_tokens"] > 0
    assert saved["prefix_hit_rate_later_turns"] > saved["prefix_hit_rate_by_turn"][0]
