"""Read volume of one epoch by split: how many times the loader reads a source's bytes.

``split="sample"`` (what ``split=auto`` picks when a source has fewer shards than rank × worker slots) makes
every slot read every shard and keep every ``slots``-th sample; ``split="shard"`` deals whole shards. Measured
on real slot streams (``SlotStream``, one pass of every slot of a 4-rank × 4-worker run, reading without
decoding): bytes of the shards opened over the source's bytes, and CPU seconds. Synthetic 32×32 JPEG sources
written at run time: 4 shards × 250 samples (fewer shards than the 16 slots) and the same 1,000 samples in 64
shards.

Usage: ``python bench/bench_read_volume.py``; writes ``bench/results/read_volume.json``.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

from zerovl_lightning.data.shards import SlotStream, SourceInfo

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
RANKS, WORKERS, SAMPLES = 4, 4, 1000


def write(root: Path, shards: int) -> SourceInfo:
    import webdataset as wds
    from PIL import Image

    root.mkdir(parents=True)
    per = SAMPLES // shards
    for s in range(shards):
        with wds.TarWriter(str(root / f"shard-{s:06d}.tar")) as tw:
            for i in range(per):
                k = s * per + i
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (k % 251, 7 * k % 253, 13 * k % 255)).save(buf, format="JPEG")
                tw.write({"__key__": f"s-{k:06d}", "jpg": buf.getvalue(), "txt": f"sample {k}"})
    return SourceInfo.build("s", str(root))


def epoch(info: SourceInfo, split: str) -> dict[str, float]:
    slots = RANKS * WORKERS
    t0 = time.process_time()
    opened = samples = 0
    for slot in range(slots):
        s = SlotStream(
            info, slot=slot, num_slots=slots, epoch=0, seed=0, split=split, resampled=False, shuffle_buffer=100
        )
        for _ in range(s._pass_length()):
            s.next_raw()
            samples += 1
        opened += s.opened_bytes
    source_bytes = sum(Path(u).stat().st_size for u in info.urls)
    return {
        "reads_per_epoch": opened / source_bytes,
        "samples": samples,
        "cpu_s": time.process_time() - t0,
        "shards": len(info.urls),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        few, many = write(Path(tmp) / "few", 4), write(Path(tmp) / "many", 64)
        result = {
            "slots": f"{RANKS} ranks × {WORKERS} workers = {RANKS * WORKERS}",
            "sample_split_4_shards": epoch(few, "sample"),
            "shard_split_64_shards": epoch(many, "shard"),
            "how": "one pass of every slot's SlotStream (no decoding), shard bytes opened / source bytes; "
            "cpu = process time",
            "command": "python bench/bench_read_volume.py",
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "read_volume.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
