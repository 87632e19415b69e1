"""Offline Python API: `LLM(model=...).generate(prompts, SamplingParams(...))`, and
`LLM.chat(messages, ...)` for models with a chat template."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from tqdm import tqdm

from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model_cache import default_cache_dir
from pdserve.engine.sampler import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    # one per generated token when SamplingParams.logprobs was set (raw model distribution)
    logprobs: list[TokenLogprobs] | None = None


class LLM:
    """Runs the whole engine (prefill and decode) in this process.

    `model` is a preset name (`tiny`, `llama-3.1-8b`, ...), a built-in real model
    (`smollm2-135m`, fetched and converted into `model_cache_dir` on first use; default
    $XDG_CACHE_HOME/pdserve/models or ~/.cache/pdserve/models) or a local HF directory.
    """

    def __init__(self, model: str = "tiny", device: str = "cpu", dtype: str = "float32", *,
                 seed: int = 0, attention_backend: str = "auto", enforce_eager: bool = False,
                 block_size: int = 16, num_blocks: int | None = None,
                 max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 model_cache_dir: str | None = None, overlap: bool | None = None,
                 config: EngineConfig | None = None) -> None:
        if config is None:
            config = EngineConfig(
                model=model, device=device, dtype=dtype, seed=seed,
                model_cache_dir=model_cache_dir,
                attention_backend=attention_backend, enforce_eager=enforce_eager,
                overlap=overlap,
                cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                  enable_prefix_caching=enable_prefix_caching),
                scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                          max_num_seqs=max_num_seqs, max_model_len=max_model_len))
        if config.model_cache_dir is None:  # the Python API's stand-in for the CLI
            config = replace(config, model_cache_dir=str(default_cache_dir(os.environ)))
        self.config = config
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    def _to_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the prompts' order."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (sampling_params if isinstance(sampling_params, list)
                  else [sampling_params] * len(batch))
        if len(params) != len(batch):
            raise ValueError(f"got {len(params)} SamplingParams for {len(batch)} prompts")
        # Validate every prompt before queueing any, so a bad one leaves nothing behind.
        seqs = [self.engine.make_sequence(self._to_ids(prompt), replace(p))
                for prompt, p in zip(batch, params)]
        for seq in seqs:
            self.engine.scheduler.validate(seq)
        for seq in seqs:
            self.engine.scheduler.add(seq)
        logprobs: dict[str, list[TokenLogprobs]] = {
            s.seq_id: [] for s in seqs if s.params.logprobs is not None}
        bar = tqdm(total=len(seqs), desc="generate", disable=not use_tqdm)
        def on_result(out, res) -> None:
            for sid, lp in res.logprobs.items():
                if sid in logprobs:
                    logprobs[sid].append(lp)
            bar.update(len(res.finished))
        pipe = self.engine.pipeline(on_result)
        while pipe.advance():  # overlap scheduling as the engine is configured
            pass
        bar.close()
        return [RequestOutput(request_id=s.seq_id, prompt_token_ids=list(s.prompt_token_ids),
                              token_ids=list(s.output_token_ids),
                              text=self.tokenizer.decode(s.output_token_ids),
                              finish_reason=s.finish_reason, num_cached_tokens=s.num_cached_tokens,
                              logprobs=logprobs.get(s.seq_id))
                for s in seqs]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = False, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate the next assistant turn of one conversation (a list of {"role", "content"}
        dicts) or of several (a list of such lists), rendered with the model's chat template.
        ValueError when the model has no template."""
        single = isinstance(messages, list) and bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        if not conversations:
            raise ValueError("chat needs at least one conversation")
        prompts = [self.tokenizer.encode(
            self.tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt),
            add_special_tokens=False) for conv in conversations]  # the template writes any BOS
        return self.generate(prompts, sampling_params, use_tqdm)
