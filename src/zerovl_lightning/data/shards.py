"""One source's webdataset stream, as one import: shard lists and counts, bad samples, slot streams.

The pieces live in one file per job and are re-exported here (``eval/`` and ``bench/`` import them from this
module):

- ``shard_list.py``: :func:`expand_shards`, :class:`SourceInfo`, the header-only tar index and ``stats.json``
  lookup — everything known about a source before training.
- ``bad_samples.py``: :func:`decode_sample` and :class:`BadSampleCounter` (the skip-and-count handler,
  ``BAD_KINDS``).
- ``slot_stream.py``: :class:`SlotStream`, the raw samples one (rank, worker) slot reads in one epoch, resumable by
  position, and the seeded shuffle it uses.
"""

from __future__ import annotations

from .bad_samples import (
    BAD_KINDS,
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTS,
    BadSampleCounter,
    decode_sample,
    new_counts,
)
from .shard_list import (
    SourceInfo,
    TarIndex,
    expand_shards,
    is_remote,
    scan_tar,
    stats_for,
    tar_index,
    tar_sample_offsets,
)
from .slot_stream import SlotStream, buffer_shuffle, derive_seed, shuffle_state, slot_capacities
from .stats import read_stats

__all__ = [
    "BAD_KINDS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTS",
    "BadSampleCounter",
    "SlotStream",
    "SourceInfo",
    "TarIndex",
    "buffer_shuffle",
    "decode_sample",
    "derive_seed",
    "expand_shards",
    "is_remote",
    "new_counts",
    "read_stats",
    "scan_tar",
    "shuffle_state",
    "slot_capacities",
    "stats_for",
    "tar_index",
    "tar_sample_offsets",
]
