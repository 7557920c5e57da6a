"""Safetensors checkpoints read tensor by tensor and written shard by shard, at any fsspec URI.

Reading (:func:`iter_tensors`): each tensor is opened with ``safetensors.safe_open``, which
memory-maps the file, and copied straight into a tensor of the target device and dtype. The
file is mapped once per tensor, so its pages leave the process as soon as that tensor is
copied: loading holds the model plus at most one tensor of the file, never a whole shard.
Shards in remote storage are downloaded one at a time to a temporary local file first.

Writing (:func:`write_shards`): the shard plan is computed from names, shapes and dtypes
alone, then each shard's tensors are fetched, written and released, so a full state dict
never has to exist in memory at once (the distillation export streams from a sharded
training checkpoint this way). The layout is transformers': ``model.safetensors``, or
``model-0000K-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import fsspec
import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# transformers' default shard limit ("5GB", decimal) and shard file names.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor to write."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def natural_key(name: str) -> list[Any]:
    """Sort key that puts ``blocks.2`` before ``blocks.10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(uri)
    return fs, root.rstrip("/")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def shard_paths(uri: str) -> list[str]:
    """The weight files of the checkpoint directory ``uri`` (fsspec paths), in index order."""
    fs, root = _fs(uri)
    single, index = f"{root}/{WEIGHTS_NAME}", f"{root}/{INDEX_NAME}"
    if fs.exists(single):
        return [single]
    if fs.exists(index):
        with fs.open(index, "r") as f:
            weight_map = json.load(f)["weight_map"]
        return [f"{root}/{name}" for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} at {uri!r}: not a safetensors checkpoint directory")


@contextlib.contextmanager
def _local_file(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    if _is_local(fs):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="d3ray-shard-") as d:
        local = os.path.join(d, path.rsplit("/", 1)[-1])
        fs.get_file(path, local)
        yield local


def iter_tensors(uri: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of the checkpoint at ``uri``, each already on ``device``/``dtype``."""
    fs, _ = _fs(uri)
    for path in shard_paths(uri):
        with _local_file(fs, path) as local:
            with safe_open(local, framework="pt") as f:
                names = sorted(f.keys(), key=natural_key)
            for name in names:
                # One mapping per tensor: closing it drops the file pages this copy touched.
                with safe_open(local, framework="pt") as f:
                    src = f.get_tensor(name)
                    dst = torch.empty(src.shape, dtype=dtype or src.dtype, device=device)
                    dst.copy_(src)
                    del src
                yield name, dst


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[list[TensorSpec]]:
    """Consecutive groups (in natural name order) of at most ``max_shard_bytes`` each (one tensor may exceed it)."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be >= 1")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in sorted(specs, key=lambda s: natural_key(s.name)):
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_name(k: int, n: int) -> str:
    return WEIGHTS_NAME if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def _remove_stale_weights(fs: fsspec.AbstractFileSystem, root: str) -> None:
    if not fs.exists(root):
        return
    for path in fs.ls(root, detail=False):
        name = path.rsplit("/", 1)[-1]
        if name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_NAME.fullmatch(name):
            fs.rm(path)


def write_shards(uri: str, plan: list[list[TensorSpec]], fetch: Callable[[list[TensorSpec]], dict[str, torch.Tensor]],
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Write each shard of ``plan`` with the tensors ``fetch(shard)`` returns; returns the file names.

    ``fetch`` must return CPU tensors named, shaped and typed as planned; they are released
    after their shard is written. Weight files already in ``uri`` are removed first.
    """
    fs, root = _fs(uri)
    fs.makedirs(root, exist_ok=True)
    _remove_stale_weights(fs, root)
    names, weight_map, total = [], {}, 0
    for k, shard in enumerate(plan):
        tensors = fetch(shard)
        for spec in shard:
            t = tensors.get(spec.name)
            if t is None or tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ValueError(f"tensor {spec.name}: planned {spec.shape} {spec.dtype}, fetched {got}")
        name = shard_name(k, len(plan))
        if _is_local(fs):
            save_file(tensors, f"{root}/{name}", metadata={"format": "pt", **(metadata or {})})
        else:
            with tempfile.TemporaryDirectory(prefix="d3ray-shard-") as d:
                save_file(tensors, os.path.join(d, name), metadata={"format": "pt", **(metadata or {})})
                fs.put_file(os.path.join(d, name), f"{root}/{name}")
        for spec in shard:
            weight_map[spec.name] = name
            total += spec.nbytes
        names.append(name)
        del tensors
        logger.debug("wrote %s (%d tensors)", name, len(shard))
    if len(plan) > 1:
        with fs.open(f"{root}/{INDEX_NAME}", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
