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
# The package extra that installs an fsspec implementation (pyproject.toml's optional dependencies).
EXTRAS = {"s3fs": "s3", "gcsfs": "gcs"}

# Several processes write one run directory (the driver, Ray workers, Ray Train's controller), but s3fs and
# gcsfs cache every directory listing for the life of a process by default: a driver then missed the
# checkpoints its workers wrote since it last listed, and a file rewritten since failed to read
# (s3fs.utils.FileExpired: the cached ETag no longer held). Object stores are listed uncached.
for _protocol in ("s3", "gs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def require_filesystem(uri: str, what: str) -> None:
    """Refuse, before any work, a URI whose fsspec implementation is not installed, naming what to install."""
    from fsspec.registry import known_implementations

    for part in uri.split("::"):  # chained URIs (simplecache::s3://...) need every filesystem of the chain
        protocol = fsspec.core.split_protocol(part)[0]
        if protocol is None:
            continue
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as err:
            package = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
            extra = EXTRAS.get(package)
            fix = f"pip install -e '.[{extra}]' (or pip install {package})" if extra else \
                f"pip install {package or 'the fsspec implementation of ' + protocol + '://'}"
            raise ValueError(f"{what}={uri!r}: {protocol}:// needs {package or 'a filesystem package'}, which is "
                             f"not installed: {fix}") from err
        except ValueError as err:  # fsspec's "Protocol not known"
            raise ValueError(f"{what}={uri!r}: {protocol}:// is no fsspec protocol ({err}); give a local path or a "
                             "URI such as s3://, gs://, memory://") from err


def require_filesystems(**uris: str | None) -> None:
    """:func:`require_filesystem` for every named location that is set (``out=cfg.out, prompts=cfg.prompts``)."""
    for what, uri in uris.items():
        if uri:
            require_filesystem(uri, what)


def fs_root(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path on it (no trailing slash); a missing fsspec implementation is a ValueError."""
    require_filesystem(uri, "location")
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
    """The JSON document at ``uri``, or None when there is none.

    One whole-object read (``cat_file``): a document another process replaces meanwhile is read whole,
    old or new, where a seek-and-read file object fails on S3 once the object it opened changes.
    """
    fs, root = fs_root(uri)
    try:
        data = fs.cat_file(root)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
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
