"""Block manager: allocation, refcounts, prefix caching, LRU eviction, invariants."""

from __future__ import annotations

import random

import pytest

from pdserve.engine.block_manager import BlockManager, hash_block
from pdserve.engine.sequence import Sequence

BS = 4


def seq(seq_id: str, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, list(tokens))


def admit(bm: BlockManager, s: Sequence) -> bool:
    """allocate_prompt + slots for the whole prompt, as the scheduler does."""
    bm.allocate_prompt(s)
    if bm.ensure_slots(s, s.num_tokens):
        return True
    bm.free(s)
    return False


def compute_all(bm: BlockManager, s: Sequence) -> None:
    """Pretend the model computed every known token."""
    s.num_computed_tokens = s.num_tokens
    bm.commit_full_blocks(s)


def test_allocate_and_free_counts():
    bm = BlockManager(8, BS)
    a = seq("a", range(10))
    assert admit(bm, a)
    assert len(a.block_ids) == 3 and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 5 and bm.num_total_blocks == 8
    assert bm.can_allocate(5) and not bm.can_allocate(6)
    bm.check_invariants([a])
    bm.free(a)
    assert a.block_ids == [] and bm.num_free_blocks == 8
    bm.check_invariants([])


def test_ensure_slots_is_all_or_nothing():
    bm = BlockManager(4, BS)
    a = seq("a", range(6))
    assert admit(bm, a)  # 2 blocks
    assert not bm.ensure_slots(a, 6 * BS)  # needs 4 more, only 2 free
    assert len(a.block_ids) == 2 and bm.num_free_blocks == 2
    assert bm.ensure_slots(a, 4 * BS)
    assert len(a.block_ids) == 4 and bm.num_free_blocks == 0
    assert bm.ensure_slots(a, 3)  # already covered: no-op
    bm.check_invariants([a])


def test_prefix_hit_shares_blocks():
    bm = BlockManager(16, BS)
    prompt = list(range(100, 110))  # 10 tokens: 2 full blocks + 2
    a = seq("a", prompt)
    assert admit(bm, a)
    compute_all(bm, a)
    b = seq("b", prompt)
    assert admit(bm, b)
    assert b.num_cached_tokens == b.num_computed_tokens == 2 * BS
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert [bm.refcount(x) for x in a.block_ids] == [2, 2, 1]
    bm.check_invariants([a, b])
    assert bm.num_hit_tokens == 2 * BS
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16
    bm.check_invariants([])


def test_hit_on_exact_multiple_leaves_a_token_to_compute():
    bm = BlockManager(16, BS)
    prompt = list(range(3 * BS))
    a = seq("a", prompt)
    assert admit(bm, a)
    compute_all(bm, a)
    bm.free(a)
    b = seq("b", prompt)
    assert admit(bm, b)
    assert 0 < b.num_computed_tokens < b.num_tokens
    assert b.num_computed_tokens == 2 * BS  # the block holding the last token is recomputed
    # one more token: now every prompt block may hit and 1 token is left
    c = seq("c", prompt + [7])
    assert admit(bm, c)
    assert c.num_computed_tokens == 3 * BS == c.num_tokens - 1
    bm.check_invariants([b, c])


def test_single_token_prompt_never_hits():
    bm = BlockManager(4, 1)
    a = seq("a", [5])
    assert admit(bm, a)
    compute_all(bm, a)
    b = seq("b", [5])
    assert admit(bm, b)
    assert b.num_computed_tokens == 0


def test_freed_cached_blocks_are_revived_and_evicted_lru_tail_first():
    bm = BlockManager(6, BS)
    a = seq("a", list(range(0, 3 * BS)) + [99])  # 3 full blocks + 1
    assert admit(bm, a)
    compute_all(bm, a)
    a_blocks = list(a.block_ids)
    bm.free(a)
    assert bm.num_cached_free_blocks == 3 and bm.num_free_blocks == 6
    # 3 plain blocks are handed out before any cached one is evicted
    x = seq("x", list(range(1000, 1000 + 3 * BS)))
    assert admit(bm, x)
    assert not set(x.block_ids) & set(a_blocks[:3])
    # one more block evicts a's LAST full block (freed first = least recent)
    y = seq("y", [2000])
    assert admit(bm, y)
    assert y.block_ids == [a_blocks[2]]
    bm.check_invariants([x, y])
    # a's first two blocks still hit, revived from the cached free list in O(1)
    a2 = seq("a2", list(range(0, 3 * BS)) + [99])
    bm.free(x)
    bm.allocate_prompt(a2)
    assert a2.block_ids == a_blocks[:2] and a2.num_cached_tokens == 2 * BS
    bm.check_invariants([y, a2])


def test_recently_used_cached_blocks_outlive_older_ones():
    bm = BlockManager(4, BS)
    old, new = seq("old", list(range(BS)) + [1]), seq("new", list(range(50, 50 + BS)) + [1])
    for s in (old, new):
        assert admit(bm, s)
        compute_all(bm, s)
    old_block, new_block = old.block_ids[0], new.block_ids[0]
    bm.free(old)
    bm.free(new)  # both cached; old is least recently freed
    hog = seq("hog", list(range(500, 500 + 3 * BS)))
    assert admit(bm, hog)  # 2 plain + evicts exactly one cached: the old one
    assert old_block in hog.block_ids and new_block not in hog.block_ids
    again = seq("again", list(range(50, 50 + BS)) + [1])
    bm.allocate_prompt(again)
    assert again.block_ids == [new_block]


def test_duplicate_content_stays_plain():
    bm = BlockManager(8, BS)
    prompt = list(range(2 * BS + 1))
    a, b = seq("a", prompt), seq("b", prompt)
    assert admit(bm, a) and admit(bm, b)  # admitted before either is computed: no sharing
    compute_all(bm, a)
    compute_all(bm, b)
    assert set(a.block_ids).isdisjoint(b.block_ids)
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    assert bm.num_cached_free_blocks == 2 and bm.num_free_blocks == 8
    bm.check_invariants([])


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    prompt = list(range(3 * BS))
    a = seq("a", prompt)
    assert admit(bm, a)
    compute_all(bm, a)
    b = seq("b", prompt)
    assert admit(bm, b)
    assert b.num_cached_tokens == 0 and set(a.block_ids).isdisjoint(b.block_ids)
    bm.free(a)
    assert bm.num_cached_free_blocks == 0


def test_reserve_is_exclusive_and_refuses_when_short():
    bm = BlockManager(7, BS)
    prompt = list(range(2 * BS + 1))
    a = seq("a", prompt)
    assert admit(bm, a)
    compute_all(bm, a)
    r = seq("r", prompt)
    ids = bm.reserve(r, r.num_tokens)
    assert ids is not None and len(ids) == 3 and set(ids).isdisjoint(a.block_ids)
    assert r.num_computed_tokens == 0
    big = seq("big", list(range(10 * BS)))
    assert bm.reserve(big, big.num_tokens) is None and big.block_ids == []
    assert bm.num_free_blocks == 1
    bm.check_invariants([a, r])


def test_hashes_chain_on_the_parent():
    assert hash_block(0, [1, 2]) != hash_block(1, [1, 2])
    assert hash_block(0, [1, 2]) != hash_block(0, [2, 1])
    bm = BlockManager(16, BS)
    a = seq("a", [1] * BS + [2] * BS + [3])
    assert admit(bm, a)
    compute_all(bm, a)
    b = seq("b", [9] * BS + [2] * BS + [3])  # same 2nd block, different parent
    bm.allocate_prompt(b)
    assert b.num_cached_tokens == 0


def test_check_invariants_catches_corruption():
    bm = BlockManager(4, BS)
    a = seq("a", range(5))
    assert admit(bm, a)
    with pytest.raises(AssertionError, match="refcount"):
        bm.check_invariants([])  # a's blocks have no owner
    bm._ref[a.block_ids[0]] += 1
    with pytest.raises(AssertionError):
        bm.check_invariants([a])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_keeps_invariants_and_frees_everything(seed):
    rng = random.Random(seed)
    bm = BlockManager(24, BS)
    prefixes = [[rng.randrange(30) for _ in range(rng.randrange(1, 12))] for _ in range(4)]
    live: list[Sequence] = []
    hits = 0
    for step in range(600):
        op = rng.random()
        if op < 0.35:  # admit a prompt sharing a random prefix
            s = seq(f"s{step}", rng.choice(prefixes) + [rng.randrange(30) for _ in range(rng.randrange(0, 9))])
            if admit(bm, s):
                live.append(s)
                hits += s.num_cached_tokens > 0
                assert s.num_computed_tokens < s.num_tokens
        elif op < 0.75 and live:  # compute, then grow by one decoded token
            s = rng.choice(live)
            compute_all(bm, s)
            s.token_ids.append(rng.randrange(30))
            if not bm.ensure_slots(s, s.num_tokens):
                live.remove(s)
                bm.free(s)
        elif live:
            s = live.pop(rng.randrange(len(live)))
            bm.free(s)
        bm.check_invariants(live)
    assert hits > 0
    for s in live:
        bm.free(s)
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_total_blocks
