"""One evaluation cell, in its Ray task: load the cell's model, decode the task's examples with the cell's
sampler params, score them, and return the cell's record.

:func:`run_cell` is what :func:`pipelines.evaluate.run_cells` sends to Ray, with the evaluation's
config and the :class:`~pipelines.evaluate.Cell` (its :class:`~pipelines.sweeps.SweepPoint`
carries the params built on the driver). It writes nothing: the driver writes each record once,
from the attempt that returned.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from typing import Protocol

from pipelines.sweeps import AR, SweepPoint

logger = logging.getLogger("d3ray.evaluate")


class CellSettings(Protocol):
    """What a cell reads of :class:`pipelines.evaluate.EvaluateConfig` (this module sits below the stage)."""

    models: dict[str, str]
    use_vllm: str
    seed: int
    n: int
    batch_size: int
    prompt_style: str
    trust_remote_code: bool
    threads_per_cell: int
    num_gpus_per_cell: float
    sandbox_timeout_s: float
    code_workers: int


class CellSpec(Protocol):
    """What a cell reads of :class:`pipelines.evaluate.Cell` (a frozen dataclass, so ``dataclasses.replace`` works)."""

    uri: str
    point: SweepPoint
    task: str

    @property
    def sampler(self) -> str: ...

    def record(self) -> dict: ...


def _ar_backend(cfg: CellSettings, cell: CellSpec, device: str):
    """(model, sampler, backend name): vLLM when allowed and importable, else d3core's ``ar``."""
    from d3core.samplers import get_sampler

    if cfg.use_vllm != "off":
        try:
            from d3core.eval.vllm_ar import VLLM_SAMPLER, VLLMModel

            return VLLMModel(cell.uri, seed=cfg.seed, dtype="auto" if device == "cuda" else "float32"), \
                VLLM_SAMPLER, "vllm"
        except (ImportError, OSError, RuntimeError) as err:  # vllm absent or broken in this environment
            if cfg.use_vllm == "on":
                raise RuntimeError(f"use_vllm='on' but vLLM could not start ({err}): install the 'vllm' extra "
                                   "or set use_vllm='auto' to fall back to the ar sampler") from err
            logger.info("vLLM unavailable (%s): AR baseline via d3core's ar sampler", type(err).__name__)
    from d3core.models.ar import load_ar_model

    return load_ar_model(cell.uri, device=device), get_sampler("ar"), "d3core-ar"


def run_cell(cfg: CellSettings, cell: CellSpec) -> dict:
    """Load the cell's model, decode the task's first ``n`` examples, score them; returns the cell record.

    The record's ``samples`` are the per-sample records (:mod:`d3core.eval.records`); the driver
    writes them beside the cell as JSON Lines.
    """
    import torch

    from d3core.eval.harness import evaluate_task
    from d3core.eval.sandbox import SandboxLimits
    from d3core.eval.stats import bootstrap_ci
    from d3core.eval.tasks import get_task
    from d3core.models.checkpoint import load_pretrained
    from d3core.models.hub import resolve_checkpoint
    from d3core.models.tokenizer import load_tokenizer
    from d3core.samplers import get_sampler

    torch.set_num_threads(cfg.threads_per_cell)
    device = "cuda" if cfg.num_gpus_per_cell > 0 and torch.cuda.is_available() else "cpu"
    t0, cpu0 = time.perf_counter(), time.process_time()
    tokenizer = load_tokenizer(cell.uri, cfg.trust_remote_code)
    if cell.sampler == AR:  # vLLM and transformers get the local snapshot of a hub id or hf:// URI
        local = dataclasses.replace(cell, uri=resolve_checkpoint(cell.uri, trust_remote_code=cfg.trust_remote_code))
        model, spec, backend = _ar_backend(cfg, local, device)
    else:
        model, spec, backend = load_pretrained(cell.uri, device=device), get_sampler(cell.sampler), "d3core"
    params = cell.point.params
    task = get_task(cell.task)
    examples = task.examples(cfg.n or None, seed=cfg.seed)
    report = evaluate_task(model, tokenizer, task, spec, params, examples, batch_size=cfg.batch_size,
                           generator=torch.Generator().manual_seed(cfg.seed), style=cfg.prompt_style,
                           limits=SandboxLimits(cpu_s=cfg.sandbox_timeout_s), code_workers=cfg.code_workers,
                           protocol=_ar_protocol(cfg, cell), truncate_prompts=True)
    hardware = torch.cuda.get_device_name() if device == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {cfg.threads_per_cell} torch thread(s)"
    return {**cell.record(), **report.summary(), "params": dataclasses.asdict(params),
            "backend": backend, "device": device, "hardware": hardware,
            "accuracy_ci": list(bootstrap_ci(report.correct, seed=cfg.seed)),
            "cell_seconds": time.perf_counter() - t0, "cell_cpu_seconds": time.process_time() - cpu0,
            "samples": [dataclasses.asdict(r) for r in report.samples]}


def _ar_protocol(cfg: CellSettings, cell: CellSpec):
    """The AR baseline's protocol on the leaderboard of the evaluated dLLMs' family (None: the harness decides)."""
    if cell.sampler != AR or cfg.prompt_style != "auto":
        return None
    from d3core.eval.protocols import ar_family_for, checkpoint_family, get_protocol
    from d3core.models.hub import resolve_checkpoint

    first = next(iter(cfg.models.values()))
    family = checkpoint_family(resolve_checkpoint(first, weights=False, trust_remote_code=cfg.trust_remote_code))
    return get_protocol(ar_family_for(family), cell.task)


