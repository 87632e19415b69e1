"""A P/D or colocated setup by name ('1P3D', '4both', '1P1D-cond512'), for the planner
and the capstone; how its workers push KV (`KVPush`) and in which order its decode workers
admit landed requests (`landed_fifo`), as a run records them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LAYERWISE_MIN_TOKENS = 1024  # kvtransfer's TransferConfig.layerwise_min_tokens (default)
LANDED_ORDER = "fifo"  # the installed engine/scheduler.py admit_remote (since branch fifo)


@dataclass(frozen=True, slots=True)
class Setup:
    """xPyD (disaggregated), Nboth (colocated), or xPyD-condT: conditional disaggregation,
    xPyD where the coordinator (--pd-threshold-tokens T) has prompts under T tokens
    prefilled on their decode worker."""

    prefill: int
    decode: int
    both: int
    cond_tokens: int = 0

    @property
    def name(self) -> str:
        if self.cond_tokens:
            return f"{self.prefill}P{self.decode}D-cond{self.cond_tokens}"
        return setup_name(self.prefill, self.decode, self.both)

    @property
    def kind(self) -> str:
        return "conditional" if self.cond_tokens else "colocated" if self.both else "P/D"

    @property
    def gpus(self) -> int:
        return self.prefill + self.decode + self.both


def parse_setup(name: str) -> Setup:
    """'1P3D' -> Setup(1, 3, 0); '4both' -> Setup(0, 0, 4); '1P1D-cond512' ->
    Setup(1, 1, 0, 512)."""
    import re

    s = name.strip()
    m = re.fullmatch(r"(\d+)P(\d+)D(?:-cond(\d+))?", s, re.IGNORECASE)
    if m:
        p, d, t = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        if p < 1 or d < 1 or (m.group(3) is not None and t < 1):
            raise ValueError(f"setup {name!r}: xPyD needs x, y >= 1 (and -condT T >= 1)")
        return Setup(p, d, 0, t)
    m = re.fullmatch(r"(\d+)both", s, re.IGNORECASE)
    if m and int(m.group(1)) >= 1:
        return Setup(0, 0, int(m.group(1)))
    raise ValueError(f"setup {name!r}: expected xPyD (1P3D), Nboth (2both) or xPyD-condT "
                     "(1P1D-cond512: prompts under T tokens prefilled on the decode worker)")


def setup_name(prefill: int, decode: int, both: int) -> str:
    return f"{both}both" if both else f"{prefill}P{decode}D"


def landed_fifo(meta: Mapping[str, str]) -> bool:
    """Whether a run's decode workers admitted requests whose KV landed while the batch was
    full in landing order (FIFO), as its meta's "landed_order" records it (the capstone
    records it since branch fifo); a run without it (every run before) admitted them
    newest first (admit_remote put each at the front of the waiting queue)."""
    return str(meta.get("landed_order", "newest-first")) == "fifo"


@dataclass(frozen=True, slots=True)
class KVPush:
    """When a prefill step's KV push starts, as the workers' TransferConfig decides it
    (prefill/role.py, kvtransfer/sender_direct.py `_pump_direct`): a step of at least
    `layerwise_min_tokens` tokens (0: never, --no-layerwise) pushes layer by layer while
    the model computes, unless the workers share a host and copy into the decode worker's
    pool (`peer_copy`) without `during_forward` (TransferConfig.peer_copy_during_forward):
    then, as every shorter step, it pushes once after the forward. The defaults are what
    the workers did before 9df90d7 (every committed capstone run: one host, copies during
    the forward); `current()` is what the installed engine does by default.

    `counts_generate` and `counts_release` are the coordinator's, not the push's, recorded
    and replayed with it: whether a Generate (a colocated request, or a local prefill)
    counts its prompt's blocks against its worker until the next heartbeat, as a Reserve
    does (coordinator/registry.py `count_generate`, since session 12; before, every request
    between two heartbeats went to the worker that looked freest at the last one), and
    whether a request that ended gives its blocks back to its worker's count until then
    (`release`, since session 13; before, the routing depended on the heartbeats' phases)."""

    layerwise_min_tokens: int = LAYERWISE_MIN_TOKENS
    peer_copy: bool = True
    during_forward: bool = True
    counts_generate: bool = False
    counts_release: bool = False

    def layerwise(self, tokens: int) -> bool:
        """Whether a step of `tokens` prompt tokens starts its push with the forward."""
        return 0 < self.layerwise_min_tokens <= tokens and \
            (self.during_forward or not self.peer_copy)

    def describe(self) -> str:
        if not self.layerwise(1 << 62):
            how = "peer copy" if self.peer_copy else "staged"
            return f"after the forward ({how}, every step)"
        where = "one host, peer copy" if self.peer_copy else "staged"
        return (f"{where}, layer by layer during the forward for steps of >= "
                f"{self.layerwise_min_tokens} tokens, else after it")

    def meta(self) -> dict[str, str]:
        """A run's record (results.json "meta", calibration.json "meta")."""
        return {"layerwise_min_tokens": str(self.layerwise_min_tokens),
                "peer_copy": str(int(self.peer_copy)),
                "peer_copy_during_forward": str(int(self.during_forward)),
                "counts_generate": str(int(self.counts_generate)),
                "counts_release": str(int(self.counts_release))}

    @classmethod
    def from_meta(cls, meta: Mapping[str, str]) -> KVPush:
        """What a run recorded; a field it lacks (every run before branch plan6, or before
        session 12 for counts_generate, 13 for counts_release) is the old behaviour: one
        host, peer copies during the forward, Generates and ends not counted."""
        old = cls()
        return cls(int(meta.get("layerwise_min_tokens", old.layerwise_min_tokens)),
                   str(meta.get("peer_copy", "1")) == "1",
                   str(meta.get("peer_copy_during_forward", "1")) == "1",
                   str(meta.get("counts_generate", "0")) == "1",
                   str(meta.get("counts_release", "0")) == "1")

    @classmethod
    def current(cls, worker_args: Sequence[str] = (), one_host: bool = True) -> KVPush:
        """The push of workers started with `worker_args` (pdserve/worker_cli.py flags; the
        rest ignored) on one host (`one_host`, as LocalCluster starts them) or not, under
        the installed engine's TransferConfig defaults."""
        import argparse

        from pdserve.kvtransfer.common import TransferConfig

        d = TransferConfig()
        p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        p.add_argument("--layerwise-min-tokens", type=int, default=d.layerwise_min_tokens)
        for flag in ("--no-layerwise", "--no-peer-copy", "--peer-copy-during-forward"):
            p.add_argument(flag, action="store_true")
        a, _ = p.parse_known_args(list(worker_args))
        layerwise = d.layerwise and not a.no_layerwise
        return cls(a.layerwise_min_tokens if layerwise else 0,
                   one_host and d.peer_copy and not a.no_peer_copy,
                   d.peer_copy_during_forward or a.peer_copy_during_forward, True, True)
