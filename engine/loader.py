"""Model loading: a preset name (random weights), a built-in model (engine/model_cache.py:
fetched and converted into `cache_dir` on first use) or an HF directory (config.json +
safetensors).

The model is built on the meta device, cast to the target dtype there and materialised on
the target device, so no full-size fp32 or CPU copy ever exists. Safetensors shards are
read one at a time straight onto the device and copied into the parameters by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pdserve.engine.config import ModelConfig
from pdserve.engine.layers import ROPE_TYPES, RotaryEmbedding, checkpoint_tensors
from pdserve.engine.model_cache import BUILTIN_MODELS, resolve_model
from pdserve.engine.models import model_class
from pdserve.engine.presets import PRESETS, init_random_weights
from pdserve.engine.tokenizer import eos_ids_from_dir

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _is_preset(name_or_dir: str) -> bool:
    return name_or_dir in PRESETS and not Path(name_or_dir).is_dir()


def _model_dir(name_or_dir: str, cache_dir: str | Path | None = None) -> Path:
    path = Path(name_or_dir)
    if not path.is_dir() and name_or_dir in BUILTIN_MODELS:
        path = resolve_model(name_or_dir, cache_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (and {name_or_dir!r} "
                                f"is not a preset ({', '.join(PRESETS)}) nor a built-in model "
                                f"({', '.join(BUILTIN_MODELS)}))")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model directory")
    return path


def _sliding_window(cfg: dict, arch: str, num_layers: int, path: Path) -> int | None:
    window = cfg.get("sliding_window")
    if arch == "MistralForCausalLM":
        return window
    if arch not in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") or not cfg.get("use_sliding_window"):
        return None
    # HF Qwen2/3 slide only on layers >= max_window_layers; one window for all layers or none.
    first = cfg.get("max_window_layers", 0)
    if window is None or first >= num_layers:
        return None
    if first > 0:
        raise ValueError(f"{path}: sliding window on only some layers (max_window_layers="
                         f"{first} < num_hidden_layers={num_layers}) is not supported")
    return int(window)


def _rope(cfg: dict, path: Path) -> tuple[float, tuple[tuple[str, object], ...] | None]:
    """(rope_theta, rope_scaling items) from HF v4 `rope_theta` + `rope_scaling`, or from
    v5 `rope_parameters` (which holds rope_theta too)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(cfg.get("rope_theta", params.pop("rope_theta", 10000.0)))
    params.pop("rope_theta", None)
    rope_type = params.pop("type", None) or params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{path}: unsupported rope_type {rope_type!r}; "
                         f"supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    return theta, tuple(sorted(params.items()))


def load_model_config(name_or_dir: str, cache_dir: str | Path | None = None) -> ModelConfig:
    """ModelConfig of a preset, or of an HF directory's config.json (a built-in model's
    directory in `cache_dir`)."""
    if _is_preset(name_or_dir):
        return PRESETS[name_or_dir]
    path = _model_dir(name_or_dir, cache_dir)
    cfg = json.loads((path / "config.json").read_text())
    arch = (cfg.get("architectures") or ["<none>"])[0]
    try:
        model_class(arch)
    except ValueError as exc:
        raise ValueError(f"{path / 'config.json'}: {exc}") from None
    heads = cfg["num_attention_heads"]
    layers = cfg["num_hidden_layers"]
    theta, scaling = _rope(cfg, path)
    bos = cfg.get("bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_window=_sliding_window(cfg, arch, layers, path),
        eos_token_ids=tuple(eos_ids_from_dir(path)),
        bos_token_id=bos[0] if isinstance(bos, list) else bos,
    )


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index} names shard {f.name}, which does not exist")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{path}: no safetensors weights (expected model.safetensors "
                            f"or model.safetensors.index.json)")


@torch.no_grad()
def _load_weights(model: nn.Module, config: ModelConfig, path: Path, device: str) -> None:
    params = checkpoint_tensors(model)  # HF names; merged projections as views
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    loaded: set[str] = set()
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt", device=str(dev)) as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # tied: logits use the embedding matrix
                if name not in params:
                    raise ValueError(f"{file}: unexpected tensor {name} (not a parameter of "
                                     f"{config.architecture} with this config.json)")
                found = tuple(f.get_slice(name).get_shape())
                expected = tuple(params[name].shape)
                if found != expected:
                    raise ValueError(f"{file}: tensor {name} has shape {list(found)}, expected "
                                     f"{list(expected)} from config.json")
                params[name].copy_(f.get_tensor(name))
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: missing tensors in the checkpoint: {', '.join(missing[:8])}"
                         + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))


def load_model(name_or_dir: str, dtype: torch.dtype, device: str, seed: int = 0,
               cache_dir: str | Path | None = None) -> tuple[nn.Module, ModelConfig]:
    """Build the model on `device` in `dtype`: random weights from `seed` for a preset,
    else the directory's safetensors (a built-in model's directory in `cache_dir`, made on
    first use). Returns (model in eval mode, its ModelConfig)."""
    config = load_model_config(name_or_dir, cache_dir)
    with torch.device("meta"):
        model = model_class(config.architecture)(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset_cache()
    if _is_preset(name_or_dir):
        init_random_weights(model, seed)
    else:
        _load_weights(model, config, _model_dir(name_or_dir, cache_dir), device)
    return model.eval().requires_grad_(False), config
