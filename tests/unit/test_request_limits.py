"""Input bounds at the router's door (CPU, no Ray): non-finite sampling values, stop
bounds, context and cache fit, and the router config keys that set them."""

from __future__ import annotations

import math

import pytest

from pdserve.deploy.config import ConfigError, parse_config
from pdserve.engine.core.outputs import LoadReport
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.router.events import ModelSummary, RouterError
from pdserve.router.policy import make_policy
from pdserve.router.request_limits import RequestLimits
from pdserve.router.service import RouterCore


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_p=math.nan), "top_p"),
        (dict(top_p=math.inf), "top_p"),
        (dict(presence_penalty=math.inf), "presence_penalty"),
        (dict(frequency_penalty=-math.inf), "frequency_penalty"),
        (dict(repetition_penalty=math.nan), "repetition_penalty"),
        (dict(min_p=math.nan), "min_p"),
    ],
)
def test_non_finite_sampling_values_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(stop=["x"] * 17), "sampling.stop: 17 stop strings, at most 16 allowed"),
        (
            SamplingParams(stop=["ok", "x" * 257]),
            "sampling.stop: a stop string of 257 characters, at most 256",
        ),
        (SamplingParams(stop_token_ids=list(range(257))), "sampling.stop_token_ids: 257 ids, at most 256"),
    ],
)
def test_stop_bounds_name_the_field_and_the_bound(params, message):
    with pytest.raises(RouterError) as info:
        RequestLimits().check_stops(params)
    assert info.value.code == "INVALID_ARGUMENT" and message in info.value.message


def test_stops_within_bounds_pass():
    RequestLimits().check_stops(SamplingParams(stop=["x" * 256] * 16, stop_token_ids=list(range(256))))
    RequestLimits(max_stop_strings=0).check_stops(SamplingParams())


def core_with_decode_cache(max_model_len: int, total_blocks: int, block_size: int = 16) -> RouterCore:
    model = ModelSummary("tiny", 256, max_model_len, block_size, None)
    core = RouterCore(model, None, make_policy("round_robin"), {}, {"p": "prefill", "d": "decode"})
    for worker_id, role, blocks in (("p", "prefill", 10_000), ("d", "decode", total_blocks)):
        core.tracker.update_load(LoadReport(worker_id, "i0", role, blocks, blocks, block_size, 0, 0, 0, 0.0))
    return core


def test_beyond_the_context_is_refused_naming_both_numbers_as_vllm_does():
    core = core_with_decode_cache(max_model_len=4096, total_blocks=1000)
    core.check_fits(100, 3996)  # exactly the context
    with pytest.raises(RouterError) as info:
        core.check_fits(100, 5000)
    assert info.value.code == "INVALID_ARGUMENT"
    assert (
        "maximum context length is 4096 tokens. However, you requested 5100 tokens "
        "(100 in the prompt, 5000 in the completion)" in info.value.message
    )
    with pytest.raises(RouterError, match="4294967395 tokens"):
        core.check_fits(100, 2**32 - 1)


def test_beyond_the_largest_decode_cache_is_refused_a_prefill_cache_does_not_count():
    core = core_with_decode_cache(max_model_len=4096, total_blocks=8)
    core.check_fits(100, 28)  # 128 tokens: 8 blocks of 16
    with pytest.raises(RouterError) as info:
        core.check_fits(100, 29)
    assert info.value.code == "INVALID_ARGUMENT"
    assert "129 tokens (100 in the prompt, 29 in the completion)" in info.value.message
    assert "holds 128 tokens (8 blocks of 16)" in info.value.message


@pytest.mark.parametrize(
    "router, key",
    [
        ({"max_bypasses": -1}, "router.max_bypasses"),
        ({"max_concurrent_rpcs": 0}, "router.max_concurrent_rpcs"),
        ({"max_pending_rpcs": 0}, "router.max_pending_rpcs"),
        ({"max_message_bytes": 100}, "router.max_message_bytes"),
        ({"max_message_bytes": 1 << 31}, "router.max_message_bytes"),
        ({"max_stop_strings": -1}, "router.max_stop_strings"),
        ({"max_stop_string_chars": 0}, "router.max_stop_string_chars"),
        ({"max_stop_token_ids": "many"}, "router.max_stop_token_ids"),
        ({"max_queue_len": -1}, "router.max_queue_len"),
        ({"default_max_tokens": 0}, "router.default_max_tokens"),
    ],
)
def test_router_bounds_are_checked_naming_the_key(router, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config({"model": "tiny", "colocated": {"count": 1}, "router": router})


def test_router_config_fills_the_limits():
    cfg = parse_config(
        {
            "model": "tiny",
            "colocated": {"count": 1},
            "router": {"max_stop_strings": 4, "max_concurrent_rpcs": 8},
        }
    )
    limits = RequestLimits.from_config(cfg.router)
    assert limits.max_stop_strings == 4 and limits.max_concurrent_rpcs == 8
    assert ("grpc.max_receive_message_length", 16 << 20) in limits.grpc_server_options()
