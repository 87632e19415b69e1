"""Checks before loading: is the device there, and do the weights fit in its memory?

Both raise ResourceError with a message that names the numbers, before anything is
allocated (a 16 GB model on a 23 GB machine would otherwise swap for a minute and die).
"""

from __future__ import annotations

import torch

from pdserve.engine.config import ModelConfig
from pdserve.engine.errors import ResourceError

HEADROOM = 0.95  # of the available memory the weights may take; the KV pool needs some too


def check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ResourceError(f"device {device} was asked for, but this torch "
                            f"({torch.__version__}) sees no CUDA device; use --device cpu")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ResourceError(f"device {device} was asked for, but only "
                            f"{torch.cuda.device_count()} CUDA device(s) are visible")


def weight_bytes(mcfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the decoder's parameters in `dtype` (biases and norms included)."""
    h, q, kv = mcfg.hidden_size, mcfg.num_heads * mcfg.head_dim, mcfg.num_kv_heads * mcfg.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * mcfg.intermediate_size + 2 * h
    if mcfg.attention_bias:
        per_layer += q + 2 * kv
    if mcfg.qk_norm:
        per_layer += 2 * mcfg.head_dim
    embeddings = mcfg.vocab_size * h * (1 if mcfg.tie_word_embeddings else 2)
    params = mcfg.num_layers * per_layer + embeddings + h
    return params * torch.empty((), dtype=dtype).element_size()


def available_bytes(device: str) -> tuple[int, str]:
    """(bytes available for new allocations, where) on a CUDA device or in host memory."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free, f"{device} has"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "this machine has"
    except (OSError, KeyError, ValueError):
        return 1 << 62, "this machine has"  # unknown: do not refuse


def check_fits(model: str, mcfg: ModelConfig, dtype: torch.dtype, device: str) -> None:
    need = weight_bytes(mcfg, dtype)
    have, where = available_bytes(device)
    if need > HEADROOM * have:
        name = str(dtype).removeprefix("torch.")
        raise ResourceError(
            f"{model} in {name} needs about {need / 1e9:.1f} GB for its weights, and {where} "
            f"{have / 1e9:.1f} GB available; use a smaller model or dtype, or another device")
