"""Export round trip: open_clip's own loaders reproduce our embeddings (≤ 1e-6) from the exported folder."""

from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from zerovl_lightning.export import (
    export_open_clip,
    load_dual_encoder,
    load_exported,
    load_lightning_checkpoint,
    main,
)
from zerovl_lightning.model import TINY_MODEL_CFG, build_tiny

TEXTS = ["a red fox.", "The flag of South Korea", "woman in manual wheelchair", ""]


def embeddings(model, images, texts, tokenizer=None):
    tokens = (tokenizer or model.tokenize)(texts)
    model.eval()
    with torch.no_grad():
        if hasattr(model, "clip"):
            return model.encode_image(images), model.encode_text(tokens)
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def assert_same_model(ours, clip, tokenizer, images):
    a_img, a_txt = embeddings(ours, images, TEXTS)
    b_img, b_txt = embeddings(clip, images, TEXTS, tokenizer)
    assert (a_img - b_img).abs().max() <= 1e-6
    assert (a_txt - b_txt).abs().max() <= 1e-6
    assert torch.equal(ours.tokenize(TEXTS), tokenizer(TEXTS))


def trained_tiny():
    """A tiny model whose weights differ from any fresh init (so loading is really tested)."""
    model = build_tiny(temperature=0.05)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_round_trip_local_dir_and_named_config(tmp_path):
    model = trained_tiny()
    paths = export_open_clip(model, tmp_path / "export", name="my-tiny")
    images = torch.randn(3, 3, 32, 32)

    # 1. open_clip's hub layout: create_model_and_transforms('local-dir:<folder>')
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    assert_same_model(model, clip, open_clip.get_tokenizer(f"local-dir:{tmp_path / 'export'}"), images)
    assert tuple(clip.visual.preprocess_cfg["mean"]) == tuple(model.preprocess_cfg["mean"])
    torch.testing.assert_close(clip.logit_scale, model.logit_scale)

    # 2. a named config: add_model_config(<name>.json) + pretrained=<name>.pt
    open_clip.add_model_config(paths["model_config"])
    clip2, _, _ = open_clip.create_model_and_transforms("my-tiny", pretrained=str(paths["model_weights"]))
    assert_same_model(model, clip2, open_clip.get_tokenizer("my-tiny"), images)

    cfg = json.loads(paths["config"].read_text())
    assert cfg["model_cfg"]["embed_dim"] == TINY_MODEL_CFG["embed_dim"]
    assert cfg["zerovl"]["temperature"] == pytest.approx(model.temperature)
    assert paths["weights"].stat().st_size == paths["model_weights"].stat().st_size


def test_load_exported_and_load_dual_encoder(tmp_path):
    model = trained_tiny()
    export_open_clip(model, tmp_path)
    images = torch.randn(2, 3, 32, 32)
    for loaded in (load_exported(tmp_path), load_dual_encoder(export_dir=str(tmp_path))):
        a, b = embeddings(model, images, TEXTS), embeddings(loaded, images, TEXTS)
        assert (a[0] - b[0]).abs().max() <= 1e-6 and (a[1] - b[1]).abs().max() <= 1e-6
        assert loaded.temperature == pytest.approx(model.temperature, rel=1e-5)
        assert loaded.model_name == "zerovl-tiny"
    named = load_dual_encoder(
        model_config=str(tmp_path / "zerovl-tiny.json"), pretrained=str(tmp_path / "zerovl-tiny.pt")
    )
    assert (embeddings(named, images, TEXTS)[0] - embeddings(model, images, TEXTS)[0]).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="exactly one"):
        load_dual_encoder(ckpt_path="x.ckpt", export_dir=str(tmp_path))


def lightning_checkpoint(tmp_path, model_cfg):
    """What Lightning writes for ZeroVLModule: its hyper_parameters and the module state_dict."""
    module_mod = pytest.importorskip("zerovl_lightning.module")
    module = module_mod.ZeroVLModule(model=model_cfg)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return module.model, path


def test_lightning_checkpoint_export_cli(tmp_path, capsys):
    cfg = {"_target_": "zerovl_lightning.model.build_dual_encoder", "model_name": "zerovl-tiny",
           "model_cfg": TINY_MODEL_CFG, "temperature": 0.07, "learn_temperature": True}  # fmt: skip
    model, ckpt = lightning_checkpoint(tmp_path, cfg)
    loaded = load_lightning_checkpoint(ckpt)
    images = torch.randn(2, 3, 32, 32)
    a, b = embeddings(model, images, TEXTS), embeddings(loaded, images, TEXTS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    main([str(ckpt), str(tmp_path / "out"), "--name", "cli-tiny"])
    assert "local-dir:" in capsys.readouterr().out
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'out'}")
    assert_same_model(model, clip, open_clip.get_tokenizer(f"local-dir:{tmp_path / 'out'}"), images)
    assert (tmp_path / "out" / "cli-tiny.json").is_file()


def test_checkpoint_without_model_config_is_explained(tmp_path):
    torch.save({"hyper_parameters": {}, "state_dict": {}}, tmp_path / "x.ckpt")
    from zerovl_lightning.checkpointing import CheckpointError

    with pytest.raises(CheckpointError, match="no model config"):  # a known error: one line from zerovl-eval
        load_lightning_checkpoint(tmp_path / "x.ckpt")


@pytest.mark.slow
def test_round_trip_pretrained_timm_hf_towers(pretrained_model, tmp_path):
    """EfficientNet-Lite0 (timm) + MiniLM (HF) export: the HF tower is found again from its local folder."""
    model = pretrained_model
    paths = export_open_clip(model, tmp_path)
    cfg = json.loads(paths["config"].read_text())
    assert cfg["zerovl"]["hf_text_tower_path"] == cfg["model_cfg"]["text_cfg"]["hf_model_name"]
    assert cfg["preprocess_cfg"]["mean"] == [0.5, 0.5, 0.5]
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    assert_same_model(model, clip, open_clip.get_tokenizer(f"local-dir:{tmp_path}"), torch.randn(2, 3, 128, 128))


def non_square_images() -> list[Image.Image]:
    """RGB images of non-square shapes with structure at the borders (where resize modes differ)."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in [(37, 90), (120, 41), (33, 33), (64, 47)]:
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 3.0)], axis=-1)
        pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(pixels, "RGB"))
    return out


def write_retrieval_shard(folder, images: list[Image.Image]) -> None:
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "shard-000000.tar")) as sink:
        for i, image in enumerate(images):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            sink.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "txt": f"image {i}",
                        "json": {"image_id": i, "caption_id": i}})  # fmt: skip


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_export_preprocessing_reproduces_zerovl_eval_image_embeddings(tmp_path, resize_mode):
    """issue 13 item 11: open_clip's own transforms of the export = the project's eval path, to 1e-6.

    The project side is what ``zerovl-eval`` and validation run (retrieval loaders → RetrievalValidation); the
    open_clip side is ``create_model_and_transforms("local-dir:…")`` and its returned eval preprocess."""
    from zerovl_lightning.eval.retrieval import evaluate_retrieval

    torch.manual_seed(0)
    model = build_tiny(preprocess_cfg={"resize_mode": resize_mode})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    paths = export_open_clip(model, tmp_path / "export")
    written = json.loads(paths["config"].read_text())["preprocess_cfg"]
    assert written["resize_mode"] == resize_mode and written == json.loads(json.dumps(model.preprocess_cfg))

    images = non_square_images()
    write_retrieval_shard(tmp_path / "set", images)
    _, metric = evaluate_retrieval(model, str(tmp_path / "set"), batch_size=3, progress=False)
    ours = metric.last[1]  # image embeddings in image id order (= list order)

    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    clip.eval()
    with torch.no_grad():
        theirs = clip.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
    assert ours.shape == theirs.shape == (len(images), TINY_MODEL_CFG["embed_dim"])
    assert (ours - theirs).abs().max() <= 1e-6
