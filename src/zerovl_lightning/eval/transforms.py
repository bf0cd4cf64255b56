"""The one evaluation preprocessing: ``to_rgb`` then open_clip's own eval transform of the model's
``preprocess_cfg``.

Validation in training, ``zerovl-eval`` and an export loaded with
``open_clip.create_model_and_transforms("local-dir:<export>")`` therefore preprocess an image identically:
``zerovl-export`` writes the same ``preprocess_cfg`` (``resize_mode``, ``interpolation``, ``mean``/``std``,
``fill_color``) into ``open_clip_config.json``. Set ``resize_mode`` etc. through the model's ``preprocess_cfg``
(``build_dual_encoder(preprocess_cfg=...)``) to change all three at once. Training augmentation is
:mod:`zerovl_lightning.data.transforms`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from torchvision import transforms as T

from zerovl_lightning.data.image_decoding import to_rgb


def preprocess_cfg_of(preprocess_cfg: Mapping[str, Any] | None, image_size: int | None = None) -> PreprocessCfg:
    """open_clip's :class:`PreprocessCfg` from a (possibly partial) ``preprocess_cfg`` dict; ``image_size``
    overrides its size."""
    cfg = merge_preprocess_dict(PreprocessCfg(), dict(preprocess_cfg or {}))
    if image_size is not None:
        cfg["size"] = int(image_size)
    return PreprocessCfg(**cfg)


def eval_transform(
    preprocess_cfg: Mapping[str, Any] | None, image_size: int | None = None
) -> Callable[[Any], torch.Tensor]:
    """PIL image → normalised FloatTensor[3, s, s]: transparency on white (:func:`to_rgb`, as in training),
    then ``open_clip.image_transform_v2(cfg, is_train=False)``.

    ``image_size`` overrides the model's size (convolutional towers with global pooling, e.g. a cheaper linear
    probe on 28-px Fashion-MNIST).
    """
    return T.Compose([to_rgb, image_transform_v2(preprocess_cfg_of(preprocess_cfg, image_size), is_train=False)])
