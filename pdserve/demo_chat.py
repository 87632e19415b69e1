"""The chat part of `pdserve demo`: a few questions sent as chat messages through the
coordinator (which renders them with the model's chat template), the answers shown, each
checked against the colocated answer of `pdserve.LLM.chat` and, where the question has
one, against a known word ("Paris")."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

CHAT_MAX_TOKENS = 48

# (question, a word the answer must contain, or None)
QUESTIONS: tuple[tuple[str, str | None], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is 2 + 2?", None),
    ("Give me a short tip for staying focused.", None),
)


@dataclass(slots=True)
class ChatCase:
    question: str
    expect: str | None = None
    expected: list[int] = field(default_factory=list)  # colocated token ids
    got: list[int] = field(default_factory=list)
    text: str = ""
    error: str = ""

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]

    @property
    def knows(self) -> bool:
        return self.expect is None or self.expect.lower() in self.text.lower()

    @property
    def ok(self) -> bool:
        return not self.error and self.got == self.expected and self.knows


def make_chat_cases() -> list[ChatCase]:
    return [ChatCase(q, expect) for q, expect in QUESTIONS]


def has_chat_template(tokenizer) -> bool:
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
    except ValueError:
        return False
    return True


def chat_reference(llm, cases: list[ChatCase]) -> None:
    """Fill `expected` with the colocated greedy answers of `llm` (a pdserve.LLM)."""
    from pdserve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=CHAT_MAX_TOKENS, temperature=0.0)
    outs = llm.chat([c.messages for c in cases], params)
    for c, out in zip(cases, outs, strict=True):
        c.expected = list(out.token_ids)


async def send_chat(client, cases: list[ChatCase]) -> None:
    """Send every question at once through `client` (a coordinator AsyncClient)."""
    async def one(c: ChatCase) -> None:
        try:
            r = await client.chat(c.messages, max_tokens=CHAT_MAX_TOKENS, temperature=0.0)
            c.got, c.text = list(r.token_ids), r.text
        except Exception as e:  # noqa: BLE001 - reported per question
            c.error = f"{type(e).__name__}: {e}"

    await asyncio.gather(*(one(c) for c in cases))


def report_chat(console: Console, cases: list[ChatCase]) -> bool:
    table = Table(title="pdserve demo: chat (greedy, through the coordinator)",
                  title_justify="left", show_lines=True)
    table.add_column("question")
    table.add_column("answer")
    table.add_column("check", justify="right")
    for c in cases:
        if c.error:
            verdict = f"[red]error: {c.error}[/]"
        elif c.got != c.expected:
            verdict = "[red]differs from colocated[/]"
        elif not c.knows:
            verdict = f"[red]no {c.expect!r}[/]"
        else:
            verdict = "[green]ok[/]" + (f" ({c.expect})" if c.expect else "")
        table.add_row(c.question, c.text.strip(), verdict)
    console.print(table)
    return all(c.ok for c in cases)
