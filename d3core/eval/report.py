"""Turn per-cell evaluation results into the AUP report (dict + markdown leaderboard).

A *cell* is one (model, sampler, threshold, task) evaluation, a dict with at least ``model``,
``sampler``, ``threshold`` (None for single-point decoders), ``task``, ``accuracy`` (fraction),
``tpf``, ``tokens_per_second`` and ``mean_nfe``. A *system* is ``"{model}/{sampler}"``.

AUP per system and task follows d3LLM (:mod:`d3core.eval.aup`), with two conventions of its
published numbers, both switchable:

* ``unit_tpf_single`` -- one-token-per-step decoders (``vanilla``, the AR baseline) enter AUP at
  TPF 1 (their measured TPF, shown in the tables, is a little below 1 because EOS padding and
  the final EOS are not counted as generated tokens);
* ``anchor_vanilla`` (off by default) -- a parallel sampler's curve starts at its model's vanilla
  accuracy at TPF 1, as every published d3LLM curve (two points each) starts at the
  one-token-per-step accuracy. Off, a curve is the sampler's own threshold sweep, whose
  lowest-TPF point then sets the 5-point drop floor.

``y_max`` of a task is the best accuracy of any cell on it (AR baseline included).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Iterable, Sequence

from d3core.eval.aup import Point, aup, kept_points

logger = logging.getLogger(__name__)

SINGLE_POINT = frozenset({"vanilla", "ar"})


def system_name(cell: dict) -> str:
    return f"{cell['model']}/{cell['sampler']}"


def _point(cell: dict, unit_tpf_single: bool) -> Point | None:
    tpf = 1.0 if unit_tpf_single and cell["sampler"] in SINGLE_POINT else float(cell["tpf"])
    if not (math.isfinite(tpf) and tpf > 0):
        logger.warning("cell %s on %s has TPF %s: left out of AUP", system_name(cell), cell["task"], tpf)
        return None
    return Point(tpf, 100.0 * float(cell["accuracy"]))


def _order(systems: Iterable[str], cells: Sequence[dict]) -> list[str]:
    """Systems in first-seen order of models, single-point decoders first within a model."""
    first = {}
    for i, c in enumerate(cells):
        first.setdefault(c["model"], i)
    rank = {"ar": 0, "vanilla": 1}
    return sorted(set(systems), key=lambda s: (first.get(s.split("/")[0], 0), rank.get(s.split("/", 1)[1], 2), s))


def build_report(cells: Sequence[dict], anchor_vanilla: bool = False, unit_tpf_single: bool = True,
                 meta: dict | None = None) -> dict:
    """The report dict: ``aup[task][system]``, ``y_max[task]``, ``operating_point[task][system]``, cells."""
    if not cells:
        raise ValueError("no cells: run at least one evaluation cell before building a report")
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        by_task[c["task"]][system_name(c)].append(c)
    report: dict = {"meta": dict(meta or {}), "conventions": {"anchor_vanilla": anchor_vanilla,
                                                              "unit_tpf_single": unit_tpf_single, "alpha": 3.0,
                                                              "max_drop": 5.0},
                    "y_max": {}, "aup": {}, "operating_point": {}, "points": {}, "cells": list(cells)}
    for task, systems in by_task.items():
        y_max = max(100.0 * float(c["accuracy"]) for group in systems.values() for c in group)
        report["y_max"][task] = y_max
        report["aup"][task], report["operating_point"][task], report["points"][task] = {}, {}, {}
        for system in _order(systems, cells):
            group = systems[system]
            own = [(p, c) for c in group if (p := _point(c, unit_tpf_single)) is not None]
            points = [p for p, _ in own]
            model, sampler = system.split("/", 1)
            anchor = systems.get(f"{model}/vanilla") if anchor_vanilla and sampler not in SINGLE_POINT else None
            if anchor:
                points = [Point(1.0, 100.0 * float(anchor[0]["accuracy"]))] + points
            report["points"][task][system] = [[p.tpf, p.accuracy] for p in points]
            if not points:
                continue
            report["aup"][task][system] = aup(points, y_max) if y_max > 0 else 0.0
            floor = kept_points(points)[0].accuracy - 5.0 if y_max > 0 else -1.0
            kept = [(p, c) for p, c in own if p.accuracy >= floor] or own
            best_point, best = max(kept, key=lambda pc: (pc[0].tpf, pc[0].accuracy))
            report["operating_point"][task][system] = {
                "threshold": best.get("threshold"), "accuracy": 100.0 * float(best["accuracy"]),
                "tpf": float(best["tpf"]), "tokens_per_second": float(best["tokens_per_second"]),
                "mean_nfe": float(best["mean_nfe"]), "backend": best.get("backend", "d3core")}
    tasks = list(report["aup"])
    systems_all = _order({s for t in tasks for s in report["aup"][t]}, cells)
    report["average_aup"] = {s: sum(report["aup"][t].get(s, 0.0) for t in tasks) / len(tasks) for s in systems_all}
    return report


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def to_markdown(report: dict) -> str:
    """A leaderboard-style markdown page: AUP per method and task, then each task's operating points."""
    tasks = list(report["aup"])
    cells = report["cells"]
    systems = _order({s for t in tasks for s in report["aup"][t]}, cells)
    meta = report.get("meta", {})
    lines = ["# d3ray evaluation: accuracy under parallelism", ""]
    if meta:
        lines += [", ".join(f"{k}: {v}" for k, v in meta.items()), ""]
    conv = report["conventions"]
    lines += [f"AUP as d3LLM defines it (alpha {conv['alpha']}, {conv['max_drop']}-point drop filter, y_max over "
              f"all systems on the task); single-point decoders at TPF 1: {conv['unit_tpf_single']}; parallel "
              f"curves anchored at the model's vanilla accuracy: {conv['anchor_vanilla']}.", "",
              "## AUP", "", "| method | " + " | ".join(tasks) + " | avg AUP |",
              "|---|" + "---|" * (len(tasks) + 1)]
    for s in systems:
        row = [_fmt(report["aup"][t].get(s)) for t in tasks]
        lines.append(f"| {s} | " + " | ".join(row) + f" | {_fmt(report['average_aup'].get(s))} |")
    for t in tasks:
        lines += ["", f"## {t} (y_max {report['y_max'][t]:.2f}%)", "",
                  "| method | threshold | accuracy (%) | TPF | NFE / problem | tokens/s | AUP |",
                  "|---|---|---|---|---|---|---|"]
        for s in systems:
            op = report["operating_point"][t].get(s)
            if op is None:
                continue
            thr = "-" if op["threshold"] is None else f"{op['threshold']:g}"
            lines.append(f"| {s} | {thr} | {op['accuracy']:.2f} | {op['tpf']:.2f} | {op['mean_nfe']:.1f} | "
                         f"{op['tokens_per_second']:.0f} | {_fmt(report['aup'][t].get(s))} |")
    lines += ["", "## Every point", "", "| task | method | threshold | accuracy (%) | TPF | NFE / problem | "
              "tokens/s | backend |", "|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["task"], system_name(c), c.get("threshold") or 0.0)):
        thr = "-" if c.get("threshold") is None else f"{c['threshold']:g}"
        lines.append(f"| {c['task']} | {system_name(c)} | {thr} | {100 * c['accuracy']:.2f} | {c['tpf']:.2f} | "
                     f"{c['mean_nfe']:.1f} | {c['tokens_per_second']:.0f} | {c.get('backend', 'd3core')} |")
    return "\n".join(lines) + "\n"
