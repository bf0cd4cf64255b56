"""Results files and tables: the per-eval records kept by the callbacks and ``zerovl-eval``.

A *record* is one evaluation of one set at one training step, shaped like a CLIP_benchmark result::

    {"task": "zeroshot_retrieval", "dataset": "tuxpaint", "model": "zerovl-tiny", "step": 0, "epoch": 0,
     "metrics": {"i2t_r1": 0.1, ..., "rsum": 123.4, "text_retrieval_recall@1": 0.1, ...}}

Tables print recalls / accuracies in percent (RSUM already is), one row per (set, step).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Columns shown per task: (metric key, header). Fractions are printed ×100.
TABLE_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "zeroshot_retrieval": [
        ("i2t_r1", "i→t R@1"), ("i2t_r5", "i→t R@5"), ("i2t_r10", "i→t R@10"),
        ("t2i_r1", "t→i R@1"), ("t2i_r5", "t→i R@5"), ("t2i_r10", "t→i R@10"), ("rsum", "RSUM"),
    ],
    "zeroshot_classification": [("top1", "top-1"), ("top5", "top-5")],
    "linear_probe": [("top1", "top-1"), ("top5", "top-5")],
}  # fmt: skip
NOT_PERCENT = {"rsum", "i2t_medr", "t2i_medr", "num_images", "num_captions", "num_samples", "weight_decay"}
TASK_TITLES = {
    "zeroshot_retrieval": "Zero-shot retrieval (%)",
    "zeroshot_classification": "Zero-shot classification (%)",
    "linear_probe": "Linear probe (%)",
}


def select_steps(records: Sequence[Mapping[str, Any]], which: str = "first_last") -> list[Mapping[str, Any]]:
    """``first_last``: the records of the first and the last evaluated step (untrained baseline vs final)."""
    if which == "all" or not records:
        return list(records)
    steps = sorted({int(r["step"]) for r in records})
    keep = {steps[0], steps[-1]}
    return [r for r in records if int(r["step"]) in keep]


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    value = float(value)
    if value != value:  # NaN
        return "–"
    return f"{value:.1f}" if key in NOT_PERCENT else f"{100 * value:.1f}"


def format_table(records: Sequence[Mapping[str, Any]], which: str = "first_last") -> str:
    """Markdown tables, one per task, rows (set, step) in set order then step order."""
    chosen = select_steps(records, which)
    blocks = []
    for task in dict.fromkeys(r["task"] for r in chosen):
        rows = [r for r in chosen if r["task"] == task]
        columns = TABLE_COLUMNS.get(task) or [(k, k) for k in rows[0]["metrics"]]
        header = ["set", "step", *[h for _, h in columns]]
        lines = [
            f"**{TASK_TITLES.get(task, task)}**",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] * 2 + ["---:"] * len(columns)) + "|",
        ]
        sets = list(dict.fromkeys(r["dataset"] for r in rows))
        for name in sets:
            for r in sorted((r for r in rows if r["dataset"] == name), key=lambda r: int(r["step"])):
                cells = [name, str(r["step"]), *[_fmt(k, r["metrics"].get(k)) for k, _ in columns]]
                lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_json(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write records atomically (a crash mid-write never leaves a truncated results file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(list(records), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def plot_recall_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike,
    baseline: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    title: str = "",
    baseline_label: str = "baseline",
    label: str = "",
) -> Path:
    """R@K against K for image→text and text→image, one colour per set; an optional baseline dashed.

    ``curves[set][direction]`` are recalls at K = 1, 2, … (fractions) with direction ``i2t`` / ``t2i``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, direction, name in zip(axes, ("i2t", "t2i"), ("image → text", "text → image")):
        for i, (set_name, c) in enumerate(curves.items()):
            color = colors[i % len(colors)]
            y = [100 * v for v in c[direction]]
            ax.plot(range(1, len(y) + 1), y, color=color, label=f"{set_name} {label}".strip())
            if baseline and set_name in baseline:
                yb = [100 * v for v in baseline[set_name][direction]]
                ax.plot(
                    range(1, len(yb) + 1),
                    yb,
                    color=color,
                    ls="--",
                    alpha=0.7,
                    label=f"{set_name} {baseline_label}",
                )
        ax.set_title(name)
        ax.set_xlabel("K")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
