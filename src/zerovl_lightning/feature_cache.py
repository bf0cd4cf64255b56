"""Frozen towers across steps: each sample's output of a locked tower is computed once and reused every epoch.

A wholly locked tower, or a locked trunk under a trainable head (``locked_cache.py``'s kinds "whole tower" and
"trunk", e.g. the demo's frozen EfficientNet trunk and MiniLM transformer), maps a sample to the same output in
every epoch, provided its input is the same. On a small corpus trained for many epochs that forward is nearly
all the cost on a CPU, so ``module.feature_cache`` keeps it per sample (``source/key`` of the batch) and runs the
locked part only on samples it has not seen (LiT-style pre-computed features, without a separate pre-compute
pass).

What it needs, and checks:

- the same input per sample in every epoch: a deterministic train transform (``data.crop_scale=null``,
  ``data.auto_augment=false``) and no ``data.text_augment``. Every sample's input keeps a fingerprint
  (float64 sums); a sample seen again with another input stops the run with a line that says what to set;
- the locked part runs in eval mode (its dropout off, as for any pre-computed feature), so its output is one
  value per sample;
- image mixup mixes pixels before the image tower: on those steps the image tower runs (text mixup mixes the
  projected features, after any locked part, so the text side stays cached).

Memory: each kept output (e.g. 1280 floats for EfficientNet-Lite0's pooled features, L·W for an HF transformer's
hidden states) stays on the device it was computed on, up to ``limit_mb`` per rank; past it, new samples are
computed and not kept (one warning). Under DGA the cache sits outside pass 1 / pass 2, so a step's second pass
finds every sample its first pass stored. The cache is not checkpointed: a resumed run rebuilds it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zerovl_lightning.locked_cache import locked_part, shadow, text_parameters
from zerovl_lightning.mixup import MixupPlan

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    fingerprint: torch.Tensor  # [3] float64 sums of the sample's input (_fingerprints)
    output: Any  # the sample's output: a tensor or a ModelOutput of per-sample tensors


@dataclass
class _CachedTower:
    name: str  # "image" | "text"
    kind: str  # "whole tower" | "trunk"
    owner: Any
    attr: str
    body: nn.Module  # what runs in eval mode while the locked part computes
    store: dict[str, _Entry] = field(default_factory=dict)


def sample_keys(batch: Mapping[str, Any]) -> list[str]:
    """``source/key`` per sample (keys are unique within a source, not across sources)."""
    if "key" not in batch:
        raise ValueError(
            "module.feature_cache needs the sample keys in the batch (a 'key' field, as ZeroVLDataModule gives): "
            "turn module.feature_cache off for this data"
        )
    sources = batch.get("source") or [""] * len(batch["key"])
    return [f"{s}/{k}" for s, k in zip(sources, batch["key"], strict=True)]


def _batch_tensors(args: Sequence[Any], kwargs: Mapping[str, Any], b: int) -> list[torch.Tensor]:
    return [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == b]


FINGERPRINT_VALUES = 4096  # per input tensor and sample, at most: an even sample of its values


def _fingerprints(inputs: list[torch.Tensor]) -> torch.Tensor:
    """[b, 3] float64 per sample: the sum of (an even sample of at most 4096 of) its input values, a
    position-weighted sum (a crop, flip or token edit changes it) and the sum of magnitudes (the scale
    :func:`_changed` compares at)."""
    rows = []
    for t in inputs:
        flat = t.reshape(t.shape[0], -1)
        rows.append(flat[:, :: max(1, flat.shape[1] // FINGERPRINT_VALUES)].double())
    x = torch.cat(rows, dim=1)  # [b, n]
    weights = torch.linspace(1.0, 2.0, x.shape[1], dtype=torch.float64, device=x.device)
    return torch.stack([x.sum(1), x @ weights, x.abs().sum(1)], dim=1).cpu()


def _changed(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """[k] bool: the fingerprints [k, 3] disagree by more than rounding (a reduction's order may differ with the
    batch's shape); a changed pixel or token moves the sums by far more than 1e-9 of the magnitude."""
    tol = 1e-9 * torch.maximum(old[:, 2], new[:, 2]) + 1e-12
    return (old[:, :2] - new[:, :2]).abs().amax(1) > tol


def _take(obj: Any, idx: torch.Tensor, b: int) -> Any:
    """The rows ``idx`` of every tensor with leading dim ``b`` inside args / kwargs / an output."""
    if isinstance(obj, torch.Tensor):
        return obj[idx.to(obj.device)] if obj.ndim and obj.shape[0] == b else obj
    if isinstance(obj, Mapping):  # dicts and HF ModelOutputs (rebuilt as their own type: poolers check it)
        return type(obj)(**{k: _take(v, idx, b) for k, v in obj.items()})
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take(v, idx, b) for v in obj)
    return obj


def _stack(rows: list[Any]) -> Any:
    """Per-sample outputs (each with a leading dim of 1) back into one batch output."""
    first = rows[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(rows, dim=0)
    if isinstance(first, Mapping):
        return type(first)(**{k: _stack([r[k] for r in rows]) for k in first})
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([r[i] for r in rows]) for i in range(len(first)))
    return first


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else []
    return sum(_nbytes(v) for v in values)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the body of the call, then every submodule's own flag back (locked BatchNorms included)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class FeatureCache:
    """Per-sample outputs of an open_clip model's locked towers, kept across steps (see module docstring).

    Build with :meth:`for_model` (None when no tower has a locked part it can cache). Use as::

        with cache.step(plan):            # around the whole training step (outside DGA's passes)
            with cache.batch(keys):       # around each encode of a (sub-)batch
                encode_pair(...)
    """

    def __init__(self, towers: list[_CachedTower], limit_mb: float) -> None:
        self.towers = towers
        self.limit_mb = float(limit_mb)
        self.limit_bytes = int(limit_mb * 2**20)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.full_warned = False
        self._keys: list[str] | None = None

    @classmethod
    def for_model(cls, model: nn.Module, limit_mb: float = 4096.0) -> FeatureCache | None:
        clip = getattr(model, "clip", model)
        if not hasattr(clip, "visual"):
            return None
        text_module = getattr(clip, "text", clip)
        parts = [
            ("image", locked_part("image", clip, "encode_image", clip.visual, list(clip.visual.parameters()))),
            ("text", locked_part("text", clip, "encode_text", text_module, text_parameters(clip))),
        ]
        towers = []
        for name, part in parts:
            if part is None or part.kind not in ("whole tower", "trunk"):
                continue  # a locked block prefix has a trainable stem after it: nothing per sample to keep
            body = part.owner if part.kind == "trunk" else (clip.visual if name == "image" else text_module)
            towers.append(_CachedTower(name, part.kind, part.owner, part.attr, body))
        return cls(towers, limit_mb) if towers else None

    def describe(self) -> str:
        return ", ".join(f"{t.name}: {t.kind}" for t in self.towers)

    def clear(self) -> None:
        for t in self.towers:
            t.store.clear()
        self.bytes = 0

    @property
    def num_samples(self) -> dict[str, int]:
        return {t.name: len(t.store) for t in self.towers}

    def take_counts(self) -> tuple[int, int]:
        """(hits, misses) of the lookups since the last call (per sample and tower), then zero."""
        counts = (self.hits, self.misses)
        self.hits = self.misses = 0
        return counts

    @contextmanager
    def step(self, plan: MixupPlan | None = None) -> Iterator[None]:
        """One training step: the cached towers' locked parts answer from the cache (image mixup: the image
        tower runs, its input being mixed pixels)."""
        with ExitStack() as stack:
            for t in self.towers:
                if t.name == "image" and plan is not None and plan.modality == "image":
                    continue
                original = getattr(t.owner, t.attr)

                def run(*args: Any, _t: _CachedTower = t, _f: Any = original, **kwargs: Any) -> Any:
                    return self._run(_t, _f, args, kwargs)

                stack.callback(shadow(t.owner, t.attr, run))
            yield

    @contextmanager
    def batch(self, keys: list[str]) -> Iterator[None]:
        """The sample keys of the (sub-)batch the next encode sees."""
        self._keys = keys
        try:
            yield
        finally:
            self._keys = None

    def _run(self, tower: _CachedTower, original: Any, args: tuple, kwargs: dict) -> Any:
        keys = self._keys
        b = len(keys) if keys is not None else -1
        inputs = _batch_tensors(args, kwargs, b)
        if keys is None or not inputs:  # a call outside a keyed batch (e.g. a user's own encode): run as is
            return original(*args, **kwargs)
        prints = _fingerprints(inputs)  # [b, 3]
        entries = [tower.store.get(k) for k in keys]
        seen = [i for i, e in enumerate(entries) if e is not None]
        if seen:
            stale = _changed(torch.stack([entries[i].fingerprint for i in seen]), prints[seen])
            if bool(stale.any()):
                key = keys[seen[int(stale.nonzero()[0])]]
                raise ValueError(
                    f"module.feature_cache: sample {key!r} reached the {tower.name} tower with another input than "
                    "in an earlier step, so its cached output would be stale: make the train input deterministic "
                    "(data.crop_scale=null, data.auto_augment=false, data.text_augment=false) or set "
                    "module.feature_cache.enabled=false"
                )
        missing = [i for i, e in enumerate(entries) if e is None]
        self.hits += b - len(missing)
        self.misses += len(missing)
        rows: list[Any] = [None if e is None else e.output for e in entries]
        if missing:
            idx = torch.tensor(missing)
            with torch.no_grad(), _eval_mode(tower.body):
                out = original(*_take(list(args), idx, b), **_take(dict(kwargs), idx, b))
            for j, i in enumerate(missing):
                row = _take(out, torch.tensor([j]), len(missing))
                rows[i] = row
                self._keep(tower, keys[i], prints[i], row)
        return _stack(rows)

    def _keep(self, tower: _CachedTower, key: str, fingerprint: torch.Tensor, output: Any) -> None:
        nbytes = _nbytes(output)
        if self.bytes + nbytes > self.limit_bytes:
            if not self.full_warned:
                log.warning(
                    "module.feature_cache is full (%.0f MiB, module.feature_cache.limit_mb): samples not seen yet "
                    "are computed every step from now on",
                    self.limit_mb,
                )
                self.full_warned = True
            return
        tower.store[key] = _Entry(fingerprint, output)
        self.bytes += nbytes
