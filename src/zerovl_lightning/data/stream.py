"""The worker side of ``ZeroVLDataModule``: one rank's training batches for one epoch, lane by lane.

Each batch carries a private ``_stream`` record (epoch, step, lane, positions, bad-count deltas) that the main
process's :class:`~.consumption.ConsumptionTracker` records and removes (``datamodule.py`` explains when).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .bad_samples import decode_sample, new_counts
from .sampling import SourceSampler
from .shard_list import SourceInfo
from .slot_stream import SlotStream, derive_seed
from .transforms import (
    TokenAugment,
)

log = logging.getLogger(__name__)


class ZeroVLStream(IterableDataset):
    """This rank's training batches for one epoch; each dataloader worker produces the steps of its lane.

    Worker ``i`` of ``W`` produces steps ``start + i, start + i + W, …`` (lane ``(start + i) mod W``), so the
    DataLoader's round-robin order over workers is step order, also after a resume at any ``start``.
    """

    def __init__(
        self,
        infos: Sequence[SourceInfo],
        splits: Sequence[str],
        sampler: SourceSampler,
        *,
        rank: int,
        tokenizer: Any,
        transform: Any,
        normalize: Any,
        text_augment: TokenAugment | None,
        shuffle_buffer: int,
        max_image_pixels: int,
        draft_size: int | None,
    ) -> None:
        super().__init__()
        self.infos, self.splits, self.sampler, self.rank = list(infos), list(splits), sampler, rank
        self.tokenizer, self.transform, self.text_augment = tokenizer, transform, text_augment
        self.normalize = normalize
        self.shuffle_buffer = shuffle_buffer
        self.max_image_pixels, self.draft_size = max_image_pixels, draft_size
        self.epoch = 0
        self.start_step = 0
        self.start_positions: dict[int, dict[str, int]] = {}  # lane -> source -> raw position at start_step

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start (through the loader's ``sampler``)."""
        self.epoch = int(epoch)

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if nw != self.sampler.lanes:
            raise RuntimeError(f"ZeroVLStream built for {self.sampler.lanes} worker lanes runs with {nw} workers")
        return wid, nw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = self._worker()
        sampler, epoch, start, B = self.sampler, self.epoch, self.start_step, self.sampler.batch_size
        lane = (start + wid) % nw
        steps = range(start + wid, sampler.steps_per_epoch, nw)
        if len(steps) == 0:
            return
        plan = sampler.lane_sources(epoch, self.rank, lane)
        names = [i.name for i in self.infos]
        start_pos = self.start_positions.get(lane, {})
        streams: dict[int, SlotStream] = {}
        reported = {n: new_counts() for n in names}

        def stream(k: int) -> SlotStream:
            if k not in streams:
                s = SlotStream(
                    self.infos[k],
                    slot=self.rank * nw + lane,
                    num_slots=sampler.world_size * nw,
                    epoch=epoch,
                    seed=sampler.seed,
                    split=self.splits[k],
                    resampled=sampler.resampled,
                    shuffle_buffer=self.shuffle_buffer,
                )
                s.seek(start_pos.get(names[k], 0))
                streams[k] = s
            return streams[k]

        def good(k: int) -> tuple[Any, str, str]:
            s = stream(k)
            for _ in range(max(1000, 100 * B)):
                raw = s.next_raw()
                out = decode_sample(raw, s.counter, max_image_pixels=self.max_image_pixels, draft_size=self.draft_size)
                if out is not None:
                    return out[0], out[1], raw["__key__"]
            raise RuntimeError(f"source {names[k]!r}: no usable sample in {max(1000, 100 * B)} consecutive reads")

        for s_idx in steps:
            row = plan[(s_idx - lane) // nw]
            srcs = np.full(B, row) if np.ndim(row) == 0 else row
            images, captions, keys, labels = [], [], [], []
            with torch.random.fork_rng(devices=[]):
                # CPU generator only: torch.manual_seed would also reseed CUDA, outside fork_rng(devices=[])
                torch.random.default_generator.manual_seed(derive_seed(sampler.seed, epoch, s_idx, self.rank, "image"))
                for k in srcs:
                    img, caption, key = good(int(k))
                    images.append(self.transform(img))
                    captions.append(caption)
                    keys.append(key)
                    labels.append(names[int(k)])
            text = self.tokenizer(captions)
            if self.text_augment is not None:
                gen = torch.Generator().manual_seed(derive_seed(sampler.seed, epoch, s_idx, self.rank, "text"))
                text = self.text_augment(text, gen)
            if s_idx + nw >= sampler.steps_per_epoch and not sampler.resampled:
                self._drain(stream, names, B)
            bad: dict[str, dict[str, int]] = {}
            for k, st in streams.items():
                delta = {kind: n - reported[names[k]][kind] for kind, n in st.counter.counts.items()}
                delta = {kind: d for kind, d in delta.items() if d}
                if delta:
                    bad[names[k]] = delta
                    reported[names[k]] = dict(st.counter.counts)
            positions = {n: start_pos.get(n, 0) for n in names}
            positions.update({names[k]: st.position for k, st in streams.items()})
            yield {
                "image": self.normalize(torch.stack(images)),
                "text": text,
                "key": keys,
                "source": labels,
                "caption": captions,
                "_stream": {"epoch": epoch, "step": s_idx, "lane": lane, "positions": positions, "bad": bad},
            }

    def _drain(self, stream: Any, names: list[str], B: int) -> None:
        """End of a one-pass epoch: read this slot's ragged remainder of every source so its bad samples
        count."""
        for k in range(len(names)):
            s = stream(k)
            for raw in s.drain(limit=4 * B):
                decode_sample(raw, s.counter, max_image_pixels=self.max_image_pixels, draft_size=self.draft_size)
