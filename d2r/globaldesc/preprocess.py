"""Image pre-processing for global descriptors (PyRetri's menu, numpy + OpenCV): resize, crops, flips, scales.

Input and output images are (H, W, 3) uint8 RGB. :func:`views` turns one image into the list of views whose
descriptors the extractor averages: resize → crops → (two-flip) → each at every scale.
"""

from __future__ import annotations

import cv2
import numpy as np

RESIZES = ("longer", "shorter", "direct", "pad")
CROPS = ("none", "center", "ten")
PAD_RGB = (124, 116, 104)  # the ImageNet mean colour: padding that normalises to ~0


def _scaled(image: np.ndarray, width: int, height: int) -> np.ndarray:
    width, height = max(int(width), 1), max(int(height), 1)
    if (width, height) == (image.shape[1], image.shape[0]):
        return image
    shrink = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize(image: np.ndarray, mode: str, size: int) -> np.ndarray:
    """``longer``: downscale (never up) so the longer side is at most ``size`` (cirtorch's test-time resize);
    ``shorter``: scale so the shorter side is ``size`` (PyRetri ShorterResize); ``direct``: ``size`` ×
    ``size`` whatever the aspect (DirectResize); ``pad``: the longer side to ``size``, then centred on a
    ``size`` × ``size`` canvas of the ImageNet mean colour (PadResize)."""
    h, w = image.shape[:2]
    if mode == "longer":
        f = min(1.0, size / max(h, w))
        return _scaled(image, round(w * f), round(h * f))
    if mode == "shorter":
        f = size / min(h, w)
        return _scaled(image, round(w * f), round(h * f))
    if mode == "direct":
        return _scaled(image, size, size)
    if mode == "pad":
        f = size / max(h, w)
        small = _scaled(image, round(w * f), round(h * f))
        out = np.empty((size, size, 3), np.uint8)
        out[:] = PAD_RGB
        y0, x0 = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
        out[y0:y0 + small.shape[0], x0:x0 + small.shape[1]] = small
        return out
    raise ValueError(f"global.resize: expected one of {list(RESIZES)}, got {mode!r}")


def crops(image: np.ndarray, mode: str, size: int) -> list[np.ndarray]:
    """``none``: the image; ``center``: the centred ``size`` × ``size`` crop (clipped to the image); ``ten``:
    the four corner crops and the centre crop, then the same five of the mirrored image (torchvision
    TenCrop)."""
    if mode == "none":
        return [image]
    h, w = image.shape[:2]
    ch, cw = min(size, h), min(size, w)
    centre = image[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
    if mode == "center":
        return [centre]
    if mode == "ten":
        five = [image[:ch, :cw], image[:ch, w - cw:], image[h - ch:, :cw], image[h - ch:, w - cw:], centre]
        return five + [np.ascontiguousarray(c[:, ::-1]) for c in five]
    raise ValueError(f"global.crop: expected one of {list(CROPS)}, got {mode!r}")


def views(image: np.ndarray, resize_mode: str = "longer", size: int = 1024, crop: str = "none",
          crop_size: int = 224, flip: bool = False, scales=(1.0,)) -> list[np.ndarray]:
    """The views of one (H, W, 3) uint8 image, in order crop × flip × scale (two-flip adds each crop's mirror;
    ten crops already hold their mirrors, so ``flip`` adds nothing to them)."""
    base = crops(resize(image, resize_mode, size), crop, crop_size)
    if flip and crop != "ten":
        base = [v for c in base for v in (c, np.ascontiguousarray(c[:, ::-1]))]
    out = []
    for v in base:
        for s in scales:
            out.append(v if s == 1 else _scaled(v, round(v.shape[1] * s), round(v.shape[0] * s)))
    return out
