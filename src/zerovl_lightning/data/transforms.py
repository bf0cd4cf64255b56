"""ZeroVL's image and text augmentations (``zerovl-method.md``, "Defaults of the paper's config").

- Train: RandomResizedCrop(size, scale 0.6–1) → AutoAugment (ImageNet policy) → normalize. ``scale=None``:
  Resize(shorter side to size) → CenterCrop(size) instead of the random crop, so that with AutoAugment off every
  epoch sees the same pixels (``module.feature_cache`` needs that).
- Eval: Resize((size·256/224, size·256/224)) → CenterCrop(size) → normalize (256/224 at the paper's 224 px).
- Text (train, optional): each word-piece is picked with p = 0.2, a picked one is masked (50%), replaced by a
  random token (10%) or deleted (40%). Works on token ids from the model's tokenizer, never touching the
  start/end tokens or padding. open_clip's CLIP BPE has no mask token: there, "mask" falls back to deletion
  unless ``mask_id`` is given (a masked id must not be the end token, which CLIP's text tower pools at).

Mean, std, size and interpolation come from the model's open_clip ``preprocess_cfg``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision import transforms as T

from .image_decoding import to_rgb  # noqa: F401  (re-exported: the one decoder of train, eval and writers)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def train_image_size(preprocess_cfg: Mapping[str, Any] | None, image_size: int | None) -> int:
    """The side of the train crop: ``image_size`` or the model's ``preprocess_cfg`` size (224 by default)."""
    if image_size is not None:
        return int(image_size)
    size = (preprocess_cfg or {}).get("size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _interpolation(preprocess_cfg: Mapping[str, Any] | None) -> T.InterpolationMode:
    name = str((preprocess_cfg or {}).get("interpolation", "bicubic")).lower()
    return {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(
        name, T.InterpolationMode.BICUBIC
    )


def _mean_std(preprocess_cfg: Mapping[str, Any] | None) -> tuple[Sequence[float], Sequence[float]]:
    cfg = preprocess_cfg or {}
    return tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))


def build_train_transform(
    preprocess_cfg: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    *,
    scale: tuple[float, float] | None = (0.6, 1.0),
    auto_augment: bool = True,
    normalize: bool = True,
) -> T.Compose:
    """PIL RGB image → normalised FloatTensor[3, s, s] with ZeroVL's train augmentation.

    ``normalize=False`` stops at a uint8 tensor, for loaders that normalise whole batches at once
    (:class:`BatchNormalize`, one vectorised pass instead of two float copies per image).
    """
    size = train_image_size(preprocess_cfg, image_size)
    interp = _interpolation(preprocess_cfg)
    mean, std = _mean_std(preprocess_cfg)
    ops: list[Any] = (
        [T.Resize(size, interpolation=interp), T.CenterCrop(size)]
        if scale is None
        else [T.RandomResizedCrop(size, scale=tuple(scale), interpolation=interp)]
    )
    if auto_augment:
        ops.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    ops += [T.ToTensor(), T.Normalize(mean, std)] if normalize else [T.PILToTensor()]
    return T.Compose(ops)


class BatchNormalize:
    """uint8 [B, 3, H, W] → float (x / 255 − mean) / std, as ``ToTensor`` + ``Normalize`` per image would."""

    def __init__(self, preprocess_cfg: Mapping[str, Any] | None = None) -> None:
        mean, std = _mean_std(preprocess_cfg)
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        sd = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * sd), m / sd

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mul_(self.scale).sub_(self.shift)


def min_crop_fraction(scale: Sequence[float] | None, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> float:
    """Smallest side of a RandomResizedCrop box relative to the image's shorter side (JPEG draft decoding);
    1 without a random crop."""
    return 1.0 if scale is None else min(1.0, (scale[0] * ratio[0]) ** 0.5)


class TokenAugment:
    """ZeroVL's word-piece augmentation on padded token ids [B, L] (see module docstring).

    The content of a row is everything strictly between its first token (start / [CLS]) and its first end
    token (CLIP's end-of-text / [SEP]); deletions shift the rest left and pad the tail with ``pad_id``.
    """

    def __init__(
        self,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        vocab_size: int,
        mask_id: int | None = None,
        special_ids: Sequence[int] = (),
        pick_prob: float = 0.2,
        mask_prob: float = 0.5,
        random_prob: float = 0.1,
        delete_prob: float = 0.4,
    ) -> None:
        if abs(mask_prob + random_prob + delete_prob - 1.0) > 1e-6:
            raise ValueError("mask_prob + random_prob + delete_prob must be 1")
        self.bos_id, self.eos_id, self.pad_id, self.mask_id = bos_id, eos_id, pad_id, mask_id
        self.vocab_size = vocab_size
        self.special = torch.tensor(
            sorted({bos_id, eos_id, *special_ids} | ({mask_id} if mask_id is not None else set()))
        )
        self.pick_prob, self.mask_prob, self.random_prob = pick_prob, mask_prob, random_prob

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> TokenAugment:
        """Special ids of an open_clip ``SimpleTokenizer`` or ``HFTokenizer``."""
        hf = getattr(tokenizer, "tokenizer", None)
        if hf is not None and hasattr(hf, "all_special_ids"):
            bos = hf.cls_token_id if hf.cls_token_id is not None else hf.bos_token_id
            eos = hf.sep_token_id if hf.sep_token_id is not None else hf.eos_token_id
            pad = hf.pad_token_id if hf.pad_token_id is not None else 0
            kwargs.setdefault("mask_id", hf.mask_token_id)
            return cls(
                bos_id=bos,
                eos_id=eos,
                pad_id=pad,
                vocab_size=len(hf),
                special_ids=hf.all_special_ids,
                **kwargs,
            )
        if hasattr(tokenizer, "sot_token_id"):
            return cls(
                bos_id=tokenizer.sot_token_id,
                eos_id=tokenizer.eot_token_id,
                pad_id=0,
                vocab_size=int(getattr(tokenizer, "vocab_size", 49408)),
                special_ids=getattr(tokenizer, "all_special_ids", ()),
                **kwargs,
            )
        raise TypeError(f"cannot find special token ids of tokenizer {type(tokenizer).__name__}")

    def _random_tokens(self, n: int, generator: torch.Generator) -> torch.Tensor:
        out = torch.randint(0, self.vocab_size, (n,), generator=generator)
        bad = torch.isin(out, self.special) | (out == self.pad_id)
        while bad.any():
            out[bad] = torch.randint(0, self.vocab_size, (int(bad.sum()),), generator=generator)
            bad = torch.isin(out, self.special) | (out == self.pad_id)
        return out

    def __call__(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        generator = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        out = tokens.clone()
        length = tokens.shape[1]
        for i in range(tokens.shape[0]):
            row = tokens[i]
            ends = (row[1:] == self.eos_id).nonzero()
            end = int(ends[0]) + 1 if len(ends) else int((row != self.pad_id).nonzero().max()) + 1
            content = row[1:end].clone()
            if len(content) == 0:
                continue
            picked = torch.rand(len(content), generator=generator) < self.pick_prob
            action = torch.rand(len(content), generator=generator)
            mask_sel = picked & (action < self.mask_prob)
            rand_sel = picked & (action >= self.mask_prob) & (action < self.mask_prob + self.random_prob)
            del_sel = picked & (action >= self.mask_prob + self.random_prob)
            if self.mask_id is not None:
                content[mask_sel] = self.mask_id
            else:
                del_sel = del_sel | mask_sel
            if rand_sel.any():
                content[rand_sel] = self._random_tokens(int(rand_sel.sum()), generator)
            kept = content[~del_sel]
            if len(kept) == 0:  # never delete a caption entirely
                continue
            new = torch.cat([row[:1], kept, row[end : end + 1] if end < length else row[:0]])
            out[i] = self.pad_id
            out[i, : len(new)] = new
        return out
