"""Coin-flipping mixup (ZeroVL §2): one plan per optimizer step, identical on every rank, soft targets.

Per step a generator seeded from ``(seed, step)`` draws α ~ Beta(β, β) and a coin. Heads: image mixup on the
input pixels, x' = α·x + (1−α)·x[partner]; tails: text mixup on the projected text features before L2 norm,
t' = α·t + (1−α)·t[partner]. The partner of a position is its mirror inside the same forward batch
(``flip(0)``), inside each sub-batch under DGA, so the global partner permutation F is block-diagonal and an
involution, and the targets are Y = α·I + (1−α)·F (:class:`~zerovl_lightning.loss.SoftTargets`, never an N×N
matrix).

Seeding from ``(seed, step)`` (not a running generator) makes every rank agree without communication and makes
resume exact from the step alone; the seed is still checkpointed so a resumed run keeps the sequence even if
the config's seed changes. Validation never calls this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zerovl_lightning.loss import SoftTargets

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class MixupPlan:
    """What one optimizer step mixes: ``modality`` ∈ {"image", "text", None} with weight ``alpha`` on self."""

    alpha: float = 1.0
    modality: str | None = None

    @property
    def active(self) -> bool:
        return self.modality is not None

    @property
    def modality_code(self) -> float:
        """For scalar loggers: 0 = none, 1 = image, 2 = text."""
        return 0.0 if self.modality is None else float(MODALITIES.index(self.modality) + 1)


def mirror_index(n: int, block: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """[n] partner index: the mirror position inside consecutive blocks of ``block`` rows (default: all n)."""
    block = n if block is None else block
    if n % block:
        raise ValueError(f"batch of {n} is not a whole number of blocks of {block}")
    idx = torch.arange(n, device=device)
    return idx - idx % block + (block - 1 - idx % block)


def global_partner(
    local_size: int,
    block: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[W·n] global partner permutation: every rank's local mirror rule, shifted by the rank's offset."""
    local = mirror_index(local_size, block, device)  # [n]
    offsets = torch.arange(world_size, device=device)[:, None] * local_size  # [W, 1]
    return (offsets + local[None, :]).reshape(-1)


def _mirror(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """x[partner] for the mirror rule; [B, ...] → [B, ...]."""
    if block is None or block == x.shape[0]:
        return x.flip(0)
    if x.shape[0] % block:
        raise ValueError(f"batch of {x.shape[0]} is not a whole number of blocks of {block}")
    return x.reshape(-1, block, *x.shape[1:]).flip(1).reshape(x.shape)


class CoinFlipMixup:
    """ZeroVL's coin-flipping mixup; ``enabled=False`` makes every plan a no-op (hard targets).

    Args:
        enabled: switch.
        beta: α ~ Beta(beta, beta) (paper: 0.1, so most draws are near 0 or 1).
        prob_image: probability of image mixup when both modalities are allowed (paper: 0.5).
        modalities: which modalities may be mixed; with one, the coin is still drawn but ignored.
        seed: with the step number, seeds the per-step generator (same on all ranks).
    """

    def __init__(
        self,
        enabled: bool = True,
        beta: float = 0.1,
        prob_image: float = 0.5,
        modalities: Sequence[str] = MODALITIES,
        seed: int = 0,
    ) -> None:
        modalities = tuple(modalities)
        if not modalities or any(m not in MODALITIES for m in modalities):
            raise ValueError(f"mixup modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        if beta <= 0 or not 0.0 <= prob_image <= 1.0:
            raise ValueError(f"need beta > 0 and prob_image in [0, 1], got {beta}, {prob_image}")
        self.enabled = bool(enabled)
        self.beta = float(beta)
        self.prob_image = float(prob_image)
        self.modalities = modalities
        self.seed = int(seed)

    def plan(self, step: int) -> MixupPlan:
        """The plan of optimizer step ``step``; a pure function of (seed, step, config)."""
        if not self.enabled:
            return MixupPlan()
        rng = np.random.default_rng([self.seed, int(step)])
        alpha = float(rng.beta(self.beta, self.beta))
        heads = bool(rng.random() < self.prob_image)  # always drawn, so the α sequence ignores `modalities`
        if len(self.modalities) == 1:
            modality = self.modalities[0]
        else:
            modality = "image" if heads else "text"
        return MixupPlan(alpha, modality)

    @staticmethod
    def mix_images(images: torch.Tensor, plan: MixupPlan, block: int | None = None) -> torch.Tensor:
        """[B, 3, H, W] → α·x + (1−α)·x[partner] under image mixup, else unchanged."""
        if plan.modality != "image":
            return images
        return plan.alpha * images + (1.0 - plan.alpha) * _mirror(images, block)

    @staticmethod
    def mix_text(features: torch.Tensor, plan: MixupPlan, block: int | None = None) -> torch.Tensor:
        """[B, D] projected pre-norm text features → α·t + (1−α)·t[partner] under text mixup."""
        if plan.modality != "text":
            return features
        return plan.alpha * features + (1.0 - plan.alpha) * _mirror(features, block)

    @staticmethod
    def targets(
        plan: MixupPlan,
        local_size: int,
        block: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> SoftTargets | None:
        """Soft targets over the gathered global batch (None = hard targets when nothing is mixed)."""
        if not plan.active:
            return None
        return SoftTargets(plan.alpha, global_partner(local_size, block, rank, world_size, device))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])

    def __repr__(self) -> str:
        return (
            f"CoinFlipMixup(enabled={self.enabled}, beta={self.beta}, prob_image={self.prob_image}, "
            f"modalities={self.modalities}, seed={self.seed})"
        )


def encode_pair(
    model: Any,
    images: torch.Tensor,
    tokens: torch.Tensor,
    plan: MixupPlan | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image / text embeddings [B, D] with the plan's mixup applied (``model``: a DualEncoder).

    Shared by the plain step and every DGA sub-batch (pass 1 and pass 2), so both see the same mixed inputs.
    """
    plan = plan if plan is not None else MixupPlan()
    image_emb = model.encode_image(CoinFlipMixup.mix_images(images, plan, block))  # [B, D]
    if plan.modality == "text":
        text = CoinFlipMixup.mix_text(model.encode_text(tokens, normalize=False), plan, block)
        text_emb = F.normalize(text, dim=-1)  # [B, D]
    else:
        text_emb = model.encode_text(tokens)
    return image_emb, text_emb
