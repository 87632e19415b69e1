"""Paged KV block allocator with reference counts and prefix caching. Pure Python, O(1).

Every block is in exactly one of three states:
- used: refcount > 0, listed in the block table of `refcount` sequences, or *fenced*: a
  reference kept by a finished sequence under its id, for a block something outside the
  engine may still write (a decode worker's block that a hung peer copy may still land
  in); out of the pool until `unfence` drops it;
- free, plain: refcount 0, no hash; kept in a stack, handed out first;
- free, cached: refcount 0, holds the hash of its (computed) tokens; kept in an
  OrderedDict in LRU order. A prefix hit revives it in O(1); allocation evicts the
  least recently freed one only when no plain block is left.

Only FULL blocks whose K/V are computed are hashed. The hash chains the parent block's
hash: h_i = xxh64(h_{i-1}, tokens of block i), so equal hashes mean equal prefixes (up
to 64-bit collisions). Blocks shared by prefix hits are never written again: a sequence
only writes at positions >= num_computed_tokens, past its hit blocks.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Collection, Iterable

import xxhash

from pdserve.engine.sequence import Sequence


def hash_block(parent_hash: int, token_ids: list[int]) -> int:
    """Chained 64-bit hash of one full block; parent_hash is 0 for the first block."""
    h = xxhash.xxh64(parent_hash.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.intdigest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0 first
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._fenced: dict[str, set[int]] = {}  # owner id -> its fenced blocks (one ref each)
        self.num_fenced_blocks = 0
        self.num_hit_tokens = 0  # stats: prefix-cache hits, in tokens
        self.num_queried_tokens = 0

    # ---- counts -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now (plain + evictable cached)."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_total_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._free_cached)

    def refcount(self, block_id: int) -> int:
        return self._ref[block_id]

    def can_allocate(self, n_blocks: int) -> bool:
        return n_blocks <= self.num_free_blocks

    def num_blocks_needed(self, seq: Sequence, num_tokens_total: int) -> int:
        return max(0, cdiv(num_tokens_total, self.block_size) - len(seq.block_ids))

    # ---- allocation ---------------------------------------------------------------------
    def _take_free(self) -> int:
        if self._free_plain:
            b = self._free_plain.pop()
        else:  # evict the least recently freed cached block
            b, _ = self._free_cached.popitem(last=False)
            del self._hash_to_block[self._hash_of[b]]
            self._hash_of[b] = None
        self._ref[b] = 1
        return b

    def _seq_hash(self, seq: Sequence, i: int) -> int:
        """Hash of full block i of seq.token_ids (computes and caches hashes 0..i)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) <= i:
            j = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else 0, seq.token_ids[j * bs:(j + 1) * bs]))
        return hashes[i]

    def allocate_prompt(self, seq: Sequence) -> None:
        """Start a block table for a sequence without blocks, reusing cached prefix blocks.

        Sets num_cached_tokens = num_computed_tokens = hit length. The hit stops one token
        short of the end at least (a block holding the last token is never a hit), so the
        step still computes >= 1 token and yields logits. Takes no new blocks: call
        ensure_slots next (on failure, free(seq) gives the hits back to the cache).
        """
        assert not seq.block_ids, f"{seq.seq_id}: allocate_prompt on a sequence holding blocks"
        hits: list[int] = []
        if self.enable_prefix_caching:
            for i in range((seq.num_tokens - 1) // self.block_size):
                b = self._hash_to_block.get(self._seq_hash(seq, i))
                if b is None:
                    break
                hits.append(b)
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += len(hits) * self.block_size
        for b in hits:
            if self._ref[b] == 0:
                del self._free_cached[b]
            self._ref[b] += 1
        seq.set_block_table(hits)
        seq.num_committed_blocks = len(hits)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size

    def ensure_slots(self, seq: Sequence, num_tokens_total: int) -> bool:
        """Grow seq.block_ids to hold num_tokens_total tokens; all or nothing."""
        need = self.num_blocks_needed(seq, num_tokens_total)
        if need > self.num_free_blocks:
            return False
        seq.block_ids.extend(self._take_free() for _ in range(need))
        return True

    def reserve(self, seq: Sequence, num_tokens: int) -> list[int] | None:
        """Exclusive blocks for num_tokens tokens whose K/V will be written from outside
        (decode side of a transfer). No prefix reuse. None when the pool is short."""
        assert not seq.block_ids, f"{seq.seq_id}: reserve on a sequence holding blocks"
        if not self.ensure_slots(seq, num_tokens):
            return None
        seq.num_committed_blocks = 0
        return list(seq.block_ids)

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Offer blocks that are full of computed tokens to the prefix cache."""
        n_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        if not self.enable_prefix_caching:
            seq.num_committed_blocks = n_full
            return
        for i in range(seq.num_committed_blocks, n_full):
            h, b = self._seq_hash(seq, i), seq.block_ids[i]
            if self._hash_of[b] is None and h not in self._hash_to_block:
                self._hash_of[b] = h  # a duplicate of a cached block stays plain
                self._hash_to_block[h] = b
        seq.num_committed_blocks = max(seq.num_committed_blocks, n_full)

    def free(self, seq: Sequence, fence: Collection[int] = ()) -> None:
        """Drop seq's references, tail first: its tail blocks become the LRU-oldest. Its
        blocks in `fence` keep their reference, fenced under seq.seq_id: out of the pool
        (not free, never handed out) until unfence(seq.seq_id, ...)."""
        fence = set(fence) if fence else ()
        kept = [b for b in seq.block_ids if b in fence]
        if kept:
            self._fenced.setdefault(seq.seq_id, set()).update(kept)
            self.num_fenced_blocks += len(kept)
        for b in reversed(seq.block_ids):
            if b not in fence:
                self._drop_ref(b)
        seq.set_block_table([])
        seq.num_committed_blocks = 0

    def unfence(self, owner: str, block_ids: Iterable[int]) -> int:
        """Free those of block_ids that are fenced under `owner` (others are ignored: a
        late or repeated release frees nothing twice); returns how many were freed."""
        fenced = self._fenced.get(owner)
        n = 0
        for b in block_ids if fenced else ():
            if b in fenced:
                fenced.discard(b)
                self._drop_ref(b)
                n += 1
        if fenced is not None and not fenced:
            del self._fenced[owner]
        self.num_fenced_blocks -= n
        return n

    def fenced(self) -> dict[str, list[int]]:
        """Fenced blocks by owner id (a copy)."""
        return {k: sorted(v) for k, v in self._fenced.items()}

    def _drop_ref(self, b: int) -> None:
        self._ref[b] -= 1
        assert self._ref[b] >= 0, f"block {b} freed more often than referenced"
        if self._ref[b] == 0:
            if self._hash_of[b] is None:
                self._free_plain.append(b)
            else:
                self._free_cached[b] = None

    # ---- checking -----------------------------------------------------------------------
    def check_invariants(self, owners: Iterable[Sequence] | None = None) -> None:
        """Raise AssertionError if the pool is inconsistent. With `owners` (every sequence
        holding blocks), refcounts must equal the number of block tables listing a block
        plus its fences."""
        n = self._num_blocks
        plain, cached = set(self._free_plain), set(self._free_cached)
        assert len(plain) == len(self._free_plain), "duplicate block in the plain free list"
        assert not plain & cached, f"blocks both plain and cached free: {sorted(plain & cached)[:8]}"
        used = [b for b in range(n) if self._ref[b] > 0]
        assert all(self._ref[b] >= 0 for b in range(n)), "negative refcount"
        for b in plain | cached:
            assert 0 <= b < n, f"free block id {b} out of range"
            assert self._ref[b] == 0, f"block {b} is free but has refcount {self._ref[b]}"
        assert len(plain) + len(cached) + len(used) == n, (
            f"free ({len(plain)} plain + {len(cached)} cached) + used ({len(used)}) != total ({n})")
        for b in plain:
            assert self._hash_of[b] is None, f"plain free block {b} holds a hash"
        for b in cached:
            assert self._hash_of[b] is not None, f"cached free block {b} holds no hash"
        for h, b in self._hash_to_block.items():
            assert self._hash_of[b] == h, f"hash map points to block {b}, which holds another hash"
        n_hashed = sum(h is not None for h in self._hash_of)
        assert n_hashed == len(self._hash_to_block), (
            f"{n_hashed} blocks hold a hash but the hash map has {len(self._hash_to_block)}")
        fenced = [b for bs in self._fenced.values() for b in bs]
        assert len(fenced) == self.num_fenced_blocks, (
            f"{len(fenced)} fenced blocks but num_fenced_blocks is {self.num_fenced_blocks}")
        assert all(bs for bs in self._fenced.values()), "an empty fence entry"
        for b in fenced:
            assert 0 <= b < n and self._ref[b] > 0, f"fenced block {b} is free or out of range"
        if owners is not None:
            count = [0] * n
            for b in fenced:
                count[b] += 1
            for seq in owners:
                assert len(set(seq.block_ids)) == len(seq.block_ids), f"{seq.seq_id} lists a block twice"
                for b in seq.block_ids:
                    count[b] += 1
            for b in range(n):
                assert count[b] == self._ref[b], (
                    f"block {b}: refcount {self._ref[b]} but {count[b]} owners")
