"""``zerovl-data``: build the demo shards, turn ZeroVL CSVs / image folders into shards, index img2dataset.

Every subcommand is idempotent (a finished output with the same inputs is skipped) and prints a short table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width table (no dependency) for terminal summaries."""
    cells = [[str(c) for c in columns]] + [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if v.replace(".", "").isdigit() else v.ljust(w) for v, w in zip(row, widths)
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), sep, *(fmt(r) for r in cells[1:])])


def _report_row(report: Any) -> dict[str, Any]:
    s = report.stats
    return {
        "source": s.get("source", ""),
        "samples": s["num_samples"],
        "images": s["num_images"],
        "shards": s["num_shards"],
        "skipped": sum((s.get("skipped") or {}).values()),
        "status": report.status,
        "dir": str(report.out_dir),
    }


_COLUMNS = ("source", "samples", "images", "shards", "skipped", "status", "dir")


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..assets import cache_dir
    from ..demo import SOURCES, build_demo, demo_root

    cache = Path(args.cache) if args.cache else cache_dir()
    t0 = time.perf_counter()
    manifest = build_demo(
        cache,
        sources=args.sources or SOURCES,
        limit=args.limit,
        heldout_fraction=args.heldout_fraction,
        max_heldout=args.max_heldout,
        image_size=args.image_size,
        workers=args.workers,
        force=args.force,
        progress=not args.quiet,
        log=None if args.quiet else (lambda m: print(m, file=sys.stderr)),
    )
    rows = []
    for name, e in manifest["sources"].items():
        rows.append(
            {
                "source": name,
                "train": e["train"]["num_samples"],
                "train_captions": e["train"]["num_unique_captions"],
                "heldout": e["heldout"]["num_samples"],
                "heldout_captions": e["heldout"]["num_unique_captions"],
                "shards": f"{e['train']['num_shards']}+{e['heldout']['num_shards']}",
                "skipped": e["train"]["skipped"] + e["heldout"]["skipped"],
            }
        )
    cols = ("source", "train", "train_captions", "heldout", "heldout_captions", "shards", "skipped")
    print(_table(rows, cols))
    print(
        f"demo {manifest['status']} in {time.perf_counter() - t0:.1f}s → {demo_root(cache)} "
        f"(train {manifest['totals']['train']}, heldout {manifest['totals']['heldout']})"
    )
    return 0


def _writer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "samples_per_shard": args.samples_per_shard,
        "max_side": args.max_side,
        "shuffle_seed": None if args.no_shuffle else args.seed,
        "workers": args.workers,
        "force": args.force,
        "progress": not args.quiet,
    }


def _cmd_csv(args: argparse.Namespace) -> int:
    from .sources import write_csv_shards

    report = write_csv_shards(args.root, args.name, args.out, split=args.split, **_writer_kwargs(args))
    print(_table([_report_row(report)], _COLUMNS))
    return 0


def _cmd_folder(args: argparse.Namespace) -> int:
    from .sources import write_folder_shards

    report = write_folder_shards(
        args.dir, args.out, captions_file=args.captions, source=args.source, **_writer_kwargs(args)
    )
    print(_table([_report_row(report)], _COLUMNS))
    return 0


def _cmd_img2dataset(args: argparse.Namespace) -> int:
    from .sources import index_img2dataset

    report = index_img2dataset(
        args.dir,
        source=args.source,
        count="scan" if args.scan else "auto",
        force=args.force,
        progress=not args.quiet,
    )
    print(_table([_report_row(report)], _COLUMNS))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from .stats import iter_stats_dirs, summarize

    dirs = list(iter_stats_dirs(args.dir))
    if not dirs:
        print(f"no stats.json under {args.dir}", file=sys.stderr)
        return 1
    rows = summarize(dirs)
    print(_table(rows, ("source", "samples", "images", "shards", "skipped", "dir")))
    return 0


def _add_writer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-side", type=int, default=None, help="downsize larger images to this side (JPEG)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row shuffle (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes (default 0: in-process)")
    p.add_argument("--force", action="store_true", help="rewrite even if up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zerovl-data",
        description="Write and inspect webdataset shards for zerovl-lightning (see docs/CONTRACTS.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build the demo shards (Tux Paint, emoji, Open Clip Art, flags)")
    p.add_argument("--cache", default=None, help="cache folder (default $ZEROVL_CACHE or ./.cache/zerovl)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--sources", nargs="+", default=None, help="subset of sources")
    p.add_argument("--limit", type=int, default=None, help="first N items per source (quick tries)")
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--max-heldout", type=int, default=400, help="cap on held-out captions per source")
    p.add_argument("--image-size", type=int, default=160, help="longer image side in px (default 160)")
    p.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("csv", help="ZeroVL CSV layout ROOT/NAME/train_anno.csv → shards in OUT")
    p.add_argument("root")
    p.add_argument("name")
    p.add_argument("out")
    p.add_argument("--split", default="train", help="reads <split>_anno.csv and images in <split>/")
    _add_writer_options(p)
    p.set_defaults(func=_cmd_csv)

    p = sub.add_parser("folder", help="folder of images + .txt captions and/or a captions CSV → shards in OUT")
    p.add_argument("dir")
    p.add_argument("out")
    p.add_argument("--captions", default=None, help="CSV/TSV mapping file (image column, caption column)")
    p.add_argument("--source", default=None, help="source name (default: the folder's name)")
    _add_writer_options(p)
    p.set_defaults(func=_cmd_folder)

    p = sub.add_parser("img2dataset", help="write stats.json for img2dataset/webdataset shards in DIR")
    p.add_argument("dir")
    p.add_argument("--source", default=None)
    p.add_argument("--scan", action="store_true", help="count samples by reading the tars")
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_img2dataset)

    p = sub.add_parser("stats", help="summarise every stats.json under DIR")
    p.add_argument("dir")
    p.set_defaults(func=_cmd_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zerovl-data`` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from ..demo import DemoAssetsMissing

    try:
        return int(args.func(args) or 0)
    except (DemoAssetsMissing, FileNotFoundError, ValueError, KeyError) as e:
        print(f"zerovl-data {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
