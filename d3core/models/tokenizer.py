"""A checkpoint's HF tokenizer, with remote-code tokenizers behind an explicit opt-in.

Some official checkpoints define their tokenizer in Python shipped with the weights
(Dream-org/Dream-v0-Instruct-7B: ``tokenization_dream.py``, named by ``auto_map`` in
``tokenizer_config.json``). Running that file is what ``trust_remote_code=True`` means in
transformers and vLLM, and as there it is off by default: :func:`check_remote_code` refuses
such a tokenizer unless asked, with an error that names the flag. The check reads only
``tokenizer_config.json``, so drivers run it before any work starts.

:func:`load_tokenizer` accepts every checkpoint reference :mod:`d3core.models.hub` does;
tokenizer files in remote fsspec storage (``s3://``, ``gs://``, ...) are copied to a local
directory first, since ``AutoTokenizer`` reads local files only.
"""

from __future__ import annotations

import atexit
import fnmatch
import json
import logging
import shutil
import tempfile

import fsspec

from d3core.models.hub import resolve_checkpoint

logger = logging.getLogger(__name__)

TOKENIZER_CONFIG = "tokenizer_config.json"
# Files that make up a tokenizer in the HF layout (the union of what LLaDA-8B-Instruct and
# Dream-v0-Instruct-7B ship, plus the other formats transformers reads).
TOKENIZER_PATTERNS = ("tokenizer.json", TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "*.tiktoken",
                      "chat_template.jinja", "chat_template.json")
FLAG = "--trust-remote-code"

_LOCAL_COPIES: dict[str, str] = {}


class RemoteCodeError(ValueError):
    """A tokenizer that needs its checkpoint's Python code was loaded without ``trust_remote_code``."""


def _root(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(uri)
    return fs, root.rstrip("/")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def read_tokenizer_config(uri: str) -> dict:
    """``tokenizer_config.json`` of the checkpoint directory ``uri`` (an empty dict when absent)."""
    fs, root = _root(uri)
    path = f"{root}/{TOKENIZER_CONFIG}"
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as f:
        return json.load(f)


def remote_code_modules(tokenizer_config: dict) -> list[str]:
    """The ``module.Class`` names a tokenizer config's ``auto_map`` asks transformers to import."""
    entry = tokenizer_config.get("auto_map", {}).get("AutoTokenizer")
    names = entry if isinstance(entry, list) else [entry]
    return [name for name in names if isinstance(name, str) and name]


def code_files(tokenizer_config: dict) -> list[str]:
    """The Python files (``tokenization_dream.py``) a remote-code tokenizer is defined in."""
    return sorted({name.split("--")[-1].split(".")[0] + ".py" for name in remote_code_modules(tokenizer_config)})


def check_remote_code(uri: str, trust_remote_code: bool, flag: str = FLAG) -> list[str]:
    """Refuse a remote-code tokenizer at ``uri`` unless ``trust_remote_code``; returns its classes."""
    classes = remote_code_modules(read_tokenizer_config(uri))
    if classes and not trust_remote_code:
        raise RemoteCodeError(
            f"the tokenizer at {uri!r} is defined by code shipped with the checkpoint ({', '.join(classes)} in "
            f"{', '.join(code_files(read_tokenizer_config(uri)))}), and trust_remote_code is off: review that "
            f"file, then pass {flag} to run it"
        )
    return classes


def tokenizer_file_names(uri: str) -> list[str]:
    """Names of the tokenizer files in the checkpoint directory ``uri``, remote-code modules included."""
    fs, root = _root(uri)
    present = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    wanted = [*TOKENIZER_PATTERNS, *code_files(read_tokenizer_config(uri))]
    return sorted(name for name in present if any(fnmatch.fnmatch(name, pat) for pat in wanted))


def local_tokenizer_dir(uri: str) -> str:
    """A local directory holding the tokenizer files of ``uri`` (itself when it is local)."""
    fs, root = _root(uri)
    if _is_local(fs):
        return root
    if uri not in _LOCAL_COPIES:
        target = tempfile.mkdtemp(prefix="d3ray-tokenizer-")
        atexit.register(shutil.rmtree, target, ignore_errors=True)  # a per-process cache of small files
        for name in tokenizer_file_names(uri):
            fs.get_file(f"{root}/{name}", f"{target}/{name}")
        logger.info("copied the tokenizer files of %s to %s", uri, target)
        _LOCAL_COPIES[uri] = target
    return _LOCAL_COPIES[uri]


def load_tokenizer(ref: str, trust_remote_code: bool = False, flag: str = FLAG):
    """``AutoTokenizer`` for the checkpoint ``ref`` (path, fsspec URI, hub id or ``hf://`` URI)."""
    from transformers import AutoTokenizer, PretrainedConfig

    uri = resolve_checkpoint(ref, weights=False, trust_remote_code=trust_remote_code)
    check_remote_code(uri, trust_remote_code, flag)
    extra = {}
    tokenizer_config = read_tokenizer_config(uri)
    if tokenizer_config.get("tokenizer_class") or remote_code_modules(tokenizer_config):
        # The tokenizer config names the class: don't let transformers read config.json for it, whose model
        # type (llada, dream) it does not know and warns about ("a model of type `llada` ... of type ``").
        extra["config"] = PretrainedConfig()
    return AutoTokenizer.from_pretrained(local_tokenizer_dir(uri), trust_remote_code=trust_remote_code, **extra)
