"""Instruct checkpoints: chat templates rendered as transformers renders them, every eos id
stops a request, generation_config.json's sampling defaults apply to unset fields.

The checkpoint is made by transformers' `save_pretrained` (a tiny random Llama and a fast
tokenizer carrying a chat template); its generation_config.json lists three eos ids.
"""

from __future__ import annotations

import json
import os

import openai
import pytest

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.router.chat_template import ChatTemplate, ChatTemplateError
from pdserve.router.client import GenerateChunk, GenerateComplete, PdserveClient
from tests.hf_models import LLAMA3_TEMPLATE, make_checkpoint, save_chat_tokenizer
from tests.inprocess import InProcessDeployment

# Exercises what transformers' environment provides: raise_exception, loop controls,
# namespace, tojson, trim_blocks / lstrip_blocks.
STRICT_TEMPLATE = """{% set ns = namespace(system='') %}
{% for message in messages %}
  {% if message['role'] == 'system' %}
    {% set ns.system = message['content'] %}
    {% continue %}
  {% endif %}
  {% if (message['role'] == 'user') != (loop.index0 % 2 == (1 if ns.system else 0)) %}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>
{% if ns.system and loop.first is false and loop.index0 == 1 %}{{ ns.system | tojson }} {% endif %}
{{ message['content'] }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}],
    [
        {"role": "system", "content": "You are a quick brown fox."},
        {"role": "user", "content": "  the lazy dog? "},
        {"role": "assistant", "content": "jumps over"},
        {"role": "user", "content": "again, with <|eot_id|> inside"},
    ],
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("instruct"))
    make_checkpoint("llama", directory)
    save_chat_tokenizer(directory, LLAMA3_TEMPLATE)
    return directory


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, STRICT_TEMPLATE], ids=["llama3", "strict"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_prompts_render_as_transformers(tmp_path, template, add_generation_prompt):
    import transformers as tf

    make_checkpoint("llama", str(tmp_path))
    save_chat_tokenizer(str(tmp_path), template)
    hf = tf.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = ChatTemplate.from_model(str(tmp_path))
    tokenizer = load_tokenizer(str(tmp_path), None, None)
    for messages in CONVERSATIONS:
        expected_text = hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert ours.render(messages, add_generation_prompt) == expected_text
        expected = hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        expected = (
            expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        )
        assert ours.encode(tokenizer, messages, add_generation_prompt) == list(expected)


def test_template_errors_are_refusals(tmp_path):
    make_checkpoint("llama", str(tmp_path))
    save_chat_tokenizer(str(tmp_path), STRICT_TEMPLATE)
    ours = ChatTemplate.from_model(str(tmp_path))
    with pytest.raises(ChatTemplateError, match="must alternate"):
        ours.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="role"):
        ours.render([{"role": "wizard", "content": "a"}])


def _stop_positions(tokens: list[int], count: int) -> list[int]:
    """Positions of `count` tokens that can serve as eos ids in turn: each first occurs at its
    position, and no earlier chosen one recurs before the next position."""
    chosen: list[int] = []
    for i, t in enumerate(tokens):
        if t in tokens[:i] or (chosen and i - chosen[-1] < 2):
            continue
        if chosen and any(tokens[c] in tokens[chosen[-1] + 1 : i] for c in chosen):
            continue
        chosen.append(i)
        if len(chosen) == count:
            return chosen
    pytest.skip(f"greedy output {tokens} has no {count} usable stop positions")


def test_every_eos_id_stops_a_request(checkpoint):
    """config.json names one eos id, generation_config.json three: each one ends a request."""
    prompt = [5, 17, 42, 99, 7]
    reference = LLM(checkpoint, num_gpu_blocks=64)
    tokens = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[
        0
    ].token_ids
    positions = _stop_positions(tokens, 3)
    eos_ids = [tokens[p] for p in positions]
    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    config["eos_token_id"] = eos_ids[0]
    with open(os.path.join(checkpoint, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(checkpoint, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos_ids, "temperature": 0.0, "max_new_tokens": 40}, f)
    assert ModelConfig.from_pretrained(checkpoint).eos_token_ids == eos_ids

    llm = LLM(checkpoint, num_gpu_blocks=64)
    dep = InProcessDeployment(engine=EngineConfig(model=checkpoint, num_gpu_blocks=128))
    try:
        with PdserveClient(dep.url) as grpc_client:
            info = grpc_client.model_info()
            assert info.eos_token_id == eos_ids[0] and info.eos_token_ids == tuple(eos_ids)
            start = 0
            for position, eos in zip(positions, eos_ids, strict=True):
                # Continue the greedy output from where the previous eos id stopped it.
                context = prompt + tokens[:start]
                # No sampling fields set: generation_config.json's temperature 0 and 40 tokens apply.
                out = llm.generate([context], SamplingParams(temperature=0, max_tokens=40))[0]
                assert out.token_ids == tokens[start : position + 1] and out.token_ids[-1] == eos
                assert out.finish_reason == "stop"
                events = list(grpc_client.generate(context))
                grpc_ids = [t for e in events if isinstance(e, GenerateChunk) for t in e.token_ids]
                assert grpc_ids == out.token_ids
                assert isinstance(events[-1], GenerateComplete) and events[-1].finish_reason == "stop"
                start = position + 1
    finally:
        dep.close()


def test_chat_through_http_and_grpc_uses_the_template(checkpoint):
    import transformers as tf

    hf = tf.AutoTokenizer.from_pretrained(checkpoint)
    dep = InProcessDeployment(engine=EngineConfig(model=checkpoint, num_gpu_blocks=128))
    try:
        name = os.path.basename(checkpoint)
        client = openai.OpenAI(base_url=dep.http_url + "/v1", api_key="unused", max_retries=0)
        messages = CONVERSATIONS[1]
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        r = client.chat.completions.create(
            model=name, messages=messages, max_tokens=6, temperature=0, extra_body={"return_token_ids": True}
        )
        assert r.model_extra["prompt_token_ids"] == expected
        assert r.usage.prompt_tokens == len(expected)
        with PdserveClient(dep.url) as grpc_client:
            events = list(grpc_client.generate(messages, max_tokens=6, temperature=0))
        grpc_ids = [t for e in events if isinstance(e, GenerateChunk) for t in e.token_ids]
        assert grpc_ids == r.choices[0].model_extra["token_ids"]
        assert events[-1].usage.prompt_tokens == len(expected)
        with pytest.raises(openai.BadRequestError, match="alternate|role"):
            client.chat.completions.create(model=name, messages=[{"role": "robot", "content": "x"}])
    finally:
        dep.close()
