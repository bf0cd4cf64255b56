"""The held-out split by caption text: a caption is held out when the hash of its normalised text ranks in
the lowest ``heldout_fraction``, so no held-out caption is ever seen in training."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence

from .listing import clean_ws


def normalize_caption(caption: str) -> str:
    """Caption text for de-duplication and the split: NFKC, case-folded, single spaces, no final period."""
    return clean_ws(unicodedata.normalize("NFKC", caption).casefold()).rstrip(" .!?…")


def caption_hash(caption: str) -> float:
    """A stable number in [0, 1) from the normalised caption (the same on every machine and Python)."""
    h = hashlib.sha1(normalize_caption(caption).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def heldout_captions(captions: Sequence[str], fraction: float = 0.2, max_heldout: int | None = 400) -> set[str]:
    """The normalised captions held out: the ``fraction`` of distinct captions with the lowest hash, at most
    ``max_heldout``. Whole caption groups move together, so no held-out text is seen in training."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError("heldout fraction must be in [0, 1)")
    distinct = sorted({normalize_caption(c) for c in captions})
    k = round(fraction * len(distinct))
    if fraction > 0 and len(distinct) > 1:
        k = max(k, 1)
    if max_heldout is not None:
        k = min(k, max_heldout)
    ranked = sorted(distinct, key=lambda c: (caption_hash(c), c))
    return set(ranked[:k])
