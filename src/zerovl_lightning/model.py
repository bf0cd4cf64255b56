"""Dual encoders built through open_clip, with ZeroVL's temperature handling.

Three ways to get a model, all through ``open_clip.create_model`` so tokenizers, preprocessing configs and export
stay open_clip-compatible:

- a named open_clip config (``ViT-B-16``), random init or weights from a local file (``pretrained=/path.pt``);
- a custom config dict (``model_cfg``), registered under ``model_name`` — tiny towers for tests;
- pretrained unimodal towers: a timm image tower + an HF text tower (ZeroVL's recipe). Offline, each comes from one
  local key: ``image_tower_weights`` (a timm checkpoint file or folder; another layout is mapped by order and shape)
  and ``text_tower_weights`` (an HF ``save_pretrained`` folder with its tokenizer). Online (``HF_HUB_OFFLINE=0``),
  hub names work: timm's ``timm_model_pretrained`` weights and an HF model name.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from timm.models import load_state_dict as timm_load_state_dict
from torch import nn

log = logging.getLogger(__name__)


_CONFIG_DIR: Path | None = None  # this process's folder of registered configs (open_clip reads them from files)


def register_model_config(name: str, model_cfg: Mapping[str, Any]) -> None:
    """Make a custom config visible to ``open_clip.create_model`` and ``open_clip.get_tokenizer`` by name, through
    open_clip's public ``add_model_config`` (a ``<name>.json`` file in a per-process folder)."""
    global _CONFIG_DIR
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ValueError(f"model.model_cfg of {name!r} lacks {missing} (open_clip needs all three)")
    if _CONFIG_DIR is None:
        _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="zerovl-open-clip-configs-"))
        atexit.register(shutil.rmtree, _CONFIG_DIR, ignore_errors=True)
    path = _CONFIG_DIR / f"{name}.json"
    path.write_text(json.dumps(model_cfg, default=_json_container))
    open_clip.add_model_config(path)


def _json_container(obj: Any) -> Any:
    """Nested mappings and sequences of any kind (e.g. a config node handed over without ``_convert_``) as JSON."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return list(obj)
    raise TypeError(f"model.model_cfg: {type(obj).__name__} {obj!r} is not a JSON value")


def load_state_dict_by_order(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> int:
    """Copy tensors into ``module`` in order, checking count and shapes (e.g. lukemelas EfficientNet → timm).

    Ignores ``num_batches_tracked`` on both sides; strip a classifier head the module lacks before calling. A
    source with more or fewer tensors than the module, or one shape that differs, is a ValueError (nothing is
    copied). Returns how many tensors were copied.
    """
    src = [(k, v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        extra = [k for k, _ in src[len(dst) :]] or [k for k, _ in dst[len(src) :]]
        raise ValueError(
            f"source state_dict has {len(src)} tensors, the module has {len(dst)}: cannot map by order "
            f"({'extra in the source' if len(src) > len(dst) else 'missing from the source'}: {extra[:5]})"
        )
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            raise ValueError(f"shape mismatch mapping {sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}")
    with torch.no_grad():
        for (_, sv), (_, dv) in zip(src, dst):
            dv.copy_(sv)
    return len(dst)


HEAD_KEYS = ("head.", "fc.", "classifier.", "_fc.")  # classifier heads of timm / lukemelas checkpoints
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")  # in a folder, first found


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a local ``.safetensors`` / ``.pth`` / ``.bin`` file, or from a folder holding one of
    :data:`WEIGHT_FILES` (timm's and HF's hub layout)."""
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no {' / '.join(WEIGHT_FILES)} in this folder")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file (model.image_tower_weights)")
    return timm_load_state_dict(str(path))  # timm's reader: safetensors or torch, EMA/state_dict keys, DDP prefixes


def load_image_tower(trunk: nn.Module, source: str | Path) -> int:
    """Load a local checkpoint into a timm trunk: by name when it is a timm checkpoint of this architecture
    (classifier head dropped; any other missing or extra tensor is an error), else by order and shape."""
    state = read_state_dict(source)
    body = {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}
    wanted = set(trunk.state_dict())
    if wanted <= set(state):
        extra = sorted(set(body) - wanted)
        if extra:
            raise ValueError(f"{source}: tensors the image tower does not have: {extra[:5]}")
        trunk.load_state_dict({k: state[k] for k in wanted}, strict=True)
        return len(wanted)
    return load_state_dict_by_order(trunk, body)


class DualEncoder(nn.Module):
    """An open_clip model with L2-normalised encoders and a ZeroVL temperature.

    ``logit_scale`` is open_clip's parameter ``log(1/τ)``; a fixed temperature keeps it frozen, a learnable one is
    clamped to ``temperature_range`` after each optimizer step (:meth:`clamp_temperature_`).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Any,
        model_name: str,
        temperature: float = 0.02,
        learn_temperature: bool = False,
        temperature_range: tuple[float, float] = (0.001, 0.5),
    ) -> None:
        super().__init__()
        lo, hi = temperature_range
        if not 0 < lo <= temperature <= hi:
            raise ValueError(f"temperature {temperature} must lie in temperature_range {temperature_range}")
        self.clip = clip
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.temperature_range = (float(lo), float(hi))
        with torch.no_grad():
            self.clip.logit_scale.fill_(math.log(1.0 / temperature))
        self.clip.logit_scale.requires_grad_(learn_temperature)

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """SigLIP's learnable bias b (open_clip's ``init_logit_bias``); None for InfoNCE models."""
        return getattr(self.clip, "logit_bias", None)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def learn_temperature(self) -> bool:
        return self.clip.logit_scale.requires_grad

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.clip.logit_scale.detach()))

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's preprocessing config: size, mean, std, interpolation."""
        return dict(self.clip.visual.preprocess_cfg)

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg["size"]
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    def train(self, mode: bool = True) -> DualEncoder:
        """Like ``nn.Module.train``, but BatchNorms whose parameters are frozen (a locked tower) keep their running
        statistics: normalising a frozen pretrained tower with batch statistics would change its features."""
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters(recurse=False)
                ):
                    module.eval()
        return self

    def clamp_temperature_(self) -> None:
        """Keep τ inside its range (OpenCLIP clamps the same way, on the parameter after the step)."""
        lo, hi = self.temperature_range
        with torch.no_grad():
            self.clip.logit_scale.clamp_(math.log(1.0 / hi), math.log(1.0 / lo))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, 3, H, W] → [B, D]; normalised unless asked for the projected pre-norm features."""
        features = self.clip.encode_image(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, L] token ids → [B, D]; ``normalize=False`` gives the projection before L2 norm (text mixup)."""
        features = self.clip.encode_text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)


def build_dual_encoder(
    model_name: str,
    model_cfg: Mapping[str, Any] | None = None,
    pretrained: str | None = None,
    image_tower_weights: str | None = None,
    text_tower_weights: str | None = None,
    temperature: float = 0.02,
    learn_temperature: bool = False,
    temperature_range: tuple[float, float] = (0.001, 0.5),
    image_size: int | None = None,
    context_length: int | None = None,
    preprocess_cfg: Mapping[str, Any] | None = None,
    lock_image: bool = False,
    lock_image_unlocked_groups: int = 0,
    lock_text: bool = False,
    lock_text_unlocked_layers: int = 0,
    grad_checkpointing: bool = False,
    init_logit_bias: float | None = None,
    **create_kwargs: Any,
) -> DualEncoder:
    """Build a :class:`DualEncoder` offline.

    Args:
        model_name: an open_clip config name, or the name to register ``model_cfg`` under.
        model_cfg: custom open_clip config (``embed_dim``, ``vision_cfg``, ``text_cfg``); registered as
            ``model_name``. HF text towers load from ``text_cfg.hf_model_name`` (a local folder offline).
        pretrained: a local open_clip checkpoint file for the whole model (never a hub tag at run time).
        image_tower_weights: a local checkpoint (file or folder) for the timm image trunk: loaded by name when it is
            timm's, else copied by order and shape; replaces timm's hub weights (``timm_model_pretrained``).
        text_tower_weights: the HF text tower and its tokenizer: a local ``save_pretrained`` folder, or a hub name
            when ``HF_HUB_OFFLINE=0``; sets ``text_cfg.hf_model_name`` and ``hf_tokenizer_name``.
        temperature / learn_temperature / temperature_range: ZeroVL's τ (fixed 0.02 in the paper).
        image_size / context_length: overrides of the config's values (e.g. 128 px for CPU training).
        preprocess_cfg: overrides of open_clip's preprocessing (``mean``, ``std``, ``interpolation``…), e.g. the
            image tower's own normalisation when it was pretrained with other statistics than CLIP's.
        lock_image / lock_text: freeze a pretrained tower except its last ``*_unlocked_*`` groups/layers
            (open_clip's LiT-style locking; projections stay trainable) — fast CPU alignment of unimodal towers.
            Locked BatchNorms keep their running statistics (:meth:`DualEncoder.train`); under DGA the locked
            parts run once per step (locked_cache.py).
        grad_checkpointing: open_clip's ``set_grad_checkpointing`` (recompute each block in backward; exact,
            dropout included: the checkpoint replays the RNG).
        init_logit_bias: SigLIP's bias b (−10 in SigLIP; ``loss=siglip``); None = no bias (InfoNCE).
    """
    if model_cfg is not None:
        cfg = copy.deepcopy(dict(model_cfg))  # plain: Hydra's _convert_: all (conf/model/*.yaml)
        if image_size is not None:
            cfg.setdefault("vision_cfg", {})["image_size"] = image_size
        if context_length is not None:
            cfg.setdefault("text_cfg", {})["context_length"] = context_length
        if image_tower_weights is not None:  # the local file replaces timm's hub weights: no download
            cfg.setdefault("vision_cfg", {})["timm_model_pretrained"] = False
        if text_tower_weights is not None:
            text = cfg.setdefault("text_cfg", {})
            text.update(hf_model_name=text_tower_weights, hf_tokenizer_name=text_tower_weights)
        register_model_config(model_name, cfg)
    elif model_name not in open_clip.list_models():
        raise ValueError(f"Unknown open_clip model {model_name!r}; give model_cfg or one of open_clip.list_models()")
    if pretrained is not None and not pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise ValueError(f"pretrained must be a local checkpoint file, got {pretrained!r} (no hub downloads)")

    kwargs: dict[str, Any] = dict(create_kwargs)
    if init_logit_bias is not None:
        kwargs["init_logit_bias"] = float(init_logit_bias)
    if preprocess_cfg is not None:
        kwargs["force_preprocess_cfg"] = dict(preprocess_cfg)
    if model_cfg is None and image_size is not None:
        kwargs["force_image_size"] = image_size
    if model_cfg is None and context_length is not None:
        kwargs["force_context_length"] = context_length
    try:
        clip = open_clip.create_model(model_name, pretrained=pretrained, output_dict=False, **kwargs)
    except OSError as err:  # huggingface_hub / transformers: not cached and offline, or no such folder
        raise OSError(
            f"model {model_name}: could not load a pretrained tower ({str(err).splitlines()[0]}); offline "
            "(HF_HUB_OFFLINE=1, the default) set model.image_tower_weights=<timm checkpoint file or folder> and "
            "model.text_tower_weights=<HF save_pretrained folder>, or allow the hub with HF_HUB_OFFLINE=0"
        ) from err

    if image_tower_weights is not None:
        trunk = getattr(clip.visual, "trunk", None)
        if trunk is None:
            raise ValueError("image_tower_weights needs a timm image tower (vision_cfg.timm_model_name)")
        n = load_image_tower(trunk, image_tower_weights)
        log.info("loaded %d image-tower tensors from %s", n, image_tower_weights)

    if lock_image:
        # Not open_clip's freeze_bn_stats: it swaps timm's BatchNormAct2d for FrozenBatchNorm2d and drops the fused
        # activation (an EfficientNet without ReLU6 collapses). Locked BatchNorms stay in eval mode instead.
        clip.lock_image_tower(unlocked_groups=lock_image_unlocked_groups, freeze_bn_stats=False)
        _keep_trainable(getattr(clip.visual, "proj", None))
    if lock_text:
        hf_layers = _hf_layers(clip) if lock_text_unlocked_layers else None
        if hf_layers is not None:
            _lock_hf_text(clip, hf_layers, lock_text_unlocked_layers)
        else:
            clip.lock_text_tower(unlocked_layers=lock_text_unlocked_layers, freeze_layer_norm=True)
        _keep_trainable(getattr(clip, "text_projection", None))
    if grad_checkpointing:
        clip.set_grad_checkpointing(True)

    tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)
    return DualEncoder(clip, tokenizer, model_name, temperature, learn_temperature, tuple(temperature_range))


def _hf_layers(clip: nn.Module) -> nn.ModuleList | None:
    """The transformer layers of an HF text tower (BERT-style ``encoder.layer``); None for other towers."""
    transformer = getattr(getattr(clip, "text", None), "transformer", None)
    layers = getattr(getattr(transformer, "encoder", None), "layer", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def _lock_hf_text(clip: nn.Module, layers: nn.ModuleList, unlocked_layers: int) -> None:
    """Lock an HF text tower except its last ``unlocked_layers`` of ``layers`` (and the projection).

    open_clip's ``HFTextEncoder.lock(unlocked_layers>0)`` looks up a ``layer_attr`` its own arch table lacks for
    BERT (KeyError) and would leave the NSP pooler trainable; this freezes everything, LayerNorms included, then
    unlocks the last layers whole, as open_clip means to.
    """
    if not 0 < unlocked_layers <= len(layers):
        raise ValueError(f"model.lock_text_unlocked_layers={unlocked_layers}: the text tower has {len(layers)} layers")
    clip.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    for layer in layers[len(layers) - unlocked_layers :]:
        layer.requires_grad_(True)


def _keep_trainable(projection: nn.Parameter | nn.Module | None) -> None:
    """open_clip's native towers (ViT, text transformer) lock their projection with the tower; timm and HF towers
    keep theirs trainable. Locked-tower alignment trains the projections, so unlock the native ones too."""
    if projection is not None:  # a Parameter, or an nn.Linear with proj_bias
        projection.requires_grad_(True)


TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_tiny(temperature: float = 0.07, learn_temperature: bool = True, **kwargs: Any) -> DualEncoder:
    """Tiny random-init towers (a few hundred k params plus the token table) for tests and notebooks."""
    return build_dual_encoder(
        "zerovl-tiny", TINY_MODEL_CFG, temperature=temperature, learn_temperature=learn_temperature, **kwargs
    )
