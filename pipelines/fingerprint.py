"""Fingerprints of stage outputs: what made them, compared on every rerun.

A *fingerprint* is a JSON-able dict of everything that decides a stage's result: the hash of
the prompts file, the identity of each checkpoint read (content hash, hub commit, or the
fingerprint of the d3ray student it is), the decode and training settings, the seed, and the
fingerprints of the upstream outputs it consumed. Locations are not part of it (the same
teacher copied elsewhere is the same teacher); they are kept beside it as *provenance*.

Each stage output directory holds ``fingerprint.json`` (trajectories: inside ``manifest.json``;
the student: inside ``distill_summary.json``), written before its first output file, and every
file inside (shard, checkpoint, eval cell) records the digest of the fingerprint that made it. A
rerun whose fingerprint differs refuses with :class:`OutputMismatch`, which names the differing
fields and the two ways out: a new output location, or ``--overwrite`` for that stage (in
``full.py``: ``--overwrite STAGE``, which redoes that stage and everything downstream of it).
Because each stage's fingerprint contains its inputs' fingerprints, a changed input invalidates
everything downstream.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import fsspec

from pipelines import _io

RECORD = "fingerprint.json"
# Checkpoints up to this many bytes of weights are hashed whole; larger ones by size plus samples
# of their first, middle and last bytes (an 8B checkpoint is ~16 GB: hashing it on every rerun
# would take minutes).
FULL_HASH_MAX_BYTES = 2 * 2**30
SAMPLE_BYTES = 4 * 2**20
# The files of a checkpoint that decide what it computes: config, weights, tokenizer.
IDENTITY_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".py", ".jinja", ".tiktoken")
IDENTITY_SKIP = ("README.md", "distill_summary.json", RECORD)


def digest(fingerprint: Any) -> str:
    """A short stable hash of a JSON-able value (sorted keys)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k in sorted(value):
            out.update(flatten(value[k], f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(dotted field, old value, new value)`` for every field that differs (absent: None)."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class OutputMismatch(ValueError):
    """An output location holds results made from other inputs or settings."""

    def __init__(self, stage: str, location: str, diffs: list[tuple[str, Any, Any]], option: str = "--out") -> None:
        self.stage, self.location, self.diffs, self.option = stage, location, diffs, option
        shown = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in diffs[:8])
        more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
        super().__init__(
            f"{location} holds {stage} outputs made from other inputs or settings, so they cannot be reused: "
            f"{shown}{more}. Either write to a new location ({option} NEW, or a new --run-dir with full.py), "
            f"or redo it with --overwrite {stage} (it redoes {stage} and everything downstream of it)")


def check(stage: str, location: str, recorded: dict | None, fingerprint: dict, option: str = "--out") -> None:
    """Raise :class:`OutputMismatch` when ``recorded`` exists and differs from ``fingerprint``."""
    if recorded is None:
        return
    diffs = differences(recorded, fingerprint)
    if diffs:
        raise OutputMismatch(stage, location, diffs, option)


def read_record(out: str) -> dict | None:
    return _io.read_json(_io.join(out, RECORD))


def write_record(out: str, stage: str, fingerprint: dict, provenance: dict) -> None:
    _io.write_json(_io.join(out, RECORD), {"stage": stage, "digest": digest(fingerprint),
                                           "fingerprint": fingerprint, "provenance": provenance})


# -- content identities ---------------------------------------------------------------------------
def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(uri: str) -> str:
    fs, root = _io.fs_root(uri)
    h = hashlib.sha256()
    with fs.open(root, "rb") as f:
        for chunk in iter(lambda: f.read(2**22), b""):
            h.update(chunk)
    return h.hexdigest()


def _sampled_sha256(fs, path: str, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with fs.open(path, "rb") as f:
        for start in sorted({0, max(size // 2 - SAMPLE_BYTES // 2, 0), max(size - SAMPLE_BYTES, 0)}):
            f.seek(start)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _directory_identity(root: str, protocol: str, stamp: tuple) -> dict:
    fs = fsspec.filesystem(protocol)
    entries = sorted((p["name"], int(p.get("size") or 0)) for p in fs.ls(root, detail=True)
                     if p.get("type") == "file")
    files = [(n, s) for n, s in entries
             if n.endswith(IDENTITY_SUFFIXES) and n.rsplit("/", 1)[-1] not in IDENTITY_SKIP
             and not n.rsplit("/", 1)[-1].startswith(_io.TMP_PREFIX)]
    total = sum(s for n, s in files if n.endswith(".safetensors"))
    whole = total <= FULL_HASH_MAX_BYTES
    h = hashlib.sha256()
    for name, size in files:
        rel = name.rsplit("/", 1)[-1]
        if whole or not name.endswith(".safetensors"):
            with fs.open(name, "rb") as f:
                file_hash = hashlib.sha256(f.read()).hexdigest()
        else:
            file_hash = _sampled_sha256(fs, name, size)
        h.update(f"{rel}:{size}:{file_hash}\n".encode())
    return {"content_sha256": h.hexdigest()[:32], "hashed": "whole files" if whole else "size + sampled bytes"}


def checkpoint_identity(ref: str, trust_remote_code: bool = False) -> dict:
    """What a checkpoint *is*, independent of where it lies.

    A d3ray student is its distillation fingerprint; a hub repo is its repo id at the resolved
    commit; any other directory is the hash of its config, weight and tokenizer files. Raises
    FileNotFoundError, naming the reference, when it points at no checkpoint.
    """
    from d3core.models.hub import parse_hub_ref, resolve_checkpoint

    hub = parse_hub_ref(ref)
    local = resolve_checkpoint(ref, weights=False, trust_remote_code=trust_remote_code)
    fs, root = _io.fs_root(local)
    if not fs.exists(_io.join(root, "config.json")):
        raise FileNotFoundError(f"checkpoint {ref!r}: no config.json there (not a path, fsspec URI or hub id of a "
                                "checkpoint in the official HF layout); check the spelling or download it first")
    summary = _io.read_json(_io.join(local, "distill_summary.json"))
    if summary and summary.get("fingerprint_digest"):
        return {"d3ray_student": summary["fingerprint_digest"]}
    if hub is not None:
        commit = os.path.basename(root.rstrip("/"))  # snapshot_download returns .../snapshots/<commit>
        return {"hub": hub.repo_id, "revision": commit}
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    stamp = tuple(sorted((p["name"], p.get("size"), str(p.get("mtime") or p.get("LastModified") or p.get("ETag")))
                         for p in fs.ls(root, detail=True)))
    return _directory_identity(root, protocol, stamp)
