"""Where a checkpoint reference points: a local path, an fsspec URI, or a Hugging Face hub repo.

Every entry point names checkpoints the same way, and :func:`resolve_checkpoint` turns the
name into something fsspec can open:

- a path that exists, or any URI with a scheme other than ``hf://`` (``s3://``, ``gs://``,
  ``memory://``, ``file://``), is returned unchanged;
- ``hf://ORG/NAME`` or ``hf://ORG/NAME@REVISION``, and a bare ``ORG/NAME`` that is not a local
  path, name a hub model repo: its files are fetched with ``huggingface_hub.snapshot_download``
  into the HF cache (``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` reads the cache only)
  and the snapshot directory is returned.

Python files (``*.py``: tokenizer classes, modeling code) are fetched only with
``trust_remote_code=True``, so code that nobody asked to run never lands on the machine.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

HF_SCHEME = "hf://"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")

# What a checkpoint directory needs besides its weights: configs, tokenizer files, model card, license.
METADATA_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "README.md", "LICENSE*")
WEIGHT_PATTERNS = ("*.safetensors",)
CODE_PATTERNS = ("*.py",)


@dataclass(frozen=True)
class HubRef:
    """A model repo on the Hugging Face hub, at an optional revision (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    def __post_init__(self) -> None:
        if not _REPO_ID.fullmatch(self.repo_id):
            raise ValueError(f"hub repo id {self.repo_id!r} is not of the form ORG/NAME: write e.g. "
                             "GSAI-ML/LLaDA-8B-Instruct or hf://GSAI-ML/LLaDA-8B-Instruct@main")
        if self.revision is not None and not self.revision:
            raise ValueError(f"hub reference {self.repo_id}@ has an empty revision: drop the '@' or name one")

    @property
    def uri(self) -> str:
        return HF_SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_ref(ref: str) -> HubRef | None:
    """The hub repo ``ref`` names, or None when it is a local path or another fsspec URI."""
    if ref.startswith(HF_SCHEME):
        body = ref[len(HF_SCHEME):].rstrip("/")
        repo_id, _, revision = body.partition("@")
        if repo_id.count("/") != 1:
            raise ValueError(f"{ref!r}: an hf:// URI names a model repo, hf://ORG/NAME[@REVISION]; for a file "
                             "inside a repo download the repo and point at the directory")
        return HubRef(repo_id, revision if "@" in body else None)
    if "://" in ref or os.path.exists(ref) or not _REPO_ID.fullmatch(ref):
        return None
    return HubRef(ref)


def allow_patterns(weights: bool, trust_remote_code: bool) -> list[str]:
    """The file patterns a hub download fetches."""
    return [*METADATA_PATTERNS, *(WEIGHT_PATTERNS if weights else ()), *(CODE_PATTERNS if trust_remote_code else ())]


def resolve_checkpoint(ref: str, weights: bool = True, trust_remote_code: bool = False) -> str:
    """A path or fsspec URI for the checkpoint ``ref`` names (hub repos are fetched into the HF cache).

    ``weights=False`` fetches only configs and tokenizer files (what a driver needs to check a
    run before any worker loads the model).
    """
    hub = parse_hub_ref(ref)
    if hub is None:
        return ref
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = allow_patterns(weights, trust_remote_code)
    try:
        path = snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=patterns)
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{ref!r} is not a local path and the hub repo {hub.repo_id} is not in the HF cache "
            f"({err.__class__.__name__}; HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): download it "
            f"where the hub is reachable (`hf download {hub.repo_id}`), or pass a local directory or fsspec URI"
        ) from err
    except HfHubHTTPError as err:
        raise FileNotFoundError(
            f"{ref!r}: the Hugging Face hub refused {hub.repo_id} ({err.__class__.__name__}: {str(err)[:200]}); "
            "check the repo id and revision, and set HF_TOKEN for gated or private repos"
        ) from err
    logger.info("resolved %s to %s (%s)", ref, path, ", ".join(patterns))
    return path
