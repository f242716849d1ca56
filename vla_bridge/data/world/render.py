"""Drawing the camera images: the shapes of objects, targets and the robot, the pinhole cameras, the renderer.

Each family / target / robot link is a few extruded polygons (``_Part``) drawn with Pillow in painter's order,
supersampled ``_SS`` x and box-filtered down. ``CAMERAS``: image_0 = the main, mostly top-down camera (robot base
at the top of the image), image_1 = an oblique side view. ``TabletopRenderer`` is the drawing half of
``TabletopEnv`` (its ``render``): it caches the static layer (table, targets, resting objects) and draws the
gripper's shadow, a held object and the arm on top each step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .scene import _TOWEL_HALF, FAMILY_SPECS, _in_target_region
from .tasks import COLOR_RGB

def _circle(r: float, n: int = 20, cx: float = 0.0, cy: float = 0.0, sy: float = 1.0) -> np.ndarray:
    a = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(a), cy + r * sy * np.sin(a)], 1)


def _rect(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _shade(rgb: Sequence[float], k: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(c * k)))) for c in rgb)  # type: ignore[return-value]


@dataclass(frozen=True)
class _Part:
    """A prism: ``top`` footprint (any simple polygon) extruded from z0 to z1; ``pieces`` are convex
    pieces whose projected hulls draw the sides. ``lines`` are decorations on the top face."""

    top: np.ndarray
    z0: float
    z1: float
    top_rgb: tuple
    side_rgb: tuple
    outline: tuple | None = None
    pieces: tuple = ()
    lines: tuple = ()  # ((x0, y0, x1, y1), rgb, width_m)


def _part(top, z0, z1, rgb, side=0.6, outline=0.45, pieces=None, lines=(), top_k=1.0) -> _Part:
    top = np.asarray(top, dtype=np.float64)
    return _Part(top, z0, z1, _shade(rgb, top_k), _shade(rgb, side),
                 None if outline is None else _shade(rgb, outline),
                 tuple(pieces) if pieces is not None else (top,), tuple(lines))


@cache
def _family_parts(family: str, color: str) -> tuple[_Part, ...]:
    rgb = COLOR_RGB[color]
    if family == "block":
        s = 0.02
        return (_part(_rect(-s, s, -s, s), 0.0, 0.040, rgb, side=0.62, top_k=1.05,
                      lines=(((-s + 0.004, -s + 0.004, s - 0.004, -s + 0.004), _shade(rgb, 1.25), 0.002),
                             ((-s + 0.004, -s + 0.004, -s + 0.004, s - 0.004), _shade(rgb, 1.25), 0.002))),)
    if family == "carrot":
        leaves = np.array([[-0.030, -0.004], [-0.050, -0.015], [-0.058, -0.005], [-0.058, 0.005],
                           [-0.050, 0.015], [-0.030, 0.004]])
        body = np.array([[-0.036, -0.009], [-0.031, -0.0135], [0.046, -0.003], [0.049, 0.0],
                         [0.046, 0.003], [-0.031, 0.0135], [-0.036, 0.009]])
        ridge = _shade(rgb, 0.6)
        return (
            _part(leaves, 0.0, 0.012, (45, 125, 40), side=0.7, outline=0.6),
            _part(body, 0.0, 0.022, rgb, side=0.6, outline=0.45,
                  lines=(((-0.012, -0.0105, -0.008, -0.004), ridge, 0.0015),
                         ((0.008, 0.003, 0.011, 0.0075), ridge, 0.0015),
                         ((0.024, -0.0055, 0.026, -0.002), ridge, 0.0015))),
        )
    if family == "cup":
        return (
            _part(_rect(0.021, 0.035, -0.0045, 0.0045), 0.012, 0.036, rgb, side=0.55, outline=0.4, top_k=0.85),
            _part(_circle(0.024, 22), 0.0, 0.045, rgb, side=0.6, outline=0.4),
            _part(_circle(0.0175, 18), 0.045, 0.0452, rgb, side=0.35, outline=None, top_k=0.38),
        )
    if family == "cloth":
        a = np.linspace(0.0, 2 * np.pi, 28, endpoint=False)
        c, s = np.cos(a), np.sin(a)
        r = 0.034 / (c ** 4 + s ** 4) ** 0.25 * (1 + 0.05 * np.sin(3 * a + 0.7) + 0.035 * np.sin(5 * a + 2.1))
        pts = np.stack([r * c, 0.88 * r * s], 1)
        fold = _shade(rgb, 0.68)
        return (_part(pts, 0.0, 0.008, rgb, side=0.6, outline=0.55, top_k=0.97, pieces=(pts,),
                      lines=(((-0.024, -0.02, 0.018, 0.022), fold, 0.0025),
                             ((-0.028, 0.012, -0.004, 0.026), fold, 0.002),
                             ((0.006, -0.026, 0.028, -0.004), fold, 0.002))),)
    if family == "spoon":
        return (
            _part(_rect(-0.046, 0.012, -0.0045, 0.0045), 0.0, 0.006, rgb, side=0.6, outline=0.45),
            _part(_circle(0.018, 16, cx=0.028, sy=0.68), 0.0, 0.008, rgb, side=0.6, outline=0.45),
            _part(_circle(0.012, 14, cx=0.028, sy=0.6), 0.008, 0.0082, rgb, side=0.6, outline=None, top_k=0.72),
        )
    if family == "banana":
        n = 9
        th = np.linspace(math.radians(90 - 52), math.radians(90 + 52), n)
        R, cy = 0.056, -0.050
        cen = np.stack([R * np.cos(th), cy + R * np.sin(th) + 0.002], 1)
        nrm = np.stack([np.cos(th), np.sin(th)], 1)
        sgrid = np.linspace(-1.0, 1.0, n)
        w = 0.0115 * (1.0 - 0.72 * sgrid ** 2)
        outer, inner = cen + nrm * w[:, None], cen - nrm * w[:, None]
        top = np.concatenate([outer, inner[::-1]], 0)
        pieces = tuple(np.array([inner[i], inner[i + 1], outer[i + 1], outer[i]]) for i in range(n - 1))
        tip = (95, 70, 35)
        return (
            _part(top, 0.0, 0.020, rgb, side=0.62, outline=0.45, pieces=pieces,
                  lines=(((cen[1, 0], cen[1, 1], cen[-2, 0], cen[-2, 1]), _shade(rgb, 0.8), 0.0015),)),
            _part(_circle(0.004, 8, cx=cen[0, 0], cy=cen[0, 1]), 0.0, 0.021, tip, side=0.7, outline=None),
            _part(_circle(0.004, 8, cx=cen[-1, 0], cy=cen[-1, 1]), 0.0, 0.021, tip, side=0.7, outline=None),
        )
    raise ValueError(f"unknown family {family!r}")


@cache
def _target_parts(kind: str) -> tuple[_Part, ...]:
    if kind == "plate":
        return (
            _part(_circle(0.050, 32), 0.0, 0.006, (238, 238, 234), side=0.8, outline=0.72),
            _part(_circle(0.035, 28), 0.006, 0.0062, (226, 226, 222), side=1.0, outline=0.9),
        )
    if kind == "pot":
        handle = (40, 40, 45)
        return (
            _part(_rect(0.040, 0.060, -0.008, 0.008), 0.028, 0.036, handle, side=0.8, outline=None),
            _part(_rect(-0.060, -0.040, -0.008, 0.008), 0.028, 0.036, handle, side=0.8, outline=None),
            _part(_circle(0.046, 28), 0.0, 0.040, (178, 181, 188), side=0.65, outline=0.5),
            _part(_circle(0.039, 26), 0.040, 0.0402, (62, 64, 68), side=1.0, outline=None),
        )
    if kind == "towel":
        hx, hy = _TOWEL_HALF
        stripe = (35, 120, 135)
        return (
            _part(_rect(-hx, hx, -hy, hy), 0.0, 0.004, (238, 234, 220), side=0.82, outline=0.75),
            _part(_rect(-hx + 0.008, -hx + 0.016, -hy, hy), 0.004, 0.0042, stripe, side=1.0, outline=None),
            _part(_rect(hx - 0.016, hx - 0.008, -hy, hy), 0.004, 0.0042, stripe, side=1.0, outline=None),
            _part(_rect(-hx + 0.021, -hx + 0.024, -hy, hy), 0.004, 0.0042, stripe, side=1.0, outline=None),
            _part(_rect(hx - 0.024, hx - 0.021, -hy, hy), 0.004, 0.0042, stripe, side=1.0, outline=None),
        )
    raise ValueError(f"unknown target {kind!r}")


_ROBOT_PARTS = (
    _part(_rect(-0.045, 0.065, -0.065, 0.065), 0.0, 0.05, (72, 72, 78), side=0.6, outline=0.5),
    _part(_circle(0.026, 16, cx=0.01), 0.05, 0.13, (62, 62, 68), side=0.7, outline=0.5),
)
_SHOULDER = np.array([0.01, 0.0, 0.13])
_GRIPPER_RGB = (70, 70, 78)
_FINGER_RGB = (150, 150, 160)
_ARM_RGB = (48, 48, 54)


# ----------------------------------------------------------------------------------------------------
# Cameras and rendering
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _CamSpec:
    pos: tuple
    look_at: tuple
    fov_deg: float


CAMERAS = {
    "observation.images.image_0": _CamSpec((0.46, 0.0, 0.62), (0.30, 0.0, 0.0), 40.0),
    "observation.images.image_1": _CamSpec((0.40, -0.44, 0.27), (0.30, 0.02, 0.03), 50.0),
}
_TABLE_X = (-0.12, 0.72)
_TABLE_Y = (-0.45, 0.45)
_SS = 2  # supersampling factor


class _Cam:
    """Pinhole camera at a given pixel resolution, with a per-pixel map of the table point it sees."""

    def __init__(self, spec: _CamSpec, size: int):
        self.pos = np.asarray(spec.pos, dtype=np.float64)
        fwd = np.asarray(spec.look_at, dtype=np.float64) - self.pos
        fwd /= np.linalg.norm(fwd)
        right = np.cross(fwd, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        self.R = np.stack([right, down, fwd])
        self.size = size
        self.f = (size / 2.0) / math.tan(math.radians(spec.fov_deg) / 2.0)
        self.c = size / 2.0
        # rays through pixel centres -> table plane z=0
        g = (np.arange(size, dtype=np.float64) + 0.5 - self.c) / self.f
        u, v = np.meshgrid(g, g)
        d = u[..., None] * self.R[0] + v[..., None] * self.R[1] + self.R[2]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -self.pos[2] / d[..., 2]
        hit = (d[..., 2] < -1e-6)
        tx = self.pos[0] + t * d[..., 0]
        ty = self.pos[1] + t * d[..., 1]
        on_table = hit & (tx > _TABLE_X[0]) & (tx < _TABLE_X[1]) & (ty > _TABLE_Y[0]) & (ty < _TABLE_Y[1])
        self.on_table = on_table
        self.tx = np.where(on_table, tx, 1e3).astype(np.float32)
        self.ty = np.where(on_table, ty, 1e3).astype(np.float32)
        self.background = self._background()

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pc = (pts - self.pos) @ self.R.T
        z = np.maximum(pc[:, 2], 1e-3)
        return self.f * pc[:, :2] / z[:, None] + self.c, z

    def depth(self, p: Sequence[float]) -> float:
        return float((np.asarray(p, dtype=np.float64) - self.pos) @ self.R[2])

    def _background(self) -> np.ndarray:
        x, y = self.tx.astype(np.float64), self.ty.astype(np.float64)
        plank_w = 0.11
        k = np.floor((y - _TABLE_Y[0]) / plank_w)
        frac = (y - _TABLE_Y[0]) / plank_w - k
        tint = 1.0 + 0.045 * np.sin(k * 12.9898 + 3.1)
        grain = np.sin(y * 260.0 + 2.2 * np.sin(x * 14.0 + k) + 0.8 * np.sin(x * 41.0 + 2 * k))
        lum = (0.93 + 0.045 * grain) * tint
        lum = np.where(np.abs(frac - 0.5) > 0.485, lum * 0.78, lum)  # seams between planks
        wood = np.array([198.0, 170.0, 130.0]) * lum[..., None]
        rows = np.linspace(1.0, 0.85, self.size)[:, None, None] * np.ones((1, self.size, 1))
        wall = np.array([188.0, 196.0, 204.0]) * rows
        return np.where(self.on_table[..., None], wood, wall).astype(np.float32)


@lru_cache(maxsize=8)
def _cams(size: int) -> dict:
    return {k: _Cam(spec, size * _SS) for k, spec in CAMERAS.items()}


def _hull(pts: np.ndarray) -> list:
    """Convex hull (monotone chain) of 2-D points, as a list of tuples."""
    p = sorted(set(map(tuple, np.round(pts, 3).tolist())))
    if len(p) <= 2:
        return p

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for q in p:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], q) <= 0:
            lower.pop()
        lower.append(q)
    upper: list = []
    for q in reversed(p):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], q) <= 0:
            upper.pop()
        upper.append(q)
    return lower[:-1] + upper[:-1]


def _draw_parts(draw: ImageDraw.ImageDraw, cam: _Cam, parts: Sequence[_Part], x: float, y: float,
                z: float, yaw: float) -> None:
    c, s = math.cos(yaw), math.sin(yaw)
    rot = np.array([[c, s], [-s, c]])
    for part in parts:
        z0, z1 = z + part.z0, z + part.z1
        if part.z1 - part.z0 > 0.001:
            for piece in part.pieces:
                w = piece @ rot + (x, y)
                n = len(w)
                p3 = np.empty((2 * n, 3))
                p3[:n, :2] = w
                p3[n:, :2] = w
                p3[:n, 2] = z0
                p3[n:, 2] = z1
                uv, _ = cam.project(p3)
                draw.polygon(_hull(uv), fill=part.side_rgb)
        w = part.top @ rot + (x, y)
        p3 = np.empty((len(w), 3))
        p3[:, :2] = w
        p3[:, 2] = z1
        uv, _ = cam.project(p3)
        draw.polygon([tuple(q) for q in uv.tolist()], fill=part.top_rgb, outline=part.outline)
        for (ax, ay, bx, by), rgb, width in part.lines:
            seg = np.array([[ax, ay], [bx, by]]) @ rot + (x, y)
            p3 = np.array([[seg[0, 0], seg[0, 1], z1], [seg[1, 0], seg[1, 1], z1]])
            uv, dep = cam.project(p3)
            draw.line([tuple(q) for q in uv.tolist()], fill=rgb,
                      width=max(1, int(round(width * cam.f / float(dep.mean())))))


def _thick_line(draw: ImageDraw.ImageDraw, cam: _Cam, a: np.ndarray, b: np.ndarray, width_m: float,
                rgb: tuple) -> None:
    uv, dep = cam.project(np.stack([a, b]))
    wa, wb = (width_m * cam.f / d for d in dep.tolist())
    w = max(1, int(round(0.5 * (wa + wb))))
    draw.line([tuple(q) for q in uv.tolist()], fill=rgb, width=w)
    for (u, v), r in zip(uv.tolist(), (wa / 2, wb / 2)):
        draw.ellipse([u - r, v - r, u + r, v + r], fill=rgb)


class TabletopRenderer:
    """The drawing half of ``TabletopEnv``: ``render()`` -> both camera images (``render(cameras)``: some of them).

    It reads the env's ``image_size``, ``_light``, ``targets``, ``objects``, ``held``, ``pos``, ``rot`` and
    ``gripper``, and caches the static layer in ``_static`` / ``_static_key`` (per camera, drawn when first asked
    for; dropped when a resting object moved).
    """

    def _resting_key(self):
        return tuple((i, round(o.x, 6), round(o.y, 6), round(o.yaw, 6), round(o.z, 6))
                     for i, o in enumerate(self.objects) if i != self.held)

    def _build_static(self, keys: Sequence[str]) -> dict:
        cams = _cams(self.image_size)
        gain, tint = self._light
        out = {}
        for key in keys:
            cam = cams[key]
            bg = np.clip(cam.background * (gain * tint.astype(np.float32)), 0, 255).astype(np.uint8)
            img = Image.fromarray(bg)
            draw = ImageDraw.Draw(img)
            _draw_parts(draw, cam, _ROBOT_PARTS, 0.0, 0.0, 0.0, 0.0)
            # painter's order over targets and resting objects together (far first); an object lying
            # on a target is drawn right after that target
            items = []
            for t in self.targets:
                items.append(((-cam.depth((t.x, t.y, 0.0)), 0), _target_parts(t.kind), t.x, t.y, 0.0, t.yaw))
            for i, o in enumerate(self.objects):
                if i == self.held:
                    continue
                under = [t for t in self.targets if _in_target_region(t.kind, t.x, t.y, t.yaw, o.x, o.y)]
                ref = (under[0].x, under[0].y, 0.0) if under else (o.x, o.y, o.z)
                items.append(((-cam.depth(ref), 1), _family_parts(o.family, o.color), o.x, o.y, o.z, o.yaw))
            for _k, parts, x, y, z, yaw in sorted(items, key=lambda it: it[0]):
                _draw_parts(draw, cam, parts, x, y, z, yaw)
            out[key] = img
        return out

    def render(self, cameras: Sequence[str] | None = None) -> dict:
        """Camera images as uint8 HxWx3 arrays: every camera (keys = ``IMAGE_KEYS``), or the ``cameras`` named (a
        camera's image does not depend on which others are drawn: the closed loop draws only the policy's view)."""
        cams = _cams(self.image_size)
        keys = list(cams) if cameras is None else list(dict.fromkeys(cameras))
        unknown = [k for k in keys if k not in cams]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; expected some of {list(cams)}")
        key = self._resting_key()
        if self._static is None or key != self._static_key:
            self._static = {}
            self._static_key = key
        missing = [k for k in keys if k not in self._static]
        if missing:
            self._static.update(self._build_static(missing))
        out = {}
        for k in keys:
            cam = cams[k]
            img = self._static[k].copy()
            self._shadow(img, cam)
            draw = ImageDraw.Draw(img)
            if self.held is not None:
                o = self.objects[self.held]
                _draw_parts(draw, cam, _family_parts(o.family, o.color), o.x, o.y, o.z, o.yaw)
            self._draw_robot(draw, cam)
            if _SS != 1:
                img = img.resize((self.image_size, self.image_size), Image.BOX)
            out[k] = np.asarray(img, dtype=np.uint8).copy()
        return out

    def _shadow(self, img: Image.Image, cam: _Cam) -> None:
        x, y, z = self.pos
        sigma = 0.011 + 0.07 * z + (0.006 if self.held is not None else 0.0)
        amp = 0.55 * (1.0 - 0.55 * z / 0.2)
        r = 3.0 * sigma
        corners = np.array([[x - r, y - r, 0], [x + r, y - r, 0], [x + r, y + r, 0], [x - r, y + r, 0]])
        uv, _ = cam.project(corners)
        n = cam.size
        u0, v0 = np.clip(np.floor(uv.min(0)).astype(int), 0, n)
        u1, v1 = np.clip(np.ceil(uv.max(0)).astype(int) + 1, 0, n)
        if u1 <= u0 or v1 <= v0:
            return
        box = (int(u0), int(v0), int(u1), int(v1))
        patch = np.asarray(img.crop(box))  # only the shadow's box, not the whole image, goes through numpy
        d2 = (cam.tx[v0:v1, u0:u1] - x) ** 2 + (cam.ty[v0:v1, u0:u1] - y) ** 2
        k = 1.0 - amp * np.exp(-d2 / (2 * sigma * sigma))
        img.paste(Image.fromarray((patch * k[..., None]).astype(np.uint8)), box[:2])

    def _draw_robot(self, draw: ImageDraw.ImageDraw, cam: _Cam) -> None:
        x, y, z = self.pos
        yaw = self.rot[2]
        if self.held is not None:
            w = max(FAMILY_SPECS[self.objects[self.held].family].half_width, 0.009)
        else:
            w = 0.009 + 0.024 * self.gripper
        # fingers (lateral axis = local y), palm, wrist
        parts = (
            _part(_rect(-0.009, 0.009, w, w + 0.007), -0.004, 0.045, _FINGER_RGB, side=0.6, outline=0.45),
            _part(_rect(-0.009, 0.009, -w - 0.007, -w), -0.004, 0.045, _FINGER_RGB, side=0.6, outline=0.45),
            _part(_rect(-0.013, 0.013, -w - 0.008, w + 0.008), 0.045, 0.058, _GRIPPER_RGB, side=0.6, outline=0.5),
            _part(_rect(-0.016, 0.012, -0.011, 0.011), 0.058, 0.092, (60, 60, 66), side=0.65, outline=0.5),
        )
        _draw_parts(draw, cam, parts, x, y, z, yaw)
        wrist = np.array([x, y, z + 0.092])
        s = _SHOULDER
        d = np.linalg.norm(wrist - s)
        link = 0.22
        mid = 0.5 * (wrist + s)
        if d < 2 * link - 1e-6:
            u = (wrist - s) / max(d, 1e-6)
            v = np.array([0.0, 0.0, 1.0]) - u[2] * u
            v /= max(np.linalg.norm(v), 1e-6)
            elbow = mid + math.sqrt(link * link - (d / 2) ** 2) * v
        else:
            elbow = mid
        _thick_line(draw, cam, s, elbow, 0.026, _ARM_RGB)
        _thick_line(draw, cam, elbow, wrist, 0.022, (58, 58, 64))

