"""The probe conditions: their names and titles, and the image perturbation (a deterministic hue rotation).

``paraphrase`` (the instruction re-phrased: ``data.tasks.paraphrase_for``), ``color_shift`` (:func:`color_shift`),
``other_camera`` (image_1 for image_0) and the reference ``other_scene`` (another evaluated episode's frame).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ..images import to_uint8_hwc

PROBES = ("paraphrase", "color_shift", "other_camera")
PROBE_TITLES = {"paraphrase": "Paraphrased instructions", "color_shift": "A {deg:g}° hue rotation of the image",
                "other_camera": "The other camera (image_1 for image_0)",
                "other_scene": "Another episode's scene (same camera, instruction kept)"}
# The reference condition: how far the policy moves when the scene's content changes completely (another evaluated
# episode's frame). A probe that moves it much less than this is one the policy handles; when even another scene
# barely moves it, the policy does not look at the scene.
REFERENCE = "other_scene"
# Evaluation groups probed, in this order, when present in the split (world: first three; Bridge: heldout + object).
PROBE_GROUPS = ("heldout", "heldout_family", "unseen_color", "heldout_object")

HUE_SHIFT_DEG = 90.0


def color_shift(image: Any, degrees: float = HUE_SHIFT_DEG) -> np.ndarray:
    """Rotate the hue of every pixel by ``degrees`` (HSV, PIL's 8-bit hue: a shift of round(degrees / 360 * 256)).

    Deterministic (no randomness); saturation and value are kept, so greys stay grey. 90° maps red to yellow-green,
    green to blue-ish, blue to magenta. Input: uint8 HxWx3 (or anything ``images.to_uint8_hwc`` takes).
    """
    arr = to_uint8_hwc(image)
    h, s, v = Image.fromarray(arr).convert("HSV").split()
    k = int(round(float(degrees) / 360.0 * 256.0)) % 256
    h = Image.fromarray(((np.asarray(h, dtype=np.int32) + k) % 256).astype(np.uint8))
    return np.asarray(Image.merge("HSV", (h, s, v)).convert("RGB"), dtype=np.uint8).copy()


def probe_title(p: str, deg: float = HUE_SHIFT_DEG) -> str:
    """The probe's title (the hue rotation's degrees filled in)."""
    return PROBE_TITLES.get(p, p).format(deg=deg)


__all__ = ["PROBES", "PROBE_TITLES", "REFERENCE", "PROBE_GROUPS", "HUE_SHIFT_DEG", "color_shift", "probe_title"]
