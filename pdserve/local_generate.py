"""`pdserve generate --local`: run the whole engine in this process and return the result."""

from __future__ import annotations

import argparse

from pdserve.engine.sampling_params import SamplingParams
from pdserve.generate_cli import logprob_json, parse_prompt_ids, sampling_kwargs


def run_local(args: argparse.Namespace) -> dict:
    """Returns {"token_ids": [...generated ids...], "text": "..."}."""
    from pdserve.generate_cli import chat_messages
    from pdserve.llm import LLM

    device = getattr(args, "device", None) or "cpu"
    dtype = getattr(args, "dtype", None) or ("float32" if device == "cpu" else "bfloat16")
    params = SamplingParams(**sampling_kwargs(args))
    messages = chat_messages(args) if getattr(args, "chat", False) else None
    llm = LLM(model=args.model or "tiny", device=device, dtype=dtype,
              model_cache_dir=getattr(args, "model_cache_dir", None))
    if messages is not None:
        out = llm.chat(messages, params)[0]
    else:
        prompt = parse_prompt_ids(args.prompt_ids) if args.prompt_ids else args.prompt
        out = llm.generate(prompt, params)[0]
    lps = None if out.logprobs is None else [
        logprob_json(t, lp.logprob, zip(lp.top_ids, lp.top_logprobs))
        for t, lp in zip(out.token_ids, out.logprobs)]
    return {"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason,
            "logprobs": lps}
