"""The engine's configuration: small frozen dataclasses, validated on construction.

Nothing in the engine reads environment variables; everything arrives through these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (filled from an HF config.json or a preset)."""

    architecture: str  # "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, object], ...] | None = None  # sorted items of the HF dict
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (Qwen3)
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over all layers, in bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV pool: per layer a tensor [num_blocks, 2, block_size, num_kv_heads, head_dim]."""

    block_size: int = 16
    num_blocks: int | None = None  # explicit count; None sizes the pool from memory_fraction
    memory_fraction: float = 0.9  # of the whole card that weights + KV cache may use (CUDA only)
    cpu_num_blocks: int = 512  # default pool on CPU when num_blocks is None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 8192  # token budget of one step
    max_num_seqs: int = 256  # running requests at once
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    long_prefill_threshold: int = 0  # 0: chunk only to fit the budget

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What one engine loads, where it runs, its KV pool and its scheduler."""

    model: str = "tiny"  # preset name, built-in model name or HF directory
    model_cache_dir: str | None = None  # where built-in models are converted (CLI: XDG cache)
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0  # seed of random preset weights
    attention_backend: str = "auto"  # "torch" | "triton" | "auto"
    enforce_eager: bool = False  # no CUDA graphs at all
    capture_decode_graphs: bool = True  # a prefill pool sets False: it never decodes
    # Prompt chunks of up to max(...) tokens, alone in their step, replay a CUDA graph of the
    # next size up (engine/prefill_graphs.py); () captures none. Sizes above
    # max_num_batched_tokens are left out.
    prefill_graph_tokens: tuple[int, ...] = (128, 256, 384, 512, 768, 1024)
    max_logprobs: int = 20  # most top logprobs a request may ask for (vLLM's default)
    # Overlap scheduling of steady decode steps (engine/step_pipeline.py): plan and launch
    # step N+1 while step N runs. None: on for CUDA, off on CPU (nothing runs asynchronously
    # there, so it would only delay each token by a step); True forces it (tests).
    overlap: bool | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        if self.attention_backend not in ("torch", "triton", "auto"):
            raise ValueError(f"attention_backend must be torch, triton or auto, got {self.attention_backend!r}")
