"""fsspec helpers every pipeline shares: join, exists, read/write JSON atomically, output-directory checks.

Every location in d3ray is an fsspec URI (a local path, ``file://``, ``s3://``, ``gs://``,
``memory://``). Writers write a temporary name and rename it, so a reader never sees half a
file; temporary names start with ``.tmp-`` and no reader ever lists them.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import fsspec

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


def fs_root(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path on it (no trailing slash)."""
    fs, root = fsspec.core.url_to_fs(uri)
    return fs, root.rstrip("/") or root


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, root = fs_root(uri)
    return fs.exists(root)


def is_file(uri: str) -> bool:
    fs, root = fs_root(uri)
    return fs.exists(root) and fs.isfile(root)


def read_json(uri: str) -> Any | None:
    """The JSON document at ``uri``, or None when there is none."""
    fs, root = fs_root(uri)
    if not fs.exists(root):
        return None
    with fs.open(root, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{uri}: not valid JSON ({err}); d3ray writes it atomically, so something else damaged "
                             "it: redo that stage with --overwrite, or write to a new location") from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    fs, root = fs_root(uri)
    parent, name = root.rsplit("/", 1) if "/" in root else ("", root)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/{TMP_PREFIX}{os.getpid()}-{name}" if parent else f"{TMP_PREFIX}{os.getpid()}-{name}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, root)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, default=str).encode())


def remove_tmp_files(uri: str) -> list[str]:
    """Delete leftover temporary files (``.tmp-*``) of a crashed writer directly under ``uri``."""
    fs, root = fs_root(uri)
    if not fs.exists(root):
        return []
    stale = [p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith(TMP_PREFIX)]
    for path in stale:
        fs.rm(path, recursive=True)
        logger.info("removed the leftover temporary file %s", path)
    return stale


def require_directory(uri: str, what: str) -> None:
    """Refuse, before any work, an output location that is an existing file."""
    if is_file(uri):
        raise ValueError(f"{what}={uri!r} is a file: it must name a directory (new or one d3ray wrote); "
                         "pass a directory path or URI")


def remove_tree(uri: str) -> None:
    fs, root = fs_root(uri)
    if fs.exists(root):
        fs.rm(root, recursive=True)
