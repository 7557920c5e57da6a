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

With the cells' per-sample records (``samples``), each system's AUP gets a 95% paired-bootstrap
interval and each task lists the pairs of systems whose AUP difference is within noise
(:mod:`d3core.eval.stats`); a cell's ``accuracy_ci`` (computed where the cell ran) is shown beside
its accuracy. Each code-task cell also lists the sandbox confinements its verdicts name, and a cell
judged by any sandbox without the seccomp filter is flagged (``weak_confinement``).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Iterable, Sequence

from d3core.eval.aup import Point, aup, kept_points
from d3core.eval.records import SECCOMP, confinements
from d3core.eval.stats import ITERATIONS, PointSamples, aup_noise

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


def _noise(task: str, systems: dict[str, list[dict]], rows: dict[int, list[dict]], cell_index: dict[int, int],
           anchor_vanilla: bool, unit_tpf_single: bool, iters: int, seed: int):
    """The AUP noise of one task's systems, or None where a cell has no per-sample records."""
    pts: dict[str, list[PointSamples]] = {}
    ids = None
    for system, group in systems.items():
        model, sampler = system.split("/", 1)
        cells = list(group)
        anchor = systems.get(f"{model}/vanilla") if anchor_vanilla and sampler not in SINGLE_POINT else None
        for c in ([anchor[0]] if anchor else []) + cells:
            recs = rows.get(cell_index[id(c)])
            if not recs:
                logger.info("task %s: cell %s has no per-sample records; AUP intervals left out", task, system)
                return None
            these = [r["id"] for r in recs]
            if ids is None:
                ids = these
            elif these != ids:
                logger.warning("task %s: cells decoded different examples; AUP intervals left out", task)
                return None
            unit = (unit_tpf_single and c["sampler"] in SINGLE_POINT) or (anchor is not None and c is anchor[0])
            pts.setdefault(system, []).append(PointSamples.of([r["correct"] for r in recs],
                                                              [r["generated_tokens"] for r in recs],
                                                              [r["nfe"] for r in recs], unit_tpf=unit))
    return aup_noise(pts, iters=iters, seed=seed)


def build_report(cells: Sequence[dict], anchor_vanilla: bool = False, unit_tpf_single: bool = True,
                 meta: dict | None = None, samples: Sequence[list[dict] | None] | None = None,
                 bootstrap_iters: int = ITERATIONS, seed: int = 0) -> dict:
    """The report dict: ``aup[task][system]``, ``y_max[task]``, ``operating_point[task][system]``, cells.

    ``samples[i]``: the per-sample records of ``cells[i]`` (each with ``id``, ``correct``,
    ``generated_tokens``, ``nfe``), or None; with them the report adds ``aup_ci[task][system]`` and
    ``within_noise[task]`` (pairs of systems whose AUP difference's 95% interval contains 0), and
    for cells whose records carry sandbox verdicts, ``confinement`` (one entry per such cell: its
    distinct confinements and whether all load seccomp) and ``weak_confinement`` (those that do not).
    """
    if not cells:
        raise ValueError("no cells: run at least one evaluation cell before building a report")
    by_task: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        by_task[c["task"]][system_name(c)].append(c)
    report: dict = {"meta": dict(meta or {}), "conventions": {"anchor_vanilla": anchor_vanilla,
                                                              "unit_tpf_single": unit_tpf_single, "alpha": 3.0,
                                                              "max_drop": 5.0},
                    "y_max": {}, "aup": {}, "operating_point": {}, "points": {}, "cells": list(cells),
                    "aup_ci": {}, "within_noise": {}}
    rows = {i: list(r) for i, r in enumerate(samples or []) if r}
    cell_index = {id(c): i for i, c in enumerate(cells)}
    report["confinement"] = _confinement(cells, rows)
    report["weak_confinement"] = [e for e in report["confinement"] if not e["seccomp"]]
    for task, systems in by_task.items():
        noise = _noise(task, systems, rows, cell_index, anchor_vanilla, unit_tpf_single, bootstrap_iters, seed) \
            if rows else None
        if noise is not None:
            report["aup_ci"][task] = {s: list(v) for s, v in noise.ci.items()}
            report["within_noise"][task] = [list(pair) for pair in noise.within_noise]
            report["conventions"]["bootstrap"] = {"iters": noise.iters, "level": noise.level, "seed": seed,
                                                  "paired": True}
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
                "mean_nfe": float(best["mean_nfe"]), "backend": best.get("backend", "d3core"),
                "forwards_per_token": _forwards(best), "accuracy_ci": _percent_ci(best.get("accuracy_ci"))}
    tasks = list(report["aup"])
    systems_all = _order({s for t in tasks for s in report["aup"][t]}, cells)
    report["average_aup"] = {s: sum(report["aup"][t].get(s, 0.0) for t in tasks) / len(tasks) for s in systems_all}
    return report


def _confinement(cells: Sequence[dict], rows: dict[int, list[dict]]) -> list[dict]:
    """Per cell with sandbox verdicts: its distinct confinements, and whether every one loads seccomp."""
    out = []
    for i, c in enumerate(cells):
        found = confinements(rows.get(i, []))
        if found:
            out.append({"task": c["task"], "system": system_name(c), "threshold": c.get("threshold"),
                        "confinements": found, "seccomp": all(SECCOMP in f for f in found)})
    return out


def _forwards(cell: dict) -> float | None:
    """Token-forwards per committed token of a cell (None where its backend does not count them, e.g. vLLM)."""
    value = cell.get("forwards_per_token")
    return float(value) if value else None


def _percent_ci(ci) -> list[float] | None:
    return None if not ci else [100.0 * float(ci[0]), 100.0 * float(ci[1])]


def provenance_line(p: dict) -> str:
    """One line naming the code, libraries, hardware and seeds of a run (from :func:`records.run_metadata`)."""
    git = p.get("git") or {}
    sha = (git.get("sha") or "no git checkout")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    libs = ", ".join(f"{k} {v}" for k, v in (p.get("libraries") or {}).items())
    hw = p.get("hardware") or {}
    gpus = ", ".join(hw.get("gpus") or []) or "no GPU"
    seeds = ", ".join(f"{k}={v}" for k, v in (p.get("seeds") or {}).items()) or "none"
    return (f"Provenance: d3ray {p.get('d3ray')} at git {sha}; Python {p.get('python')}; {libs}; "
            f"{hw.get('cpu')} ({hw.get('cores')} cores), {gpus}; seeds {seeds}.")


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt_ci(ci, digits: int = 1) -> str:
    return "" if not ci else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _noise_partners(report: dict, task: str, system: str) -> str:
    pairs = report.get("within_noise", {}).get(task)
    if pairs is None:
        return "n/a"
    partners = [b if a == system else a for a, b in pairs if system in (a, b)]
    return ", ".join(partners) or "none"


def to_markdown(report: dict) -> str:
    """A leaderboard-style markdown page: AUP per method and task, then each task's operating points."""
    tasks = list(report["aup"])
    cells = report["cells"]
    systems = _order({s for t in tasks for s in report["aup"][t]}, cells)
    meta = report.get("meta", {})
    lines = ["# d3ray evaluation: accuracy under parallelism", ""]
    plain = {k: v for k, v in meta.items() if not isinstance(v, (dict, list))}
    if plain:
        lines += [", ".join(f"{k}: {v}" for k, v in plain.items()), ""]
    if meta.get("provenance"):
        lines += [provenance_line(meta["provenance"]), ""]
    weak = report.get("weak_confinement") or []
    if weak:
        names = "; ".join(f"{e['task']} {e['system']}{_at(e['threshold'])} ({', '.join(e['confinements'])})"
                          for e in weak)
        lines += [f"**Weaker sandbox:** {len(weak)} code cell(s) were judged without the seccomp filter "
                  f"(`{SECCOMP}`): {names}. See 'Sandbox confinement' below.", ""]
    conv = report["conventions"]
    lines += [f"AUP as d3LLM defines it (alpha {conv['alpha']}, {conv['max_drop']}-point drop filter, y_max over "
              f"all systems on the task); single-point decoders at TPF 1: {conv['unit_tpf_single']}; parallel "
              f"curves anchored at the model's vanilla accuracy: {conv['anchor_vanilla']}.", "",
              "## AUP", "", "| method | " + " | ".join(tasks) + " | avg AUP |",
              "|---|" + "---|" * (len(tasks) + 1)]
    for s in systems:
        row = [_fmt(report["aup"][t].get(s)) + _fmt_ci(report.get("aup_ci", {}).get(t, {}).get(s)) for t in tasks]
        lines.append(f"| {s} | " + " | ".join(row) + f" | {_fmt(report['average_aup'].get(s))} |")
    boot = conv.get("bootstrap")
    if boot:
        lines += ["", f"Brackets: {100 * boot['level']:.0f}% paired-bootstrap intervals ({boot['iters']} resamples of "
                  "the examples, the same resample for every cell of a task). Two systems are *within noise* when "
                  "the interval of their AUP difference contains 0 (column 'within noise of' below)."]
    for t in tasks:
        lines += ["", f"## {t} (y_max {report['y_max'][t]:.2f}%)", "",
                  "| method | threshold | accuracy (%) [95% CI] | TPF | NFE / problem | token-forwards / token "
                  "| tokens/s | AUP | within noise of |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in systems:
            op = report["operating_point"][t].get(s)
            if op is None:
                continue
            thr = "-" if op["threshold"] is None else f"{op['threshold']:g}"
            lines.append(f"| {s} | {thr} | {op['accuracy']:.2f}{_fmt_ci(op.get('accuracy_ci'))} | {op['tpf']:.2f} | "
                         f"{op['mean_nfe']:.1f} | {_fmt(op.get('forwards_per_token'))} | "
                         f"{op['tokens_per_second']:.0f} | {_fmt(report['aup'][t].get(s))} | "
                         f"{_noise_partners(report, t, s)} |")
    lines += ["", "## Every point", "", "| task | method | threshold | accuracy (%) [95% CI] | TPF | NFE / problem | "
              "token-forwards / token | tokens/s | backend |", "|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["task"], system_name(c), c.get("threshold") or 0.0)):
        thr = "-" if c.get("threshold") is None else f"{c['threshold']:g}"
        ci = _fmt_ci(_percent_ci(c.get("accuracy_ci")))
        lines.append(f"| {c['task']} | {system_name(c)} | {thr} | {100 * c['accuracy']:.2f}{ci} | {c['tpf']:.2f} | "
                     f"{c['mean_nfe']:.1f} | {_fmt(_forwards(c))} | {c['tokens_per_second']:.0f} | "
                     f"{c.get('backend', 'd3core')} |")
    if report.get("confinement"):
        lines += ["", "## Sandbox confinement", "",
                  (f"The confinements the code cells' verdicts name (sandbox mode, then `+cgroup` and `{SECCOMP}` "
                   "where used)."), "", "| task | method | threshold | confinement | seccomp |",
                  "|---|---|---|---|---|"]
        for e in report["confinement"]:
            thr = "-" if e["threshold"] is None else f"{e['threshold']:g}"
            flag = "yes" if e["seccomp"] else "**no**"
            lines.append(f"| {e['task']} | {e['system']} | {thr} | {', '.join(e['confinements'])} | {flag} |")
    return "\n".join(lines) + "\n"


def _at(threshold) -> str:
    return "" if threshold is None else f" at {threshold:g}"
