"""``SlotStream.seek``: resuming a slot stream at any position gives exactly the samples (keys and bytes) of
an uninterrupted stream, across shard and sample splits, shuffle buffers larger and smaller than a shard,
pass wraps, resampled streams and bad shards — while opening only the shards the resumed read needs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from shard_fixtures import write_bad_source, write_source

from zerovl_lightning.data.shards import SlotStream, SourceInfo, buffer_shuffle, shuffle_state


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> SourceInfo:
    root = tmp_path_factory.mktemp("seek")
    write_source(root / "s", "s", 61, 7)  # 9 shards, the last one short
    return SourceInfo.build("s", str(root / "s"))


def stream(info: SourceInfo, **kw: Any) -> SlotStream:
    args: dict[str, Any] = dict(slot=1, num_slots=3, epoch=2, seed=5, split="shard", resampled=False, shuffle_buffer=10)
    args.update(kw)
    return SlotStream(info, **args)


def take(s: SlotStream, n: int) -> list[dict[str, Any]]:
    """The next ``n`` raw samples: key, url and every member's bytes."""
    return [s.next_raw() for _ in range(n)]


def test_buffer_shuffle_is_webdatasets_shuffle() -> None:
    import webdataset as wds

    ours = list(buffer_shuffle(iter(range(100)), 16, random.Random(3), []))
    theirs = list(wds.filters._shuffle(iter(range(100)), bufsize=16, initial=16, rng=random.Random(3)))
    assert ours == theirs
    buf, _, consumed, ended = shuffle_state(40, 16, 3, 100)
    assert not ended
    assert sorted(buf + ours[:40]) == list(range(consumed))


@pytest.mark.parametrize(
    "kw",
    [
        {},  # shard split, buffer 10 > shard size 7
        {"shuffle_buffer": 3},
        {"shuffle_buffer": 0},
        {"split": "sample", "num_slots": 4, "slot": 3},
        {"split": "sample", "num_slots": 2, "slot": 0, "shuffle_buffer": 1},
        {"resampled": True},
        {"resampled": True, "split": "shard", "shuffle_buffer": 25},
    ],
)
def test_seek_equals_uninterrupted_stream(source: SourceInfo, kw: dict[str, Any]) -> None:
    ref = stream(source, **kw)
    full = take(ref, 70)  # beyond one pass of a non-resampled slot: covers the wrap into a second pass
    per_pass = ref._pass_length() if not ref.resampled else None
    positions = {1, 5, 13, 19, 33, 50}
    if per_pass:
        positions |= {per_pass - 1, per_pass, per_pass + 1}
    for n in sorted(p for p in positions if p < 60):
        s = stream(source, **kw)
        s.seek(n)
        assert s.position == n
        assert take(s, 10) == full[n : n + 10], f"seek({n}) with {kw}"
        assert s.position == n + 10


def test_seek_opens_only_the_shards_it_needs(source: SourceInfo) -> None:
    """Late in the pass, a replay opens every earlier shard of the slot; the seek opens the ones that still
    hold buffered or unread samples."""
    kw = {"slot": 0, "num_slots": 1, "shuffle_buffer": 0}  # one slot reads all 9 shards in order
    replayed, sought = stream(source, **kw), stream(source, **kw)
    replayed.skip(57)
    sought.seek(57)
    assert take(replayed, 4) == take(sought, 4)
    assert replayed.opened_shards == 9 and sought.opened_shards == 1


def test_seek_with_bad_shards_matches_and_does_not_recount(tmp_path: Path) -> None:
    """Truncated, empty and corrupt shards: the same samples, and the resumed stream counts exactly what the
    uninterrupted one counted after the resume point (nothing twice, nothing lost)."""
    write_bad_source(tmp_path / "bad")
    info = SourceInfo.build("bad", str(tmp_path / "bad"))
    kw: dict[str, Any] = {"slot": 0, "num_slots": 1, "shuffle_buffer": 4}
    ref = stream(info, **kw)
    per_pass = ref._pass_length()
    full, counted = [], []
    for _ in range(per_pass):
        full.append(ref.next_raw())
        counted.append(dict(ref.counter.counts))
    ref.drain(per_pass)  # read to the end of the tars, as the epoch end does
    for n in range(1, per_pass):
        s = stream(info, **kw)
        s.seek(n)
        assert take(s, per_pass - n) == full[n:], f"seek({n})"
        s.drain(per_pass)
        assert {k: s.counter.counts[k] + counted[n - 1][k] for k in counted[0]} == ref.counter.counts, n


def test_seek_falls_back_to_replay_when_shard_sizes_are_assumed(source: SourceInfo) -> None:
    assumed = SourceInfo(source.name, source.urls, source.num_samples, source.shard_sizes, exact_sizes=False)
    ref = take(stream(source), 20)
    s = stream(assumed)
    s.seek(12)
    assert take(s, 8) == ref[12:]
