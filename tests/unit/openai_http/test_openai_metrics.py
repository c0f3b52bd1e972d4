"""The router's OpenAI-compatible HTTP API, driven by the real `openai` SDK: what `/metrics`
shows (parsed with prometheus_client's parser) after requests, overload, aborts and KV transfers,
and `pdserve top` reading it.
"""

from __future__ import annotations

import time

import openai
import pytest

from pdserve.engine.config import EngineConfig
from tests.inprocess import InProcessDeployment
from tests.unit.openai_http.helpers import PROMPT, _metrics


def test_overload_is_429_with_openai_error_body():
    """No decode headroom and no queue: the second concurrent request is refused at once."""
    engine = EngineConfig(model="tiny", num_gpu_blocks=8, max_num_seqs=4)
    d = InProcessDeployment(engine=engine, max_queue_len=0)
    try:
        c = openai.OpenAI(base_url=d.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        long = c.completions.create(
            model="tiny",
            prompt="hi",
            max_tokens=100,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(long))  # admitted and holding the blocks
        with pytest.raises(openai.RateLimitError) as info:
            c.completions.create(model="tiny", prompt="hi", max_tokens=100, extra_body={"ignore_eos": True})
        assert info.value.status_code == 429
        assert "max_queue_len=0" in info.value.body["message"]
        assert sum(1 for _ in long) > 0
        long.close()
        metrics = _metrics(d)
        assert metrics["pdserve:admission_rejections"][("tiny",)] == 1
    finally:
        d.close()


def test_metrics_after_requests():
    d = InProcessDeployment()
    try:
        c = openai.OpenAI(base_url=d.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        n, usage = 5, []
        for i in range(n):
            r = c.completions.create(model="tiny", prompt=f"{i} {PROMPT}", max_tokens=6, temperature=0)
            usage.append(r.usage)
        m = _metrics(d)
        assert sum(m["pdserve:time_to_first_token_seconds_count"].values()) == n
        assert sum(m["pdserve:e2e_request_latency_seconds_count"].values()) == n
        assert sum(m["pdserve:request_success"].values()) == n
        assert sum(m["pdserve:prompt_tokens"].values()) == sum(u.prompt_tokens for u in usage)
        assert sum(m["pdserve:generation_tokens"].values()) == sum(u.completion_tokens for u in usage)
        assert sum(m["pdserve:kv_transfer_seconds_count"].values()) == n  # every request went 1P1D
        assert sum(m["pdserve:routing_decisions"].values()) == n
        # vLLM's bucket edges
        ttft_edges = sorted({float(k[0]) for k in m["pdserve:time_to_first_token_seconds_bucket"]})
        assert ttft_edges[:3] == [0.001, 0.005, 0.01] and ttft_edges[-2] == 2560.0
        # the workers report their blocks free again (cached blocks count as free)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            usage_by_worker = _metrics(d)["pdserve:kv_cache_usage_perc"]
            if set(usage_by_worker.values()) == {0.0}:
                break
            time.sleep(0.1)
        assert set(usage_by_worker) == {("tiny", "decode", "decode-0"), ("tiny", "prefill", "prefill-0")}
        assert set(usage_by_worker.values()) == {0.0}
    finally:
        d.close()


def test_client_leaving_mid_stream_aborts_the_request(dep, client):
    aborted_before = sum(v for k, v in _metrics(dep)["pdserve:request_success"].items() if "abort" in k)
    stream = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=3000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (
        dep.core.status()["num_streams"] == 0 and dep.all_blocks_free()
    ):
        time.sleep(0.1)
    assert dep.core.status()["num_streams"] == 0
    assert dep.all_blocks_free()
    aborted = sum(v for k, v in _metrics(dep)["pdserve:request_success"].items() if "abort" in k)
    assert aborted == aborted_before + 1  # it ended by the abort, not by running out its 3000 tokens


def test_metrics_routing_reasons_and_prefix_cache(dep, client):
    """1P1D: a repeated prompt is routed for its cache hit and counted as prefix cache hits;
    co-located: every request prefills on its decode worker and ships no KV."""
    long_prompt = "a shared system prompt, long enough for several KV blocks. " * 2
    before = _metrics(dep)
    for _ in range(2):
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=2)
        time.sleep(0.5)  # the prefill worker's KV events reach the router's index
    after = _metrics(dep)

    def delta(name: str, key: tuple | None = None) -> float:
        def total(m):
            samples = m.get(name, {})
            return samples.get(key, 0.0) if key is not None else sum(samples.values())

        return total(after) - total(before)

    assert delta("pdserve:routing_decisions", ("tiny", "cache_hit")) >= 1
    assert delta("pdserve:prefix_cache_hits") >= 2 * dep.core.model.block_size
    assert delta("pdserve:prefix_cache_queries") == 2 * (len(long_prompt) + 1)

    colocated = InProcessDeployment(num_prefill=0, num_decode=1)
    try:
        c = openai.OpenAI(base_url=colocated.http_url + "/v1", api_key="unused", max_retries=0)
        for i in range(3):
            c.completions.create(model="tiny", prompt=f"{i} {PROMPT}", max_tokens=2)
        m = _metrics(colocated)
        assert m["pdserve:routing_decisions"] == {("tiny", "local_prefill"): 3.0}
        assert sum(m.get("pdserve:kv_transfer_seconds_count", {}).values()) == 0
        assert set(m["pdserve:prompt_tokens"]) == {("tiny", "both", "decode-0")}
    finally:
        colocated.close()


def test_pdserve_top_reads_metrics(dep, client, capsys):
    from pdserve.deploy.cli import main as cli_main

    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    assert cli_main(["top", "--url", dep.http_url, "--iterations", "2", "--interval", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "decode-0" in out and "prefill-0" in out and "generated" in out and "tok/s" in out
    assert "length " in out.splitlines()[-1]  # finished requests by reason
    assert cli_main(["top", "--url", "http://127.0.0.1:1", "--iterations", "1"]) == 2
    assert "pdserve: error: http://127.0.0.1:1/metrics" in capsys.readouterr().err


def test_kv_transfer_bytes_equal_the_blocks_shipped():
    """Distinct prompts on a fresh 1P1D deployment: every prompt block goes over, at the size
    the prefill worker's own cache tensor gives a block."""
    d = InProcessDeployment()
    try:
        c = openai.OpenAI(base_url=d.http_url + "/v1", api_key="unused", max_retries=0)
        prompt_lens = []
        for i in range(4):
            r = c.completions.create(
                model="tiny", prompt=f"{i}" * (20 + 17 * i), max_tokens=3, extra_body={"ignore_eos": True}
            )
            prompt_lens.append(r.usage.prompt_tokens)
        cache = next(iter(d.prefill.values())).engine.kv_cache
        block_size = d.core.model.block_size
        num_blocks = next(iter(d.prefill.values())).load().num_total_blocks
        block_bytes = cache.numel() * cache.element_size() // num_blocks
        expected = sum(-(-n // block_size) for n in prompt_lens) * block_bytes
        assert _metrics(d)["pdserve:kv_transfer_bytes"] == {("grpc", "tiny"): float(expected)}
    finally:
        d.close()
