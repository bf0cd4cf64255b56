"""Evaluation on shards and as Lightning callbacks: encoding == brute force, DDP split, files, logs, CLI."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from ddp_utils import free_port
from PIL import Image

from zerovl_lightning.data.image_decoding import to_rgb
from zerovl_lightning.eval.classification_callbacks import LinearProbeCallback, ZeroShotCallback
from zerovl_lightning.eval.retrieval import evaluate_retrieval, retrieval_ranks, summarize
from zerovl_lightning.eval.retrieval_data import (
    RankSplitSampler,
    RetrievalImages,
    resolve_retrieval_sets,
    retrieval_loaders,
)
from zerovl_lightning.eval.retrieval_report import RetrievalCallback, example_tables
from zerovl_lightning.eval.transforms import eval_transform
from zerovl_lightning.eval.validation import RetrievalValidation
from zerovl_lightning.model import build_tiny
from zerovl_lightning.module import ZeroVLModule

COLORS = [
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "purple",
    "orange",
    "pink",
    "brown",
    "grey",
    "cyan",
]


def iter_samples(url: str):
    """Raw samples of one shard (webdataset's own reader, nothing decoded): the brute-force references."""
    import webdataset as wds

    return iter(wds.WebDataset(url, shardshuffle=False))


def write_shards(folder, n_images: int = 12, per_shard: int = 10) -> list[tuple[int, int, str]]:
    """Tiny retrieval shards per the contract (one sample per caption, 1–3 captions per image, RGBA PNGs).

    Returns (image_id, caption_id, caption) of every sample.
    """
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n_images):
        pixels = rng.integers(0, 255, (40, 30, 4), dtype=np.uint8)
        pixels[..., 3] = 255 if i % 2 else 128  # some transparency to composite on white
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGBA").save(buf, format="PNG")
        for j in range(1 + i % 3):
            caption = f"a {COLORS[i]} thing number {j}"
            samples.append((buf.getvalue(), 100 + i, 1000 + 10 * i + j, caption))
    out = []
    for s in range(0, len(samples), per_shard):
        with wds.TarWriter(str(folder / f"shard-{s // per_shard:06d}.tar")) as sink:
            for png, image_id, caption_id, caption in samples[s : s + per_shard]:
                meta = {"image_id": image_id, "caption_id": caption_id, "source": "toy"}
                sink.write({"__key__": f"{caption_id:08d}", "png": png, "txt": caption, "json": meta})
                out.append((image_id, caption_id, caption))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    samples = write_shards(root / "toy" / "heldout")
    write_shards(root / "other" / "heldout", n_images=5)
    return root, samples


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny()


def test_sets_from_a_glob_are_named_after_their_source(shards):
    root, _ = shards
    sets = resolve_retrieval_sets(str(root / "*" / "heldout"))
    assert sorted(sets) == ["other", "toy"] and len(sets["toy"]) == 3  # 24 samples / 10 per shard
    with pytest.raises(FileNotFoundError, match="zerovl-data demo"):
        resolve_retrieval_sets(str(root / "nothing" / "*"))


def test_rank_split_partitions_the_samples(shards):
    root, samples = shards
    data = RetrievalImages(str(root / "toy" / "heldout"), eval_transform(build_tiny().preprocess_cfg))
    items = [[data[i] for i in RankSplitSampler(data, 2, r)] for r in range(2)]
    keys = [[c for it in rank for c in it["caption_ids"]] for rank in items]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(c for _, c, _ in samples)
    images = [{it["image_id"] for it in rank} for rank in items]
    assert not images[0] & images[1] and len(images[0]) == len(images[1]) == 6  # split by image id


def test_evaluate_retrieval_equals_brute_force_encoding(shards, tiny):
    root, samples = shards
    folder = root / "toy" / "heldout"
    metrics, metric = evaluate_retrieval(tiny, str(folder), batch_size=5, progress=False)
    # brute force: decode every image of the shards ourselves, encode, rank the full matrix
    transform = eval_transform(tiny.preprocess_cfg)
    images = {}
    for url in sorted(folder.glob("*.tar")):
        for s in iter_samples(str(url)):
            image_id = json.loads(s["json"])["image_id"]
            images.setdefault(image_id, transform(to_rgb(Image.open(io.BytesIO(s["png"])))))
    image_ids = sorted(images)
    caption_ids = sorted(c for _, c, _ in samples)
    text_of = {c: t for _, c, t in samples}
    image_of = {c: i for i, c, _ in samples}
    with torch.no_grad():
        tiny.eval()
        img = tiny.encode_image(torch.stack([images[i] for i in image_ids]))
        txt = tiny.encode_text(tiny.tokenize([text_of[c] for c in caption_ids]))
    cap_idx = torch.tensor([image_ids.index(image_of[c]) for c in caption_ids])
    i2t, t2i, q = retrieval_ranks(img, txt, cap_idx)
    ranks, _, _ = metric.compute_ranks()
    assert ranks.image_ids.tolist() == [i - 0 for i in image_ids] and ranks.caption_ids.tolist() == caption_ids
    assert torch.equal(ranks.i2t, i2t) and torch.equal(ranks.t2i, t2i)
    assert metrics["num_images"] == 12 and metrics["num_captions"] == 24
    assert metrics["rsum"] == pytest.approx(summarize(ranks)["rsum"])


def test_example_tables_show_top5_with_marks(shards, tiny):
    root, _ = shards
    folder = str(root / "toy" / "heldout")
    _, metric = evaluate_retrieval(tiny, folder, progress=False)
    tables = example_tables(metric, resolve_retrieval_sets({"toy": folder})["toy"], num_examples=3, as_wandb=False)
    cols, rows = tables["text_to_image"]
    assert cols[:2] == ["query", "rank of match"] and len(cols) == 7 and len(rows) == 3
    assert all(isinstance(c, Image.Image) for c in rows[0][2:])
    assert rows[0][0].startswith("a ")
    cols, rows = tables["image_to_text"]
    assert isinstance(rows[0][0], Image.Image) and all(isinstance(c, str) for c in rows[0][2:])
    marked = sum(c.startswith("✓") for r in rows for c in r[2:])
    hits_in_top5 = sum(int(r[1]) <= 5 for r in rows)
    assert marked >= hits_in_top5


class TinyModule(ZeroVLModule):
    """ZeroVLModule on the tiny towers, SGD, and a few fixed random training batches."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(build_tiny(), optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05})

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        tokens = self.model.tokenize([f"a {c} thing number 0" for c in COLORS[:8]])
        batches = [{"image": torch.randn(8, 3, 32, 32, generator=g), "text": tokens} for _ in range(3)]
        return torch.utils.data.DataLoader(batches, batch_size=None)


def test_callbacks_log_write_json_png_and_report(shards, tmp_path):
    root, _ = shards
    run = tmp_path / "run"
    retrieval = RetrievalCallback(output_dir=run, curve_max_k=10)
    zeroshot = ZeroShotCallback(sets=["digits"], test_limit=30, every_n_steps=2, output_dir=run, progress=False)
    probe = LinearProbeCallback(
        sets=["digits"],
        train_limit=60,
        test_limit=30,
        weight_decays=(0.1, 1.0),
        output_dir=run,
        progress=False,
    )
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="logs", version=0)
    trainer = L.Trainer(
        max_steps=2, callbacks=[retrieval, zeroshot, probe], logger=logger, accelerator="cpu", devices=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, val_check_interval=1,
        num_sanity_val_steps=0,
    )  # fmt: skip
    module = TinyModule()
    val = retrieval_loaders(resolve_retrieval_sets({"toy": str(root / "toy" / "heldout")}), module.model.preprocess_cfg)
    trainer.validate(module, dataloaders=val, verbose=False)  # the step-0 baseline, as zerovl-train does
    trainer.fit(module, val_dataloaders=val)

    # retrieval at 0 (baseline), 1, 2 (validation every step); zero-shot 0, 2; probe at end
    assert [r["step"] for r in retrieval.history] == [0, 1, 2]
    assert [r["step"] for r in zeroshot.history] == [0, 2]
    assert [r["step"] for r in probe.history] == [2]

    # results JSON, CLIP_benchmark-compatible keys next to ours
    records = json.loads((run / "eval" / "zeroshot_retrieval.json").read_text())
    assert len(records) == 3 and records[0]["task"] == "zeroshot_retrieval" and records[0]["dataset"] == "toy"
    m = records[-1]["metrics"]
    assert m["text_retrieval_recall@5"] == m["i2t_r5"] and m["image_retrieval_recall@1"] == m["t2i_r1"]
    zs = json.loads((run / "eval" / "zeroshot_classification.json").read_text())[-1]["metrics"]
    assert {"acc1", "acc5", "mean_per_class_recall", "top1"} <= set(zs)
    lp = json.loads((run / "eval" / "linear_probe.json").read_text())[0]["metrics"]
    assert {"lp_acc1", "lp_acc5", "weight_decay"} <= set(lp) and lp["top1"] > 0.3  # digits, chance 0.1

    # plots
    for name in ("recall_at_k.png", "recall_at_k_step000000.png", "recall_at_k_step000002.png"):
        with Image.open(run / "eval" / name) as im:
            assert im.size[0] > 100

    # loggers: stable names
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        header = next(csv.reader(f))
    for key in (
        "val/toy/rsum",
        "val/toy/i2t_r1",
        "val/toy/t2i_medr",
        "zeroshot/digits/top1",
        "linear_probe/digits/top1",
    ):
        assert key in header
    assert "val/toy/rsum" in trainer.callback_metrics

    # step 0 vs final table, and the history survives a checkpoint round trip
    table = retrieval.format_report()
    assert "| toy | 0 |" in table and "| toy | 2 |" in table and "| toy | 1 |" not in table and "RSUM" in table
    fresh = RetrievalCallback()
    fresh.load_state_dict(retrieval.state_dict())
    assert fresh.history == retrieval.history


def test_validation_update_leaves_model_mode_and_grad_alone(shards):
    root, _ = shards
    module = TinyModule()
    module.train()
    (loader,) = retrieval_loaders({"toy": str(root / "toy" / "heldout")}, module.model.preprocess_cfg)
    RetrievalValidation().update(module.model, next(iter(loader)))
    assert module.model.training and torch.is_grad_enabled()


def test_zerovl_eval_run_in_process(shards, tmp_path):
    """conf/eval.yaml composes and ``run`` evaluates an export folder (the console script: next test)."""
    from hydra import compose, initialize_config_module

    from zerovl_lightning.evaluate import run
    from zerovl_lightning.export import export_open_clip

    root, _ = shards
    export_open_clip(build_tiny(), tmp_path / "export")
    out = tmp_path / "results.json"
    overrides = [
        f"export_dir={tmp_path / 'export'}", "tasks=[retrieval,linear_probe]",
        f"data.val_sets={root / '*' / 'heldout'}", "callbacks.linear_probe.sets=[digits]",
        "callbacks.linear_probe.train_limit=50", "callbacks.linear_probe.test_limit=20",
        "callbacks.linear_probe.weight_decays=[0.1,1.0]",
        "progress=false", f"output={out}",
    ]  # fmt: skip
    with initialize_config_module("zerovl_lightning.conf", version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    records = run(cfg)
    assert [(r["task"], r["dataset"]) for r in records] == [
        ("zeroshot_retrieval", "other"), ("zeroshot_retrieval", "toy"), ("linear_probe", "digits"),
    ]  # fmt: skip
    assert json.loads(out.read_text()) == records


@pytest.mark.slow
def test_zerovl_eval_cli(shards, tmp_path):
    from zerovl_lightning.export import export_open_clip

    root, _ = shards
    export_open_clip(build_tiny(), tmp_path / "export")
    out = tmp_path / "results.json"
    cmd = [
        sys.executable, "-m", "zerovl_lightning.evaluate", f"export_dir={tmp_path / 'export'}",
        "tasks=[retrieval,zeroshot]", f"data.val_sets={{toy: {root / 'toy' / 'heldout'}}}",
        "callbacks.zeroshot.sets=[digits]", "callbacks.zeroshot.test_limit=20", "progress=false", f"output={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RSUM" in proc.stdout and "| toy | 0 |" in proc.stdout and "| digits | 0 |" in proc.stdout
    records = json.loads(out.read_text())
    assert {r["task"] for r in records} == {"zeroshot_retrieval", "zeroshot_classification"}
    assert (tmp_path / "recall_at_k.png").is_file()


@pytest.mark.slow
def test_wandb_example_tables_are_logged(shards, tmp_path, monkeypatch):
    """With a (offline) wandb logger the callback logs text→image / image→text tables with images."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    root, _ = shards
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="zerovl-test")
    cb = RetrievalCallback(output_dir=tmp_path, num_examples=3)
    trainer = L.Trainer(max_steps=1, callbacks=[cb], logger=logger, accelerator="cpu", devices=1,
                        enable_checkpointing=False, enable_progress_bar=False, val_check_interval=1)  # fmt: skip
    module = TinyModule()
    val = retrieval_loaders({"toy": [str(p) for p in sorted((root / "toy" / "heldout").glob("*.tar"))]},
                            module.model.preprocess_cfg)  # fmt: skip
    try:
        trainer.fit(module, val_dataloaders=val)
    finally:
        wandb.finish()
    tables = sorted(p.name for p in tmp_path.glob("wandb/*/files/media/table/examples/toy/*.table.json"))
    assert any(t.startswith("text_to_image") for t in tables) and any(t.startswith("image_to_text") for t in tables)
    table = json.loads(next(tmp_path.glob("wandb/*/files/media/table/examples/toy/text_to_image*.json")).read_text())
    assert table["columns"][:3] == ["query", "rank of match", "top1"] and len(table["data"]) == 3
    assert table["data"][0][2:] == ["Image"] * 5  # wandb.Image cells (the media travel in the run's artifact)


def digits31():
    from zerovl_lightning.eval.classification_data import DIGIT_CLASSES, ArrayImages, ClassificationSet, digits

    test = digits("test")
    return ClassificationSet("digits31", DIGIT_CLASSES, ArrayImages(test.images[:31], test.labels[:31]))


def _ddp_eval_worker(rank: int, world: int, port: int, folder: str, out_path: str) -> None:
    import os

    import torch.distributed as dist

    from zerovl_lightning.eval.linear_probe import extract_features
    from zerovl_lightning.eval.zeroshot import evaluate_zeroshot

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_tiny()
    retrieval, _ = evaluate_retrieval(model, folder, batch_size=4, progress=False)
    digits = digits31()  # odd: ranks get 16 / 15 images
    zeroshot = evaluate_zeroshot(model, digits, batch_size=8, progress=False)
    x, y = extract_features(model, digits.test, model.preprocess_cfg, batch_size=8, progress=False)
    if rank == 0:
        torch.save({"retrieval": retrieval, "zeroshot": zeroshot, "x": x, "y": y}, out_path)
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_process_evaluation_equals_single_process(shards, tmp_path):
    """Rank split of shards and datasets + metric sync: the same numbers as one process."""
    import torch.multiprocessing as mp

    from zerovl_lightning.eval.linear_probe import extract_features
    from zerovl_lightning.eval.zeroshot import evaluate_zeroshot

    root, _ = shards
    folder = str(root / "toy" / "heldout")
    port = free_port()
    mp.spawn(_ddp_eval_worker, args=(2, port, folder, str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt")

    torch.manual_seed(0)
    model = build_tiny()
    retrieval, _ = evaluate_retrieval(model, folder, batch_size=4, progress=False)
    digits = digits31()
    zeroshot = evaluate_zeroshot(model, digits, batch_size=8, progress=False)
    x, y = extract_features(model, digits.test, model.preprocess_cfg, batch_size=8, progress=False)
    assert got["retrieval"] == pytest.approx(retrieval, abs=1e-12)
    assert got["zeroshot"] == pytest.approx(zeroshot, abs=1e-6)
    # gathered features: same rows, in rank-interleaved order
    order = torch.cat([torch.arange(0, len(y), 2), torch.arange(1, len(y), 2)])
    assert torch.equal(got["y"], y[order])
    torch.testing.assert_close(got["x"], x[order], atol=1e-5, rtol=1e-5)
