"""Sharded distillation checkpoints with ``torch.distributed.checkpoint`` (DCP), and a streaming read for export.

A checkpoint directory holds the DCP files of the model and optimizer state (one
``__<rank>_0.distcp`` per rank plus ``.metadata``) and ``trainer_state.json``: step, epoch,
the row ids consumed this epoch, row uses, metrics history. There is no gather to rank 0
and no single pickle: every rank writes only its own FSDP2 shards, so an 8B run's ~96 GB of
fp32 weights and AdamW moments are spread over its ranks and never pass through one
process. DCP records global shapes, so :func:`load_checkpoint` reshards to whatever world
size the resumed run has (2 workers save, 1 worker resumes, or the reverse).

Ray Train v2 (``RAY_TRAIN_V2_ENABLED``, the default in Ray 2.60) specifics:

- every rank calls ``ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))``
  with its own local directory; Ray merges the ranks' files into one checkpoint directory
  under ``RunConfig.storage_path`` (``report`` is a barrier: all ranks call it equally often);
- ``ray.train.get_checkpoint()`` returns the latest registered checkpoint, both after a
  worker-group restart (``FailureConfig``) and in a new ``fit()`` with the same run name and
  storage (the controller restores its checkpoint list from storage);
- a checkpoint in object storage is read in place through fsspec (:func:`checkpoint_uri`),
  never downloaded whole with ``as_directory()``: each rank reads only its byte ranges, and
  the driver's export reads only the model's tensors, not the optimizer's;
- the controller *registers* a reported checkpoint only when it next polls the workers (every
  ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default), and ``ray.train.get_checkpoint()``
  knows registered ones only. A worker or driver killed sooner leaves a complete checkpoint on
  disk that Ray never heard of. So resume does not ask Ray: :func:`newest_complete` scans the
  run's directory, :func:`verify` checks each candidate (trainer state of this run's
  fingerprint, DCP metadata, every shard file it references at its full size), and
  :func:`reconcile` deletes incomplete and superseded unregistered directories, keeping at most
  ``num_to_keep`` (Ray deletes the registered ones it no longer keeps itself).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from typing import Callable

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from pipelines import _io

logger = logging.getLogger("d3ray.distill")

TRAINER_STATE = "trainer_state.json"
DCP_METADATA = ".metadata"
CHECKPOINT_DIR = re.compile(r"checkpoint-step(\d{8})$")
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train v2's list of registered checkpoints
MODEL, OPTIM = "model", "optim"
# Export reads the training checkpoint in groups of at most this many bytes (as stored, fp32).
EXPORT_GROUP_BYTES = 2**30


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _reader(uri: str):
    fs, _ = fsspec.core.url_to_fs(uri)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return dcp.FileSystemReader(uri.removeprefix("file://"))
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(uri)


def checkpoint_uri(checkpoint, storage_path: str) -> str:
    """The fsspec URI of a Ray Train checkpoint (``Checkpoint.path`` carries no scheme for object storage)."""
    scheme = storage_path.split("://", 1)[0] if "://" in storage_path else ""
    if scheme in ("", "file"):
        return checkpoint.path
    return f"{scheme}://{checkpoint.path.removeprefix(scheme + '://')}"


def save_checkpoint(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict) -> None:
    """Every rank: write its shards of model and optimizer state to ``directory``; rank 0 adds trainer_state.json."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({MODEL: model_sd, OPTIM: optim_sd}, checkpoint_id=directory)
    if _rank() == 0:
        with open(f"{directory}/{TRAINER_STATE}", "w") as f:
            json.dump(trainer_state, f)


def load_checkpoint(uri: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every rank: restore model and optimizer from ``uri`` (resharded to this run's layout); returns trainer state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # The state dicts of *this* run (sharding, world size) are the targets DCP reads into;
    # get_state_dict also creates the optimizer's moment buffers so they have somewhere to go.
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {MODEL: model_sd, OPTIM: optim_sd}
    dcp.load(state, storage_reader=_reader(uri))
    set_state_dict(model, optimizer, model_state_dict=state[MODEL], optim_state_dict=state[OPTIM])
    return read_trainer_state(uri)


def read_trainer_state(uri: str) -> dict:
    fs, root = _io.fs_root(uri)
    return json.loads(fs.cat_file(f"{root}/{TRAINER_STATE}"))


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-step{step:08d}"


def list_checkpoints(experiment_uri: str) -> list[str]:
    """URIs of the checkpoint directories under a Ray Train run directory, oldest step first."""
    fs, root = _io.fs_root(experiment_uri)  # listed as the store is now (workers write while the driver waits)
    if not fs.exists(root):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    steps = sorted((int(m.group(1)), n) for n in names if (m := CHECKPOINT_DIR.match(n)))
    return [experiment_uri.rstrip("/") + "/" + n for _, n in steps]


def read_state_or_none(uri: str) -> dict | None:
    try:
        return read_trainer_state(uri)
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


def verify(uri: str, digest: str) -> dict | None:
    """The trainer state of a complete checkpoint of the run with fingerprint ``digest``, else None.

    Complete: ``trainer_state.json`` parses and names ``digest``, DCP's ``.metadata`` reads, and every
    file it references exists and is long enough for every byte range stored in it (a rank that
    died mid-upload leaves its file missing or short).
    """
    state = read_state_or_none(uri)
    if state is None or state.get("fingerprint_digest") != digest:
        return None
    fs, root = _io.fs_root(uri)
    try:
        meta = _reader(uri).read_metadata()
    except (FileNotFoundError, OSError, EOFError, RuntimeError, ValueError) as err:
        logger.warning("checkpoint %s: unreadable DCP metadata (%s)", uri, type(err).__name__)
        return None
    needed: dict[str, int] = {}
    for item in (meta.storage_data or {}).values():
        rel = str(item.relative_path)
        needed[rel] = max(needed.get(rel, 0), int(item.offset) + int(item.length))
    for rel, size in needed.items():
        path = root.rstrip("/") + "/" + rel
        if not fs.exists(path) or int(fs.size(path)) < size:
            logger.warning("checkpoint %s: %s is missing or short (needs %d bytes)", uri, rel, size)
            return None
    return state


def registered(experiment_uri: str) -> set[str]:
    """Names of the checkpoint directories Ray Train's controller registered (its snapshot in storage).

    The controller rewrites the snapshot while training runs: it is read in one request (``cat_file``), so a
    rewrite meanwhile gives the old or the new list, never a read error.
    """
    fs, root = _io.fs_root(experiment_uri)
    path = f"{root}/{RAY_SNAPSHOT}"
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return set()
    try:
        snapshot = json.loads(data)
        return {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
    except (json.JSONDecodeError, KeyError, TypeError) as err:  # a Ray version with another layout: delete nothing
        logger.warning("cannot read Ray's checkpoint list %s (%s): keeping every checkpoint", path, err)
        return {"*"}


def newest_complete(experiment_uri: str, digest: str) -> str | None:
    for uri in reversed(list_checkpoints(experiment_uri)):
        if verify(uri, digest) is not None:
            return uri
    return None


def reconcile(experiment_uri: str, digest: str, num_to_keep: int) -> str | None:
    """The newest complete checkpoint on disk (None: none); deletes what no resume will read.

    Deleted: incomplete directories, and unregistered complete ones that are not among the newest
    ``num_to_keep`` (Ray's controller never deletes what it never registered). Registered ones are
    Ray's to delete (its snapshot must keep pointing at existing directories).
    """
    names = registered(experiment_uri)
    checkpoints = list_checkpoints(experiment_uri)
    complete = [uri for uri in checkpoints if verify(uri, digest) is not None]
    keep = set(complete[-num_to_keep:])
    fs, _ = _io.fs_root(experiment_uri)
    for uri in checkpoints:
        name = uri.rsplit("/", 1)[-1]
        if uri in keep or name in names or "*" in names:
            continue
        logger.info("removing checkpoint %s (%s)", uri, "superseded" if uri in complete else "incomplete")
        fs.rm(fsspec.core.url_to_fs(uri)[1], recursive=True)
    return complete[-1] if complete else None


def stored_model_tensors(uri: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{parameter FQN: (global shape, dtype)}`` of the model in the checkpoint at ``uri`` (metadata only)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = _reader(uri).read_metadata().state_dict_metadata
    prefix = MODEL + "."
    return {k[len(prefix):]: (tuple(v.size), v.properties.dtype) for k, v in meta.items()
            if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}


def read_model_tensors(uri: str, names: list[str], stored: dict | None = None) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors ``names`` from the checkpoint at ``uri``, read in this process only."""
    stored = stored or stored_model_tensors(uri)
    missing = [n for n in names if n not in stored]
    if missing:
        raise KeyError(f"checkpoint {uri} has no model tensors {missing[:4]}; it holds e.g. {sorted(stored)[:4]}")
    targets = {n: torch.empty(stored[n][0], dtype=stored[n][1]) for n in names}
    with warnings.catch_warnings():  # no_dist is the point here, not a fallback worth a warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({MODEL: targets}, storage_reader=_reader(uri), no_dist=True)
    return targets


def student_fetcher(uri: str, official_to_ours: dict[str, str], lora=None,
                    group_bytes: int = EXPORT_GROUP_BYTES) -> Callable:
    """A ``fetch(shard)`` for ``d3core.models.safetensors_io.write_shards`` that reads the student from ``uri``.

    Each planned tensor (official name, shape, dtype) is read from the sharded checkpoint in
    groups of at most ``group_bytes``, LoRA adapters merged into their base weight
    (``d3core.distill.lora.merged_weight``), and cast to the planned dtype, so memory holds the
    output shard plus one group, never the whole model.
    """
    from d3core.distill.lora import merged_weight

    stored = stored_model_tensors(uri)

    def sources(ours: str) -> list[str]:
        if ours in stored:
            return [ours]
        stem = ours.rsplit(".", 1)[0]
        parts = [f"{stem}.base_layer.weight", f"{stem}.lora_A.default.weight", f"{stem}.lora_B.default.weight"]
        if lora is None or not all(p in stored for p in parts):
            raise KeyError(f"checkpoint {uri} has neither {ours} nor its LoRA parts {parts}")
        return parts

    def fetch(shard) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        groups: list[list] = [[]]
        size = 0
        for spec in shard:
            nbytes = sum(torch.Size(stored[s][0]).numel() * stored[s][1].itemsize
                         for s in sources(official_to_ours[spec.name]))
            if groups[-1] and size + nbytes > group_bytes:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += nbytes
        for group in groups:
            names = [s for spec in group for s in sources(official_to_ours[spec.name])]
            tensors = read_model_tensors(uri, names, stored)
            for spec in group:
                src = sources(official_to_ours[spec.name])
                full = tensors[src[0]] if len(src) == 1 else merged_weight(*(tensors[s] for s in src), lora)
                out[spec.name] = full.to(spec.dtype).contiguous()
            del tensors
        return out

    return fetch
