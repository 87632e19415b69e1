"""`pdserve generate --local`: run the whole engine in this process and return the result."""

from __future__ import annotations

import argparse

from pdserve.engine.sampling_params import SamplingParams


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    given = {k: getattr(args, k, None) for k in ("max_tokens", "temperature", "top_p", "top_k", "seed")}
    return SamplingParams(ignore_eos=bool(getattr(args, "ignore_eos", False)),
                          **{k: v for k, v in given.items() if v is not None})


def parse_prompt_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from exc


def run_local(args: argparse.Namespace) -> dict:
    """Returns {"token_ids": [...generated ids...], "text": "..."}."""
    from pdserve.generate_cli import chat_messages
    from pdserve.llm import LLM

    params = sampling_from_args(args)
    device = getattr(args, "device", None) or "cpu"
    dtype = getattr(args, "dtype", None) or ("float32" if device == "cpu" else "bfloat16")
    messages = chat_messages(args) if getattr(args, "chat", False) else None
    llm = LLM(model=args.model or "tiny", device=device, dtype=dtype,
              model_cache_dir=getattr(args, "model_cache_dir", None))
    if messages is not None:
        out = llm.chat(messages, params)[0]
    else:
        prompt = parse_prompt_ids(args.prompt_ids) if args.prompt_ids else args.prompt
        out = llm.generate(prompt, params)[0]
    return {"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason}
