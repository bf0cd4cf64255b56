"""Decoded image → 8-bit RGB, one way for training, evaluation and the shard writers (PIL + numpy only, so
the writers' CLI does not import torch)."""

from __future__ import annotations

import numpy as np
from PIL import Image

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded image → 8-bit RGB, identically for training, evaluation and the shard writers.

    - Transparency (RGBA, LA, PA, P with a transparent colour) is composited on white: clip art and stamps
      are drawn on transparent pixels, which are often black underneath (``convert("RGB")`` would show them).
    - 16-bit grey (``I;16*``, e.g. 16-bit PNG) is scaled by 255/65535, not clipped at 255.
    - 32-bit integer (``I``) is taken as 16-bit when any value exceeds 255 (PIL's mode for 16-bit data from
      some decoders), else as 8-bit; float (``F``, e.g. float TIFF) as [0, 1] when its values are within it,
      else as [0, 255] (clipped).
    """
    mode = image.mode
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        a = np.asarray(image, dtype=np.float64)
        finite = a[np.isfinite(a)]
        top = float(finite.max()) if finite.size else 0.0
        if mode in _SIXTEEN_BIT or (mode == "I" and top > 255):
            a = a * (255.0 / 65535.0)
        elif mode == "F" and float(finite.min(initial=0.0)) >= 0.0 and top <= 1.0:
            a = a * 255.0
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    return image.convert("RGB")
