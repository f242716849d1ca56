"""The one image converter (images.to_uint8_hwc) and the train/eval crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vla_bridge import images


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)


def test_every_input_form_gives_the_same_uint8_hwc(rgb):
    chw_float = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0      # LeRobot's decoded frame
    forms = [rgb, Image.fromarray(rgb), chw_float, chw_float.numpy(), rgb.astype(np.float32) / 255.0]
    for f in forms:
        out = images.to_uint8_hwc(f)
        assert out.dtype == np.uint8 and out.shape == rgb.shape
        assert np.array_equal(out, rgb), type(f)


def test_grey_and_single_channel_become_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = images.to_uint8_hwc(grey)
    assert out.shape == (3, 4, 3) and np.array_equal(out[..., 2], grey)
    assert images.to_uint8_hwc(grey[..., None]).shape == (3, 4, 3)


def test_resize_matches_pil_bilinear_closely(rgb):
    square = np.asarray(Image.fromarray(rgb).resize((64, 64)))
    up = images.to_uint8_hwc(square, 96)
    ref = np.asarray(Image.fromarray(square).resize((96, 96), Image.BILINEAR))
    assert up.shape == (96, 96, 3)
    assert np.abs(up.astype(int) - ref.astype(int)).mean() < 1.0
    down = images.to_uint8_hwc(square, 32)
    ref = np.asarray(Image.fromarray(square).resize((32, 32), Image.BILINEAR))
    assert np.abs(down.astype(int) - ref.astype(int)).mean() < 2.0
    assert images.to_uint8_hwc(square, 64) is not None and np.array_equal(images.to_uint8_hwc(square, 64), square)


def test_eval_crop_keeps_the_center_and_drops_the_rim():
    img = np.zeros((100, 100, 3), np.uint8)
    img[:2] = img[-2:] = img[:, :2] = img[:, -2:] = 255            # a 2-px white rim (outside the 90 % crop)
    img[40:60, 40:60] = (10, 200, 10)                                # a centred green square
    crop = np.asarray(images.center_crop(Image.fromarray(img)))
    assert crop.shape == img.shape
    assert crop[0].max() < 40 and crop[:, -1].max() < 40             # rim gone (2-3 px per side are cut)
    green = (crop[..., 1] > 150) & (crop[..., 0] < 60)
    ys, xs = np.nonzero(green)
    assert abs(ys.mean() - 49.5) < 1 and abs(xs.mean() - 49.5) < 1    # still centred
    assert green.sum() > 20 * 20                                     # and zoomed in (1/0.9 area)
