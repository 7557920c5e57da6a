"""Load and save dLLMs in their official HF layout, from any fsspec URI.

A checkpoint directory holds ``config.json`` (official field names), an optional
``generation_config.json`` (its ``eos_token_id`` list names every stop token), and either
``model.safetensors`` or shards listed in ``model.safetensors.index.json``. Loading builds
the model on the meta device and assigns the tensors (``load_state_dict(assign=True)``) as
they stream in one by one, so nothing is initialised twice and an 8B model needs one copy of
its weights in memory. Checkpoints are named by path, fsspec URI, hub id or ``hf://`` URI
(``d3core.models.hub``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import fsspec
import torch

from d3core.models.config import ModelConfig
from d3core.models.hub import resolve_checkpoint
from d3core.models.layers import DiffusionTransformer
from d3core.models.registry import ARCHITECTURES, Architecture, build_model, get_architecture
from d3core.models.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_NAME,
    WEIGHTS_NAME,
    TensorSpec,
    iter_tensors,
    plan_shards,
    write_shards,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
__all__ = ["CONFIG_NAME", "GENERATION_CONFIG_NAME", "WEIGHTS_NAME", "INDEX_NAME", "load_config", "load_pretrained",
           "save_pretrained", "write_config", "write_generation_config", "official_specs", "official_names",
           "init_from_causal_lm"]


def expand_param_map(param_map: dict[str, str], num_layers: int) -> dict[str, str]:
    """The literal per-layer map ``{official name: d3core name}`` for ``num_layers`` blocks."""
    out: dict[str, str] = {}
    for official, ours in param_map.items():
        if "{i}" in official:
            for i in range(num_layers):
                out[official.format(i=i)] = ours.format(i=i)
        else:
            out[official] = ours
    return out


def official_names(model: DiffusionTransformer) -> list[str]:
    """The official parameter names of ``model`` in its architecture's layout."""
    arch = get_architecture(model.config.arch)
    ours = dict(model.named_parameters())
    full = expand_param_map(arch.param_map, model.config.num_layers)
    return sorted(o for o, n in full.items() if n in ours)


def detect_architecture(raw: dict[str, Any]) -> Architecture:
    model_type = str(raw.get("model_type", "")).lower()
    for arch in ARCHITECTURES.values():
        if model_type in arch.hf_model_types:
            return arch
    raise ValueError(
        f"config.json model_type={raw.get('model_type')!r} is not a d3core dLLM: supported model_type "
        f"values are {sorted(t for a in ARCHITECTURES.values() for t in a.hf_model_types)}"
    )


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    with fs.open(path, "r") as f:
        return json.load(f)


def load_config(uri: str) -> ModelConfig:
    """Read ``config.json`` (and ``generation_config.json`` stop ids) of the checkpoint ``uri`` names."""
    uri = resolve_checkpoint(uri, weights=False)
    fs, root = fsspec.core.url_to_fs(uri)
    cfg_path = _join(root, CONFIG_NAME)
    if not fs.exists(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} at {uri!r}: point at a directory saved in the official HF layout")
    raw = _read_json(fs, cfg_path)
    special: dict[str, Any] = {}
    gen_path = _join(root, GENERATION_CONFIG_NAME)
    if fs.exists(gen_path):
        eos = _read_json(fs, gen_path).get("eos_token_id")
        if eos is not None:
            special["eos_ids"] = [eos] if isinstance(eos, int) else list(eos)
    return detect_architecture(raw).config_from_hf(raw, special)


def load_pretrained(
    uri: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> DiffusionTransformer:
    """Load an official-layout LLaDA or Dream checkpoint: local dir, fsspec URI, hub id or ``hf://`` URI.

    The model is built on the meta device and each tensor is streamed from its shard straight
    to ``device`` in ``dtype`` (default: the checkpoint's), so host memory holds at most the
    model plus one tensor (``d3core.models.safetensors_io``).
    """
    uri = resolve_checkpoint(uri, weights=True)
    cfg = load_config(uri)
    arch = get_architecture(cfg.arch)
    mapping = expand_param_map(arch.param_map, cfg.num_layers)
    model = build_model(cfg, device="meta")
    expected = set(dict(model.named_parameters()))
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in iter_tensors(uri, device=device, dtype=dtype):
        ours = mapping.get(name)
        if ours is None or ours not in expected:
            unexpected.append(name)
            continue
        state[ours] = tensor
    missing = sorted(expected - set(state))
    if missing or unexpected:
        inverse = {v: k for k, v in mapping.items()}
        raise ValueError(
            f"checkpoint at {uri!r} does not match the official {cfg.arch} layout: "
            f"missing {[inverse.get(m, m) for m in missing][:8]}, unexpected {sorted(unexpected)[:8]}; "
            "was it saved by a different architecture or a LoRA adapter without merging?"
        )
    model.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded %s (%s, %.2fM params) from %s", cfg.arch, next(iter(state.values())).dtype,
                sum(p.numel() for p in model.parameters()) / 1e6, uri)
    return model.eval()


def official_specs(cfg: ModelConfig, dtype: torch.dtype) -> list[TensorSpec]:
    """Official name, shape and ``dtype`` of every tensor of a ``cfg``-shaped checkpoint (nothing allocated)."""
    model = build_model(cfg, device="meta")
    mapping = {v: k for k, v in expand_param_map(get_architecture(cfg.arch).param_map, cfg.num_layers).items()}
    return [TensorSpec(mapping[name], tuple(p.shape), dtype) for name, p in model.named_parameters()]


def write_config(uri: str, cfg: ModelConfig, dtype: torch.dtype) -> None:
    """``config.json`` and ``generation_config.json`` of ``cfg`` in its architecture's official layout."""
    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(root, exist_ok=True)
    with fs.open(_join(root, CONFIG_NAME), "w") as f:
        json.dump(get_architecture(cfg.arch).config_to_hf(cfg, dtype_name(dtype)), f, indent=2)
    write_generation_config(uri, cfg)


def write_generation_config(uri: str, cfg: ModelConfig) -> None:
    """``generation_config.json`` with every stop id of ``cfg`` (its eos list is what ``load_config`` reads)."""
    fs, root = fsspec.core.url_to_fs(uri)
    with fs.open(_join(root, GENERATION_CONFIG_NAME), "w") as f:
        json.dump({"eos_token_id": list(cfg.eos_ids), "pad_token_id": cfg.pad_id,
                   **({"bos_token_id": cfg.bos_id} if cfg.bos_id is not None else {})}, f, indent=2)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, the spelling of ``torch_dtype`` in config.json."""
    return str(dtype).removeprefix("torch.")


def save_pretrained(
    model: DiffusionTransformer, uri: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None
) -> None:
    """Write ``model`` in its architecture's official layout (config, generation config, safetensors).

    Weights are cast to ``dtype`` (default: the model's) one shard at a time; more than
    ``max_shard_bytes`` of weights are split into shards with an index, as transformers does.
    """
    cfg = model.config
    params = dict(model.named_parameters())
    dtype = dtype or next(iter(params.values())).dtype
    ours = {v: k for k, v in expand_param_map(get_architecture(cfg.arch).param_map, cfg.num_layers).items()}
    official = {ours[name]: p for name, p in params.items()}
    specs = [TensorSpec(name, tuple(p.shape), dtype) for name, p in official.items()]

    def fetch(shard: list[TensorSpec]) -> dict[str, torch.Tensor]:
        return {s.name: official[s.name].detach().to("cpu", dtype).contiguous() for s in shard}

    write_config(uri, cfg, dtype)
    write_shards(uri, plan_shards(specs, max_shard_bytes), fetch)


def init_from_causal_lm(model: DiffusionTransformer, uri: str) -> list[str]:
    """Copy the weights of an HF Llama/Qwen2-layout causal LM into a dLLM of the same shape.

    This is how Dream was made from Qwen2.5 (AR initialisation, then masked-diffusion
    training); it works for either d3core architecture because both use the same blocks.
    Returns the names of dLLM parameters the checkpoint lacks (e.g. QKV biases), which keep
    their zero initialisation.
    """
    from d3core.models import dream

    uri = resolve_checkpoint(uri, weights=True)
    mapping = expand_param_map(dream.PARAM_MAP, model.config.num_layers)
    ours = dict(model.named_parameters())
    loaded, unused = set(), []
    with torch.no_grad():
        for name, tensor in iter_tensors(uri):
            target = mapping.get(name)
            if target is None or target not in ours:
                unused.append(name)
                continue
            if ours[target].shape != tensor.shape:
                raise ValueError(
                    f"{uri}: {name} has shape {tuple(tensor.shape)} but the dLLM's {target} is "
                    f"{tuple(ours[target].shape)}: build the dLLM with the causal LM's sizes"
                )
            ours[target].copy_(tensor)
            loaded.add(target)
    missing = sorted(set(ours) - loaded)
    if unused or [m for m in missing if not m.endswith("bias")]:
        raise ValueError(f"{uri}: not a Llama/Qwen2-layout causal LM of this shape (unused {unused[:6]}, "
                         f"missing {missing[:6]})")
    for name in missing:
        ours[name].zero_()
    logger.info("initialised %s from causal LM %s (%d tensors)", model.config.arch, uri, len(loaded))
    return missing
