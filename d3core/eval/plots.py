"""Accuracy-vs-TPF plot of an AUP report: one panel per task, one curve per method."""

from __future__ import annotations

import io

from d3core.eval.report import SINGLE_POINT, system_name


def plot_report(report: dict) -> bytes:
    """PNG bytes: measured (TPF, accuracy %) points per method and task, AUP in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["aup"])
    if not tasks:
        raise ValueError("the report has no task with AUP: nothing to plot")
    fig, axes = plt.subplots(1, len(tasks), figsize=(9.0 * len(tasks), 4.8), squeeze=False)
    systems = sorted({system_name(c) for c in report["cells"]})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(systems)}
    for ax, task in zip(axes[0], tasks):
        by_system: dict[str, list[dict]] = {}
        for c in report["cells"]:
            if c["task"] == task:
                by_system.setdefault(system_name(c), []).append(c)
        for s, group in sorted(by_system.items()):
            group = sorted(group, key=lambda c: c["tpf"])
            xs = [c["tpf"] for c in group]
            ys = [100.0 * c["accuracy"] for c in group]
            label = f"{s} (AUP {report['aup'][task].get(s, float('nan')):.1f})"
            single = s.split("/", 1)[1] in SINGLE_POINT
            ax.plot(xs, ys, marker="*" if single else "o", markersize=13 if single else 6,
                    linestyle="none" if single else "-", color=colors[s], label=label)
            for c, x, y in zip(group, xs, ys):
                if c.get("threshold") is not None:
                    ax.annotate(f"{c['threshold']:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                                fontsize=7, color=colors[s])
        ax.axhline(report["y_max"][task], color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{task} (y_max {report['y_max'][task]:.1f}%)")
        ax.set_xlabel("TPF (generated tokens per forward)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Accuracy vs parallelism (labels: threshold)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
