"""Single-process inference: config, model, loader, tokenizer, block manager, phase-less
scheduler, sampler, model runner, CUDA graphs, and the thread that runs the engine."""
