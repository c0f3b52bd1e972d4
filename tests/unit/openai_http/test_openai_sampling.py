"""The router's OpenAI-compatible HTTP API, driven by the real `openai` SDK: what it generates.

Greedy tokens equal to the gRPC path and the offline engine; vLLM's extra sampling fields,
logprobs and prompt_logprobs in vLLM's shape, n choices, penalties and min_p, stop strings,
continuous usage stats.
"""

from __future__ import annotations

import openai
import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.router.client import GenerateChunk, PdserveClient
from tests.unit.openai_http.helpers import PROMPT


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
