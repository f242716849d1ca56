"""Image conversion and OpenVLA-style augmentation, shared by training and evaluation.

OpenVLA fine-tunes with ``image_aug``: a random crop covering 90 % of the image area (then resized back) plus mild
colour jitter. A policy trained that way sees objects slightly zoomed in, so at evaluation the matching **center**
crop of 90 % area is applied; skipping it costs measurable accuracy upstream.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

CROP_AREA = 0.9


def to_uint8_hwc(image: Any, size: int | None = None) -> np.ndarray:
    """LeRobot's float CxHxW tensor in [0, 1], a uint8 / float HxWx3 or CxHxW array, or a PIL image → uint8 HxWx3,
    optionally resized to ``size`` x ``size``. The one image converter of the package (stream, training,
    evaluation, probes and plots all call it).

    The resize is torch's uint8 bilinear kernel on a channels-last tensor (~70 µs for 128→224 on one core, vs
    ~300 µs for PIL), antialiased when shrinking; it matches PIL's bilinear to < 0.1 grey level on average.
    """
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
    else:
        if hasattr(image, "detach"):  # torch tensor
            image = image.detach().cpu().numpy()
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = np.transpose(arr, (1, 2, 0))
        if arr.dtype != np.uint8:
            scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 + 1e-6 else 1.0
            arr = np.clip(np.rint(arr.astype(np.float32) * scale), 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
    if size and (arr.shape[0] != size or arr.shape[1] != size):
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]
        shrink = arr.shape[0] > size or arr.shape[1] > size
        t = F.interpolate(t.contiguous(memory_format=torch.channels_last), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=shrink)[0]
        arr = t.permute(1, 2, 0).numpy()
    # C-contiguous HxWx3: a transposed view costs PIL's fromarray a strided copy (~0.5 ms at 128 px) every call
    return np.ascontiguousarray(arr)


def to_pil(image: Any) -> Image.Image:
    """Any image ``to_uint8_hwc`` reads → an RGB PIL image; an RGB PIL image is returned as it is (the array round
    trip would rebuild the same pixels; every caller makes new images from it, none edits it in place)."""
    if isinstance(image, Image.Image) and image.mode == "RGB":
        return image
    return Image.fromarray(to_uint8_hwc(image))


def _crop_side(n: int, area: float) -> int:
    return max(1, int(round(n * math.sqrt(area))))


def center_crop(image: Image.Image, area: float = CROP_AREA) -> Image.Image:
    """Center crop covering ``area`` of the image, resized back to the original size (evaluation)."""
    w, h = image.size
    cw, ch = _crop_side(w, area), _crop_side(h, area)
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR)


def random_crop(image: Image.Image, rng: np.random.Generator, area: float = CROP_AREA) -> Image.Image:
    """Random crop covering ``area`` of the image (square aspect kept), resized back (training)."""
    w, h = image.size
    cw, ch = _crop_side(w, area), _crop_side(h, area)
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    return image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR)


def color_jitter(image: Image.Image, rng: np.random.Generator, brightness: float = 0.2, contrast: float = 0.2,
                 saturation: float = 0.2) -> Image.Image:
    """Mild colour jitter (OpenVLA uses brightness 0.2, contrast/saturation [0.8, 1.2], hue 0.05)."""
    for enhancer, amount in ((ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast),
                             (ImageEnhance.Color, saturation)):
        image = enhancer(image).enhance(float(rng.uniform(1.0 - amount, 1.0 + amount)))
    return image


def train_transform(image: Any, rng: np.random.Generator, enabled: bool = True) -> Image.Image:
    pil = to_pil(image)
    if not enabled:
        return pil
    return color_jitter(random_crop(pil, rng), rng)


def eval_transform(image: Any, enabled: bool = True) -> Image.Image:
    """The evaluation counterpart of ``train_transform``: center crop iff training used image augmentation."""
    pil = to_pil(image)
    return center_crop(pil) if enabled else pil
