"""The LightningModule with `loss=siglip`, locked towers and gradient checkpointing, through the real Trainer:
the DGA step equals the plain full-batch step (float64), configs compose, bad combinations fail first."""

from __future__ import annotations

import copy

import pytest
import torch
from test_dga import SGD, TINY, _batch32, _fit, _max_rel_err

from zerovl_lightning.module import ZeroVLModule

SIGLIP_MODEL = {**TINY, "init_logit_bias": -10.0, "temperature": 0.1}


def _module(model=SIGLIP_MODEL, loss="siglip", **kw) -> ZeroVLModule:
    torch.manual_seed(0)
    return ZeroVLModule(model=copy.deepcopy(model), optimizer=SGD, scheduler={"warmup_fraction": 0.0}, loss=loss, **kw)


def test_siglip_module_dga_step_equals_plain_step_with_mixup():
    batch = _batch32()
    mixup = {"enabled": True, "seed": 3, "modalities": ["text"]}
    # the plain step mirrors partners inside its whole batch, DGA inside each sub-batch: compare like with like
    plain = _module(mixup=mixup)
    dga = _module(sub_batch_size=8, mixup=mixup)
    assert plain.mixup.plan(0).alpha < 0.99
    t_plain, cap_plain = _fit(plain, batch)
    t_dga, cap_dga = _fit(dga, batch)
    assert "clip.logit_bias" in cap_plain.grads[0] and cap_plain.grads[0]["clip.logit_bias"].abs() > 0
    assert _max_rel_err(cap_dga.grads[0], cap_plain.grads[0]) <= 1e-10
    loss_plain, loss_dga = (float(t.callback_metrics["train/loss"]) for t in (t_plain, t_dga))
    assert abs(loss_dga - loss_plain) <= 1e-10 * loss_plain
    assert float(t_dga.callback_metrics["train/logit_bias"]) != -10.0  # b was trained


def test_siglip_dga_with_sub_batches_matches_its_full_batch_reference():
    batch = _batch32()
    _, cap_plain = _fit(_module(), batch)
    for b in (1, 2, 4):
        _, cap = _fit(_module(sub_batch_size=b), batch)
        assert _max_rel_err(cap.grads[0], cap_plain.grads[0]) <= 1e-10, b


def test_loss_and_model_must_agree():
    with pytest.raises(ValueError, match=r"module\.loss=siglip needs a model with a logit bias"):
        _module(model=TINY)
    with pytest.raises(ValueError, match="InfoNCE would never train"):
        _module(loss="infonce")
    with pytest.raises(ValueError, match=r"module\.loss='hinge' is not one of"):
        _module(loss="hinge")


@pytest.mark.parametrize(
    "lock",
    [{"lock_image": True}, {"lock_text": True, "lock_text_unlocked_layers": 2}],
    ids=["image", "text_last_layer"],
)
@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_locked_module_dga_equals_plain_step(lock, loss):
    model = {**(SIGLIP_MODEL if loss == "siglip" else TINY), **lock}
    batch = _batch32()
    plain, dga = _module(model, loss), _module(model, loss, sub_batch_size=2)
    assert plain.tower_cache is None and dga.tower_cache is not None
    _, cap_plain = _fit(plain, batch)
    _, cap_dga = _fit(dga, batch)
    assert cap_dga.grads[0].keys() == cap_plain.grads[0].keys()
    assert any(not p.requires_grad for p in plain.model.parameters())  # something is locked
    assert _max_rel_err(cap_dga.grads[0], cap_plain.grads[0]) <= 1e-10


def test_locked_cache_limit_is_a_config_error_with_the_key():
    module = _module({**TINY, "lock_text": True, "lock_text_unlocked_layers": 2}, "infonce", sub_batch_size=2,
                     dga={"locked_cache_mb": 0.001})
    with pytest.raises(ValueError, match=r"module\.dga\.locked_cache_mb=0\.001"):
        _fit(module, _batch32())


@pytest.mark.parametrize("sub_batch_size", [None, 2])
def test_grad_checkpointing_leaves_gradients_unchanged_with_dropout(sub_batch_size):
    """open_clip's checkpointing replays the RNG in its recomputation: float64 gradients identical to ≤ 1e-10."""
    from test_dga import _batch, _grads
    from test_locked_towers import _locked_model

    from zerovl_lightning.dga import DecoupledStep, split_batch
    from zerovl_lightning.mixup import encode_pair

    grads = []
    for ckpt in (False, True):
        model = _locked_model(dropout=0.1)
        model.clip.set_grad_checkpointing(ckpt)
        assert model.clip.transformer.grad_checkpointing is ckpt
        batch = _batch()
        torch.manual_seed(11)
        if sub_batch_size is None:
            from zerovl_lightning.loss import ContrastiveLoss

            u, v = encode_pair(model, batch["image"], batch["text"])
            ContrastiveLoss()(u, v, model.logit_scale.exp()).backward()
        else:
            DecoupledStep()(
                model, lambda s, m=model: encode_pair(m, s["image"], s["text"]), split_batch(batch, sub_batch_size),
                model.logit_scale,
            )
        grads.append(_grads(model))
    assert _max_rel_err(grads[1], grads[0]) <= 1e-10
    assert all(g is not None for g in grads[0].values())


def test_grad_checkpointing_key_reaches_open_clip():
    from hydra.utils import instantiate

    model = instantiate({**TINY, "grad_checkpointing": True})
    assert model.clip.transformer.grad_checkpointing and model.clip.visual.transformer.grad_checkpointing


def test_loss_siglip_config_composes_and_builds():
    from hydra import compose, initialize_config_module

    with initialize_config_module("zerovl_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=["loss=siglip", "method=dga", "module.sub_batch_size=2"])
    assert cfg.module.loss == "siglip" and cfg.model.init_logit_bias == -10.0
    assert cfg.model.learn_temperature and cfg.model.temperature == 0.1
    assert cfg.module.dga.locked_cache and cfg.module.dga.locked_cache_mb == 2048
    from hydra.utils import instantiate

    module = instantiate(cfg.module)
    assert module.loss_name == "siglip" and float(module.model.logit_bias) == -10.0
    assert float(module.model.logit_scale.exp()) == pytest.approx(10.0)
