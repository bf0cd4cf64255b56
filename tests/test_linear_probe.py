"""Linear probe: pre-projection features per tower, L-BFGS logistic regression, Fashion-MNIST > chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_zeroshot import have_fashion_mnist

from zerovl_lightning.eval.classification_data import build_classification_set
from zerovl_lightning.eval.linear_probe import (
    evaluate_linear_probe,
    fit_logistic_regression,
    image_features,
    linear_probe,
)
from zerovl_lightning.model import build_tiny

needs_fmnist = pytest.mark.skipif(not have_fashion_mnist(), reason="dataset-fashion-mnist missing")


def test_vit_features_are_the_pooled_token_before_proj():
    model = build_tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = image_features(model, x)
        assert feats.shape == (3, 64)  # tower width, not the 32-d joint space
        torch.testing.assert_close(feats @ model.clip.visual.proj, model.encode_image(x, normalize=False))
    assert model.clip.visual.proj is not None  # restored


def test_timm_features_are_the_trunk_output(pretrained_model):
    model = pretrained_model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = image_features(model, x)
        assert feats.shape == (2, 1280)  # EfficientNet-Lite0 pooled features
        proj = model.clip.visual.head.proj
        torch.testing.assert_close(proj(feats), model.encode_image(x, normalize=False))


def test_logistic_regression_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.5 * torch.randn(300, generator=g, dtype=torch.float64) > 0).long()
    y[x[:, 2] > 1.0] = 2
    lam = 1e-2
    w, b = fit_logistic_regression(x, y, 3, lam, max_iter=500)
    # sklearn minimises C·Σ CE + ½‖W‖² (intercept unpenalised) = same optimum when C = 1 / (λ·n)
    ref = LogisticRegression(C=1 / (lam * len(x)), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    ours = torch.softmax(x @ w + b, dim=1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x.numpy()), atol=2e-4)


def test_sweep_picks_a_weight_decay_and_separable_blobs_are_solved():
    g = torch.Generator().manual_seed(1)
    centers = 4 * torch.randn(4, 16, generator=g)
    y = torch.randint(0, 4, (400,), generator=g)
    x = centers[y] + torch.randn(400, 16, generator=g)
    out = linear_probe(x[:300], y[:300], x[300:], y[300:], 4, weight_decays=(1e-3, 1e-1, 10.0))
    assert out["top1"] > 0.95 and out["weight_decay"] in (1e-3, 1e-1, 10.0)
    assert out["num_train"] == 300 and out["num_test"] == 100 and "top5" not in out  # 4 classes < 5


@needs_fmnist
def test_random_tiny_tower_beats_chance_on_fashion_mnist():
    model = build_tiny()
    cset = build_classification_set("fashion_mnist", test_limit=200, train_limit=400, with_train=True)
    out = evaluate_linear_probe(model, cset, batch_size=100, weight_decays=(1e-2, 1.0), progress=False)
    assert out["top1"] > 0.4  # chance 0.1: even random ViT features are linearly informative


@needs_fmnist
@pytest.mark.slow
def test_pretrained_tower_probe_on_fashion_mnist(pretrained_model):
    """The offline EfficientNet-Lite0 at 48 px: ~0.8 top-1 with 1k train images (chance 0.1)."""
    cset = build_classification_set("fashion_mnist", test_limit=500, train_limit=1000, with_train=True)
    out = evaluate_linear_probe(pretrained_model, cset, image_size=48, progress=False)
    assert out["top1"] > 0.7 and out["top5"] > 0.95
