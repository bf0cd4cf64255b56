"""Summarise a `make ablate` sweep: per-seed held-out retrieval of every arm → ablation.{json,md,png}.

Reads each job folder of the Hydra multirun (``.hydra/config.yaml`` for the arm and seed,
``eval/zeroshot_retrieval.json`` for the held-out results the RetrievalCallback wrote at the end of training) and
writes, under ``--out`` (default bench/results/ablation):

- ``.json``: ``{"arms": {arm: {"seeds": [{"seed", "sets": {set: {"rsum", "i2t_r1", "t2i_r1"}}, "mean_rsum"}]}},
  "zerovl_minus_baseline_mean_rsum", ...}`` plus the setting the sweep ran with and its wall time;
- ``.md``: mean ± standard error (over seeds) per arm and held-out set;
- ``.png``: mean held-out RSUM per arm, ± 1 standard error, seeds as dots.

A sweep with fewer finished jobs than its ``multirun.yaml`` asked for (a job failed, or the sweep was stopped: Lightning
ends a SIGTERM'd fit quietly, so the multirun can exit 0) is refused unless ``--allow-partial``; a partial summary says
so in its ``.md`` and its ``"jobs"`` entry.

Usage: ``python bench/ablation.py SWEEP_DIR [--out bench/results/ablation] [--wall-s SECONDS] [--load "..."]
[--allow-partial]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from statistics import mean, stdev

import yaml

ARMS = ("baseline", "debias", "mixup", "dga", "zerovl")  # the order of the table and the plot
METRICS = ("rsum", "i2t_r1", "t2i_r1")


def read_job(job: Path) -> tuple[str, dict] | None:
    """(arm, per-seed result) of one finished job folder; None when it has no results (failed or still running)."""
    results = job / "eval" / "zeroshot_retrieval.json"
    config = job / ".hydra" / "config.yaml"
    if not results.is_file() or not config.is_file():
        return None
    cfg = yaml.safe_load(config.read_text())
    arm = (cfg.get("ablation") or {}).get("arm")
    if arm is None:
        raise SystemExit(f"{config}: no ablation.arm; run the sweep with +ablation_arm=<arm>")
    records = json.loads(results.read_text())
    last = max(r["step"] for r in records)  # the evaluation at the end of training
    sets = {
        r["dataset"]: {m: 100 * r["metrics"][m] if m != "rsum" else r["metrics"][m] for m in METRICS}
        for r in records
        if r["task"] == "zeroshot_retrieval" and r["step"] == last
    }
    run = {"seed": int(cfg["seed"]), "step": int(last), "sets": dict(sorted(sets.items()))}
    run["mean_rsum"] = mean(s["rsum"] for s in sets.values())
    setting = {
        "batch_size": cfg["ablation"]["batch_size"],
        "dga_batch_size": cfg["ablation"]["dga_batch_size"],
        "max_steps": cfg["trainer"]["max_steps"],
        "image_size": cfg["model"]["image_size"],
        "lr": cfg["module"]["optimizer"]["lr"],
        "model": cfg["model"]["model_name"],
    }
    return arm, {**run, "_setting": setting}


def expected_jobs(sweep: Path) -> int | None:
    """How many jobs the multirun asked for: the product of its sweep overrides' lengths (None: no multirun.yaml)."""
    multirun = sweep / "multirun.yaml"
    if not multirun.is_file():
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = yaml.safe_load(multirun.read_text())["hydra"]["overrides"]["task"]
    overrides = OverridesParser.create().parse_overrides(task)
    return math.prod(len(list(o.sweep_string_iterator())) for o in overrides if o.is_sweep_override())


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    return mean(values), (stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def summarise(sweep: Path, allow_partial: bool = False) -> dict:
    arms: dict[str, dict] = {}
    settings = []
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
        found = read_job(job)
        if found is None:
            print(f"skipping {job}: no eval/zeroshot_retrieval.json", file=sys.stderr)
            continue
        arm, run = found
        settings.append(run.pop("_setting"))
        arms.setdefault(arm, {"seeds": []})["seeds"].append(run)
    if not arms:
        raise SystemExit(f"{sweep}: no finished ablation jobs (folders 0/, 1/, … with eval/zeroshot_retrieval.json)")
    if any(s != settings[0] for s in settings):
        raise SystemExit(f"{sweep}: the jobs ran with different settings: {settings}")
    expected = expected_jobs(sweep)
    if expected is not None and len(settings) < expected and not allow_partial:
        raise SystemExit(
            f"{sweep}: {len(settings)} of the {expected} jobs in multirun.yaml finished; rerun the sweep, or pass "
            "--allow-partial to summarise what finished"
        )
    for arm in arms.values():
        arm["seeds"].sort(key=lambda r: r["seed"])
        arm["mean_rsum"], arm["se_rsum"] = mean_se([r["mean_rsum"] for r in arm["seeds"]])
    out = {"arms": {a: arms[a] for a in (*ARMS, *sorted(set(arms) - set(ARMS))) if a in arms}, "setting": settings[0]}
    out["jobs"] = {"finished": len(settings), "expected": expected}
    if "zerovl" in arms and "baseline" in arms:
        diff = arms["zerovl"]["mean_rsum"] - arms["baseline"]["mean_rsum"]
        se = math.hypot(arms["zerovl"]["se_rsum"], arms["baseline"]["se_rsum"])
        out["zerovl_minus_baseline_mean_rsum"] = diff
        out["zerovl_minus_baseline_se"] = se
        out["zerovl_above_baseline_by_2se"] = bool(se > 0 and diff > 2 * se)
    return out


def partial_note(summary: dict) -> list[str]:
    """A warning line (and a blank) when the summary covers only part of its sweep."""
    jobs = summary.get("jobs") or {}
    if jobs.get("expected") is None or jobs["finished"] >= jobs["expected"]:
        return []
    return [f"**Partial sweep: {jobs['finished']} of {jobs['expected']} jobs finished.**", ""]


def markdown(summary: dict) -> str:
    arms = summary["arms"]
    sets = sorted({s for arm in arms.values() for r in arm["seeds"] for s in r["sets"]})
    st = summary["setting"]
    lines = [
        f"Held-out retrieval after {st['max_steps']} steps ({st['model']}, {st['image_size']} px, b = "
        f"{st['batch_size']}, DGA arms {st['dga_batch_size']} per step in sub-batches of {st['batch_size']}); "
        "mean ± standard error over seeds, recalls in %.",
        "",
        *partial_note(summary),
        "| arm | seeds | mean RSUM | " + " | ".join(f"{s} RSUM | {s} i→t R@1" for s in sets) + " |",
        "|---|---:|---:|" + "---:|---:|" * len(sets),
    ]
    for name, arm in arms.items():
        cells = [name, str(len(arm["seeds"])), f"{arm['mean_rsum']:.1f} ± {arm['se_rsum']:.1f}"]
        for s in sets:
            for m in ("rsum", "i2t_r1"):
                m_, se = mean_se([r["sets"][s][m] for r in arm["seeds"] if s in r["sets"]])
                cells.append(f"{m_:.1f} ± {se:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    if "zerovl_minus_baseline_mean_rsum" in summary:
        lines += [
            "",
            f"zerovl − baseline, mean held-out RSUM: {summary['zerovl_minus_baseline_mean_rsum']:+.1f} ± "
            f"{summary['zerovl_minus_baseline_se']:.1f} (standard error); above baseline by more than 2 SE: "
            f"{'yes' if summary['zerovl_above_baseline_by_2se'] else 'no'}.",
        ]
    if "wall_s" in summary:
        lines += ["", f"Sweep wall time {summary['wall_s'] / 60:.1f} min; load during it: {summary.get('load', '?')}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (name, arm) in enumerate(arms.items()):
        ax.bar(i, arm["mean_rsum"], yerr=arm["se_rsum"], capsize=4, color="tab:blue" if name != "zerovl" else "tab:red")
        ax.scatter([i] * len(arm["seeds"]), [r["mean_rsum"] for r in arm["seeds"]], color="k", s=10, zorder=3)
    ax.set_xticks(range(len(arms)), list(arms))
    ax.set_ylabel("mean held-out RSUM")
    ax.set_title(f"ZeroVL ablation ({summary['setting']['max_steps']} steps; bars ± 1 SE, dots = seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the multirun folder (hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ablation")
    parser.add_argument("--wall-s", type=float, default=None, help="wall time of the sweep, for the record")
    parser.add_argument("--load", default=None, help="machine load during the sweep (uptime), for the record")
    parser.add_argument("--allow-partial", action="store_true", help="summarise a sweep with unfinished jobs")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        raise SystemExit(f"{args.sweep}: not a folder; give the multirun folder of `make ablate`")
    summary = summarise(args.sweep, allow_partial=args.allow_partial)
    if args.wall_s is not None:
        summary["wall_s"] = args.wall_s
    if args.load is not None:
        summary["load"] = args.load
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary))
    plot(summary, args.out.with_suffix(".png"))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
