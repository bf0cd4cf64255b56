"""One (rank, worker) slot's raw-sample stream of one source in one epoch, resumable by position.

Built from webdataset stages (``SimpleShardList`` / ``ResampledShards`` → tar reading with the skip-and-count
handler → seeded ``shuffle``), deterministic from ``(seed, epoch, source, slot)`` so that a position (raw samples
consumed) is all it takes to resume: :meth:`SlotStream.seek` replays nothing it can compute.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np
import webdataset as wds

from .bad_samples import BadSampleCounter
from .shard_list import SourceInfo, _local_path, is_remote, tar_sample_offsets

# ------------------------------------------------------------------------------------- slot streams


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings, stable across processes (no Python ``hash``)."""
    ints = [int.from_bytes(p.encode(), "little") % (2**63) if isinstance(p, str) else int(p) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> np.uint64(1))


def slot_capacities(sizes: Sequence[int], num_slots: int, split: str) -> np.ndarray:
    """Raw samples each slot reads in one pass: shard-level split deals shards, sample-level split deals
    samples."""
    caps = np.zeros(num_slots, dtype=np.int64)
    if split == "shard":
        for i, n in enumerate(sizes):
            caps[i % num_slots] += n
    elif split == "sample":
        total = int(sum(sizes))
        caps[:] = total // num_slots
        caps[: total % num_slots] += 1
    else:
        raise ValueError(f"split must be 'shard' or 'sample', got {split!r}")
    return caps


def buffer_shuffle(data: Iterator[Any], bufsize: int, rng: random.Random, buf: list[Any]) -> Iterator[Any]:
    """webdataset's ``shuffle`` stage (``filters._shuffle`` with ``initial == bufsize``) over a buffer the caller
    owns, so a stream can be continued from any (buffer, rng, input cursor) state.

    Which buffer slot is picked depends only on the buffer's length, never on the samples: running this on
    input *indices* (:func:`shuffle_state`) tells which inputs a real stream holds after any number of outputs.
    """
    for sample in data:
        buf.append(sample)
        if len(buf) < bufsize:
            try:
                buf.append(next(data))
            except StopIteration:
                pass
        if len(buf) >= bufsize:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list[Any], rng: random.Random) -> Any:  # webdataset.filters.pick
    k = rng.randint(0, len(buf) - 1)
    sample = buf[k]
    buf[k] = buf[-1]
    buf.pop()
    return sample


def shuffle_state(
    outputs: int, bufsize: int, seed: int, total: int | None
) -> tuple[list[int], random.Random, int, bool]:
    """State of :func:`buffer_shuffle` after ``outputs`` outputs from ``total`` inputs (None: endless): the
    buffered input indices in buffer order, the rng, the inputs read, and whether the input has been asked
    past its end (the real stream has then opened every remaining shard). O(outputs) integers, no I/O."""
    rng, buf, ended = random.Random(seed), [], []

    def src() -> Iterator[int]:
        yield from (range(total) if total is not None else itertools.count())
        ended.append(True)

    for _ in islice(buffer_shuffle(src(), bufsize, rng, buf), outputs):
        pass
    return buf, rng, len(buf) + outputs, bool(ended)


class SlotStream:
    """The raw samples of one source for one slot (rank × worker lane) in one epoch, with a position.

    - ``split="shard"``: the slot reads shards ``i ≡ slot (mod num_slots)`` in an epoch-shuffled order.
    - ``split="sample"``: every slot reads all shards in the same epoch-shuffled order through the same seeded
      shuffle buffer and keeps raw samples ``j ≡ slot (mod num_slots)`` — balanced to ±1 sample whatever the
      shard layout, at the cost of reading (not decoding) the source ``num_slots`` times; used for small
      sources.
    - ``resampled``: shards drawn with replacement (``wds.ResampledShards``), an endless stream per slot.

    Non-resampled streams that run dry (only when bad samples or uneven shards leave a slot short of its
    schedule) wrap into a fresh pass with a new shuffle; the position keeps counting across passes.

    The reading is webdataset's (``url_opener`` → ``tar_file_expander`` → ``group_by_keys``, the stages of
    ``tarfile_to_samples``) with each shard optionally opened at a sample's header offset, and its shuffle
    (:func:`buffer_shuffle`). :meth:`seek` resumes at a position by arithmetic on the per-shard counts: it
    recomputes the shuffle buffer's input indices, fetches those samples by seeking, and continues reading at
    the first unread sample — shards before it are never opened, so a resume costs O(buffer + one shard),
    not O(position).
    """

    def __init__(
        self,
        info: SourceInfo,
        *,
        slot: int,
        num_slots: int,
        epoch: int,
        seed: int,
        split: str,
        resampled: bool,
        shuffle_buffer: int,
    ) -> None:
        self.info, self.slot, self.num_slots, self.epoch, self.seed = info, slot, num_slots, epoch, seed
        self.split, self.resampled, self.shuffle_buffer = split, resampled, shuffle_buffer
        self.position = 0  # raw samples handed out (bad ones included), across passes
        self.passes = 0
        self.opened_shards = 0  # shard opens and their file sizes (local), for benchmarks and tests
        self.opened_bytes = 0
        self._it: Iterator[dict[str, Any]] | None = None
        self._yielded_in_pass = 0
        self._skipping = False
        self._sizes = dict(zip(info.urls, info.shard_sizes or [0] * len(info.urls)))
        self._offsets: dict[str, tuple[list[int], bool]] = {}
        owner = {u: i % num_slots for i, u in enumerate(info.urls)}
        # With a sample-level split every slot reads every shard: only the shard's owner counts its errors.
        shared = split == "sample" and not resampled
        self.counter = BadSampleCounter(info.urls, (lambda url: owner.get(url) == slot) if shared else None)

    # ----------------------------------------------------------------------------- what a pass reads

    def _seeds(self, pass_index: int) -> tuple[int, int]:
        """(shard-order seed, shuffle-buffer seed) of a pass."""
        name = self.info.name
        if self.split == "sample" and not self.resampled:  # the same order and buffer in every slot
            parts: tuple[Any, ...] = (self.seed, self.epoch, name, pass_index)
        else:
            parts = (self.seed, self.epoch, name, self.slot, pass_index)
        return derive_seed(*parts, "shards"), derive_seed(*parts, "buffer")

    def _shard_order(self, pass_index: int) -> Iterator[str]:
        """Shard urls in the order a pass reads them (endless when resampled)."""
        urls = self.info.urls
        order_seed, _ = self._seeds(pass_index)
        if self.resampled:
            draws = wds.ResampledShards(urls, seed=order_seed, worker_seed=lambda: 0, deterministic=True)
            return (d["url"] for d in draws)
        if self.split == "shard":
            mine = [u for i, u in enumerate(urls) if i % self.num_slots == self.slot]
        else:
            mine = list(urls)
        random.Random(order_seed).shuffle(mine)
        return iter(mine)

    def _take(self) -> tuple[int, int]:
        """(first, stride) of the shuffled samples this slot keeps."""
        if self.split == "sample" and not self.resampled:
            return self.slot, self.num_slots
        return 0, 1

    def _pass_inputs(self) -> int:
        """Raw samples one (non-resampled) pass reads through the shuffle buffer."""
        return int(sum(self._sizes[u] for u in self._shard_order(0)))

    def _pass_length(self) -> int:
        """Raw samples one (non-resampled) pass hands to this slot."""
        first, stride = self._take()
        return len(range(first, self._pass_inputs(), stride))

    def _read(self, shards: Iterable[tuple[str, int]]) -> Iterator[dict[str, Any]]:
        """Raw samples of ``(url, first sample)`` pairs: webdataset's tar reading, each shard opened at its
        first sample's header offset (local files) or read past it (remote streams cannot seek)."""
        handler = self.counter.handler
        drop: dict[str, int] = {}

        def opened() -> Iterator[dict[str, Any]]:
            for src in wds.tariterators.url_opener(({"url": u, "first": j} for u, j in shards), handler=handler):
                self.opened_shards += 1
                url, first = src["url"], src.pop("first")
                if not is_remote(url):
                    self.opened_bytes += os.path.getsize(_local_path(url))
                drop[url] = 0
                if first and is_remote(url):
                    drop[url] = first
                elif first:
                    src["stream"].seek(self._sample_offsets(url)[first])
                yield src

        files = wds.tariterators.tar_file_expander(opened(), handler=handler)
        for sample in wds.tariterators.group_by_keys(files, handler=handler):
            url = sample.get("__url__")
            if drop.get(url):
                drop[url] -= 1
                continue
            yield sample

    def _sample_offsets(self, url: str) -> list[int]:
        if url not in self._offsets:
            self._offsets[url] = tar_sample_offsets(url)
        return self._offsets[url][0]

    def _ends_cleanly(self, url: str) -> bool:
        if is_remote(url):
            return True
        self._sample_offsets(url)
        return self._offsets[url][1]

    def _pipeline(self, pass_index: int) -> Iterator[dict[str, Any]]:
        self.counter.new_pass()
        _, buf_seed = self._seeds(pass_index)
        it = self._read((u, 0) for u in self._shard_order(pass_index))
        if self.shuffle_buffer > 1:
            it = buffer_shuffle(it, self.shuffle_buffer, random.Random(buf_seed), [])
        first, stride = self._take()
        return islice(it, first, None, stride) if stride > 1 else it

    # ------------------------------------------------------------------------------------- reading

    def next_raw(self) -> dict[str, Any]:
        """Next raw sample (undecoded); wraps into a new pass when a finite stream ends."""
        for _ in range(2):
            if self._it is None:
                self._it = self._pipeline(self.passes)
                self._yielded_in_pass = 0
            try:
                sample = next(self._it)
            except StopIteration:
                if self.resampled or self._yielded_in_pass == 0:
                    break
                self._it = None
                self.passes += 1
                self._update_mute()
                continue
            self.position += 1
            self._yielded_in_pass += 1
            return sample
        raise RuntimeError(
            f"source {self.info.name!r}: slot {self.slot}/{self.num_slots} has no readable samples "
            f"(shards: {len(self.info.urls)}; all empty, truncated or unreadable?)"
        )

    def seek(self, n: int) -> None:
        """Resume a fresh stream at position ``n`` (raw samples handed out before), exactly as if ``n`` samples
        had been read: without reading them (see the class docstring). Errors met before ``n`` were counted
        before the checkpoint and are not counted again. Falls back to :meth:`skip` when the per-shard counts
        are assumed rather than counted."""
        if n <= 0:
            return
        if self.position or self._it is not None:
            raise RuntimeError("SlotStream.seek needs a fresh stream")
        if not self.info.exact_sizes:
            self.skip(n)
            return
        offset = n
        if not self.resampled:
            per_pass = self._pass_length()
            if per_pass == 0:
                self.skip(n)  # nothing readable: let next_raw raise its error
                return
            self.passes, offset = divmod(n, per_pass)
            if offset == 0:  # a pass ended exactly here: the next read opens the next pass
                self.passes -= 1
                offset = per_pass
        self.position, self._yielded_in_pass = n, offset
        self._update_mute()
        first, stride = self._take()
        outputs = first + (offset - 1) * stride + 1  # shuffled samples consumed up to the last one handed out
        total = None if self.resampled else self._pass_inputs()
        self.counter.new_pass()
        _, buf_seed = self._seeds(self.passes)
        if self.shuffle_buffer > 1:
            buf_idx, rng, consumed, ended = shuffle_state(outputs, self.shuffle_buffer, buf_seed, total)
        else:
            buf_idx, rng, consumed, ended = [], random.Random(buf_seed), outputs, False
        # input index → (url, sample in shard) over the pass's shard order, up to the next unread input
        order, urls, starts, end = self._shard_order(self.passes), [], [], 0
        while end < consumed:
            url = next(order)
            urls.append(url)
            starts.append(end)
            end += self._sizes[url]
        self._skipping = True
        self._update_mute()
        try:
            buf = [self._fetch(urls, starts, i) for i in buf_idx]
        finally:
            self._skipping = False
            self._update_mute()

        def rest() -> Iterator[tuple[str, int]]:
            if ended:  # the pass's input was read to its end (trailing empty shards included)
                return
            if end > consumed:  # the last shard listed is read from its first unread sample
                yield urls[-1], consumed - starts[-1]
            remaining: Iterator[str] = order  # the pass's other shards (an endless draw when resampled)
            if end == consumed and not self._ends_cleanly(urls[-1]):
                # its last sample came out only when a later shard gave a member: the empty shards between
                # were opened (and counted) before the checkpoint
                remaining = itertools.dropwhile(lambda u: self._sizes[u] == 0, order)
            yield from ((u, 0) for u in remaining)

        it = self._read(rest())
        if self.shuffle_buffer > 1:
            it = buffer_shuffle(it, self.shuffle_buffer, rng, buf)
        self._it = islice(it, stride - 1, None, stride) if stride > 1 else it

    def _fetch(self, urls: list[str], starts: list[int], index: int) -> dict[str, Any]:
        """Input ``index`` of the pass, read alone (its shard opened at its offset)."""
        k = bisect.bisect_right(starts, index) - 1
        url, j = urls[k], index - starts[k]
        sample = next(iter(self._read(iter([(url, j)]))), None)
        if sample is None or sample.get("__url__") != url:
            raise RuntimeError(
                f"source {self.info.name!r}: shard {url} has fewer samples than its count ({self._sizes[url]}) "
                "says; fix stats.json (zerovl-data stats) or remove it to count by scanning"
            )
        return sample

    def skip(self, n: int) -> None:
        """Fast-forward ``n`` raw samples by reading them without decoding (what :meth:`seek` avoids; used
        when shard sizes are only assumed)."""
        self._skipping = True
        self._update_mute()
        try:
            for _ in range(n):
                self.next_raw()
        finally:
            self._skipping = False
            self._update_mute()

    def _update_mute(self) -> None:
        # A wrapped pass of a one-pass epoch re-reads what the first pass counted: count each input once.
        self.counter.muted = self._skipping or (self.passes > 0 and not self.resampled)

    def drain(self, limit: int) -> list[dict[str, Any]]:
        """The rest of the current pass when it holds at most ``limit`` raw samples, reading to the end of
        the tars so errors at the end of the last shard are counted; [] (nothing read) when more remain or
        resampled."""
        if self.resampled or self.passes > 0:
            return []
        cap = int(slot_capacities(self.info.shard_sizes or [], self.num_slots, self.split)[self.slot])
        if cap - self._yielded_in_pass > limit:
            return []
        if self._it is None:
            self._it = self._pipeline(0)
        rest = list(self._it)
        self.position += len(rest)
        self._yielded_in_pass += len(rest)
        self._it = iter(())
        return rest
