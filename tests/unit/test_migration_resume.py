"""A request resumed elsewhere goes on exactly as it would have: the engine side of migration.

The router moves a request whose decode worker died by prefilling its prompt plus the
tokens already streamed, with `SamplingParams.resumed_after(n)`. Greedy and seeded
streams must continue token for token, with penalties too (the earlier tokens still count
as outputs); min_tokens and max_tokens count the whole request.
"""

from __future__ import annotations

import pytest

from pdserve.engine import LLM, SamplingParams

PROMPT = [256, 7, 42, 99, 3, 180, 61, 5, 77, 250, 11]


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", num_gpu_blocks=256)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True),
        SamplingParams(
            temperature=0.9,
            seed=11,
            presence_penalty=0.8,
            frequency_penalty=0.5,
            repetition_penalty=1.3,
            max_tokens=20,
            ignore_eos=True,
        ),
        SamplingParams(temperature=0.0, frequency_penalty=1.5, max_tokens=20, ignore_eos=True),
    ],
    ids=["greedy", "seeded", "seeded-top-k-top-p", "seeded-penalties", "greedy-frequency-penalty"],
)
@pytest.mark.parametrize("moved_after", [1, 6, 19])
def test_resumed_request_continues_the_same_stream(llm, params, moved_after):
    whole = llm.generate([PROMPT], params)[0].token_ids
    assert len(whole) == 20
    done = whole[:moved_after]
    rest = llm.generate([PROMPT + done], params.resumed_after(moved_after))[0].token_ids
    assert done + rest == whole


def test_seeded_resume_without_the_offset_would_differ(llm):
    """The offset is what keeps the seeded stream: restarting its count changes the tokens."""
    params = SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True)
    whole = llm.generate([PROMPT], params)[0].token_ids
    restarted = SamplingParams(temperature=1.0, seed=99, max_tokens=8, ignore_eos=True)
    assert llm.generate([PROMPT + whole[:4]], restarted)[0].token_ids != whole[4:]


def test_resumed_after_counts_the_whole_request():
    params = SamplingParams(max_tokens=10, min_tokens=4, seed=3)
    rest = params.resumed_after(3)
    assert (rest.max_tokens, rest.min_tokens, rest.num_prior_output_tokens) == (7, 1, 3)
    again = rest.resumed_after(5)
    assert (again.max_tokens, again.min_tokens, again.num_prior_output_tokens) == (2, 0, 8)
    assert SamplingParams(prompt_logprobs=2).resumed_after(1).prompt_logprobs is None  # sent once
    with pytest.raises(ValueError, match="cannot resume after 10 of 10"):
        params.resumed_after(10)
    with pytest.raises(ValueError, match="num_prior_output_tokens"):
        SamplingParams(num_prior_output_tokens=-1)
