"""The paper's towers (conf/model/vit_b16_bert.yaml, used by experiment=zerovl_14m, zerovl_dga_16k, baseline) built
from tiny stand-in weights written here: a tiny timm ViT checkpoint and a tiny BERT ``save_pretrained`` folder.

Checks what the paper's recipe needs: the loaded weights equal the files, BERT is built without its NSP pooler and
the text embedding is the projected [CLS] token of the last hidden state, and offline without local weights the
error names the two keys to set.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from test_configs import compose_train

from zerovl_lightning.model import load_image_tower

TIMM_VIT = "vit_tiny_patch16_224"  # the paper's ViT-B/16 architecture family, 5.7 M parameters
WORDS = ["a", "red", "blue", "cat", "dog", "photo", "of", "on", "the", "grass"]


@pytest.fixture(scope="module")
def stand_in_weights(tmp_path_factory) -> dict[str, Path]:
    """A timm ViT checkpoint (one .safetensors file and the hub's folder layout) and a tiny BERT folder."""
    import timm
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("paper_towers")
    torch.manual_seed(0)
    vit = timm.create_model(TIMM_VIT, pretrained=False, num_classes=7)  # with a classifier head, like in21k's
    (root / "vit").mkdir()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(root / "vit" / "model.safetensors"))
    torch.save(vit.state_dict(), root / "vit.pth")

    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    config = BertConfig(
        vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(root / "bert")  # saved with its pooler, as bert-base-uncased is
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(root / "bert")
    return {"vit_dir": root / "vit", "vit_file": root / "vit.pth", "bert": root / "bert"}


def _paper_model(tmp_path: Path, experiment: str, image_weights: Path, bert: Path):
    cfg = compose_train(
        [
            f"experiment={experiment}",
            f"model.model_cfg.vision_cfg.timm_model_name={TIMM_VIT}",
            f"model.image_tower_weights={image_weights}",
            f"model.text_tower_weights={bert}",
        ],
        tmp_path,
    )
    return instantiate(cfg.model)


PAPER_EXPERIMENTS = ("zerovl_14m", "zerovl_dga_16k", "baseline")


def test_paper_experiments_load_pretrained_towers_offline(stand_in_weights, tmp_path):
    from safetensors.torch import load_file
    from transformers import BertModel

    w = stand_in_weights
    overrides = [f"model.image_tower_weights={w['vit_dir']}", f"model.text_tower_weights={w['bert']}"]
    models = [compose_train([f"experiment={e}", *overrides], tmp_path).model for e in PAPER_EXPERIMENTS]
    assert all(m == models[0] for m in models)  # the three build the same towers; build them once
    model = _paper_model(tmp_path, "zerovl_14m", w["vit_dir"], w["bert"])
    # image tower: every trunk tensor is the file's (the classifier head is dropped: the projection replaces it)
    saved = load_file(str(w["vit_dir"] / "model.safetensors"))
    trunk = model.clip.visual.trunk.state_dict()
    assert set(trunk) == {k for k in saved if not k.startswith("head.")}
    for k, v in trunk.items():
        assert torch.equal(v, saved[k]), k
    # text tower: BERT's weights without its NSP pooler
    text = model.clip.text
    reference = BertModel.from_pretrained(w["bert"]).eval()  # with the pooler
    assert getattr(text.transformer, "pooler", None) is None
    ref_state = reference.state_dict()
    for k, v in text.transformer.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    # the text embedding is the projection of the [CLS] token of the last hidden state
    model.eval()
    tokens = model.tokenize(["a photo of a red cat", "the dog on the grass"])
    assert tokens.shape == (2, 25) and (tokens[:, 0] == 2).all()  # [CLS] first, padded to the paper's 25
    with torch.no_grad():
        hidden = reference(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
        expected = text.proj(hidden[:, 0])
        got = model.encode_text(tokens, normalize=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, text.proj(reference.pooler(hidden)), atol=1e-3)  # not the tanh NSP pooler
    emb = model.encode_image(torch.randn(2, 3, 224, 224))
    assert emb.shape == (2, 512)


def test_image_tower_file_and_folder_load_the_same(stand_in_weights, tmp_path):
    import timm

    w = stand_in_weights
    a = timm.create_model(TIMM_VIT, pretrained=False, num_classes=0)
    b = timm.create_model(TIMM_VIT, pretrained=False, num_classes=0)
    assert load_image_tower(a, w["vit_file"]) == load_image_tower(b, w["vit_dir"]) == len(a.state_dict())
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_image_tower(a, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth: no such weights file"):
        load_image_tower(a, tmp_path / "missing.pth")


def test_offline_without_local_weights_names_the_keys(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (tests, zerovl-train's default) and an empty hub cache: one error naming both keys."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = compose_train(["experiment=zerovl_14m", f"model.model_cfg.vision_cfg.timm_model_name={TIMM_VIT}"], tmp_path)
    with pytest.raises(InstantiationException) as err:
        instantiate(cfg.model)
    assert isinstance(err.value.__cause__, OSError)
    assert re.search(r"model\.image_tower_weights=.*model\.text_tower_weights=.*HF_HUB_OFFLINE=0", str(err.value))


@pytest.mark.parametrize(("user_value", "offline"), [(None, True), ("0", False)])
def test_zerovl_train_is_offline_unless_the_user_allows_the_hub(user_value, offline):
    """``zerovl-train`` defaults HF_HUB_OFFLINE to 1 before huggingface_hub reads it, and keeps a user's 0."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if user_value is not None:
        env["HF_HUB_OFFLINE"] = user_value
    code = "import zerovl_lightning.train, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(offline)


@pytest.mark.parametrize("unlocked", [1, 2])
def test_locked_bert_unlocks_its_last_layers_only(stand_in_weights, tmp_path, unlocked):
    """model.lock_text_unlocked_layers on an HF BERT tower (open_clip's own lock raises KeyError 'layer_attr'):
    the last layers and the projection train; embeddings, earlier layers and the NSP pooler stay frozen."""
    cfg = compose_train(
        [
            "experiment=baseline",
            f"model.model_cfg.vision_cfg.timm_model_name={TIMM_VIT}",
            f"model.image_tower_weights={stand_in_weights['vit_file']}",
            f"model.text_tower_weights={stand_in_weights['bert']}",
            "++model.lock_text=true",
            f"++model.lock_text_unlocked_layers={unlocked}",
        ],
        tmp_path,
    )
    text = instantiate(cfg.model).clip.text
    trainable = {n for n, p in text.named_parameters() if p.requires_grad}
    layers = [f"transformer.encoder.layer.{i}." for i in range(2)]
    for i, prefix in enumerate(layers):
        in_layer = {n for n, _ in text.named_parameters() if n.startswith(prefix)}
        assert in_layer and (in_layer <= trainable if i >= 2 - unlocked else not in_layer & trainable), prefix
    assert not {n for n in trainable if n.startswith(("transformer.embeddings.", "transformer.pooler."))}
    assert {n for n in trainable if n.startswith("proj")}, "the projection stays trainable"
    with pytest.raises(Exception, match="lock_text_unlocked_layers=3: the text tower has 2 layers"):
        cfg.model.lock_text_unlocked_layers = 3
        instantiate(cfg.model)
