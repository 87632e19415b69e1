"""Attention backend ABC and the metadata every backend reads.

A step's batch is a flat list of T new tokens belonging to B sequences. Sequence b owns
query rows query_start_loc[b]:query_start_loc[b+1]; after this step its context holds
seq_lens[b] tokens, the last (query_len) of which are the new ones. A decode step is the
case query_len == 1; there is no separate prefill/decode phase.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset of each new token
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32, context length after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]  # host copies: references loop over them without a sync
    seq_lens_cpu: list[int]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Writes the new tokens' K/V into the paged cache, then attends over each context.

    kv_cache is one layer's pool: [num_blocks, 2, block_size, num_kv_heads, head_dim]
    (index 0 = K, 1 = V), so one block's K and V for one layer are contiguous.
    """

    name: str = "abstract"
    fuses_rope: bool = False  # accepts forward(rope=(positions, cos_sin_cache))

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """rope=(positions [T], cos_sin_cache [P, head_dim]), only for backends with
        fuses_rope: q and k are not yet rotated, and the backend rotates them itself."""
        ...


_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_backend(name: str):
    def deco(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        _BACKENDS[name] = cls
        return cls
    return deco


def get_backend(name: str, device: str = "cpu") -> AttentionBackend:
    """'auto' picks triton on CUDA when the kernels import, else the torch reference."""
    from pdserve.kernels import torch_attention  # noqa: F401  (registers "torch")
    if name == "auto":
        name = "triton" if device.startswith("cuda") else "torch"
    if name == "triton":
        try:
            from pdserve.kernels import attention_backend  # noqa: F401  (registers "triton")
        except ImportError as exc:
            raise ValueError(f"attention backend 'triton' is not available: {exc}") from exc
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name]()
