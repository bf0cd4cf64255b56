"""Locked towers under DGA: run what is locked once per step (pass 1) and replay its output in pass 2.

Pass 2 of DGA re-encodes every sub-batch with grad. A locked part — no trainable parameter, an input that needs
no gradient — gives the same output in both passes and needs no graph, so recomputing it is pure waste (every
two-pass cache elsewhere — OpenCLIP, GradCache, ZeroVL — does). Per tower of an open_clip model:

- **fully locked** (``model.lock_image`` / ``model.lock_text`` with no unlocked groups/layers, or any tower with
  no trainable parameter): the tower's output (``clip.encode_image`` / ``clip.encode_text``, [b, D], before L2
  norm and text mixup) is cached; pass 2 runs nothing of the tower.
- **locked trunk** (a timm image tower or an HF text tower locked with its projection head trainable, as in
  the demo): the trunk's output (timm: the pooled features [b, F]; HF: the transformer's output, [b, L, W]) is
  cached; pass 2 runs only the head.
- **locked prefix** (``*_unlocked_groups`` / ``*_unlocked_layers`` > 0 on an open_clip ViT or text transformer):
  the output of the last locked residual block ([b, L, W]) is cached; pass 2 runs the frozen stem (patch or
  token embedding: cheap, no graph) and only the trainable blocks and head.

A timm or HF tower with some trunk layers unlocked has no boundary we can resume from: it is recomputed.

RNG: the generator state after the cached part is recorded in pass 1 and restored in pass 2, so the dropout of
the trainable parts that follow draws the same masks in both passes (DGA stays exact with dropout).

Memory: per sample, D values (fully locked), the trunk's output, or L·W values (prefix; L tokens after patch
dropout, W the width) of the tower's dtype, for every sample of the rank's batch. A step whose cache would exceed
``module.dga.locked_cache_mb`` is refused at its first sub-batch, before any parameter or buffer is updated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from zerovl_lightning.dga import RNGState

_STEM = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "token_embedding", "cls_emb")


@dataclass
class _Tower:
    """One tower's locked part: ``owner.attr`` (a method whose output is cached: the whole tower's encode, or a
    trunk's forward) or, with ``prefix``, the first ``prefix`` residual blocks of ``blocks``."""

    name: str
    kind: str  # "whole tower" | "trunk" | "blocks"
    owner: Any = None
    attr: str = "forward"
    prefix: int = 0
    blocks: nn.ModuleList | None = None
    store: dict[int, tuple[Any, RNGState]] = field(default_factory=dict)


def _trainable(params: Any) -> bool:
    return any(p.requires_grad for p in params)


def text_parameters(clip: nn.Module) -> list[nn.Parameter]:
    """The text tower's parameters: ``clip.text`` (a custom text tower) or everything but the image tower and
    the logit scale / bias (open_clip's native CLIP keeps its text modules at the top level)."""
    if isinstance(getattr(clip, "text", None), nn.Module):
        return list(clip.text.parameters())
    skip = {id(p) for p in clip.visual.parameters()}
    skip |= {id(getattr(clip, n)) for n in ("logit_scale", "logit_bias") if getattr(clip, n, None) is not None}
    return [p for p in clip.parameters() if id(p) not in skip]


def locked_part(
    name: str, clip: nn.Module, encode_attr: str, module: nn.Module, params: list[nn.Parameter]
) -> _Tower | None:
    """The locked part of one tower whose output can be kept (see module docstring), or None."""
    if not params:
        return None
    if not _trainable(params):
        return _Tower(name, "whole tower", clip, encode_attr)
    for trunk_name in ("trunk", "transformer"):  # timm image tower / HF text tower: a frozen trunk, a head
        trunk = getattr(module, trunk_name, None)
        if isinstance(trunk, nn.Module) and not hasattr(trunk, "resblocks") and not _trainable(trunk.parameters()):
            return _Tower(name, "trunk", trunk, "forward")
    blocks = getattr(getattr(module, "transformer", None), "resblocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return None  # e.g. a timm / HF trunk partly unlocked: no boundary we know how to resume from
    stem = [p for n in _STEM if (m := getattr(module, n, None)) is not None for p in _params_of(m)]
    prefix = 0
    while prefix < len(blocks) and not _trainable(blocks[prefix].parameters()):
        prefix += 1
    if prefix == 0 or _trainable(stem):
        return None
    return _Tower(name, "blocks", prefix=prefix, blocks=blocks)


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors inside a module output (a tensor, a tuple, or an HF ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else []
    return [t for v in values for t in _tensors(v)]


def _params_of(m: Any) -> list[nn.Parameter]:
    return [m] if isinstance(m, nn.Parameter) else list(m.parameters())


def _skip(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The forward of the locked blocks after the first in pass 2: pass the cached output through."""
    return x


class LockedTowerCache:
    """The :class:`~zerovl_lightning.dga.TowerCache` of an open_clip model's locked towers.

    Build with :meth:`for_model` (None when nothing is locked). ``limit_mb`` bounds the cache of one step.
    """

    def __init__(self, clip: nn.Module, towers: list[_Tower], limit_mb: float) -> None:
        self.clip = clip
        self.towers = towers
        self.limit_mb = float(limit_mb)
        self.limit_bytes = int(limit_mb * 2**20)
        self.num_sub_batches = 1
        self.bytes = 0

    @classmethod
    def for_model(cls, model: nn.Module, limit_mb: float = 2048.0) -> LockedTowerCache | None:
        clip = getattr(model, "clip", model)
        if not hasattr(clip, "visual"):
            return None
        towers = [
            locked_part("image", clip, "encode_image", clip.visual, list(clip.visual.parameters())),
            locked_part("text", clip, "encode_text", getattr(clip, "text", clip), text_parameters(clip)),
        ]
        towers = [t for t in towers if t is not None]
        return cls(clip, towers, limit_mb) if towers else None

    def describe(self) -> str:
        """e.g. ``image: whole tower, text: blocks 0-1`` (for logs and the benchmark)."""
        return ", ".join(
            f"{t.name}: " + (t.kind if t.kind != "blocks" else f"blocks 0-{t.prefix - 1}") for t in self.towers
        )

    def begin(self, num_sub_batches: int) -> None:
        self.clear()
        self.num_sub_batches = num_sub_batches

    def clear(self) -> None:
        for t in self.towers:
            t.store.clear()
        self.bytes = 0

    def _keep(self, tower: _Tower, k: int, out: Any) -> None:
        out = out.detach() if isinstance(out, torch.Tensor) else out
        tensors = _tensors(out)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if not tower.store:  # the first sub-batch of the step: refuse before the cache grows
            projected = self.bytes + nbytes * self.num_sub_batches
            if projected > self.limit_bytes:
                b = tensors[0].shape[0] if tensors else 1
                raise ValueError(
                    f"locked-tower cache ({tower.name}: {tower.kind}) needs {projected / 2**20:.1f} MiB per step "
                    f"({nbytes // max(b, 1)} bytes per sample × {b * self.num_sub_batches} samples), over "
                    f"module.dga.locked_cache_mb={self.limit_mb:g}: raise it, lower data.batch_size, "
                    "or set module.dga.locked_cache=false (recompute the locked part in pass 2)"
                )
        self.bytes += nbytes
        device = tensors[0].device if tensors else None
        tower.store[k] = (out, RNGState.capture(device))

    @contextmanager
    def record(self, k: int) -> Iterator[None]:
        """Pass 1 of sub-batch ``k``: run normally, keep each locked part's output and the RNG after it."""
        undo = []
        for t in self.towers:
            if t.kind == "blocks":
                hook = t.blocks[t.prefix - 1].register_forward_hook(lambda _m, _i, out, _t=t: self._keep(_t, k, out))
                undo.append(hook.remove)
                continue
            original = getattr(t.owner, t.attr)

            def run(*args: Any, _t: _Tower = t, _f: Any = original, **kwargs: Any) -> Any:
                out = _f(*args, **kwargs)
                self._keep(_t, k, out)
                return out

            undo.append(shadow(t.owner, t.attr, run))
        with _undone(undo):
            yield

    @contextmanager
    def replay(self, k: int) -> Iterator[None]:
        """Pass 2 of sub-batch ``k``: the locked parts return their pass-1 output instead of running."""
        undo = []
        for t in self.towers:
            out, rng = t.store.pop(k)

            def cached(*args: Any, _out: Any = out, _rng: RNGState = rng, **kwargs: Any) -> Any:
                _rng.restore()  # resume the stream where pass 1 left the locked part
                return _out

            if t.kind == "blocks":  # the first locked block returns the cache, the others pass it through
                undo.append(shadow(t.blocks[0], "forward", cached))
                undo.extend(shadow(t.blocks[i], "forward", _skip) for i in range(1, t.prefix))
            else:
                undo.append(shadow(t.owner, t.attr, cached))
        with _undone(undo):
            yield


@contextmanager
def _undone(undo: list[Any]) -> Iterator[None]:
    """Run the body, then every undo callable (the hooks and shadows a pass installed), even on error."""
    try:
        yield
    finally:
        for u in undo:
            u()


def shadow(owner: Any, attr: str, fn: Any) -> Any:
    """Shadow a method with an instance attribute (``nn.Module.__call__`` looks up ``self.forward``); returns
    the undo."""
    had = attr in vars(owner)
    previous = vars(owner).get(attr)
    object.__setattr__(owner, attr, fn)

    def undo() -> None:
        if had:
            object.__setattr__(owner, attr, previous)
        else:
            object.__delattr__(owner, attr)

    return undo
