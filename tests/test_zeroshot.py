"""Zero-shot classification: a constructed encoder with a known answer, template averaging, datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zerovl_lightning.eval.classification_data import (
    ArrayImages,
    ClassificationSet,
    build_classification_set,
    digits,
    fashion_mnist,
)
from zerovl_lightning.eval.zeroshot import evaluate_zeroshot, zeroshot_classifier

CLASSES = ["cat", "dog", "car", "tree", "boat", "lamp"]


class GreyLevelEncoder(nn.Module):
    """Images of constant grey level 40·c + 20 are class c; a prompt is class c when it names CLASSES[c].

    ``confuse`` maps some image classes to another class's direction, so the expected accuracy is known.
    """

    preprocess_cfg = {"size": 8, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "interpolation": "bilinear"}

    def __init__(self, confuse: dict[int, int] | None = None) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.confuse = confuse or {}
        self.seen_prompts: list[str] = []

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        self.seen_prompts += texts
        return torch.tensor([[next(i for i, c in enumerate(CLASSES) if c in t)] for t in texts])

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.one_hot(tokens[:, 0], len(CLASSES)).float()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        level = images.mean(dim=(1, 2, 3)) * 255
        cls = torch.round((level - 20) / 40).long()
        cls = torch.tensor([self.confuse.get(int(c), int(c)) for c in cls])
        # a little mass on the next class, so top-2 contains the true class for confused ones (c → c+1)
        emb = F.one_hot(cls, len(CLASSES)).float() + 0.1 * F.one_hot((cls - 1) % len(CLASSES), len(CLASSES))
        return F.normalize(emb, dim=-1)


def grey_set(per_class: int = 5) -> ClassificationSet:
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    images = np.stack([np.full((6, 6), 40 * c + 20, dtype=np.uint8) for c in labels])
    return ClassificationSet("grey", CLASSES, ArrayImages(images, labels), templates=["a {c}.", "a photo of a {c}."])


def test_constructed_case_has_known_accuracy():
    perfect = evaluate_zeroshot(GreyLevelEncoder(), grey_set(), batch_size=7, progress=False)
    assert perfect["top1"] == 1.0 and perfect["top5"] == 1.0 and perfect["num_samples"] == 30
    # classes 0, 1, 2 look like 1, 2, 3: half the images are wrong at top-1, all right at top-5
    confused = GreyLevelEncoder(confuse={0: 1, 1: 2, 2: 3})
    out = evaluate_zeroshot(confused, grey_set(), batch_size=7, progress=False)
    assert out["top1"] == pytest.approx(0.5)
    assert out["top5"] == 1.0
    assert out["mean_per_class_recall"] == pytest.approx(0.5)
    assert set(confused.seen_prompts) >= {"a cat.", "a photo of a boat."}


def test_classifier_is_the_normalised_mean_of_normalised_template_embeddings():
    torch.manual_seed(0)
    table = torch.randn(100, 4)

    class Random(GreyLevelEncoder):
        def tokenize(self, texts):
            return torch.tensor([[hash(t) % 100] for t in texts])

        def encode_text(self, tokens, normalize=True):
            return F.normalize(table[tokens[:, 0]], dim=-1)

    model = Random()
    templates = ["{c}", "a {c}", "the {}"]
    w = zeroshot_classifier(model, ["x", "y"], templates)
    for i, name in enumerate(["x", "y"]):
        prompts = [t.replace("{}", "{c}").format(c=name) for t in templates]
        emb = F.normalize(table[[hash(p) % 100 for p in prompts]], dim=-1).mean(0)
        torch.testing.assert_close(w[i], F.normalize(emb, dim=0))
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(2))


def have_fashion_mnist() -> bool:
    """The Debian package's files are there (read through the one Fashion-MNIST reader, data/demo.py)."""
    try:
        fashion_mnist("test", limit=10)
    except RuntimeError:  # DemoAssetsMissing: apt-get install dataset-fashion-mnist
        return False
    return True


@pytest.mark.skipif(not have_fashion_mnist(), reason="no Fashion-MNIST")
def test_fashion_mnist_is_balanced_inverted_rgb():
    ds = fashion_mnist("test", limit=200)
    assert len(ds) == 200
    assert np.bincount(ds.labels).tolist() == [20] * 10
    image, label = ds[0]
    assert image.mode == "RGB" and image.size == (28, 28)
    assert np.asarray(image).mean() > 128  # dark-on-white after 255 − x
    cset = build_classification_set("fashion_mnist", test_limit=100, train_limit=50, with_train=True)
    assert cset.classnames[0] == "t-shirt" and cset.classnames[9] == "ankle boot"  # prompt-style names
    assert cset.num_classes == 10 and len(cset.test) == 100 and len(cset.train) == 50


def test_digits_split_is_disjoint_and_labelled():
    test, train = digits("test"), digits("train")
    assert len(test) + len(train) == 1797
    assert np.bincount(test.labels, minlength=10).min() > 50
    cset = build_classification_set({"name": "my_digits", "type": "digits", "classnames": list("0123456789")})
    assert cset.name == "my_digits" and cset.templates and cset.classnames[3] == "3"


def test_tiny_model_runs_on_digits():
    from zerovl_lightning.model import build_tiny

    model = build_tiny()
    model.train()
    out = evaluate_zeroshot(model, build_classification_set("digits", test_limit=40), progress=False)
    assert 0.0 <= out["top1"] <= out["top5"] <= 1.0 and out["num_samples"] == 40
    assert model.training  # evaluation restores the mode it found


def test_top5_is_not_merged_with_top1_when_first_batch_is_perfect():
    """torchmetrics' compute groups would merge top-1 and top-5 after a first batch where they agree."""
    confused = GreyLevelEncoder(confuse={3: 4, 4: 5, 5: 0})  # classes in order: the first batch is perfect
    out = evaluate_zeroshot(confused, grey_set(), batch_size=5, progress=False)
    assert out["top1"] == pytest.approx(0.5) and out["top5"] == 1.0
