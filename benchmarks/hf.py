"""`pdserve bench hf`: pdserve against HF transformers `generate`, same weights, same GPU.

pdserve loads the preset (random weights); an HF model built from the preset's config gets
a copy of exactly those weights. Both run greedy, no EOS stop:
- batch 1: decode ms/token = (time for N new tokens - time for 1) / (N - 1), so prefill
  cancels out; prompt P tokens;
- batch B: throughput, B prompts of P tokens each generating N tokens, B * N / time.
`match` is how many leading batch-1 tokens agree (informational: random weights give
near-uniform logits, so bf16 rounding differences flip argmaxes early).
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from pdserve.benchmarks import engine_bench as eb
from pdserve.benchmarks import plotting
from pdserve.engine.config import ModelConfig
from pdserve.engine.layers import checkpoint_tensors
from pdserve.engine.sampling_params import SamplingParams

COLUMNS = ["engine", "batch", "prompt", "new", "ms_per_token", "tok_s", "seconds", "match"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    eb.add_common_arguments(p, out="benchmarks/results/hf")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=64, help="throughput batch")
    p.add_argument("--enforce-eager", action="store_true", help="pdserve without CUDA graphs")
    p.add_argument("--hf-attn", default="sdpa", help="HF attn_implementation (default sdpa)")


def hf_config(mcfg: ModelConfig):
    """The transformers config of a preset's architecture."""
    import transformers

    cls = getattr(transformers, mcfg.architecture.replace("ForCausalLM", "Config"))
    kw = dict(vocab_size=mcfg.vocab_size, hidden_size=mcfg.hidden_size,
              intermediate_size=mcfg.intermediate_size, num_hidden_layers=mcfg.num_layers,
              num_attention_heads=mcfg.num_heads, num_key_value_heads=mcfg.num_kv_heads,
              head_dim=mcfg.head_dim, max_position_embeddings=mcfg.max_position_embeddings,
              rms_norm_eps=mcfg.rms_norm_eps, rope_theta=mcfg.rope_theta,
              rope_scaling=mcfg.rope_scaling_dict, tie_word_embeddings=mcfg.tie_word_embeddings,
              bos_token_id=mcfg.bos_token_id, eos_token_id=list(mcfg.eos_token_ids))
    if mcfg.architecture == "LlamaForCausalLM":
        kw["attention_bias"] = mcfg.attention_bias
    return cls(**kw)


def hf_model_like(model: torch.nn.Module, mcfg: ModelConfig, dtype: torch.dtype, device: str,
                  attn: str):
    """An HF model on `device` holding a copy of our model's weights (names are HF's)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(mcfg)
    cfg._attn_implementation = attn
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    missing, unexpected = hf.load_state_dict(checkpoint_tensors(model), strict=False)
    allowed = {"lm_head.weight"} if mcfg.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed:
        raise RuntimeError(f"weight names differ from HF's: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    return hf.eval()


def _timed(fn, device: str) -> tuple[float, object]:
    eb.sync(device)
    t0 = time.perf_counter()
    res = fn()
    eb.sync(device)
    return time.perf_counter() - t0, res


def run(args: argparse.Namespace) -> int:
    from pdserve.llm import LLM

    device, dtype = eb.resolve(args)
    meta = plotting.run_metadata(device)
    p_len, new, batch = args.prompt_len, args.new_tokens, args.batch
    dt_name = str(dtype).removeprefix("torch.")
    blocks = batch * -(-(p_len + new + 1) // 16) + 64
    llm = LLM(args.model, device=device, dtype=dt_name, seed=args.seed,
              attention_backend=args.attention, enforce_eager=args.enforce_eager,
              num_blocks=blocks, max_num_seqs=max(batch, 1),
              max_num_batched_tokens=max(8192, p_len * batch), max_model_len=p_len + new + 16,
              enable_prefix_caching=False)
    mcfg = llm.engine.model_cfg
    hf = hf_model_like(llm.engine.model, mcfg, dtype, device, args.hf_attn)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, min(mcfg.vocab_size, 32000), (batch, p_len), generator=gen)

    def ours(n_prompts: int, n_new: int):
        sp = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True)
        return lambda: llm.generate(prompts[:n_prompts].tolist(), sp)

    def theirs(n_prompts: int, n_new: int):
        ids = prompts[:n_prompts].to(device)

        def go():
            with torch.no_grad():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=n_new, min_new_tokens=n_new,
                                   eos_token_id=None, pad_token_id=0)
        return go

    rows = []
    bar = tqdm(total=6, desc="hf vs pdserve")
    first_tokens = {}
    for engine, make in (("pdserve", ours), ("hf", theirs)):
        make(1, 4)()  # warm-up (kernels, allocator, graphs)
        t1, _ = _timed(make(1, 1), device)
        tn, res = _timed(make(1, new), device)
        bar.update(2)
        first_tokens[engine] = (res[0].token_ids if engine == "pdserve"
                                else res[0, p_len:].tolist())
        rows.append({"engine": engine, "batch": 1, "prompt": p_len, "new": new,
                     "ms_per_token": (tn - t1) / max(new - 1, 1) * 1e3,
                     "tok_s": new / tn, "seconds": tn})
        tb, _ = _timed(make(batch, new), device)
        bar.update(1)
        rows.append({"engine": engine, "batch": batch, "prompt": p_len, "new": new,
                     "ms_per_token": tb / new * 1e3, "tok_s": batch * new / tb, "seconds": tb})
    bar.close()
    a, b = first_tokens["pdserve"], first_tokens["hf"]
    match = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    for r in rows:
        r["match"] = f"{match}/{new}" if r["batch"] == 1 else ""
    by = {(r["engine"], r["batch"]): r for r in rows}
    meta.update({"model": f"{args.model} ({dt_name}), same random weights in both",
                 "pdserve": f"attention {llm.engine.attn.name}, cuda_graphs "
                            f"{llm.engine.runner.graphs is not None}",
                 "hf": f"transformers generate, attn_implementation={args.hf_attn}"})
    notes = [
        "batch 1 ms_per_token = (t(N new) - t(1 new)) / (N - 1): decode only; batch B "
        "ms_per_token = wall time / N steps and tok_s = B * N / wall time (prefill included).",
        f"speed-up batch 1: {by['hf', 1]['ms_per_token'] / by['pdserve', 1]['ms_per_token']:.2f}x, "
        f"batch {batch}: {by['pdserve', batch]['tok_s'] / by['hf', batch]['tok_s']:.2f}x",
    ]

    def plot(path: str):
        xs = [1, batch]
        return plotting.plot_lines(
            path, {e: (xs, [by[e, 1]["tok_s"], by[e, batch]["tok_s"]]) for e in ("pdserve", "hf")},
            "batch", "generated tokens/s", title=f"pdserve vs HF generate, {meta.get('device')}",
            logx=True, logy=True)

    eb.emit(args, "hf", rows, COLUMNS, f"pdserve vs HF transformers ({args.model})", meta,
            notes, plot)
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="pdserve bench hf", description=__doc__)
    add_arguments(_p)
    raise SystemExit(run(_p.parse_args()))
