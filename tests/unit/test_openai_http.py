"""The router's OpenAI-compatible HTTP API, driven by the real `openai` SDK.

An in-process deployment wired like `deploy/local.yaml` (tiny model, one prefill and one
decode worker, KV over gRPC): completions and chat, streamed and not, usage, errors as the
SDK's exception types, greedy tokens equal to the gRPC path and the offline engine, and
`/metrics` parsed with prometheus_client's parser.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.router.client import GenerateChunk, PdserveClient
from tests.inprocess import InProcessDeployment

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def dep():
    d = InProcessDeployment(engine=EngineConfig(model="tiny", num_gpu_blocks=512, max_num_seqs=64))
    yield d
    d.close()


@pytest.fixture(scope="module")
def client(dep):
    return openai.OpenAI(base_url=dep.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post_raw(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_health(dep, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert _get(dep.http_url + "/health")[0] == 200


def test_completion_stream_equals_non_stream_with_usage(client):
    full = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert full.object == "text_completion"
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(PROMPT) + 1  # bytes + <bos>
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 12  # the usage chunk comes last
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, stream=True)
    )
    assert all(c.choices and c.usage is None for c in chunks)


def test_chat_stream_and_non_stream(dep, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    full = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    # The tiny preset's plain template, tokenized without an added <bos>.
    rendered = dep.core.chat_template.render(messages)
    assert rendered == "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    assert full.usage.prompt_tokens == len(rendered.encode())
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 10


def test_greedy_tokens_equal_grpc_and_offline(dep, client):
    """Token for token: HTTP (vLLM's return_token_ids), the gRPC API, the offline engine."""
    n = 24
    http = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=n, temperature=0, extra_body={"return_token_ids": True}
    )
    http_ids = http.choices[0].model_extra["token_ids"]
    streamed = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=n,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    streamed_ids = [t for c in streamed for t in c.choices[0].model_extra.get("token_ids", [])]
    with PdserveClient(dep.url) as grpc_client:
        grpc_ids = [
            t
            for e in grpc_client.generate(PROMPT, max_tokens=n, temperature=0)
            if isinstance(e, GenerateChunk)
            for t in e.token_ids
        ]
    offline = LLM("tiny", num_gpu_blocks=64).generate([PROMPT], SamplingParams(temperature=0, max_tokens=n))[
        0
    ]
    assert http_ids == streamed_ids == grpc_ids == offline.token_ids
    assert http.model_extra["prompt_token_ids"] == offline.prompt_token_ids
    assert http.choices[0].text == offline.text


def test_vllm_extra_fields_are_honoured(client):
    base = dict(model="tiny", prompt=PROMPT, temperature=0, max_tokens=16)
    ids = client.completions.create(**base, extra_body={"return_token_ids": True, "ignore_eos": True})
    tokens = ids.choices[0].model_extra["token_ids"]
    # stop_token_ids: ends at the first occurrence of the fourth token
    stop_at = tokens[3]
    stopped = client.completions.create(
        **base, extra_body={"return_token_ids": True, "stop_token_ids": [stop_at], "ignore_eos": True}
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["token_ids"] == tokens[: tokens.index(stop_at) + 1]
    # seeded sampling is reproducible; top_k=1 is greedy
    seeded = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
    assert (
        client.completions.create(**seeded).choices[0].text
        == client.completions.create(**seeded).choices[0].text
    )
    top1 = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=16,
        temperature=1.0,
        extra_body={"top_k": 1, "ignore_eos": True},
    )
    assert top1.choices[0].text == ids.choices[0].text
    # a stop string: the text ends before its first occurrence, finish_reason "stop"
    text = ids.choices[0].text
    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if text[i : i + 2].isprintable())
    with_stop = client.completions.create(**base, stop=[stop], extra_body={"ignore_eos": True})
    assert with_stop.choices[0].text == text[: text.index(stop)]
    assert with_stop.choices[0].finish_reason == "stop"
    min_tok = client.completions.create(
        **base, extra_body={"min_tokens": 5, "stop_token_ids": [tokens[0]], "return_token_ids": True}
    )
    assert len(min_tok.choices[0].model_extra["token_ids"]) >= 5


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(logprobs=99), "logprobs"),
        (dict(echo=True), "echo"),
        (dict(presence_penalty=5), "presence_penalty"),
        (dict(extra_body={"min_p": 2}), "min_p"),
        (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
        (dict(extra_body={"prompt_logprobs": 99}), "prompt_logprobs"),
        (dict(extra_body={"skip_special_tokens": "no"}), "skip_special_tokens"),
        (dict(extra_body={"include_stop_str_in_output": 1}), "include_stop_str_in_output"),
        (dict(extra_body={"top_k": -5}), "top_k"),
        (dict(prompt=[1, 2, 999]), "prompt"),
        (dict(prompt="x" * 5000), "prompt"),
        (dict(max_tokens=5000), "max_tokens"),
        (dict(prompt=""), "prompt"),
        (dict(prompt=["a", "b"]), "prompt"),
    ],
)
def test_bad_values_are_400(client, kwargs, param):
    args = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**args)
    assert info.value.status_code == 400
    err = info.value.body
    assert err["param"] == param and err["code"] == 400 and err["type"] == "BadRequestError"
    assert err["message"]


def test_unknown_model_is_404_and_bad_json_400(dep, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert info.value.body["message"] == "The model `gpt-4` does not exist."
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    status, body = _post_raw(dep.http_url + "/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "BadRequestError"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])


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


def _metrics(d: InProcessDeployment) -> dict[str, dict[tuple, float]]:
    """name -> {label values (sorted by label name, `le` and the like included): value}."""
    status, body = _get(d.http_url + "/metrics")
    assert status == 200
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = tuple(v for _, v in sorted(sample.labels.items()))
            out.setdefault(sample.name.removesuffix("_total"), {})[key] = sample.value
    return out


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


def test_unknown_paths_and_methods_answer_openai_errors(dep):
    status, body = _get(dep.http_url + "/v1/embeddings")
    assert status == 404 and json.loads(body)["error"]["type"] == "NotFoundError"
    status, body = _get(dep.http_url + "/v1/completions")
    assert status == 405 and json.loads(body)["error"]["code"] == 405


def test_continuous_usage_stats(client):
    stream = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    chunks = [c for c in stream if c.choices and c.choices[0].finish_reason is None]
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 10
    seen = 0
    for c in chunks:
        seen += len(c.choices[0].model_extra["token_ids"])
        assert c.usage.completion_tokens == seen and c.usage.prompt_tokens == len(PROMPT) + 1


def test_http_port_in_use_is_one_clear_error(dep):
    from pdserve.router.http_server import HttpServer

    taken = int(dep.http_url.rsplit(":", 1)[1])
    with pytest.raises(OSError, match=f"router.http_port: cannot bind 127.0.0.1:{taken}"):
        dep.run(HttpServer(dep.core, "127.0.0.1", taken).start())


def test_stopping_the_server_ends_open_streams_at_once():
    """Stopping HTTP with a stream open takes about a second, ends the stream, frees its blocks."""
    import threading

    d = InProcessDeployment()
    try:
        c = openai.OpenAI(base_url=d.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = c.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=3000, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        next(chunks)
        outcome: list[object] = []

        def drain():
            try:
                outcome.append(sum(1 for _ in chunks))
            except Exception as exc:  # noqa: BLE001 - what the client sees is the point
                outcome.append(exc)

        reader = threading.Thread(target=drain)
        reader.start()
        start = time.monotonic()
        d.run(d.http.stop())
        assert time.monotonic() - start < 5
        reader.join(10)
        assert not reader.is_alive() and outcome
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
            d.core.status()["num_streams"] == 0 and d.all_blocks_free()
        ):
            time.sleep(0.1)
        assert d.core.status()["num_streams"] == 0 and d.all_blocks_free()
    finally:
        d.close()


def test_pdserve_top_reads_metrics(dep, client, capsys):
    from pdserve.deploy.cli import main as cli_main

    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    assert cli_main(["top", "--url", dep.http_url, "--iterations", "2", "--interval", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "decode-0" in out and "prefill-0" in out and "generated" in out and "tok/s" in out
    assert "length " in out.splitlines()[-1]  # finished requests by reason
    assert cli_main(["top", "--url", "http://127.0.0.1:1", "--iterations", "1"]) == 2
    assert "pdserve: error: http://127.0.0.1:1/metrics" in capsys.readouterr().err


def test_logprobs_equal_the_offline_engine(client):
    """Completions' and chat's logprobs shapes, with the offline engine's values."""
    n_tok, k = 6, 3
    offline = LLM("tiny", num_gpu_blocks=64).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=n_tok, logprobs=k, ignore_eos=True)
    )[0]
    r = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=n_tok,
        temperature=0,
        logprobs=k,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_tok
    assert lp.token_logprobs == pytest.approx([t.logprob for t in offline.logprobs], abs=1e-5)
    by_id = (
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=n_tok,
            temperature=0,
            logprobs=k,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
        .choices[0]
        .logprobs
    )
    assert by_id.tokens == [f"token_id:{t}" for t in offline.token_ids]
    for top, ref in zip(by_id.top_logprobs, offline.logprobs, strict=True):
        # the k best (greedy: the sampled token is the best of them)
        assert len(top) == k and top == pytest.approx({f"token_id:{t}": v for t, v in ref.top}, abs=1e-5)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    streamed = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=n_tok,
        temperature=0,
        logprobs=k,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    streamed_lp = [v for c in streamed if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed_lp == pytest.approx(lp.token_logprobs, abs=1e-6)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=n_tok,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == n_tok and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy: the best
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], top_logprobs=2
        )


def test_n_choices_streamed_and_not(client):
    base = dict(model="tiny", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, n=3)
    r = client.completions.create(**base, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 15 and r.usage.prompt_tokens == len(PROMPT) + 1
    texts = {c.index: c.text for c in r.choices}
    assert len(set(texts.values())) > 1  # sample i draws from seed + i
    chunks = list(
        client.completions.create(
            **base, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    streamed: dict[int, str] = {}
    finished = set()
    for c in chunks:
        for choice in c.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert streamed == texts and finished == {0, 1, 2}
    assert chunks[-1].usage.completion_tokens == 15
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8


def test_penalties_and_min_p_equal_the_grpc_path(dep, client):
    sampling = dict(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3, min_p=0.05, seed=11)
    r = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=16,
        temperature=0.8,
        presence_penalty=1.5,
        frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.3, "min_p": 0.05, "return_token_ids": True, "ignore_eos": True},
        seed=11,
    )
    with PdserveClient(dep.url) as grpc_client:
        events = grpc_client.generate(PROMPT, max_tokens=16, temperature=0.8, ignore_eos=True, **sampling)
        grpc_ids = [t for e in events if isinstance(e, GenerateChunk) for t in e.token_ids]
    assert r.choices[0].model_extra["token_ids"] == grpc_ids


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


def test_prompt_logprobs_in_vllm_shape_equal_the_offline_engine(client):
    """prompt_logprobs (vLLM's extra field): None for the first prompt token, then the prompt
    token and its top alternatives with the offline engine's values, streamed and not."""
    offline = LLM("tiny", num_gpu_blocks=64).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    )[0]
    body = {"prompt_logprobs": 2}
    full = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=2, temperature=0, extra_body=body
    )
    got = full.choices[0].model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == len(offline.prompt_token_ids)
    for entry, ref in zip(got[1:], offline.prompt_logprobs, strict=True):
        assert entry[str(ref.token_id)]["logprob"] == pytest.approx(ref.logprob, abs=1e-5)
        assert entry[str(ref.token_id)]["rank"] == ref.rank
        assert {str(t) for t, _ in ref.top} <= set(entry)
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=2, temperature=0, stream=True, extra_body=body
        )
    )
    streamed = [c.choices[0].model_extra.get("prompt_logprobs") for c in chunks if c.choices]
    assert [p for p in streamed if p] == [got]  # once, in the first chunk
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=2, extra_body=body
    )
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) > 1


def test_include_stop_str_in_output_and_skip_special_tokens(client):
    plain = (
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = plain[6:8]  # a string the greedy text holds
    at = plain.find(stop)
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    kept = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"include_stop_str_in_output": True},
    )
    assert cut.choices[0].text == plain[:at] and cut.choices[0].finish_reason == "stop"
    assert kept.choices[0].text == plain[: at + len(stop)]
    # the tiny model's tokenizer: <bos> leads every encoded prompt; kept when not skipped
    special = client.completions.create(
        model="tiny", prompt=[256, 104, 105], max_tokens=1, extra_body={"skip_special_tokens": True}
    )
    assert "<bos>" not in special.choices[0].text
