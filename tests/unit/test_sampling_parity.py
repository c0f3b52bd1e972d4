"""Sampling parity with transformers and with reference implementations written here:
raw logprobs (sampled token, rank, top-N), presence / frequency / repetition penalties
and min-p, under async scheduling and without it."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.sampler import SamplingRow, apply_min_p, sample_tokens
from tests.hf_models import make_checkpoint

MAX_NEW = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama"))
    model = make_checkpoint("llama", path, initializer_range=0.05)  # flatter logits: penalties matter
    rng = random.Random(3)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in (5, 17, 40)]
    # a prompt that repeats itself, so a repetition penalty changes what greedy picks
    prompts.append([7, 8, 9, 7, 8, 9, 7, 8, 9, 7, 8])
    return path, model, prompts


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), V] float32 logits of transformers' forward over the whole sequence."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_equal_transformers_log_softmax(checkpoint, temperature):
    path, model, prompts = checkpoint
    llm = LLM(path, num_gpu_blocks=256)
    params = SamplingParams(temperature=temperature, seed=5, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == MAX_NEW
        ref = hf_logits(model, prompt + out.token_ids).log_softmax(dim=-1)[len(prompt) - 1 : -1]
        for step, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            assert lp.token_id == token
            assert abs(lp.logprob - ref[step, token].item()) < 1e-4, f"step {step}"
            assert lp.rank == int((ref[step] > ref[step, token]).sum()) + 1
            top_lps, top_ids = ref[step].topk(5)
            assert [t for t, _ in lp.top] == top_ids.tolist()
            assert max(abs(a - b) for (_, a), b in zip(lp.top, top_lps.tolist(), strict=True)) < 1e-4
            if temperature == 0.0:
                assert lp.rank == 1


def test_no_logprobs_unless_asked(checkpoint):
    path, _, prompts = checkpoint
    llm = LLM(path, num_gpu_blocks=256)
    out = llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert out.logprobs is None
    zero = llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, logprobs=0))[0]
    assert zero.logprobs is not None and all(lp.top == [] for lp in zero.logprobs)


def reference_penalized_greedy(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy decoding with the OpenAI/vLLM penalties, written out on full forward passes."""
    tokens: list[int] = []
    for _ in range(params.max_tokens):
        logits = hf_logits(model, prompt + tokens)[-1].clone()
        for token in set(prompt + tokens):  # transformers' RepetitionPenaltyLogitsProcessor
            value = logits[token]
            rp = params.repetition_penalty
            logits[token] = value / rp if value > 0 else value * rp
        for token in set(tokens):
            logits[token] -= params.frequency_penalty * tokens.count(token) + params.presence_penalty
        tokens.append(int(logits.argmax()))
    return tokens


PENALTIES = {
    "repetition": dict(repetition_penalty=1.5),
    "frequency": dict(frequency_penalty=1.2),
    "presence": dict(presence_penalty=1.5),
    "all": dict(repetition_penalty=0.8, frequency_penalty=-0.5, presence_penalty=1.0),
}


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_penalties_equal_reference(checkpoint, async_scheduling):
    path, model, prompts = checkpoint
    llm = LLM(path, num_gpu_blocks=256, async_scheduling=async_scheduling)
    # one batch: every penalty next to an unpenalized request (the engine must not run ahead)
    batch_prompts, batch_params = [], []
    for penalty in PENALTIES.values():
        for prompt in prompts[-2:]:
            batch_prompts.append(prompt)
            batch_params.append(
                SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, **penalty)
            )
    batch_prompts.append(prompts[0])
    batch_params.append(SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
    outs = llm.generate(batch_prompts, batch_params)
    changed = 0
    for prompt, params, out in zip(batch_prompts, batch_params, outs, strict=True):
        expected = reference_penalized_greedy(model, prompt, params)
        assert out.token_ids == expected, params
        plain = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        changed += expected != reference_penalized_greedy(model, prompt, plain)
    assert changed >= 4, "the penalties should change greedy output on these prompts"
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.num_blocks
    assert not llm.engine._penalized


def test_repetition_penalty_equals_transformers_generate(checkpoint):
    path, model, prompts = checkpoint
    llm = LLM(path, num_gpu_blocks=256)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, repetition_penalty=1.3)
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        with torch.no_grad():
            hf = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=MAX_NEW,
                min_new_tokens=MAX_NEW,
                do_sample=False,
                repetition_penalty=1.3,
                pad_token_id=0,
            )
        assert out.token_ids == hf[0, len(prompt) :].tolist()


def test_min_p_masks_as_transformers_min_p_warper():
    from transformers.generation.logits_process import MinPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for min_p in (0.05, 0.2, 0.6):
        ours = apply_min_p(logits, torch.full((6,), min_p))
        theirs = MinPLogitsWarper(min_p=min_p)(None, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(apply_min_p(logits, torch.zeros(6)), logits)


def test_min_p_sampling_never_draws_below_the_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    drawn = set()
    for seed in range(300):
        row = SamplingRow(SamplingParams(temperature=1.0, min_p=0.25, seed=seed), 0)
        drawn.add(int(sample_tokens(logits, [row])[0]))
    assert drawn == {0, 1, 2}  # 0.05 < 0.25 * 0.5; 0.15 >= 0.125 stays


@pytest.mark.parametrize(
    "field,value",
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", float("nan")),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("min_p", 1.5),
        ("logprobs", 21),
        ("logprobs", -1),
        ("logprobs", True),
    ],
)
def test_out_of_range_sampling_fields_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("num_prefill", [1, 0], ids=["disaggregated", "colocated"])
def test_grpc_streams_logprobs_and_penalties_equal_offline(num_prefill):
    """Through the router's gRPC API (first token from the prefill worker, the rest from the
    decode worker, or all co-located): tokens and logprobs equal the offline engine's."""
    from pdserve.router.client import GenerateChunk, PdserveClient
    from tests.inprocess import InProcessDeployment

    prompts = [[3, 4, 5, 3, 4, 5, 3, 4], list(range(20, 45))]
    fields = dict(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3, repetition_penalty=1.4)
    fields.update(frequency_penalty=0.5, prompt_logprobs=2)
    expected = LLM("tiny", num_gpu_blocks=256).generate(prompts, SamplingParams(**fields))
    dep = InProcessDeployment(num_prefill=num_prefill, num_decode=1)
    try:
        with PdserveClient(dep.url) as client:
            for prompt, exp in zip(prompts, expected, strict=True):
                chunks = [e for e in client.generate(prompt, **fields) if isinstance(e, GenerateChunk)]
                tokens = [t for c in chunks for t in c.token_ids]
                logprobs = [lp for c in chunks for lp in c.logprobs]
                assert tokens == exp.token_ids
                assert [lp.token_id for lp in logprobs] == tokens
                prompt_lps = [lp for c in chunks for lp in c.prompt_logprobs]
                assert len(prompt_lps) == len(prompt) - 1 and chunks[0].prompt_logprobs
                for got, want in zip(logprobs + prompt_lps, exp.logprobs + exp.prompt_logprobs, strict=True):
                    assert got.token_id == want.token_id and got.rank == want.rank
                    assert abs(got.logprob - want.logprob) < 1e-4
                    assert [t for t, _ in got.top] == [t for t, _ in want.top]
    finally:
        dep.close()


@pytest.mark.parametrize("budget", [2048, 16], ids=["one_chunk", "chunked"])
def test_prompt_logprobs_equal_transformers(checkpoint, budget):
    path, model, prompts = checkpoint
    llm = LLM(path, num_gpu_blocks=256, max_num_batched_tokens=budget)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=2))  # fills the prefix cache
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=4)
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        ref = hf_logits(model, prompt).log_softmax(dim=-1)
        assert out.num_cached_tokens == 0  # computed whole, cache or not
        assert len(out.prompt_logprobs) == len(prompt) - 1
        for i, lp in enumerate(out.prompt_logprobs):
            token = prompt[i + 1]
            assert lp.token_id == token
            assert abs(lp.logprob - ref[i, token].item()) < 1e-4
            assert lp.rank == int((ref[i] > ref[i, token]).sum()) + 1
            assert [t for t, _ in lp.top] == ref[i].topk(4).indices.tolist()
