"""A student checkpoint that can be published as is (``hf upload REPO DIR``), in its teacher's layout.

What :func:`export_student` writes next to the weights, and where it comes from:

- ``config.json``: the teacher's own, with every official field kept (dropouts, ``use_cache``,
  ``precision``...), ``torch_dtype`` set to the dtype the weights are written in, and
  ``auto_map``. For a teacher on the hub, each ``auto_map`` entry points into the teacher's repo
  in transformers' ``REPO--module.Class`` form, so ``AutoModel.from_pretrained(dir,
  trust_remote_code=True)`` fetches the official modeling code and none is copied. A local
  teacher's ``*.py`` files are copied verbatim instead; a teacher without ``auto_map`` gets its
  architecture's official one (``d3core.models.llada.AUTO_MAP`` / ``dream.AUTO_MAP``).
- the tokenizer files, copied byte for byte (never re-saved, so transformers 4.x stacks read
  them as the teacher's), including a remote-code tokenizer's class file (Dream's
  ``tokenization_dream.py``); ``generation_config.json`` and ``LICENSE*`` likewise;
- weights as safetensors in the requested dtype, sharded with an index above the shard limit
  (5 GB, transformers' default), streamed shard by shard from a ``fetch`` callback;
- ``README.md``: a model card (base model, recipe, evaluation table, the teacher's license).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec
import torch

from d3core.models.checkpoint import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    dtype_name,
    load_config,
    official_specs,
    write_generation_config,
)
from d3core.models.hub import parse_hub_ref, resolve_checkpoint
from d3core.models.registry import get_architecture
from d3core.models.safetensors_io import DEFAULT_MAX_SHARD_BYTES, plan_shards, write_shards
from d3core.models.tokenizer import check_remote_code, tokenizer_file_names

logger = logging.getLogger(__name__)

README = "README.md"
EVAL_START, EVAL_END = "<!-- d3ray:evaluation -->", "<!-- /d3ray:evaluation -->"
_LICENSE_FILE = re.compile(r"LICEN[CS]E(\.\w+)?|NOTICE(\.\w+)?", re.I)


@dataclass(frozen=True)
class ModelCard:
    """What the README of an exported student says."""

    title: str
    base_model: str  # the teacher as given: hub id, hf:// URI, path or fsspec URI
    license: str | None  # SPDX-style id from the teacher's card ("mit", "apache-2.0"); None: unknown
    recipe: dict[str, Any] = field(default_factory=dict)
    evaluation: str = ""  # markdown (the run's AUP table); empty: not evaluated yet
    tags: tuple[str, ...] = ("d3ray", "diffusion-llm", "distillation", "d3llm", "dparallel")

    def render(self) -> str:
        hub = parse_hub_ref(self.base_model)
        front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
                 f"license: {self.license or 'other'}"]
        if hub is not None:
            front += [f"base_model: {hub.repo_id}", "base_model_relation: finetune"]
        front += ["tags:", *[f"- {t}" for t in self.tags], "---", ""]
        base = f"[{hub.repo_id}](https://huggingface.co/{hub.repo_id})" if hub else f"`{self.base_model}`"
        lines = [f"# {self.title}", "",
                 f"A parallel-decoding student of {base}, distilled with d3ray (d3LLM pseudo-trajectory "
                 "distillation with dParallel certainty forcing). Same architecture, tokenizer and file layout "
                 "as the base model.", "",
                 "## Use", "", "```python",
                 "from transformers import AutoModel, AutoTokenizer",
                 "model = AutoModel.from_pretrained(PATH, trust_remote_code=True)  # the base model's code",
                 "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
                 "# or natively, with d3ray's multi-block KV-cache samplers:",
                 "from d3core.models.checkpoint import load_pretrained",
                 "model = load_pretrained(PATH)", "```", "",
                 "## Recipe", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in self.recipe.items()]
        lines += ["", "## Evaluation", "", EVAL_START,
                  self.evaluation or "Not evaluated yet: run `pipelines/evaluate.py` (or `pipelines/full.py`, "
                                     "which adds the AUP table here).", EVAL_END, "",
                  "## License", "",
                  f"Inherited from the base model: `{self.license}`." if self.license else
                  "The base model declares no license in its model card: check its terms before publishing.", ""]
        return "\n".join(front + lines)


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict, bool)) or value is None else str(value)
    return text.replace("|", "\\|")


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(uri)
    return fs, root.rstrip("/")


def _names(uri: str) -> list[str]:
    fs, root = _fs(uri)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isfile(p))


def card_license(readme: str) -> str | None:
    """The ``license:`` of a model card's YAML front matter."""
    match = re.match(r"---\s*\n(.*?)\n---", readme, re.S)
    if not match:
        return None
    found = re.search(r"^license:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", match.group(1), re.M)
    return found.group(1) if found else None


def teacher_license(teacher_uri: str) -> str | None:
    fs, root = _fs(teacher_uri)
    path = f"{root}/{README}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return card_license(f.read())


def student_config(teacher_uri: str, teacher_ref: str, dtype: torch.dtype) -> dict[str, Any]:
    """The teacher's config.json for a student stored in ``dtype`` (auto_map pointed into the teacher's repo)."""
    fs, root = _fs(teacher_uri)
    with fs.open(f"{root}/{CONFIG_NAME}", "r") as f:
        raw = json.load(f)
    raw.pop("_name_or_path", None)
    hub = parse_hub_ref(teacher_ref)
    auto_map = raw.get("auto_map")
    if not auto_map:  # e.g. d3ray's own tiny teacher: the architecture's official classes, in its official repo
        cfg = load_config(teacher_uri)
        auto_map = get_architecture(cfg.arch).config_to_hf(cfg)["auto_map"]
    elif hub is not None:
        auto_map = {k: _in_repo(v, hub.repo_id) for k, v in auto_map.items()}
    raw["auto_map"] = auto_map
    raw["torch_dtype"] = dtype_name(dtype)
    if "dtype" in raw:  # the transformers 5 spelling, when the teacher was saved by it
        raw["dtype"] = dtype_name(dtype)
    return raw


def _in_repo(entry: Any, repo_id: str) -> Any:
    if isinstance(entry, list):
        return [_in_repo(e, repo_id) for e in entry]
    if isinstance(entry, str) and "--" not in entry:
        return f"{repo_id}--{entry}"
    return entry


def _copy(src_uri: str, dst_uri: str, names: list[str]) -> None:
    sfs, sroot = _fs(src_uri)
    dfs, droot = _fs(dst_uri)
    for name in names:
        with sfs.open(f"{sroot}/{name}", "rb") as src, dfs.open(f"{droot}/{name}", "wb") as dst:
            dst.write(src.read())


def export_student(out: str, teacher_ref: str, fetch: Callable, dtype: torch.dtype, card: ModelCard,
                   trust_remote_code: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write the student to ``out``; ``fetch(shard)`` returns its tensors by official name. Returns the file names.

    ``teacher_ref`` is resolved like any checkpoint reference (a hub teacher's configs and
    tokenizer come from the HF cache, not its weights). A teacher whose tokenizer is remote
    code is refused without ``trust_remote_code``, before anything is written.
    """
    teacher = resolve_checkpoint(teacher_ref, weights=False, trust_remote_code=trust_remote_code)
    check_remote_code(teacher, trust_remote_code)
    cfg = load_config(teacher)
    present = _names(teacher)
    copied = tokenizer_file_names(teacher)
    copied += [n for n in present if n == GENERATION_CONFIG_NAME or _LICENSE_FILE.fullmatch(n)]
    if parse_hub_ref(teacher_ref) is None:  # a local teacher's auto_map names its own files: ship them
        copied += [n for n in present if n.endswith(".py") and n not in copied]
    write_shards(out, plan_shards(official_specs(cfg, dtype), max_shard_bytes), fetch)
    dfs, droot = _fs(out)
    with dfs.open(f"{droot}/{CONFIG_NAME}", "w") as f:
        json.dump(student_config(teacher, teacher_ref, dtype), f, indent=2)
    _copy(teacher, out, sorted(set(copied)))
    if GENERATION_CONFIG_NAME not in present:
        write_generation_config(out, cfg)
    with dfs.open(f"{droot}/{README}", "w") as f:
        f.write(card.render())
    if load_config(out) != cfg:
        raise RuntimeError(f"the export at {out} does not read back as the teacher's architecture: this is a bug")
    logger.info("exported the student to %s (%s, %s)", out, dtype_name(dtype), ", ".join(sorted(set(copied))))
    return _names(out)


def set_evaluation(out: str, markdown: str) -> None:
    """Replace the evaluation section of the model card in ``out`` (after the run's evaluation stage)."""
    fs, root = _fs(out)
    path = f"{root}/{README}"
    with fs.open(path, "r") as f:
        text = f.read()
    if EVAL_START not in text or EVAL_END not in text:
        raise ValueError(f"{path} has no d3ray evaluation section ({EVAL_START} ... {EVAL_END}): was it written by "
                         "d3core.models.export?")
    head, rest = text.split(EVAL_START, 1)
    tail = rest.split(EVAL_END, 1)[1]
    with fs.open(path, "w") as f:
        f.write(f"{head}{EVAL_START}\n{markdown.strip()}\n{EVAL_END}{tail}")


def push_to_hub(out: str, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload the export at ``out`` (a local directory) to the model repo ``repo_id``; returns the commit URL."""
    from huggingface_hub import HfApi

    if "://" in out and not out.startswith("file://"):
        raise ValueError(f"push_to_hub uploads a local directory, but out={out!r} is remote: download it first "
                         f"(or run `hf upload {repo_id} <local copy>`)")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=out.removeprefix("file://"),
                             commit_message="Upload d3ray distilled student")
    logger.info("pushed %s to %s", out, repo_id)
    return str(getattr(info, "commit_url", info))
