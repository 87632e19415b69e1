"""The simulated workers' prefix caches (engine/block_manager.py), kept from one simulated
run to the next as a setup's workers keep theirs between the capstone's runs.

Why the planner needs them: runs recorded before the prompt salt (capstone_sweep.py) sent
the same prompts at every rate of a search (one seed: request i had the same token ids in
every run of a workload), so a worker that prefilled prompt i in an earlier run found its
blocks in its prefix cache and computed only the rest: on 2 x H200 a 1985-token prompt
took 51 ms cold and 17 ms the second time. A replay that ignores this overestimates the
prefill load of every run after the first. Runs with a salt share nothing with each other
(their keys differ), only within themselves (a shared prefix).

The engine's rule: full blocks of `block_size` tokens are hits, up to one token short of
the prompt's end (the step computes >= 1 token for the logits), as long as the blocks are
still cached; a worker's cache holds at most `capacity_tokens` (0: unbounded; `pdserve plan
--validate` bounds it by the KV pool the workers reported), the least recently freed prompt
evicted first. The lookup and the allocation happen when the scheduler admits the prompt
into a step (`admit`), not when it arrives: prompts queued behind a backlog find only what
the prompts admitted before them left in the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.config import CacheConfig

if TYPE_CHECKING:
    from pdserve.benchmarks.planner_batching import SimReq

BLOCK_SIZE = CacheConfig().block_size  # the engine's default


@dataclass(slots=True)
class PrefixCaches:
    """Per worker name ('prefill-0', 'decode-1', 'both-0'): the prompts (keys) it holds in
    its prefix cache, least recently used first, with their token counts."""

    capacity_tokens: int = 0  # per worker; 0: unbounded
    block_size: int = BLOCK_SIZE
    held: dict[str, OrderedDict[Hashable, int]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  # per worker: sum of held prompts

    def hit_tokens(self, worker: str, key: Hashable | None, prompt: int) -> int:
        """Prompt tokens the worker finds cached (0 when the key is None or not held); a
        hit refreshes the prompt's place in the LRU order."""
        mine = self.held.get(worker)
        if key is None or mine is None or key not in mine:
            return 0
        mine.move_to_end(key)
        return (prompt - 1) // self.block_size * self.block_size

    def add(self, worker: str, key: Hashable | None, prompt: int) -> None:
        """The worker computed this prompt's KV: it stays cached until evicted."""
        if key is None:
            return
        mine = self.held.setdefault(worker, OrderedDict())
        total = self.tokens.get(worker, 0) - mine.pop(key, 0) + prompt
        mine[key] = prompt
        while self.capacity_tokens and total > self.capacity_tokens and len(mine) > 1:
            total -= mine.popitem(last=False)[1]
        self.tokens[worker] = total

    def admit(self, worker: str) -> Callable[[SimReq], None]:
        """What the worker's scheduler does as it admits a prompt (engine/scheduler.py
        `_admit`): look its blocks up, then allocate the rest, evicting the least recently
        freed prompts (`add`; its completion frees them, `add` again). A callable for
        planner_batching.fill_budget's `on_take`."""
        def on_take(r: SimReq) -> None:
            r.computed = self.hit_tokens(worker, r.key, r.prompt)
            self.add(worker, r.key, r.prompt)
        return on_take

    def copy(self) -> PrefixCaches:
        return PrefixCaches(self.capacity_tokens, self.block_size,
                            {w: OrderedDict(d) for w, d in self.held.items()}, dict(self.tokens))
