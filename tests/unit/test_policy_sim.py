"""A small run of the policy simulator: cache_aware must beat round_robin on shared
prefixes, match least_loaded on random prompts, and never over-commit decode memory."""

from pdserve.bench.policy_sim import main

SMALL = [
    "--num-prefill",
    "4",
    "--num-decode",
    "4",
    "--num-requests",
    "600",
    "--request-rate",
    "40",
    "--num-groups",
    "16",
    "--prompts-per-group",
    "8",
    "--kv-blocks-per-prefill",
    "1024",
    "--json",
]


def by_policy(results: list[dict]) -> dict[str, dict]:
    return {r["policy"]: r for r in results}


def test_cache_aware_beats_round_robin_on_shared_prefixes() -> None:
    results = by_policy(main(SMALL + ["--workload", "prefix-sharing", "--policy", "all"]))
    cache_aware, round_robin = results["cache_aware"], results["round_robin"]
    assert cache_aware["completed"] == round_robin["completed"] == 600
    assert cache_aware["prefix_hit_rate"] >= 0.9 * cache_aware["oracle_prefix_hit_rate"]
    assert cache_aware["prefix_hit_rate"] > round_robin["prefix_hit_rate"] + 0.2
    assert 2 * cache_aware["ttft_p50_ms"] <= round_robin["ttft_p50_ms"]


def test_cache_aware_equals_least_loaded_without_shared_prefixes() -> None:
    pair = ["--policy", "cache_aware", "--policy", "least_loaded"]
    results = by_policy(main(SMALL + ["--workload", "random", *pair]))
    assert results["cache_aware"]["oracle_prefix_hit_rate"] == 0.0
    for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "goodput_rps"):
        expected = results["least_loaded"][key]
        assert abs(results["cache_aware"][key] - expected) <= 0.05 * expected


def test_tight_decode_memory_rejects_overflow_without_preemptions() -> None:
    tight = SMALL + [
        "--workload",
        "random",
        "--request-rate",
        "120",
        "--kv-blocks-per-decode",
        "600",
        "--max-queue-len",
        "16",
        "--max-wait-s",
        "1",
        "--policy",
        "cache_aware",
    ]
    (committed,) = main(tight)
    assert committed["routing_caused_preemptions"] == 0 and committed["preemptions"] == 0
    assert committed["rejected"] > 0
    assert committed["completed"] + committed["rejected"] == 600
    (reported,) = main(tight + ["--headroom", "reported"])
    assert reported["routing_caused_preemptions"] > 0
