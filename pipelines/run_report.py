"""The main job's report: the machine it ran on, the student against the teacher, ``report.md``, and the
evaluation table of the student's model card.

:func:`pipelines.full.run` gathers the stages' results into a summary dict; everything here reads that
summary (and the evaluation's own report) and writes nothing.
"""

from __future__ import annotations

import os
import platform
from typing import Sequence

# The stages in the order they run (and are listed in report.md).
STAGES = ("pretrain", "trajectories", "distill", "evaluate", "serve")
# The samplers that commit several tokens per step: the student should beat the teacher on each.
PARALLEL_SAMPLERS = ("fast_dllm", "dparallel", "d3llm")


def hardware() -> dict:
    """The driver's machine: CPU, cores, torch version and GPUs."""
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def compare(evaluation: dict, samplers: Sequence[str] = PARALLEL_SAMPLERS) -> dict:
    """Per task and parallel sampler: student AUP, teacher AUP, and whether the student's is higher."""
    out: dict = {}
    for task, systems in evaluation.get("aup", {}).items():
        for sampler in samplers:
            s, t = systems.get(f"student/{sampler}"), systems.get(f"teacher/{sampler}")
            if s is not None and t is not None:
                out.setdefault(task, {})[sampler] = {"student": round(s, 2), "teacher": round(t, 2),
                                                     "student_higher": s > t}
    return out


def card_evaluation(report: dict) -> str:
    """The run's AUP table for the student's model card (student and teacher rows, every task)."""
    tasks = list(report["aup"])
    systems = sorted({s for t in tasks for s in report["aup"][t]})
    meta = report.get("meta", {})
    lines = [f"AUP (accuracy under parallelism, as d3LLM defines it) from this run: {meta.get('n', '?')} problems "
             f"per task, generation length {meta.get('gen_length', '?')}, block {meta.get('block_length', '?')}, "
             f"on {meta.get('hardware', '?')}.", "", "| system | " + " | ".join(tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for system in systems:
        cells = [report["aup"][t].get(system) for t in tasks]
        lines.append(f"| {system} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in cells) + " |")
    return "\n".join(lines)


def markdown(summary: dict, evaluation: dict, preset: str) -> str:
    """``report.md`` of a run of the recipe ``preset``: stages, student vs teacher, the evaluation, the smoke test."""
    hw = summary["hardware"]
    lines = [f"# d3ray run ({preset})", "",
             f"Hardware: {hw['cpu']}, {hw['cores']} CPU cores, GPUs: {', '.join(hw['gpus']) or 'none'}; "
             f"torch {hw['torch']}. Teacher: `{summary['teacher']}`.", "",
             "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    for name in STAGES:
        st = summary["stages"].get(name)
        if st:
            lines.append(f"| {name} | {st.get('status')} | {st.get('seconds', '')} |")
    lines += ["", "## Student vs teacher (AUP)", "", "| task | sampler | teacher AUP | student AUP | student higher |",
              "|---|---|---|---|---|"]
    for task, samplers in summary["student_beats_teacher"].items():
        for sampler, row in samplers.items():
            lines.append(f"| {task} | {sampler} | {row['teacher']:.1f} | {row['student']:.1f} | "
                         f"{'yes' if row['student_higher'] else 'NO'} |")
    if summary.get("provenance"):
        from d3core.eval.report import provenance_line

        lines += ["", provenance_line(summary["provenance"])]
    if evaluation:
        from d3core.eval.report import to_markdown

        lines += ["", "## Evaluation", "", "![accuracy vs TPF](eval/aup.png)", "",
                  f"Per-sample records (prompt, output, extracted answer, verdict, NFE, unmask steps): "
                  f"`eval/cells/*.samples.jsonl`, {len(evaluation.get('samples', {}))} cells.", "",
                  to_markdown(evaluation)]
    serve = summary["stages"].get("serve", {}).get("result")
    if serve:
        lines += ["", "## Serve smoke test", "", f"`{serve['model']}` answered: {serve['text']!r} "
                  f"(usage {serve['usage']})"]
    return "\n".join(lines) + "\n"
