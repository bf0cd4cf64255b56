"""Zero-shot retrieval in Lightning's validation loop: equals the brute-force metric, decodes each image once,
trainer.validate gives the step-0 numbers, ModelCheckpoint can monitor it, DDP equals one process."""

from __future__ import annotations

import io
import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_callbacks import iter_samples, write_shards

from zerovl_lightning.data.image_decoding import to_rgb
from zerovl_lightning.data.shards import expand_shards
from zerovl_lightning.eval.retrieval import evaluate_retrieval, retrieval_ranks, summarize
from zerovl_lightning.eval.retrieval_data import PAD, RankSplitSampler, RetrievalImages, retrieval_loaders
from zerovl_lightning.eval.retrieval_report import RetrievalCallback
from zerovl_lightning.eval.transforms import eval_transform
from zerovl_lightning.model import build_tiny
from zerovl_lightning.module import ZeroVLModule


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    write_shards(root / "toy" / "heldout")  # 12 images, 1–3 captions each, images split across shards
    write_shards(root / "other" / "heldout", n_images=5)  # 5 images: ranks get 3 / 2 (padding needed)
    return {"other": expand_shards(str(root / "other" / "heldout")),
            "toy": expand_shards(str(root / "toy" / "heldout"))}  # fmt: skip


def brute_force(model, shards) -> dict[str, float]:
    """Decode every sample ourselves, one embedding per unique image, rank the full matrix."""
    transform = eval_transform(model.preprocess_cfg)
    images, captions = {}, {}
    for url in shards:
        for s in iter_samples(url):
            meta = json.loads(s["json"])
            images.setdefault(meta["image_id"], transform(to_rgb(Image.open(io.BytesIO(s["png"])))))
            captions[meta["caption_id"]] = (meta["image_id"], s["txt"].decode().strip())
    image_ids, caption_ids = sorted(images), sorted(captions)
    with torch.no_grad():
        model.eval()
        img = model.encode_image(torch.stack([images[i] for i in image_ids]))
        txt = model.encode_text(model.tokenize([captions[c][1] for c in caption_ids]))
    cap_idx = torch.tensor([image_ids.index(captions[c][0]) for c in caption_ids])
    i2t, t2i, q = retrieval_ranks(img, txt, cap_idx)
    from zerovl_lightning.eval.retrieval import RetrievalRanks

    return summarize(RetrievalRanks(i2t, t2i, torch.tensor(image_ids), torch.tensor(caption_ids), cap_idx, q))


def tiny_module(seed: int = 0) -> ZeroVLModule:
    torch.manual_seed(seed)
    return ZeroVLModule(build_tiny(), optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5})


def train_batches(module: ZeroVLModule, n: int = 3, b: int = 6) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    tokens = module.model.tokenize([f"a thing number {i}" for i in range(b)])
    batches = [{"image": torch.randn(b, 3, 32, 32, generator=g), "text": tokens} for _ in range(n)]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path,
              "num_sanity_val_steps": 0, **kwargs}  # fmt: skip
    return L.Trainer(**kwargs)


def test_validation_loop_equals_brute_force(sets, tmp_path):
    module = tiny_module()
    loaders = retrieval_loaders(sets, module.model.preprocess_cfg, batch_size=4)
    logged = trainer(tmp_path).validate(module, dataloaders=loaders, verbose=False)[0]
    for name, shards in sets.items():
        expected = brute_force(module.model, shards)
        got = module.retrieval.results[name]
        assert got == pytest.approx(expected, abs=1e-12)
        assert got["num_images"] == {"toy": 12, "other": 5}[name]
        for key in ("i2t_r1", "t2i_r5", "rsum", "i2t_medr"):  # what the loggers / ModelCheckpoint see
            assert logged[f"val/{name}/{key}"] == pytest.approx(expected[key], abs=1e-12)


def test_each_image_is_decoded_once_and_ranks_get_equal_batches(tmp_path):
    import webdataset as wds

    folder = tmp_path / "coco_like"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(folder / "shard-000000.tar")) as sink:  # 7 images × 5 captions, one sample each
        for i in range(7):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
            for j in range(5):
                sink.write({"__key__": f"{i}_{j}", "png": buf.getvalue(), "txt": f"caption {i} {j}",
                            "json": {"image_id": i, "caption_id": 10 * i + j}})  # fmt: skip
    transform = eval_transform(build_tiny().preprocess_cfg)
    data = [RetrievalImages(str(folder), transform) for _ in range(2)]  # one dataset per rank
    orders = [list(RankSplitSampler(d, 2, r)) for r, d in enumerate(data)]
    assert orders == [[0, 2, 4, 6], [1, 3, 5, PAD]]  # split by image id, padded to equal length
    items = [d[i] for r, d in enumerate(data) for i in orders[r]]
    assert sum(d.decoded for d in data) == 7  # images decoded per unique image = 1.0
    caption_ids = sorted(c for it in items for c in it["caption_ids"])
    assert caption_ids == sorted(10 * i + j for i in range(7) for j in range(5))  # every caption once


def test_trainer_validate_gives_the_step0_numbers_of_zerovl_train(sets, tmp_path):
    """zerovl-train's baseline (trainer.validate before fit) = validating the untrained model by hand."""
    from hydra import compose, initialize_config_module

    from zerovl_lightning.train import build, run

    toy = sets["toy"][0].rsplit("/", 1)[0]  # the toy set trains too: no demo shards needed (fresh clone)
    overrides = ["experiment=smoke", "data=custom", f"++data.sources={{toy: {{path: '{toy}'}}}}",
                 "data.batch_size=8", "data.num_workers=0", "callbacks=retrieval", "val_at_start=true",
                 "trainer.max_steps=2", f"++data.val_sets={{toy: {toy}}}", "logger=none",
                 f"paths.output_dir={tmp_path / 'run'}", "trainer.enable_checkpointing=false"]  # fmt: skip
    with initialize_config_module("zerovl_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run(cfg)
    records = json.loads((tmp_path / "run" / "eval" / "zeroshot_retrieval.json").read_text())
    assert [(r["dataset"], r["step"]) for r in records] == [("toy", 0), ("toy", 2)]

    L.seed_everything(cfg.seed, workers=True)
    module, _, _ = build(cfg)  # the same untrained model
    expected = brute_force(module.model, sets["toy"])
    assert records[0]["metrics"]["rsum"] == pytest.approx(expected["rsum"], abs=1e-12)
    assert records[0]["metrics"]["t2i_r1"] == pytest.approx(expected["t2i_r1"], abs=1e-12)


def test_model_checkpoint_monitors_validation_rsum(sets, tmp_path):
    module = tiny_module()
    loaders = retrieval_loaders({"toy": sets["toy"]}, module.model.preprocess_cfg, batch_size=5)
    best = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/toy/rsum", mode="max",
                                               save_top_k=1, filename="best")  # fmt: skip
    report = RetrievalCallback(output_dir=tmp_path, num_examples=0, curve_max_k=5)
    t = trainer(tmp_path, max_steps=3, val_check_interval=1, callbacks=[best, report], enable_checkpointing=True)
    t.fit(module, train_dataloaders=train_batches(module), val_dataloaders=loaders)
    rsums = {r["step"]: r["metrics"]["rsum"] for r in report.history}
    assert sorted(rsums) == [1, 2, 3]
    assert float(best.best_model_score) == pytest.approx(max(rsums.values()), abs=1e-12)
    best_step = max(sorted(rsums), key=rsums.get)  # first step with the highest RSUM
    assert torch.load(best.best_model_path, weights_only=False)["global_step"] == best_step
    assert json.loads((tmp_path / "eval" / "zeroshot_retrieval.json").read_text()) == report.history


def _ddp_validate(rank: int, world: int, sets: dict, root: str) -> dict:
    from lightning.pytorch.strategies import DDPStrategy

    module = tiny_module()
    loaders = retrieval_loaders(sets, module.model.preprocess_cfg, batch_size=2, rank=rank, world_size=world)
    report = RetrievalCallback(output_dir=root, num_examples=0)
    t = trainer(root, devices=world, strategy=DDPStrategy(process_group_backend="gloo"), max_steps=2,
                val_check_interval=1, callbacks=[report], use_distributed_sampler=False)  # fmt: skip
    baseline = t.validate(module, dataloaders=loaders, verbose=False)[0]
    t.fit(module, train_dataloaders=train_batches(module, n=2), val_dataloaders=loaders)  # validation in DDP
    return {"baseline": baseline, "history": report.history,
            "state": {k: v.clone() for k, v in module.model.state_dict().items()}}  # fmt: skip


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_validation_loop_equals_one_process(sets, tmp_path):
    from ddp_utils import run_ddp

    got = run_ddp(_ddp_validate, 2, args=(sets, str(tmp_path)))
    assert got[0]["history"] == got[1]["history"]  # synced: every rank has the same numbers
    module = tiny_module()
    for name, shards in sets.items():
        expected = brute_force(module.model, shards)
        for key in ("i2t_r1", "i2t_r10", "t2i_r5", "rsum", "t2i_medr"):
            assert got[0]["baseline"][f"val/{name}/{key}"] == pytest.approx(expected[key], abs=1e-12)
    module.model.load_state_dict(got[0]["state"])  # the trained model: fit-time validation at step 2
    final = {r["dataset"]: r["metrics"] for r in got[0]["history"] if r["step"] == 2}
    for name, shards in sets.items():
        metrics, _ = evaluate_retrieval(module.model, shards, batch_size=3, progress=False)
        assert {k: final[name][k] for k in metrics} == pytest.approx(metrics, abs=1e-12)


class _KilledBeforeValidation(RuntimeError):
    pass


class _KillBeforeFirstValidation(L.Callback):
    """Stands for a kill -9 between epoch 0's batch-end checkpoint and its validation."""

    def on_validation_start(self, trainer, pl_module):
        raise _KilledBeforeValidation


def _fit_with_epoch_validation(root, sets, max_epochs: int, ckpt_path=None, kill: bool = False):
    from zerovl_lightning.checkpointing import BatchEndCheckpoint, RNGStateCheckpoint, stored_step
    from zerovl_lightning.logger_resume import ResumableCSVLogger

    module = tiny_module()
    loaders = retrieval_loaders({"toy": sets["toy"]}, module.model.preprocess_cfg, batch_size=5)
    report = RetrievalCallback(output_dir=root, num_examples=0)
    ckpt = BatchEndCheckpoint(
        dirpath=root / "ckpt", filename="epoch_{epoch}", every_n_epochs=1, save_top_k=-1, auto_insert_metric_name=False
    )
    callbacks = [report, ckpt, RNGStateCheckpoint(), *([_KillBeforeFirstValidation()] if kill else [])]
    resume_step = stored_step(ckpt_path) if ckpt_path else None  # what prepare_resume configures
    csv = ResumableCSVLogger(root, name="csv", version=0, resume_step=resume_step)
    t = trainer(root, max_epochs=max_epochs, check_val_every_n_epoch=1, enable_checkpointing=True, callbacks=callbacks,
                logger=csv)  # fmt: skip
    batches = train_batches(module, n=3).dataset
    shuffled = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=True)  # order from the global RNG
    t.fit(module, train_dataloaders=shuffled, val_dataloaders=loaders, ckpt_path=ckpt_path)
    return report.history, module.model.state_dict()


@pytest.mark.slow
def test_epoch_end_validation_survives_resume_bit_exactly(sets, tmp_path):
    """Resuming from the epoch's batch-end checkpoint (written before that epoch's validation) keeps the
    validation record, and validating every epoch does not shift the training RNG (same final weights)."""
    torch.manual_seed(123)
    full_history, full_state = _fit_with_epoch_validation(tmp_path / "full", sets, max_epochs=2)
    assert [r["step"] for r in full_history] == [3, 6]

    torch.manual_seed(123)
    with pytest.raises(_KilledBeforeValidation):  # the same run, killed after epoch 0's checkpoint
        _fit_with_epoch_validation(tmp_path / "crash", sets, max_epochs=2, kill=True)
    ckpt = tmp_path / "crash" / "ckpt" / "epoch_0.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 3
    assert not any(s.get("history") for s in saved["callbacks"].values())  # written before epoch 0's validation
    states = saved["callbacks"].values()
    assert [s["validation_follows"] for s in states if "validation_follows" in s] == [0]  # ... and says so
    assert [s["epoch_end"] for s in states if "epoch_end" in s] == [True]
    torch.manual_seed(999)  # a fresh process: the RNG state comes from the checkpoint
    history, state = _fit_with_epoch_validation(tmp_path / "crash", sets, max_epochs=2, ckpt_path=str(ckpt))
    assert history == full_history
    for key, value in full_state.items():
        assert torch.equal(state[key], value), key
    # the CSV history: the killed run's rows before the checkpoint, the resumed run's after it, each once
    metrics = "csv/version_0/metrics.csv"
    assert (tmp_path / "crash" / metrics).read_text() == (tmp_path / "full" / metrics).read_text()
