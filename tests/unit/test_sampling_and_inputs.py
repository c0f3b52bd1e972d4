"""Seeded sampling, top-k/top-p, detokenization, stop conditions and input validation."""

import pytest
import torch

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.sampler import SamplingRow, apply_top_k_top_p, sample
from pdserve.engine.tokenizer import ByteTokenizer, IncrementalDetokenizer


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", num_gpu_blocks=256)


def test_seeded_sampling_is_reproducible_across_runs_and_batches(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate(["the same prompt"], seeded)[0].token_ids
    again = llm.generate(["the same prompt"], seeded)[0].token_ids
    noisy = SamplingParams(temperature=1.3, max_tokens=30, ignore_eos=True)
    batch = llm.generate(["other", "the same prompt", "and another one"], [noisy, seeded, noisy])
    assert alone == again == batch[1].token_ids
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=24, ignore_eos=True)
    assert llm.generate(["the same prompt"], other_seed)[0].token_ids != alone


def test_top_k_and_top_p_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    k2 = apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([0.5]))
    assert torch.isfinite(p[0, 0]) and torch.isinf(p[0, 1:]).all()  # top token alone holds > 0.5
    rows = [SamplingRow(SamplingParams(temperature=0.7, top_k=1, seed=s), 0) for s in range(5)]
    assert sample(logits.repeat(5, 1), rows) == [0] * 5


def test_greedy_is_deterministic_and_mixed_batch(llm):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = llm.generate(["abc"], greedy)[0].token_ids
    b = llm.generate(["abc", "xyz"], [greedy, SamplingParams(temperature=1.0, max_tokens=8)])[0].token_ids
    assert a == b


def test_incremental_detokenizer_never_splits_utf8():
    tok = ByteTokenizer()
    text = "héllo 世界 🙂!"
    ids = list(text.encode("utf-8"))
    detok = IncrementalDetokenizer(tok, [tok.bos_token_id])
    deltas = [detok.add_tokens([t]) for t in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_token_ids_stop_strings_and_min_tokens(llm):
    base = llm.generate(["stop test"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop_tok = base.token_ids[5]
    out = llm.generate(
        ["stop test"], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_tok])
    )[0]
    first = base.token_ids.index(stop_tok)
    assert out.token_ids == base.token_ids[: first + 1] and out.finish_reason == "stop"
    # a stop string cuts the text before it
    target = base.text[3:5]
    if target and "\ufffd" not in base.text[:5]:
        out = llm.generate(["stop test"], SamplingParams(temperature=0, max_tokens=20, stop=[target]))[0]
        assert out.finish_reason == "stop"
        assert target not in out.text and base.text.startswith(out.text)
    out = llm.generate(["stop test"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_and_paths(llm, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        llm.generate([[1] * 5000], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[100000]], SamplingParams())
    with pytest.raises(ValueError, match="no/such/model"):
        LLM("no/such/model")
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(str(tmp_path))
    # nothing leaked from the failed calls
    assert not llm.engine.scheduler.requests


def test_output_text_keeps_special_tokens_and_stop_strings_when_asked():
    from pdserve.engine.output_processor import OutputProcessor
    from pdserve.engine.tokenizer import ByteTokenizer

    def text(params: SamplingParams, tokens: list[int]) -> str:
        processor = OutputProcessor(ByteTokenizer())
        processor.add("r", [256, 104], params)
        return "".join(processor.process("r", [t], i == len(tokens) - 1).text for i, t in enumerate(tokens))

    tokens = [*b"ab", 257, *b"cd"]
    assert text(SamplingParams(), tokens) == "abcd"
    assert text(SamplingParams(skip_special_tokens=False), tokens) == "ab<eos>cd"
    assert text(SamplingParams(stop=["bc"]), [*b"abcde"]) == "a"
    assert text(SamplingParams(stop=["bc"], include_stop_str_in_output=True), [*b"abcde"]) == "abc"


def test_step_inputs_slots_and_host_lists_match_their_token_by_token_forms():
    """A step's cache slots are built block by block and its host lists go through numpy: both
    must equal the plain per-token forms, at every block boundary and for nested lists."""
    import random

    from pdserve.engine.host_tensors import host_to_device
    from pdserve.engine.model_runner import _slots

    rng = random.Random(0)
    for _ in range(500):
        block_size = rng.choice([1, 2, 4, 16])
        table = [rng.randrange(1000) for _ in range(rng.randrange(1, 12))]
        start = rng.randrange(len(table) * block_size)
        end = rng.randrange(start + 1, len(table) * block_size + 1)
        want = [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        assert _slots(table, start, end, block_size) == want
    cpu = torch.device("cpu")
    for values, dtype in [([3, 1 << 40], torch.int64), ([[1, 2], [3, 4]], torch.int32), ([], torch.int64)]:
        got = host_to_device(values, dtype, cpu)
        assert got.dtype == dtype and torch.equal(got, torch.tensor(values, dtype=dtype))
