"""Workloads of `pdserve bench capstone` and `pdserve plan`: request length distributions,
arrival processes, and the requests they make. Pure Python (no I/O except reading a
ShareGPT file), deterministic for a seed.

A workload is named by a spec string, `KIND[:key=value,...]`:

    fixed:in=128,out=128           every request the same lengths
    uniform:in=64-256,out=32-128   uniform, inclusive
    sharegpt-synth                 lognormal lengths shaped like ShareGPT (see SHAREGPT_*)
    shared-prefix:prefix=512,suffix=64,out=64
                                   a common system prompt + a unique suffix per request
    prefill-heavy / decode-heavy   long prompts and short outputs / the opposite
    sharegpt:PATH                  a ShareGPT JSON file (`--dataset sharegpt PATH`)

Arrivals: gamma-distributed gaps with shape = burstiness and scale = 1/(rate * burstiness)
(vLLM's `--burstiness`): burstiness 1 is a Poisson process, < 1 burstier, > 1 smoother.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Lognormal shape of ShareGPT lengths. The means are the ShareGPT figures of the vLLM paper
# (Kwon et al., SOSP 2023, Fig. 11: mean input 161 and mean output 338 tokens, as recalled
# here -- check against your own tokenizer with `--dataset sharegpt PATH`, whose fitted
# parameters the report prints). The sigmas are our assumption (a long right tail), not a
# fit. Lengths are clipped as vLLM's ShareGPT sampler filters: input 4..1024, total <= 2048.
SHAREGPT_MEAN_IN, SHAREGPT_SIGMA_IN = 161.0, 1.0
SHAREGPT_MEAN_OUT, SHAREGPT_SIGMA_OUT = 338.0, 0.9
SHAREGPT_MAX_IN, SHAREGPT_MAX_TOTAL, SHAREGPT_MIN = 1024, 2048, 4

LengthPair = tuple[int, int]  # (prompt tokens, output tokens)


@dataclass(frozen=True, slots=True)
class Request:
    at_s: float  # arrival offset from the start of the run (0 in fixed-concurrency mode)
    prompt: list[int]  # token ids
    output_len: int


@dataclass(frozen=True, slots=True)
class Workload:
    """A named length distribution. `sample(rng)` draws one (input, output) pair;
    `prefix_len` > 0 makes every prompt start with the same `prefix_len` tokens."""

    name: str
    describe: str
    sample: Callable[[random.Random], LengthPair]
    prefix_len: int = 0
    params: dict = field(default_factory=dict)


def lognormal_mu(mean: float, sigma: float) -> float:
    """mu of a lognormal with this mean: mean = exp(mu + sigma^2 / 2)."""
    return math.log(mean) - sigma * sigma / 2


def fit_lognormal(values: Sequence[float]) -> tuple[float, float]:
    """Maximum-likelihood (mu, sigma) of positive values: mean and std of their logs."""
    logs = [math.log(v) for v in values if v > 0]
    if len(logs) < 2:
        raise ValueError("need at least 2 positive values to fit a lognormal")
    mu = sum(logs) / len(logs)
    return mu, math.sqrt(sum((x - mu) ** 2 for x in logs) / len(logs))


def _span(value: str) -> tuple[int, int]:
    parts = [int(x) for x in value.replace(":", "-").split("-")]
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    if len(parts) > 2 or lo < 1 or hi < lo:
        raise ValueError(f"expected N or LO-HI with 1 <= LO <= HI, got {value!r}")
    return lo, hi


def _uniform(name: str, inp: tuple[int, int], out: tuple[int, int], describe: str = "",
             prefix_len: int = 0) -> Workload:
    desc = describe or f"input uniform {inp[0]}..{inp[1]}, output uniform {out[0]}..{out[1]}"
    return Workload(name, desc, lambda r: (r.randint(*inp), r.randint(*out)), prefix_len,
                    {"in": list(inp), "out": list(out)})


def sharegpt_synth(mean_in: float = SHAREGPT_MEAN_IN, sigma_in: float = SHAREGPT_SIGMA_IN,
                   mean_out: float = SHAREGPT_MEAN_OUT, sigma_out: float = SHAREGPT_SIGMA_OUT,
                   max_in: int = SHAREGPT_MAX_IN, max_total: int = SHAREGPT_MAX_TOTAL,
                   name: str = "sharegpt-synth") -> Workload:
    mu_in, mu_out = lognormal_mu(mean_in, sigma_in), lognormal_mu(mean_out, sigma_out)

    def sample(r: random.Random) -> LengthPair:
        i = min(max_in, max(SHAREGPT_MIN, round(r.lognormvariate(mu_in, sigma_in))))
        o = max(SHAREGPT_MIN, round(r.lognormvariate(mu_out, sigma_out)))
        return i, min(o, max(1, max_total - i))

    desc = (f"lognormal input (mean {mean_in:g}, sigma {sigma_in:g}) and output (mean "
            f"{mean_out:g}, sigma {sigma_out:g}), input clipped to {SHAREGPT_MIN}..{max_in}, "
            f"total <= {max_total}")
    return Workload(name, desc, sample, 0, {"mean_in": mean_in, "sigma_in": sigma_in,
                                            "mean_out": mean_out, "sigma_out": sigma_out,
                                            "max_in": max_in, "max_total": max_total})


def parse_workload(spec: str) -> Workload:
    """A workload from its spec string (see the module docstring). `sharegpt:PATH` is
    handled by `load_sharegpt` (it needs the tokenizer), not here."""
    kind, _, rest = spec.partition(":")
    kv: dict[str, str] = {}
    for item in (s for s in rest.split(",") if s):
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"workload {spec!r}: expected key=value, got {item!r}")
        kv[k.strip()] = v.strip()
    get = lambda k, d: _span(kv.pop(k, d))  # noqa: E731
    if kind == "fixed":
        i, o = get("in", "128"), get("out", "128")
        w = _uniform(spec, (i[0], i[0]), (o[0], o[0]), f"input {i[0]}, output {o[0]} tokens")
    elif kind == "uniform":
        w = _uniform(spec, get("in", "64-256"), get("out", "32-128"))
    elif kind == "sharegpt-synth":
        w = sharegpt_synth(**{k: float(kv.pop(k)) for k in list(kv)
                              if k in ("mean_in", "sigma_in", "mean_out", "sigma_out")},
                           name=spec)
    elif kind == "shared-prefix":
        prefix, suffix, out = get("prefix", "512")[0], get("suffix", "32-96"), get("out", "64")
        w = _uniform(spec, (prefix + suffix[0], prefix + suffix[1]), out,
                     f"shared system prompt of {prefix} tokens + unique suffix "
                     f"{suffix[0]}..{suffix[1]}, output {out[0]}..{out[1]}", prefix_len=prefix)
    elif kind == "prefill-heavy":
        w = _uniform(spec, get("in", "768-1536"), get("out", "8-32"),
                     "prefill-heavy: long prompts, short outputs")
    elif kind == "decode-heavy":
        w = _uniform(spec, get("in", "16-64"), get("out", "256-512"),
                     "decode-heavy: short prompts, long outputs")
    elif kind == "sharegpt":
        raise ValueError("sharegpt:PATH needs the tokenizer: use load_sharegpt")
    else:
        raise ValueError(f"unknown workload {kind!r}; choose from fixed, uniform, "
                         "sharegpt-synth, shared-prefix, prefill-heavy, decode-heavy, sharegpt")
    if kv:
        raise ValueError(f"workload {spec!r}: unknown keys {sorted(kv)}")
    return w


def read_sharegpt(path: str) -> list[tuple[str, str]]:
    """(first human turn, first gpt turn after it) of each conversation that has both."""
    with open(path) as f:
        data = json.load(f)
    out = []
    for item in data:
        turns = item.get("conversations") or []
        human = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
        if human is None:
            continue
        gpt = next((t for t in turns[human + 1:] if t.get("from") == "gpt"), None)
        if gpt is not None:
            out.append((turns[human].get("value", ""), gpt.get("value", "")))
    return out


def load_sharegpt(path: str, encode: Callable[[str], list[int]],
                  max_in: int = SHAREGPT_MAX_IN, max_total: int = SHAREGPT_MAX_TOTAL
                  ) -> tuple[Workload, list[tuple[list[int], int]]]:
    """The dataset as a workload: prompts tokenized with `encode`, output length = token
    count of the first gpt turn; pairs filtered as vLLM's sampler does (both >= 4 tokens,
    input <= max_in, total <= max_total). Returns the workload (its sampler draws pairs
    with replacement) and the (prompt ids, output length) pool."""
    pool = []
    for prompt, answer in read_sharegpt(path):
        ids, out_len = encode(prompt), len(encode(answer))
        if len(ids) < SHAREGPT_MIN or out_len < SHAREGPT_MIN:
            continue
        if len(ids) > max_in or len(ids) + out_len > max_total:
            continue
        pool.append((ids, out_len))
    if not pool:
        raise ValueError(f"{path}: no usable conversation (first human + gpt turn, 4..{max_in} "
                         f"prompt tokens, <= {max_total} total)")
    mu_i, s_i = fit_lognormal([len(p) for p, _ in pool])
    mu_o, s_o = fit_lognormal([o for _, o in pool])
    desc = (f"ShareGPT {path}: {len(pool)} conversations; lognormal fit input mu {mu_i:.2f} "
            f"sigma {s_i:.2f}, output mu {mu_o:.2f} sigma {s_o:.2f}")
    w = Workload("sharegpt", desc, lambda r: (0, 0), 0,
                 {"path": path, "conversations": len(pool), "fit_in": [mu_i, s_i],
                  "fit_out": [mu_o, s_o]})
    return w, pool


def arrival_times(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """n send offsets, the first at 0, gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness))
    (mean 1/rate; burstiness 1 = exponential = Poisson). rate inf: all at 0."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def clip_lengths(pair: LengthPair, max_model_len: int) -> LengthPair:
    """Shrink (input, output) so input + output <= max_model_len (0: no limit)."""
    i, o = pair
    if max_model_len and i + o > max_model_len:
        i = max(1, min(i, max_model_len // 2))
        o = max(1, max_model_len - i)
    return i, o


def salt_token(seed: int, salt: int, vocab: int) -> int:
    """The first token of every prompt of a run with this salt: distinct salts (less than
    vocab - 1 apart) give distinct tokens, in [1, vocab)."""
    hi = max(2, vocab)
    return 1 + (seed * 7919 + salt) % (hi - 1)


def make_requests(workload: Workload, n: int, rate: float, seed: int, vocab: int,
                  burstiness: float = 1.0, max_model_len: int = 0,
                  pool: Sequence[tuple[list[int], int]] | None = None,
                  salt: int = 0) -> list[Request]:
    """n requests; the same arguments always give the same requests (lengths, token ids,
    arrival times), whatever the setup they are sent to. Token ids are random in [1, vocab)
    (no accidental prefix-cache hits) apart from a shared prefix; `pool` (a tokenized
    dataset) replaces the sampler.

    `salt` (non-zero): every prompt's first token is `salt_token(seed, salt, vocab)`, the
    rest unchanged. The prefix cache hashes blocks in a chain from the first token, so a
    run with its own salt finds nothing an earlier run left in a worker's cache (which
    holds request i's prompt when that run sent the same seed), while its own prompts
    share what they share (the shared prefix, a dataset prompt drawn twice)."""
    rng = random.Random(seed)
    times = arrival_times(n, rate, burstiness, random.Random(seed + 7919))
    hi = max(2, vocab)
    prefix = [rng.randrange(1, hi) for _ in range(workload.prefix_len)]
    first = salt_token(seed, salt, vocab) if salt else 0
    out = []
    for t in times:
        if pool:
            ids, o = pool[rng.randrange(len(pool))]
            i, o = clip_lengths((len(ids), o), max_model_len)
            prompt = [x % hi for x in ids[:i]]
        else:
            i, o = clip_lengths(workload.sample(rng), max_model_len)
            p = min(len(prefix), i)
            prompt = prefix[:p] + [rng.randrange(1, hi) for _ in range(i - p)]
        if first and prompt:
            prompt[0] = first
        out.append(Request(t, prompt, o))
    return out


def length_pairs(workload: Workload, n: int, seed: int) -> list[LengthPair]:
    """Only the lengths (what the planner's simulator needs)."""
    rng = random.Random(seed)
    return [workload.sample(rng) for _ in range(n)]
