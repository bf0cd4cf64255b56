"""Coin-flipping mixup: per-step plans synchronised by (seed, step), partner rule, soft targets, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zerovl_lightning.loss import ContrastiveLoss
from zerovl_lightning.mixup import CoinFlipMixup, MixupPlan, encode_pair, global_partner, mirror_index


def test_plan_is_a_function_of_seed_and_step():
    a, b = CoinFlipMixup(seed=7), CoinFlipMixup(seed=7)
    plans = [a.plan(s) for s in range(200)]
    assert plans == [b.plan(s) for s in range(200)]
    interior = [p.alpha for p in plans if 0.0 < p.alpha < 1.0]  # Beta(0.1, 0.1) can round to exactly 0 or 1
    assert len(interior) > 180 and len(set(interior)) == len(interior)  # different steps draw differently
    assert {p.modality for p in plans} == {"image", "text"}
    assert [CoinFlipMixup(seed=8).plan(s) for s in range(200)] != plans
    assert a.plan(5) == a.plan(5)  # no hidden state: asking twice (or out of order) changes nothing


def test_beta_and_coin_statistics():
    plans = [CoinFlipMixup(seed=0).plan(s) for s in range(4000)]
    alphas = torch.tensor([p.alpha for p in plans])
    near_edge = ((alphas < 0.01) | (alphas > 0.99)).float().mean()
    assert 0.58 < near_edge < 0.70  # Beta(0.1, 0.1): ~64% within 0.01 of 0 or 1
    assert 0.46 < alphas.mean() < 0.54
    heads = sum(p.modality == "image" for p in plans) / len(plans)
    assert 0.46 < heads < 0.54
    p_image = [CoinFlipMixup(seed=0, prob_image=0.9).plan(s).modality for s in range(1000)]
    assert 0.87 < p_image.count("image") / 1000 < 0.93


def test_modalities_and_disable():
    only_text = CoinFlipMixup(modalities=["text"])
    assert {only_text.plan(s).modality for s in range(50)} == {"text"}
    # restricting modalities keeps the α sequence
    assert [only_text.plan(s).alpha for s in range(50)] == [CoinFlipMixup().plan(s).alpha for s in range(50)]
    off = CoinFlipMixup(enabled=False)
    assert all(not off.plan(s).active for s in range(10))
    assert off.targets(off.plan(0), 8) is None
    with pytest.raises(ValueError):
        CoinFlipMixup(modalities=["audio"])
    with pytest.raises(ValueError):
        CoinFlipMixup(beta=0.0)


def test_resume_restores_the_future_sequence():
    run = CoinFlipMixup(seed=1234)
    state = run.state_dict()
    future = [run.plan(s) for s in range(100, 120)]
    resumed = CoinFlipMixup(seed=0)  # a fresh object from a config with another seed
    resumed.load_state_dict(state)
    assert [resumed.plan(s) for s in range(100, 120)] == future


def test_partner_rule_mirror_inside_blocks():
    assert mirror_index(6).tolist() == [5, 4, 3, 2, 1, 0]
    assert mirror_index(8, block=4).tolist() == [3, 2, 1, 0, 7, 6, 5, 4]
    p = global_partner(4, block=2, rank=1, world_size=2)  # 2 ranks × 2 sub-batches of 2
    assert p.tolist() == [1, 0, 3, 2, 5, 4, 7, 6]
    assert torch.equal(p[p], torch.arange(8))  # an involution → symmetric Y
    odd = mirror_index(5)
    assert odd[2] == 2  # the centre of an odd batch is its own partner (target weight 1)
    with pytest.raises(ValueError):
        mirror_index(6, block=4)


class _RecordingModel(torch.nn.Module):
    """Encoders that record their inputs, with a linear 'projection' so text mixup is visible pre-norm."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 4, dtype=torch.float64)
        self.seen: dict[str, torch.Tensor] = {}

    def encode_image(self, images, normalize=True):
        self.seen["image"] = images
        f = images.flatten(1)[:, :4]
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens, normalize=True):
        self.seen["text"] = tokens
        f = self.proj(tokens.double())
        self.seen["text_features"] = f
        return F.normalize(f, dim=-1) if normalize else f


@pytest.mark.parametrize("block", [None, 2])
def test_image_mixup_changes_only_images(block):
    model = _RecordingModel()
    images = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    tokens = torch.randint(0, 5, (4, 3))
    plan = MixupPlan(0.3, "image")
    u, v = encode_pair(model, images, tokens, plan, block)
    partner = mirror_index(4, block)
    assert torch.allclose(model.seen["image"], 0.3 * images + 0.7 * images[partner])
    assert torch.equal(model.seen["text"], tokens)
    assert torch.allclose(v, F.normalize(model.proj(tokens.double()), dim=-1))


@pytest.mark.parametrize("block", [None, 2])
def test_text_mixup_changes_only_text_features_before_normalisation(block):
    model = _RecordingModel()
    images = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    tokens = torch.randint(0, 5, (4, 3))
    plan = MixupPlan(0.8, "text")
    u, v = encode_pair(model, images, tokens, plan, block)
    partner = mirror_index(4, block)
    assert torch.equal(model.seen["image"], images)
    t = model.seen["text_features"]
    assert torch.allclose(v, F.normalize(0.8 * t + 0.2 * t[partner], dim=-1))
    assert torch.allclose(u, F.normalize(images.flatten(1)[:, :4], dim=-1))


def test_no_plan_changes_nothing():
    model = _RecordingModel()
    images, tokens = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randint(0, 5, (4, 3))
    encode_pair(model, images, tokens, MixupPlan())
    assert torch.equal(model.seen["image"], images)


def test_targets_loss_is_alpha_mix_of_cross_entropies_both_directions():
    """α·CE(logits, I) + (1−α)·CE(logits, F), both directions, value and gradient, plan's targets."""
    mixup = CoinFlipMixup(seed=3)
    plan = next(p for p in (mixup.plan(s) for s in range(100)) if 0.2 < p.alpha < 0.8)
    n = 8
    targets = mixup.targets(plan, n, block=4)
    g = torch.Generator().manual_seed(0)
    u0 = F.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=-1)
    v0 = F.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=-1)
    labels, partner = torch.arange(n), mirror_index(n, 4)

    def reference(u, v):
        logits = 10.0 * u @ v.T
        return (
            sum(
                plan.alpha * F.cross_entropy(lg, labels) + (1 - plan.alpha) * F.cross_entropy(lg, partner)
                for lg in (logits, logits.T)
            )
            / 2
        )

    leaves = [t.clone().requires_grad_(True) for t in (u0, v0, u0, v0)]
    ours = ContrastiveLoss()(leaves[0], leaves[1], torch.tensor(10.0, dtype=torch.float64), targets)
    ref = reference(leaves[2], leaves[3])
    g_ours = torch.autograd.grad(ours, leaves[:2])
    g_ref = torch.autograd.grad(ref, leaves[2:])
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


# The 2-process check that all ranks draw the same plan is in test_ddp_loss.py (one spawn, all DDP checks).
