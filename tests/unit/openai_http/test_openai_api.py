"""The router's OpenAI-compatible HTTP API, driven by the real `openai` SDK: the API surface.

An in-process deployment wired like `deploy/local.yaml` (tiny model, one prefill and one
decode worker, KV over gRPC; tests/unit/openai_http/conftest.py): models and health,
completions and chat, streamed and not, usage, errors as the SDK's exception types and
OpenAI error bodies, the server's port and shutdown.
"""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.inprocess import InProcessDeployment
from tests.unit.openai_http.helpers import PROMPT, _get, _post_raw


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


def test_unknown_paths_and_methods_answer_openai_errors(dep):
    status, body = _get(dep.http_url + "/v1/embeddings")
    assert status == 404 and json.loads(body)["error"]["type"] == "NotFoundError"
    status, body = _get(dep.http_url + "/v1/completions")
    assert status == 405 and json.loads(body)["error"]["code"] == 405


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
