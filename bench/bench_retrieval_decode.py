"""Images decoded per unique image by the retrieval evaluation (issue 14 item 6): a 5-captions-per-image set.

The validation loop's loaders (:func:`zerovl_lightning.eval.retrieval_data.retrieval_loaders`) split a set by
``image_id`` across ranks and decode each image once, with all its captions. The reference is the per-caption
reading the loaders replaced (one shard sample per caption, every sample's image decoded, rank ``r`` taking sample
``i`` when ``i % W == r``), counted on the same shards. Decodes are counted by wrapping PIL's ``Image.open`` in
this process (loaders with ``num_workers=0``), for ``W`` simulated ranks.

    python bench/bench_retrieval_decode.py                  # writes bench/results/retrieval_decode.json
    python bench/bench_retrieval_decode.py --images 200 --world-size 4
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"


def write_set(folder: Path, images: int, captions: int, per_shard: int = 100) -> None:
    """COCO-like: ``images`` random 64-px JPEGs × ``captions`` captions, one webdataset sample per caption."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
        samples += [(buf.getvalue(), i, captions * i + j) for j in range(captions)]
    for s in range(0, len(samples), per_shard):
        with wds.TarWriter(str(folder / f"shard-{s // per_shard:06d}.tar")) as sink:
            for jpg, image_id, caption_id in samples[s : s + per_shard]:
                sink.write({"__key__": f"{caption_id:08d}", "jpg": jpg, "txt": f"caption {caption_id}",
                            "json": {"image_id": image_id, "caption_id": caption_id}})  # fmt: skip


class CountOpens:
    """Count PIL ``Image.open`` calls (each is one decode of an image payload)."""

    def __enter__(self) -> CountOpens:
        self.count, self._open = 0, Image.open

        def counted(*args, **kwargs):
            self.count += 1
            return self._open(*args, **kwargs)

        Image.open = counted
        return self

    def __exit__(self, *exc) -> None:
        Image.open = self._open


def ours(folder: Path, world: int, preprocess_cfg: dict) -> tuple[int, int, float]:
    """(decodes, captions seen, CPU seconds) of the validation loaders over all simulated ranks."""
    from zerovl_lightning.data.shards import expand_shards
    from zerovl_lightning.eval.retrieval_data import retrieval_loaders

    shards = expand_shards(str(folder))
    t0 = time.process_time()
    with CountOpens() as c:
        captions = 0
        for rank in range(world):
            (loader,) = retrieval_loaders({"set": shards}, preprocess_cfg, 64, 0, rank, world)
            captions += sum(len(b["caption"]) for b in loader)
    return c.count, captions, time.process_time() - t0


def per_caption(folder: Path, world: int, preprocess_cfg: dict) -> tuple[int, int, float]:
    """The replaced reading: every caption sample decodes its image; sample i goes to rank i % W."""
    import webdataset as wds

    from zerovl_lightning.data.image_decoding import to_rgb
    from zerovl_lightning.data.shards import expand_shards
    from zerovl_lightning.eval.transforms import eval_transform

    transform = eval_transform(preprocess_cfg)
    t0 = time.process_time()
    with CountOpens() as c:
        captions = 0
        for rank in range(world):
            samples = wds.WebDataset(expand_shards(str(folder)), shardshuffle=False, empty_check=False)
            for i, sample in enumerate(samples):
                if i % world == rank:
                    image = next(v for k, v in sample.items() if k in ("jpg", "jpeg", "png", "webp"))
                    transform(to_rgb(Image.open(io.BytesIO(image))))
                    captions += 1
    return c.count, captions, time.process_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    preprocess_cfg = {"size": (64, 64), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "set"
        write_set(folder, args.images, args.captions_per_image)
        d_ours, c_ours, t_ours = ours(folder, args.world_size, preprocess_cfg)
        d_ref, c_ref, t_ref = per_caption(folder, args.world_size, preprocess_cfg)
    n_captions = args.images * args.captions_per_image
    assert c_ours == c_ref == n_captions, (c_ours, c_ref, n_captions)
    summary = {
        "images": args.images,
        "captions_per_image": args.captions_per_image,
        "world_size": args.world_size,
        "decoded_per_unique_image": d_ours / args.images,
        "per_caption_reference_decoded_per_unique_image": d_ref / args.images,
        "cpu_seconds": {"ours": round(t_ours, 3), "per_caption_reference": round(t_ref, 3)},
        "measured": "PIL Image.open calls over all simulated ranks in one process (num_workers=0); CPU time "
        "by time.process_time; both read the same shards written at run time",
        "command": "python bench/bench_retrieval_decode.py "
        f"--images {args.images} --captions-per-image {args.captions_per_image} --world-size {args.world_size}",
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval_decode.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
