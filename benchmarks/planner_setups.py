"""A P/D or colocated setup by name ('1P3D', '4both', '1P1D-cond512'), for the planner
and the capstone."""

from __future__ import annotations

from dataclasses import dataclass


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
