"""Locked towers under DGA: pass 2 runs only what is trainable, and the step stays exact (float64, dropout on)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_dga import _batch, _grads, _max_rel_err, _reference_subbatched
from torch import nn

from zerovl_lightning.dga import DecoupledStep, split_batch
from zerovl_lightning.locked_cache import LockedTowerCache
from zerovl_lightning.loss import SoftTargets
from zerovl_lightning.mixup import MixupPlan, encode_pair, global_partner
from zerovl_lightning.model import TINY_MODEL_CFG, build_dual_encoder

N = 8
EXACT = 1e-10

# lock keys → what the cache holds. open_clip's lock keeps the projections trainable here (model.py), so a locked
# ViT / text transformer caches its blocks and re-runs the head; "+frozen_proj" freezes the projection too.
LOCKS = {
    "image": ({"lock_image": True}, "image: blocks 0-1"),
    "image+frozen_proj": ({"lock_image": True, "freeze": "visual.proj"}, "image: whole tower"),
    "text": ({"lock_text": True}, "text: blocks 0-1"),
    "text+frozen_proj": ({"lock_text": True, "freeze": "text_projection"}, "text: whole tower"),
    "image_last_block": ({"lock_image": True, "lock_image_unlocked_groups": 2}, "image: blocks 0-0"),
    "text_last_layer": ({"lock_text": True, "lock_text_unlocked_layers": 2}, "text: blocks 0-0"),
    "both": (
        {"lock_image": True, "freeze": "visual.proj", "lock_text": True, "lock_text_unlocked_layers": 2},
        "image: whole tower, text: blocks 0-0",
    ),
}


def _locked_model(dropout: float = 0.1, freeze: str | None = None, **lock) -> nn.Module:
    """Tiny open_clip towers (float64) with attention dropout and patch dropout, locked as asked (``freeze``: one
    more parameter of ``clip`` to freeze, e.g. a projection)."""
    cfg = copy.deepcopy(TINY_MODEL_CFG)
    cfg["vision_cfg"]["patch_dropout"] = 0.25
    torch.manual_seed(0)  # the same init for every model built here
    model = build_dual_encoder("zerovl-tiny-locked", cfg, temperature=0.07, learn_temperature=True, **lock)
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = dropout
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if freeze is not None:
        model.clip.get_parameter(freeze).requires_grad_(False)
    return model.double().train()


class _Calls:
    """Counts forward calls of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.n = 0
        module.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


def _dga(model, subs, cache, plan=None, targets=None):
    model.zero_grad(set_to_none=True)
    res = DecoupledStep()(
        model, lambda s: encode_pair(model, s["image"], s["text"], plan), subs, model.logit_scale, targets,
        tower_cache=cache,
    )
    return res.loss, _grads(model)


@pytest.mark.parametrize("case", list(LOCKS))
@pytest.mark.parametrize("k", [2, 4])
def test_locked_dga_equals_full_batch_and_skips_the_locked_part(case, k):
    lock, description = LOCKS[case]
    model, batch = _locked_model(**lock), _batch()
    subs = split_batch(batch, N // k)
    cache = LockedTowerCache.for_model(model)
    assert cache is not None and cache.describe() == description
    torch.manual_seed(3)
    loss_ref, g_ref = _reference_subbatched(model, subs)
    assert any(g is None for g in g_ref.values())  # something is locked
    # forwards of the first block of each tower: the locked ones run in pass 1 only
    calls = {"image": _Calls(model.clip.visual.transformer.resblocks[0].mlp),
             "text": _Calls(model.clip.transformer.resblocks[0].mlp)}
    torch.manual_seed(3)
    loss, g = _dga(model, subs, cache)
    rng_after = torch.get_rng_state()
    assert _max_rel_err(g, g_ref) <= EXACT
    assert abs(float(loss - loss_ref)) <= EXACT * float(loss_ref)
    locked = {t.name for t in cache.towers}
    for name, counter in calls.items():
        assert counter.n == (k if name in locked else 2 * k - 1), name  # 2K−1 with keep_last_graph
    assert all(not t.store for t in cache.towers) and cache.bytes == 0  # nothing kept between steps
    # the RNG stream moves on exactly as without the cache
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    _, g_nocache = _dga(model, subs, None)
    assert torch.equal(torch.get_rng_state(), rng_after)
    assert _max_rel_err(g_nocache, g_ref) <= EXACT


@pytest.mark.parametrize(
    "case,modality", [("image+frozen_proj", "image"), ("text+frozen_proj", "text"), ("text_last_layer", "text")]
)
def test_locked_dga_with_mixup(case, modality):
    model, batch = _locked_model(**LOCKS[case][0]), _batch()
    subs = split_batch(batch, 4)
    plan = MixupPlan(0.3, modality)
    targets = SoftTargets(plan.alpha, global_partner(N, block=4))
    torch.manual_seed(4)
    loss_ref, g_ref = _reference_subbatched(model, subs, targets, plan)
    torch.manual_seed(4)
    loss, g = _dga(model, subs, LockedTowerCache.for_model(model), plan, targets)
    assert _max_rel_err(g, g_ref) <= EXACT


def test_cache_over_the_limit_is_refused_before_any_update():
    model, batch = _locked_model(**LOCKS["image_last_block"][0]), _batch()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    buffers = [b.clone() for b in model.buffers()]
    cache = LockedTowerCache.for_model(model, limit_mb=0.01)
    with pytest.raises(ValueError, match=r"bytes per sample × 8 samples.*module\.dga\.locked_cache_mb=0\.01"):
        _dga(model, split_batch(batch, 2), cache)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), buffers))


def test_nothing_locked_means_no_cache():
    assert LockedTowerCache.for_model(_locked_model()) is None


def test_timm_trunk_locked_with_a_trainable_head_is_cached():
    """The demo's shape: a locked timm trunk (BatchNorm statistics frozen, fused BN+act kept) + trainable head."""
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "efficientnet_b0", "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "linear", "image_size": 32},
        "text_cfg": TINY_MODEL_CFG["text_cfg"],
    }
    torch.manual_seed(0)
    model = build_dual_encoder("tiny-timm-locked", cfg, lock_image=True).double().train()
    bns = [m for m in model.clip.visual.trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(not m.training for m in bns)  # the existing fix: locked BN stays in eval mode
    assert all(type(m).__name__ == "BatchNormAct2d" for m in bns if hasattr(m, "act"))
    cache = LockedTowerCache.for_model(model)
    assert cache.describe() == "image: trunk"
    subs = split_batch(_batch(), 2)
    stats = [b.clone() for b in model.clip.visual.trunk.buffers()]
    _, g_ref = _reference_subbatched(model, subs)
    trunk_calls = _Calls(model.clip.visual.trunk.conv_stem)
    _, g = _dga(model, subs, cache)
    assert trunk_calls.n == 4  # pass 1 only (K = 4)
    assert g["clip.visual.head.proj.weight"] is not None
    assert _max_rel_err(g, g_ref) <= EXACT
    assert all(torch.equal(b, s) for b, s in zip(model.clip.visual.trunk.buffers(), stats))
