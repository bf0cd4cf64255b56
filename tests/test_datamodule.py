"""ZeroVLDataModule end to end on tiny shards: batch contract, single-source global batches under
(simulated and real) DDP × workers, exact one-pass coverage, epochs, resume (by hand and through Lightning),
config errors, transforms."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from shard_fixtures import write_source

from zerovl_lightning.data.datamodule import ZeroVLDataModule
from zerovl_lightning.data.transforms import TokenAugment, build_train_transform
from zerovl_lightning.model import build_tiny

SIZES = {"a": 96, "b": 48, "c": 32}  # shards of 8 → with B=4, R=2, W=2: 12 / 6 / 4 steps per epoch


@pytest.fixture(scope="module")
def tiny() -> Any:
    return build_tiny()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    for name, n in SIZES.items():
        write_source(root / name, name, n, 8)
    return root


def make_dm(root: Path, tiny: Any, **kw: Any) -> ZeroVLDataModule:
    args: dict[str, Any] = dict(
        sources={n: {"path": str(root / n)} for n in SIZES},
        batch_size=4,
        num_workers=2,
        seed=1,
        shuffle_buffer=16,
        tokenizer=tiny.tokenizer,
        preprocess_cfg=tiny.preprocess_cfg,
    )
    args.update(kw)
    return ZeroVLDataModule(**args)


def run_epoch(dm: ZeroVLDataModule, limit: int | None = None) -> list[tuple[list[str], list[str]]]:
    """(sources, keys) of each batch of one epoch (or its first ``limit`` batches)."""
    out = []
    for i, batch in enumerate(dm.train_dataloader()):
        if limit is not None and i >= limit:
            break
        out.append((batch["source"], batch["key"]))
    return out


def all_keys() -> set[str]:
    return {f"{n}-{i:05d}" for n, size in SIZES.items() for i in range(size)}


def test_batch_contract(data_root: Path, tiny: Any) -> None:
    dm = make_dm(data_root, tiny, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "text", "key", "source", "caption", "bad_counts"}
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (4, tiny.context_length) and batch["text"].dtype == torch.long
    assert len(batch["key"]) == len(batch["source"]) == len(batch["caption"]) == 4
    assert batch["bad_counts"] == {}
    # captions belong to their keys; the model's tokenizer produced the ids
    for key, caption in zip(batch["key"], batch["caption"]):
        src, idx = key.rsplit("-", 1)
        assert caption == f"a picture of {src} number {int(idx)}"
    assert torch.equal(batch["text"], tiny.tokenizer(batch["caption"]))
    assert -3 < batch["image"].mean() < 3 and batch["image"].std() > 0.05  # normalised, not raw 0..255
    assert len(dm.train_dataloader()) == dm.steps_per_epoch == 44  # 176 samples / B=4, one rank


def test_simulated_ddp_debias_single_source_exact_coverage_and_epochs_differ(
    data_root: Path, tiny: Any
) -> None:
    """2 ranks × 2 workers, one pass: every global batch has one source, every sample appears exactly once,
    source frequencies equal the size weights, and the next epoch has another order."""
    ranks = [make_dm(data_root, tiny, world_size=2, rank=r) for r in range(2)]
    assert ranks[0].steps_per_epoch == 22
    epochs = []
    for _ in range(2):
        per_rank = [run_epoch(dm) for dm in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 22
        steps = []
        for (src0, keys0), (src1, keys1) in zip(*per_rank):
            sources = set(src0) | set(src1)
            assert len(sources) == 1, sources  # the global batch is single-source
            assert all(k.startswith(f"{next(iter(sources))}-") for k in keys0 + keys1)
            steps.append((sources.pop(), keys0 + keys1))
        keys = [k for _, ks in steps for k in ks]
        assert len(keys) == len(set(keys)) == sum(SIZES.values())  # no duplicates …
        assert set(keys) == all_keys()  # … and nothing missing
        assert Counter(s for s, _ in steps) == {"a": 12, "b": 6, "c": 4}  # = sizes / global batch
        epochs.append(steps)
    assert [s for s, _ in epochs[0]] != [s for s, _ in epochs[1]]
    assert [k for _, k in epochs[0]] != [k for _, k in epochs[1]]


def _ddp_worker(rank: int, world: int, root: str, out: str, init: str, tiny: Any) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        dm = make_dm(Path(root), tiny)  # rank and world size from torch.distributed
        record: dict[str, Any] = {"steps_per_epoch": dm.steps_per_epoch, "epochs": []}
        for _ in range(2):
            record["epochs"].append(run_epoch(dm))
        state = dm.state_dict()  # a collective: gathers every rank's positions
        record["state_ranks"] = len(state["ranks"])
        record["bad"] = dm.bad_sample_counts(sync=True)
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_real_ddp_two_processes_two_workers(data_root: Path, tiny: Any, tmp_path: Path) -> None:
    """Two gloo processes, each with 2 dataloader workers: the same guarantees as the simulated test.

    The processes are forked (not spawned) so they skip re-importing torch: seconds instead of a minute."""
    import torch.multiprocessing as mp

    mp.start_processes(
        _ddp_worker,
        args=(2, str(data_root), str(tmp_path), f"file://{tmp_path / 'init'}", tiny),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    rec = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert rec[0]["steps_per_epoch"] == rec[1]["steps_per_epoch"] == 22
    assert rec[0]["state_ranks"] == 2 and rec[0]["bad"] == {}
    orders = []
    for e in range(2):
        keys, order = [], []
        for (src0, keys0), (src1, keys1) in zip(rec[0]["epochs"][e], rec[1]["epochs"][e]):
            assert len(set(src0) | set(src1)) == 1
            keys += keys0 + keys1
            order.append(src0[0])
        assert len(keys) == len(set(keys)) and set(keys) == all_keys()
        assert Counter(order) == {"a": 12, "b": 6, "c": 4}
        orders.append(order)
    assert orders[0] != orders[1]


@pytest.mark.parametrize(
    ("kw", "k"),
    [
        ({}, 5),  # one pass, debias, resume at an odd step (the worker lanes rotate)
        ({"resampled": True, "steps_per_epoch": 9}, 4),
        ({"sampling": "shuffle", "text_augment": True}, 3),
        ({"sampling": "sequential", "num_workers": 0}, 6),
    ],
)
def test_resume_mid_epoch_repeats_the_uninterrupted_sources_and_keys(
    data_root: Path, tiny: Any, kw: dict[str, Any], k: int
) -> None:
    ref = make_dm(data_root, tiny, **kw)
    ref_loader = ref.train_dataloader()
    uninterrupted = [(b["source"], b["key"], b["image"], b["text"]) for e in range(2) for b in ref_loader]

    first = make_dm(data_root, tiny, **kw)
    it = iter(first.train_dataloader())
    for _ in range(k):
        next(it)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["step"] == k
    del it

    resumed = make_dm(data_root, tiny, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
    loader = resumed.train_dataloader()
    rest = [(b["source"], b["key"], b["image"], b["text"]) for e in range(2) for b in loader]
    assert len(rest) == len(uninterrupted) - k
    for (s0, k0, im0, t0), (s1, k1, im1, t1) in zip(uninterrupted[k:], rest):
        assert s0 == s1 and k0 == k1
        assert torch.equal(im0, im1) and torch.equal(t0, t1)  # augmentation is replayed too


class _Recorder:
    """A tiny LightningModule factory (import lightning lazily: it is slow to import)."""

    @staticmethod
    def make() -> Any:
        import lightning.pytorch as pl

        class Recorder(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.seen: list[tuple[str, list[str], float, int]] = []

            def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
                assert "_stream" not in batch
                pixels = float(batch["image"].double().sum())  # augmentation replayed exactly, too
                self.seen.append((batch["source"][0], list(batch["key"]), pixels, int(batch["text"].sum())))
                return (self.w * batch["image"].mean()).sum() ** 2

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Recorder()


def _trainer(tmp: Path, **kw: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp),
        num_sanity_val_steps=0,
        **kw,
    )


def test_lightning_checkpoint_resume_continues_the_same_stream(
    data_root: Path, tiny: Any, tmp_path: Path
) -> None:
    """Interrupt a Lightning run after k steps, resume from its checkpoint: the following sources and sample
    keys equal the uninterrupted run's, into the next epoch."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    full = _Recorder.make()
    _trainer(tmp_path / "full", max_epochs=2, enable_checkpointing=False).fit(
        full, datamodule=make_dm(data_root, tiny)
    )
    assert len(full.seen) == 88  # 2 epochs × 176 samples / B=4
    assert full.seen[:44] != full.seen[44:]  # Lightning's set_epoch reaches the stream: epochs differ
    assert {k for _, ks, _, _ in full.seen[:44] for k in ks} == all_keys()

    for k in (7, 51):  # mid-epoch 0 (odd: the worker lanes rotate), and mid-epoch 1
        ckpt_dir = tmp_path / f"ckpt{k}"
        part = _Recorder.make()
        cb = ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=k, save_top_k=-1)
        _trainer(tmp_path / f"part{k}", max_steps=k, callbacks=[cb]).fit(
            part, datamodule=make_dm(data_root, tiny)
        )
        assert part.seen == full.seen[:k]
        (ckpt,) = ckpt_dir.glob("*.ckpt")
        saved = torch.load(ckpt, weights_only=False)["ZeroVLDataModule"]
        assert (saved["epoch"], saved["step"]) == divmod(k, 44)

        resumed = _Recorder.make()
        _trainer(tmp_path / f"resumed{k}", max_epochs=2, enable_checkpointing=False).fit(
            resumed, datamodule=make_dm(data_root, tiny), ckpt_path=str(ckpt)
        )
        assert resumed.seen == full.seen[k:]


def test_missing_shard_path_is_a_clear_error_at_construction(
    data_root: Path, tiny: Any, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match=r"source 'x'.*not found"):
        make_dm(
            data_root, tiny, sources={"x": {"path": str(tmp_path / "nope" / "shard-{000000..000003}.tar")}}
        )
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards"):
        make_dm(data_root, tiny, sources={"x": {"path": str(tmp_path)}})
    with pytest.raises(FileNotFoundError, match="no shards match"):
        make_dm(data_root, tiny, sources={"x": str(tmp_path / "*.tar")})


def test_config_errors_name_the_problem(data_root: Path, tiny: Any) -> None:
    with pytest.raises(ValueError, match="unknown source"):
        make_dm(data_root, tiny, weights={"a": 1.0, "zz": 2.0})
    with pytest.raises(ValueError, match="unknown source"):
        make_dm(data_root, tiny, sampling="sequential", order=["a", "zz"])
    with pytest.raises(ValueError, match="unknown key"):
        make_dm(data_root, tiny, sources={"a": {"path": str(data_root / "a"), "wieght": 2}})
    with pytest.raises(ValueError, match="sampling must be"):
        make_dm(data_root, tiny, sampling="mixed")
    with pytest.raises(ValueError, match="exceeds one pass"):
        make_dm(data_root, tiny, steps_per_epoch=1000).setup("fit")


def test_sources_as_brace_pattern_glob_and_list_with_explicit_weights(data_root: Path, tiny: Any) -> None:
    a = data_root / "a"
    dm = make_dm(
        data_root,
        tiny,
        num_workers=0,
        sources={
            "a": {"urls": str(a / "shard-{000000..000011}.tar")},
            "b": {"path": str(data_root / "b" / "*.tar"), "weight": 1.0},
            "c": {"path": [str(p) for p in sorted((data_root / "c").glob("*.tar"))]},
        },
        weights={"a": 1.0, "b": 1.0, "c": 0.0},
    )
    assert [len(i.urls) for i in dm.infos] == [12, 6, 4]
    assert [i.num_samples for i in dm.infos] == [96, 48, 32]
    seen = Counter(s[0] for s, _ in run_epoch(dm))
    assert seen == {"a": 12, "b": 12}  # b's 48 samples limit the equal-weight epoch; c is off


def test_train_transform(tiny: Any) -> None:
    from PIL import Image

    img = Image.new("RGB", (50, 40), (255, 0, 0))
    train = build_train_transform(tiny.preprocess_cfg, 32)
    x = train(img)
    assert x.shape == (3, 32, 32)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["RandomResizedCrop", "AutoAugment", "ToTensor", "Normalize"]
    assert train.transforms[0].scale == (0.6, 1.0)
    assert "AutoAugment" not in [
        type(t).__name__ for t in build_train_transform(None, 32, auto_augment=False).transforms
    ]


def test_token_augment_keeps_special_tokens_and_padding(tiny: Any) -> None:
    tok = tiny.tokenizer
    aug = TokenAugment.from_tokenizer(tok)
    assert aug.mask_id is None  # CLIP BPE has no mask token: masking falls back to deletion
    texts = ["one two three four five six seven eight nine ten eleven twelve thirteen"] * 400
    ids = tok(texts)
    out = aug(ids, torch.Generator().manual_seed(0))
    sot, eot = tok.sot_token_id, tok.eot_token_id
    n_in = int((ids[0] != 0).sum()) - 2
    changed, lengths = 0, []
    for row in out:
        end = int((row == eot).nonzero()[0])
        assert row[0] == sot and (row[end + 1 :] == 0).all()
        assert not ((row[1:end] == sot) | (row[1:end] == eot)).any()
        lengths.append(end - 1)
        changed += int(end - 1 != n_in or not torch.equal(row[1:end], ids[0, 1 : n_in + 1]))
    # p(pick) = 0.2, and 90% of picks delete (mask → delete here): ~18% of the word pieces go
    mean_deleted = n_in - sum(lengths) / len(lengths)
    assert 0.12 * n_in < mean_deleted < 0.24 * n_in
    assert changed > 0.9 * len(out)

    # With a mask token (BERT-style): masked positions carry it, lengths shrink only by deletions.
    bert = TokenAugment(bos_id=101, eos_id=102, pad_id=0, mask_id=103, vocab_size=1000, special_ids=[100])
    row = torch.tensor([[101] + list(range(200, 260)) + [102] + [0] * 10] * 300)
    out = bert(row, torch.Generator().manual_seed(1))
    masked = (out == 103).float().sum() / (300 * 60)
    assert 0.07 < masked < 0.13  # 0.2 × 0.5
    assert ((out == 102).sum(1) == 1).all() and (out[:, 0] == 101).all()
    assert not torch.isin(out, torch.tensor([100])).any()


def test_datamodule_composes_from_the_hydra_config(
    data_root: Path, tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import zerovl_lightning.assets  # noqa: F401  (registers ${zerovl.asset:...})

    conf = Path(__file__).resolve().parents[1] / "conf" / "data"
    for name in ("demo", "custom"):
        assert (conf / f"{name}.yaml").is_file()
    cfg = OmegaConf.load(conf / "custom.yaml")
    cfg.sources = {n: {"path": str(data_root / n)} for n in SIZES}
    cfg.num_workers = 0
    cfg.seed = 0  # ${oc.select:seed,0} points at the root config's seed once composed
    dm = instantiate(cfg, tokenizer=tiny.tokenizer, preprocess_cfg=tiny.preprocess_cfg)
    assert isinstance(dm, ZeroVLDataModule) and dm.sampling == "debias"
    demo = OmegaConf.load(conf / "demo.yaml")
    demo.seed = 0  # ${oc.select:seed,0} points at the root config's seed once composed
    assert set(demo.sources) == {"tuxpaint", "emoji", "openclipart", "flags"}
    monkeypatch.setenv("ZEROVL_CACHE", str(data_root))
    resolved = OmegaConf.to_container(demo, resolve=True)
    assert resolved["sources"]["flags"]["path"] == str(data_root / "demo" / "flags" / "train")


def test_jpeg_draft_decodes_big_images_at_a_scale_that_still_covers_the_crop() -> None:
    import io

    from PIL import Image

    from zerovl_lightning.data.shards import BadSampleCounter, decode_sample
    from zerovl_lightning.data.transforms import min_crop_fraction

    buf = io.BytesIO()
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(buf, format="JPEG")
    draft = math.ceil(224 / min_crop_fraction((0.6, 1.0)))  # 334: the smallest 0.6-area crop keeps 224 px
    out = decode_sample({"jpg": buf.getvalue(), "txt": b"green"}, BadSampleCounter(), draft_size=draft)
    assert out is not None and out[0].size == (800, 600)  # libjpeg 1/2 scale (1/4 would be < 334 px)
    full = decode_sample({"jpg": buf.getvalue(), "txt": b"green"}, BadSampleCounter())
    assert full is not None and full[0].size == (1600, 1200)
