"""Run every ``bench/bench_*.py`` in its own process and collect their markdown tables in bench/results/SUMMARY.md.

Usage: ``python bench/run_all.py [NAME ...]`` (names without ``bench_``/``.py``; default: all).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main(argv: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in argv]
    RESULTS.mkdir(exist_ok=True)
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script)], cwd=HERE.parent)
        print(f"== {script.name}: exit {rc} in {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(script.name)
    parts = [f"## {md.stem}\n\n{md.read_text()}" for md in sorted(RESULTS.glob("*.md")) if md.name != "SUMMARY.md"]
    (RESULTS / "SUMMARY.md").write_text("# Benchmark results\n\n" + "\n\n".join(parts) + "\n")
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
