"""The fake workers' "model" (benchmarks/fake_workers.py): token i is followed by i + 1
(mod VOCAB), logprobs that say so, and a tokenizer of one character per id."""

from __future__ import annotations

from pdserve.proto import pdserve_pb2 as pb

VOCAB = 1000
EOS = 999


def fake_outputs(prompt: list[int], max_tokens: int, stop_ids=(), ignore_eos=False,
                 eos: int | None = EOS) -> tuple[list[int], str]:
    out, t = [], prompt[-1]
    while len(out) < max_tokens:
        t = (t + 1) % VOCAB
        out.append(t)
        if t in stop_ids or (t == eos and not ignore_eos):
            return out, "stop"
    return out, "length"


def fake_logprobs(token: int, k: int) -> pb.TokenLogprobs:
    """The fake model's logprobs: the sampled token is the most likely one (-0.1), then
    token + 1, token + 2, ... (-0.2, -0.3, ...)."""
    return pb.TokenLogprobs(logprob=-0.1, top_ids=[(token + j) % VOCAB for j in range(k)],
                            top_logprobs=[-0.1 * (j + 1) for j in range(k)])


class FakeTokenizer:
    """id i <-> character chr(32 + i % 90); text encodes char by char."""

    def encode(self, text: str) -> list[int]:
        return [(ord(c) - 32) % 90 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(32 + i % 90) for i in ids)
