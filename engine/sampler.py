"""Token sampling: greedy, temperature, top-k, top-p; seeded rows independent of the batch.

Random rows use the exponential race: token = argmax(p / E) with E ~ Exp(1) i.i.d. per
vocab entry, which draws exactly from p. A seeded row draws E on the CPU from a generator
seeded by (seed, output_index), in vocab order, so its token depends only on its own
probabilities, never on the other rows, their order, or the device (up to float rounding
of the probabilities themselves). Unseeded rows draw E on the logits' device from one
sampler-level generator.

Logprobs (`SamplingParams.logprobs = k`) are those of the raw model distribution:
log_softmax of the logits before temperature, top-k and top-p (vLLM's default meaning), for
the sampled token and the k most likely ones. They are computed after sampling, from the same
logits, so asking for them never changes a token; a batch where no row asks pays nothing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch
import xxhash

from pdserve.engine.sampling_params import SamplingParams


def row_seed(seed: int, output_index: int) -> int:
    """Stable 63-bit seed for token `output_index` of a request seeded with `seed`."""
    return xxhash.xxh64_intdigest(struct.pack("<QQ", seed & (2**64 - 1), output_index)) >> 1


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probabilities around one sampled token (natural log, raw model distribution)."""

    logprob: float  # of the sampled token
    top_ids: list[int] = field(default_factory=list)  # the k most likely tokens, best first
    top_logprobs: list[float] = field(default_factory=list)  # their logprobs


@dataclass(slots=True)
class SamplerOutput:
    """One step's samples, by sequence id: what the model runner hands the engine."""

    tokens: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # only those that asked

    @classmethod
    def of(cls, seq_ids: list[str], tokens: list[int],
           logprobs: list[TokenLogprobs | None] | None) -> SamplerOutput:
        out = cls(dict(zip(seq_ids, tokens, strict=True)))
        if logprobs is not None:
            out.logprobs = {s: lp for s, lp in zip(seq_ids, logprobs, strict=True) if lp is not None}
        return out


def wants_logprobs(params: list[SamplingParams]) -> bool:
    return any(p.logprobs is not None for p in params)


def compute_logprobs(logits: torch.Tensor, params: list[SamplingParams],
                     tokens: list[int]) -> list[TokenLogprobs | None]:
    """Per row: None, or the sampled token's logprob and the top-k of log_softmax(logits).
    Only the rows that ask are computed; their results come back in one copy per tensor."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(params)
    if not rows:
        return out
    dev = logits.device
    r = torch.tensor(rows, device=dev)
    lp = logits.index_select(0, r).float().log_softmax(dim=-1)  # (R, V)
    picked = torch.tensor([tokens[i] for i in rows], device=dev)
    sampled = lp.gather(1, picked[:, None])[:, 0].tolist()
    k_max = min(max(params[i].logprobs for i in rows), lp.shape[1])
    top_v: list[list[float]] = [[] for _ in rows]
    top_i: list[list[int]] = [[] for _ in rows]
    if k_max > 0:
        v, ids = lp.topk(k_max, dim=-1)  # (R, k_max), best first
        top_v, top_i = v.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        k = params[i].logprobs
        out[i] = TokenLogprobs(sampled[j], top_i[j][:k], top_v[j][:k])
    return out


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}  # unseeded rows, per device

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               output_indices: list[int]) -> list[int]:
        """logits: [N, V] float32; returns N token ids (Python ints)."""
        n, vocab = logits.shape
        assert len(params) == n == len(output_indices), "one SamplingParams and index per row"
        logits = logits.float()
        if all(p.greedy for p in params):  # the common decode case: one kernel, one sync
            return logits.argmax(dim=-1).tolist()
        out = torch.empty(n, dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if greedy:
            g = torch.tensor(greedy, device=logits.device)
            out[g] = logits.index_select(0, g).argmax(dim=-1)
        if rand:
            r = torch.tensor(rand, device=logits.device)
            probs = self._probs(logits.index_select(0, r), [params[i] for i in rand])  # (R, V)
            noise = torch.empty_like(probs)  # (R, V) Exp(1)
            unseeded = [j for j, i in enumerate(rand) if params[i].seed is None]
            if unseeded:
                u = torch.tensor(unseeded, device=logits.device)
                noise[u] = torch.empty(len(unseeded), vocab, device=logits.device).exponential_(
                    generator=self._generator(logits.device))
            seeded = [j for j, i in enumerate(rand) if params[i].seed is not None]
            if seeded:  # one CPU generator per row, then one copy to the device
                rows = []
                for j in seeded:
                    i = rand[j]
                    gen = torch.Generator().manual_seed(row_seed(params[i].seed, output_indices[i]))
                    rows.append(torch.empty(vocab).exponential_(generator=gen))
                s = torch.tensor(seeded, device=logits.device)
                noise[s] = torch.stack(rows).to(logits.device)
            noise.clamp_(min=torch.finfo(torch.float32).tiny)  # p / 0 would win
            out[r] = (probs / noise).argmax(dim=-1)
        return out.tolist()

    def sample_output(self, logits: torch.Tensor, params: list[SamplingParams],
                      output_indices: list[int], seq_ids: list[str]) -> SamplerOutput:
        """sample(), plus the logprobs of the rows that ask for them, keyed by seq id."""
        tokens = self.sample(logits, params, output_indices)
        lps = compute_logprobs(logits, params, tokens) if wants_logprobs(params) else None
        return SamplerOutput.of(seq_ids, tokens, lps)

    @staticmethod
    def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, then top-k, then top-p; returns renormalised probs (R, V). Each row
        takes the same path whatever the other rows are (batch-independent rounding)."""
        dev = logits.device
        temps = torch.tensor([p.temperature for p in params], device=dev)
        probs = logits / temps[:, None]
        trunc = [j for j, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
        plain = [j for j, p in enumerate(params) if not (p.top_k > 0 or p.top_p < 1.0)]
        if plain:
            rows = torch.tensor(plain, device=dev)
            probs[rows] = probs.index_select(0, rows).softmax(dim=-1)
        if trunc:
            rows = torch.tensor(trunc, device=dev)
            probs[rows] = _truncated_probs(probs.index_select(0, rows), [params[j] for j in trunc])
        return probs


def _truncated_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-k then top-p (smallest prefix whose mass reaches top_p; the best token always
    stays) over temperature-scaled logits (R, V); returns renormalised probs (R, V)."""
    vocab, dev = logits.shape[1], logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (R, V)
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    sorted_logits.masked_fill_(torch.arange(vocab, device=dev)[None, :] >= ks[:, None], float("-inf"))
    top_ps = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], device=dev)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the better tokens
    sorted_logits.masked_fill_(mass_before >= top_ps[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits.softmax(dim=-1))
