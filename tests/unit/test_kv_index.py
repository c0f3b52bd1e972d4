"""KVIndex: leading-block overlaps, removal, LRU bound."""

import random

from pdserve.engine.core.block_pool import hash_prompt_blocks
from pdserve.router.kv_index import KVIndex


def prompt_hashes(tokens: list[int]) -> list[int]:
    return hash_prompt_blocks(tokens, block_size=4)


def test_overlaps_counts_leading_blocks_per_worker() -> None:
    index = KVIndex()
    shared = list(range(16))  # 4 blocks
    a = prompt_hashes(shared + [100, 101, 102, 103])
    b = prompt_hashes(shared[:8] + [7, 7, 7, 7])
    index.store("w1", a)
    index.store("w2", b)
    assert index.overlaps(a) == {"w1": 5, "w2": 2}
    assert index.overlaps(b) == {"w1": 2, "w2": 3}
    assert index.overlaps(prompt_hashes([9] * 8)) == {}
    assert index.overlaps([]) == {}


def test_overlap_stops_at_first_miss_even_if_later_blocks_held() -> None:
    index = KVIndex()
    hashes = prompt_hashes(list(range(20)))
    index.store("w", hashes[:2] + hashes[3:])  # hole at block 2
    assert index.overlaps(hashes) == {"w": 2}


def test_remove_and_remove_worker() -> None:
    index = KVIndex()
    hashes = prompt_hashes(list(range(12)))
    index.store("w1", hashes)
    index.store("w2", hashes)
    index.remove("w1", hashes[1:])
    assert index.overlaps(hashes) == {"w1": 1, "w2": 3}
    index.remove_worker("w2")
    assert index.overlaps(hashes) == {"w1": 1}
    assert len(index) == 1
    index.remove("w1", [12345])  # unknown hash: ignored
    index.remove("nobody", hashes)


def test_lru_cap_evicts_least_recently_touched() -> None:
    index = KVIndex(max_entries=4)
    index.store("w", [1, 2, 3, 4])
    index.touch([1])  # 2 is now the oldest
    index.store("w", [5])
    assert 2 not in index and 1 in index and len(index) == 4
    assert index.num_blocks_of("w") == 4
    assert index.num_evicted == 1


def test_overlaps_match_brute_force() -> None:
    rng = random.Random(0)
    index = KVIndex()
    prompts = [prompt_hashes([rng.randrange(3) for _ in range(24)]) for _ in range(30)]
    held: dict[str, set[int]] = {}
    for worker in ("a", "b", "c"):
        for prompt in rng.sample(prompts, 8):
            cut = rng.randrange(len(prompt) + 1)
            index.store(worker, prompt[:cut])
            held.setdefault(worker, set()).update(prompt[:cut])
    for prompt in prompts:
        expected = {}
        for worker, hashes in held.items():
            n = 0
            while n < len(prompt) and prompt[n] in hashes:
                n += 1
            if n:
                expected[worker] = n
        assert index.overlaps(prompt) == expected


def test_removed_worker_slot_is_reused_without_stale_holdings() -> None:
    index = KVIndex()
    index.store("old", [1, 2, 3])
    index.store("other", [1])
    index.remove_worker("old")
    index.store("new", [7])  # takes the removed worker's bit
    assert index.overlaps([1, 2, 3]) == {"other": 1}
    assert index.holders(7) == frozenset({"new"}) and index.num_blocks_of("new") == 1
    assert sorted(index.workers()) == ["new", "other"]
    assert 2 not in index and 3 not in index
