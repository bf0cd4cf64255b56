"""``ZeroVLDataModule``: several webdataset sources → one stream of training batches, resumable mid-epoch.

Wiring only: the option checks live in ``options.py``, a source's shards and counts in ``shard_list.py``,
per-slot streams in ``slot_stream.py``, bad-sample counting in ``bad_samples.py``, the choice of source per step
in ``sampling.py`` (its docstring explains how ranks and workers split the work), the worker-side batches in
``stream.py``, the loader in ``loader.py``, what training consumed (the resume state) in ``consumption.py``,
augmentations in ``transforms.py``.

What comes out (``docs/CONTRACTS.md``):

- ``train_dataloader()`` yields ``dict(image=FloatTensor[B,3,H,W], text=LongTensor[B,L], key=list[str],
  source=list[str], caption=list[str], bad_counts=dict[str,int])`` with ``B = batch_size`` per rank per
  optimizer step. ``bad_counts`` holds this rank's *cumulative* skipped-sample counts as ``{"<source>/<kind>":
  n}`` (non-zero entries; kinds in ``shards.BAD_KINDS``); summed over ranks it is the run's total.
  ``len(loader)`` is ``steps_per_epoch``.
- :meth:`ZeroVLDataModule.bad_sample_counts` gives the same counts as ``{source: {kind: n}}``; with
  ``sync=True`` (a collective: call it on every rank) summed over ranks.
- :meth:`state_dict` / :meth:`load_state_dict` (Lightning calls them when it saves/restores a checkpoint) hold
  the sampling state of every rank: epoch, steps consumed, each worker lane's position in each source, bad
  counts. Under DDP ``state_dict`` gathers the ranks' states (collective — Lightning calls it on every rank).
  Resuming needs the same sources, batch size, world size and ``num_workers``; otherwise it warns and
  continues from the saved step without exact stream positions.

What the counts mean: in a one-pass epoch every sample and shard is read once, so each bad input is counted
once per epoch (a slot that tops itself up from a second pass of its own samples does not count again, and
the ragged remainder of each slot is read at the end of the epoch so nothing goes uncounted). With
``resampled=true`` a bad image is counted at every encounter and a bad shard once per worker slot and epoch.

How the loader knows what training consumed: each batch carries a private ``_stream`` record (epoch, step,
lane, positions, bad-count deltas). When the DataModule is attached to a Trainer, its
``on_before_batch_transfer`` hook (called once per batch that reaches ``training_step``) records and removes
it, so a checkpoint taken after step k holds exactly the state after k batches, whatever the Trainer
prefetched. Without a Trainer, the loader records each batch as it yields it. Do not override
``on_before_batch_transfer`` in the LightningModule (Lightning would warn and still call this one).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from ..distributed import all_gather_object
from ..world import per_rank_batch
from .bad_samples import DEFAULT_MAX_IMAGE_PIXELS, sum_counts
from .consumption import ConsumptionTracker
from .loader import ZeroVLLoader
from .options import check_data_options
from .plan_check import check_same_plan, plan_inputs
from .sampling import SourceSampler, source_probabilities
from .shard_list import SourceInfo
from .slot_stream import slot_capacities
from .stream import ZeroVLStream
from .transforms import (
    BatchNormalize,
    TokenAugment,
    build_train_transform,
    min_crop_fraction,
    train_image_size,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _default_tokenizer() -> Any:
    import open_clip

    log.warning("ZeroVLDataModule: no tokenizer given, using open_clip's default CLIP tokenizer")
    return open_clip.get_tokenizer("ViT-B-32")


class ZeroVLDataModule(LightningDataModule):
    """Multi-source webdataset training data with ZeroVL's debiased sampling (see the module docstring).

    Args:
        sources: ``{name: {path | urls, weight?, num_samples?}}`` (or ``{name: path}``); ``path``/``urls`` is
        a
            shard dir, glob, brace pattern or list. Checked at construction: a missing path is an error here.
        sampling: ``debias`` (one source per global batch), ``shuffle`` (mixed) or ``sequential``.
        weights: ``size`` (∝ num_samples, from ``stats.json`` or the shards), ``uniform``, ``explicit``
        (per-source
            ``weight``), or a ``{name: weight}`` mapping.
        batch_size: samples per rank per optimizer step (global batch = batch_size × world size).
        global_batch_size: samples per optimizer step over all ranks; when set, ``batch_size`` is derived from
            it in ``setup`` (``global_batch_size / world size``, an error when that does not divide).
        num_workers: dataloader workers per rank (each produces every ``num_workers``-th step).
        steps_per_epoch: epoch length; default one pass (non-resampled) or Σ num_samples / global batch.
        resampled: draw shards with replacement (endless per-slot streams; for large corpora).
        seed: sampling seed (source plan, shard orders, shuffle buffers, augmentation).
        image_size: overrides the model's ``preprocess_cfg`` size.
        auto_augment / crop_scale: ZeroVL's train transform (AutoAugment on, RandomResizedCrop scale 0.6–1);
            ``crop_scale=None`` resizes and centre-crops instead (with AutoAugment off: the same pixels every
            epoch, as ``module.feature_cache`` needs).
        text_augment: ZeroVL's word-piece masking/replacement/deletion on the token ids.
        shuffle_buffer: samples in each stream's seeded shuffle buffer.
        split: ``shard`` | ``sample`` | ``auto`` — how a source is divided among rank × worker slots
            (``auto``: by shard when that loses < 2% of an epoch, else by sample).
        order: source order for ``sequential`` (default: as given).
        max_image_pixels: decompression-bomb guard (width × height).
        jpeg_draft: let libjpeg decode big JPEGs at 1/2, 1/4 or 1/8 scale when the smallest random crop
            still gets ≥ image_size pixels (no quality loss, much less decoding for large images).
        tokenizer / preprocess_cfg: from the model (``train.py`` passes ``model.tokenizer``,
            ``model.preprocess_cfg``).
        world_size / rank: override the distributed setup (tests; normally from the Trainer or
        torch.distributed).
        allow_inexact_resume: resume even when ``batch_size`` / ``num_workers`` changed since the checkpoint
            (refused otherwise, see ``config_checks.check_data_resume``); what changed is logged as a warning.
        val_sets / val_batch_size / val_num_workers: zero-shot retrieval sets of the validation loop
            (``{name: shards}`` or a glob of set folders, see :func:`~zerovl_lightning.eval.retrieval_data.
            resolve_retrieval_sets`; None: no validation) and their loaders (images per batch, workers).
    """

    def __init__(
        self,
        sources: Mapping[str, Any],
        sampling: str = "debias",
        weights: str | Mapping[str, float] = "size",
        batch_size: int = 64,
        num_workers: int = 2,
        global_batch_size: int | None = None,
        steps_per_epoch: int | None = None,
        resampled: bool = False,
        seed: int = 0,
        image_size: int | None = None,
        auto_augment: bool = True,
        crop_scale: Sequence[float] | None = (0.6, 1.0),
        text_augment: bool = False,
        shuffle_buffer: int = 1000,
        split: str = "auto",
        order: Sequence[str] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        jpeg_draft: bool = True,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        tokenizer: Any = None,
        preprocess_cfg: Mapping[str, Any] | None = None,
        world_size: int | None = None,
        rank: int | None = None,
        allow_inexact_resume: bool = False,
        val_sets: Any = None,
        val_batch_size: int = 64,
        val_num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.allow_inexact_resume = bool(allow_inexact_resume)
        self.val_sets, self.val_batch_size, self.val_num_workers = val_sets, val_batch_size, val_num_workers
        self.source_cfgs, weights = check_data_options(
            sources, sampling=sampling, weights=weights, split=split, order=order
        )
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be ≥ 1 and num_workers ≥ 0, got {batch_size}, {num_workers}")
        self.sampling, self.weights, self.batch_size, self.num_workers = (
            sampling,
            weights,
            batch_size,
            num_workers,
        )
        self.global_batch_size = None if global_batch_size is None else int(global_batch_size)
        self.steps_per_epoch_cfg, self.resampled, self.seed = steps_per_epoch, resampled, int(seed)
        self.split, self.order, self.shuffle_buffer = split, list(order) if order else None, shuffle_buffer
        self.max_image_pixels, self.pin_memory, self.prefetch_factor = (
            max_image_pixels,
            pin_memory,
            prefetch_factor,
        )
        self.tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
        self.preprocess_cfg = dict(preprocess_cfg) if preprocess_cfg is not None else {}
        self.image_size = int(image_size) if image_size is not None else None
        scale = None if crop_scale is None else tuple(crop_scale)  # None: no random crop (deterministic)
        self.train_transform = build_train_transform(
            self.preprocess_cfg, self.image_size, scale=scale, auto_augment=auto_augment
        )
        # The loader normalises whole batches: per image it stops at uint8 (same values, less copying).
        self._sample_transform = build_train_transform(
            self.preprocess_cfg,
            self.image_size,
            scale=scale,
            auto_augment=auto_augment,
            normalize=False,
        )
        self._normalize = BatchNormalize(self.preprocess_cfg)
        size = train_image_size(self.preprocess_cfg, self.image_size)
        # libjpeg may decode at 1/2, 1/4, 1/8 scale as long as the smallest crop still covers `size` pixels
        self.draft_size = math.ceil(size / min_crop_fraction(scale)) if jpeg_draft else None
        self.text_augment = TokenAugment.from_tokenizer(self.tokenizer) if text_augment else None
        self._world_override, self._rank_override = world_size, rank
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF tokenizers in forked workers
        # Fail before training: every shard path must exist (and the counts must be known).
        self.infos = [
            SourceInfo.build(
                name,
                cfg.get("path", cfg.get("urls")),
                num_samples=cfg.get("num_samples"),
                weight=cfg.get("weight"),
                scan=not resampled,
            )
            for name, cfg in self.source_cfgs.items()
        ]
        for info in self.infos:
            if info.num_samples == 0 or not any(info.shard_sizes or [1]):
                raise ValueError(f"source {info.name!r} has no samples (empty, truncated or unreadable shards)")
        self.probs = source_probabilities(
            [i.num_samples for i in self.infos], self.weights, [i.weight for i in self.infos]
        )
        self.sampler: SourceSampler | None = None
        self.splits: list[str] = []
        self.rank, self.world_size = 0, 1
        self._stream: ZeroVLStream | None = None
        self.tracker = ConsumptionTracker()
        self._next_epoch = 0  # the epoch a new loader starts with (Lightning overrides it through set_epoch)

    # --------------------------------------------------------------------------------------- set-up

    @property
    def lanes(self) -> int:
        return max(1, self.num_workers)

    def _resolve_world(self) -> tuple[int, int]:
        if self._world_override is not None:
            return int(self._rank_override or 0), int(self._world_override)
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _choose_split(self, info: SourceInfo, slots: int) -> str:
        if self.resampled:
            return "shard"
        if self.split != "auto":
            return self.split
        if len(info.urls) < slots:
            return "sample"

        # every slot serves as many batches as the smallest one (sampling.SourceSampler._lane_quotas)
        def usable(split: str) -> int:
            return int(slot_capacities(info.shard_sizes or [], slots, split).min()) // self.batch_size

        return "shard" if usable("shard") >= 0.98 * usable("sample") else "sample"

    def setup(self, stage: str | None = None) -> None:
        if stage not in (None, "fit") or self.sampler is not None:
            return
        self.rank, self.world_size = self._resolve_world()
        if self.global_batch_size is not None:
            self.batch_size = per_rank_batch(self.global_batch_size, self.world_size)
        R, W = self.world_size, self.lanes
        self.splits = [self._choose_split(i, R * W) for i in self.infos]
        caps = None
        if not self.resampled:
            caps = np.stack(
                [slot_capacities(i.shard_sizes or [], R * W, s).reshape(R, W) for i, s in zip(self.infos, self.splits)]
            )
        self.sampler = SourceSampler(
            [i.name for i in self.infos],
            self.probs,
            sizes=[i.num_samples for i in self.infos],
            capacities=caps,
            mode=self.sampling,
            resampled=self.resampled,
            batch_size=self.batch_size,
            world_size=R,
            lanes=W,
            seed=self.seed,
            steps_per_epoch=self.steps_per_epoch_cfg,
            size_weighted=self.weights == "size",
            order=self.order,
        )
        settings = {
            "splits": self.splits,
            "steps_per_epoch": self.sampler.steps_per_epoch,
            "batch_size": self.batch_size,
            "world_size": R,
            "lanes": W,
            "sampling": self.sampling,
            "weights": [float(p) for p in self.probs],
            "resampled": self.resampled,
            "seed": self.seed,
        }
        check_same_plan(plan_inputs(self.infos, settings), all_gather_object)  # one collective under DDP
        slots = R * W
        shared = [i for i, s in zip(self.infos, self.splits) if s == "sample" and slots > 1]
        if shared and self.rank == 0:
            log.warning(
                "split=sample: every one of the %d rank × worker slots reads all shards of %s and keeps every "
                "%d-th sample, so each epoch reads %s %d times (reading, not decoding). Write such a source "
                "in ≥ %d shards (zerovl-data … --samples-per-shard) to read it once per epoch.",
                slots,
                ", ".join(f"{i.name!r} ({len(i.urls)} shards)" for i in shared),
                slots,
                "it" if len(shared) == 1 else "each",
                slots,
                slots,
            )
        if self.rank == 0:
            log.info(
                "%s; splits: %s",
                self.sampler.describe(),
                dict(zip([i.name for i in self.infos], self.splits)),
            )

    @property
    def steps_per_epoch(self) -> int:
        self.setup("fit")
        assert self.sampler is not None
        return self.sampler.steps_per_epoch

    def train_dataloader(self) -> ZeroVLLoader:
        self.setup("fit")
        assert self.sampler is not None
        self._stream = ZeroVLStream(
            self.infos,
            self.splits,
            self.sampler,
            rank=self.rank,
            tokenizer=self.tokenizer,
            transform=self._sample_transform,
            normalize=self._normalize,
            text_augment=self.text_augment,
            shuffle_buffer=self.shuffle_buffer,
            max_image_pixels=self.max_image_pixels,
            draft_size=self.draft_size,
        )
        self._stream.epoch = self._next_epoch
        kwargs: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return ZeroVLLoader(self, self._stream, **kwargs)

    def val_dataloader(self) -> list[Any]:
        """One loader per retrieval set, this rank's unique images (eval/retrieval_data.py); none without sets."""
        if not self.val_sets:
            return []
        from zerovl_lightning.eval.retrieval_data import resolve_retrieval_sets, retrieval_loaders

        rank, world_size = self._resolve_world()
        return retrieval_loaders(resolve_retrieval_sets(self.val_sets), self.preprocess_cfg, self.val_batch_size,
                                 self.val_num_workers, rank, world_size)  # fmt: skip

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "_stream" in batch:
            return self.tracker.observe(batch)
        return batch

    # ------------------------------------------------------------------------------- counts & state

    def bad_sample_counts(self, sync: bool = False) -> dict[str, dict[str, int]]:
        """Skipped samples per source and kind (non-zero only): this rank's, or all ranks' with
        ``sync=True``."""
        local = self.tracker.counts  # sum_counts only reads; it returns new dicts
        return sum_counts(all_gather_object(local) if sync else [local])

    def _fingerprint(self) -> dict[str, Any]:
        assert self.sampler is not None
        return {
            "sources": [i.name for i in self.infos],
            "num_samples": [i.num_samples for i in self.infos],
            "num_shards": [len(i.urls) for i in self.infos],
            "splits": self.splits,
            "sampling": self.sampling,
            "resampled": self.resampled,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "lanes": self.lanes,
            "seed": self.seed,
            "steps_per_epoch": self.sampler.steps_per_epoch,
        }

    def state_dict(self) -> dict[str, Any]:
        """Sampling state of all ranks (gathered under DDP — a collective, as in Lightning's
        checkpointing)."""
        if self.sampler is None:
            return {}
        local = self.tracker.local_state()
        if self.tracker.step == 0 and self._stream is not None:
            local["epoch"] = self._stream.epoch
        ranks = all_gather_object(local)
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "epoch": local["epoch"],
            "step": local["step"],
            "ranks": ranks,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the sampling state; the next epoch iterated resumes after the last consumed step."""
        if not state_dict:
            return
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported ZeroVLDataModule state version {state_dict.get('version')}")
        self.setup("fit")
        ranks = state_dict["ranks"]
        from ..config_checks import check_data_resume

        check_data_resume(state_dict["fingerprint"], self._fingerprint(), self.allow_inexact_resume)
        exact = state_dict["fingerprint"] == self._fingerprint() and len(ranks) == self.world_size
        if not exact:
            log.warning(
                "data configuration changed since the checkpoint (%s → %s): resuming at epoch %d step %d "
                "without "
                "exact stream positions",
                state_dict["fingerprint"],
                self._fingerprint(),
                state_dict["epoch"],
                state_dict["step"],
            )
        mine = ranks[self.rank] if self.rank < len(ranks) else {"positions": {}, "bad_counts": {}}
        assert self.sampler is not None
        epoch, step = int(state_dict["epoch"]), int(state_dict["step"])
        if step >= self.sampler.steps_per_epoch:  # saved at the end of an epoch: continue with the next one
            epoch, step = epoch + 1, 0
        self.tracker.restore(epoch, step, mine, exact)
        self._next_epoch = epoch
        if self._stream is not None:
            self._stream.epoch = epoch
