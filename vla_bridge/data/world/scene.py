"""What is on the table and where: the objects' and targets' physical sizes, the target regions, seeded scenes.

``FAMILY_SPECS`` / ``TARGET_SPECS`` (bounding radius, grasp radius, height, ...), ``_in_target_region`` (the
success test), the scene's objects and targets (``_Obj``, ``_Target``) and ``_sample_scene``: the instructed
object + 1-2 distractors + 2 targets at non-overlapping positions, a deterministic function of (the task's
parsed colour/family/target, seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .tasks import COLORS, FAMILIES, TARGETS, _crc

# ----------------------------------------------------------------------------------------------------
# Geometry of families and targets (object frame: metres, x along the long axis, origin = grasp point)
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _FamilySpec:
    radius: float        # bounding circle, for non-overlapping placement
    grasp_radius: float  # max horizontal fingertip-to-centre distance for a grasp
    height: float
    half_width: float    # half width across the fingers (rendering of a held object)
    symmetry: float | None  # yaw symmetry period for the expert's wrist alignment (None = round)


FAMILY_SPECS = {
    "block": _FamilySpec(0.030, 0.026, 0.040, 0.020, math.pi / 2),
    "carrot": _FamilySpec(0.048, 0.030, 0.022, 0.013, math.pi),
    "cup": _FamilySpec(0.038, 0.028, 0.045, 0.025, None),
    "cloth": _FamilySpec(0.043, 0.038, 0.008, 0.008, math.pi / 2),
    "spoon": _FamilySpec(0.046, 0.030, 0.008, 0.006, math.pi),
    "banana": _FamilySpec(0.048, 0.030, 0.020, 0.010, math.pi),
}


@dataclass(frozen=True)
class _TargetSpec:
    radius: float        # bounding circle
    support: float       # height an object rests at inside the region
    height: float


TARGET_SPECS = {
    "plate": _TargetSpec(0.052, 0.006, 0.006),
    "pot": _TargetSpec(0.060, 0.012, 0.040),
    "towel": _TargetSpec(0.062, 0.004, 0.004),
}
_TOWEL_HALF = (0.050, 0.039)


def _in_target_region(kind: str, tx: float, ty: float, tyaw: float, x: float, y: float) -> bool:
    dx, dy = x - tx, y - ty
    if kind == "plate":
        return dx * dx + dy * dy < 0.040 ** 2
    if kind == "pot":
        return dx * dx + dy * dy < 0.036 ** 2
    c, s = math.cos(tyaw), math.sin(tyaw)
    lx, ly = c * dx + s * dy, -s * dx + c * dy
    return abs(lx) < _TOWEL_HALF[0] - 0.008 and abs(ly) < _TOWEL_HALF[1] - 0.008


@dataclass
class _Obj:
    family: str
    color: str
    x: float
    y: float
    yaw: float
    z: float = 0.0


@dataclass
class _Target:
    kind: str
    x: float
    y: float
    yaw: float


# ----------------------------------------------------------------------------------------------------
# Scene sampling
# ----------------------------------------------------------------------------------------------------
_OBJ_AREA = ((0.175, 0.425), (-0.155, 0.155))
_TGT_AREA = ((0.20, 0.40), (-0.125, 0.125))


def _scene_rng(color: str | None, family: str, target: str, seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFF, _crc(f"{color}|{family}|{target}"), stream])


def _sample_scene(color: str | None, family: str, target: str, seed: int):
    rng = _scene_rng(color, family, target, seed, 0)
    if color is None:
        color = COLORS[int(rng.integers(len(COLORS)))]
        color_given = False
    else:
        color_given = True
    other_targets = [t for t in TARGETS if t != target]
    kinds = [target, other_targets[int(rng.integers(len(other_targets)))]]
    objects = [(color, family)]
    for _ in range(int(rng.integers(1, 3))):
        for _try in range(100):
            r = rng.random()
            if r < 0.4 and color_given:
                cand = (COLORS[int(rng.integers(len(COLORS)))], family)
            elif r < 0.7:
                cand = (color, FAMILIES[int(rng.integers(len(FAMILIES)))])
            else:
                cand = (COLORS[int(rng.integers(len(COLORS)))], FAMILIES[int(rng.integers(len(FAMILIES)))])
            if cand in objects or (not color_given and cand[1] == family):
                continue
            objects.append(cand)
            break
    # rejection-sample non-overlapping positions (restart the whole layout if stuck)
    for _layout in range(200):
        placed: list[tuple[float, float, float]] = []
        ok = True
        items = [(k, TARGET_SPECS[k].radius, _TGT_AREA) for k in kinds] + \
                [(o, FAMILY_SPECS[o[1]].radius, _OBJ_AREA) for o in objects]
        for _item, rad, ((x0, x1), (y0, y1)) in items:
            for _try in range(60):
                x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
                if all((x - px) ** 2 + (y - py) ** 2 > (rad + pr + 0.006) ** 2 for px, py, pr in placed):
                    placed.append((x, y, rad))
                    break
            else:
                ok = False
                break
        if ok:
            break
    else:  # pragma: no cover
        raise RuntimeError("scene layout failed")
    yaws = rng.uniform(-math.pi, math.pi, size=len(items))
    targets = [_Target(k, placed[i][0], placed[i][1], float(yaws[i]) if k != "towel" else float(yaws[i] * 0.15))
               for i, k in enumerate(kinds)]
    objs = [_Obj(f, c, placed[2 + j][0], placed[2 + j][1], float(yaws[2 + j])) for j, (c, f) in enumerate(objects)]
    home = np.array([rng.uniform(0.17, 0.23), rng.uniform(-0.03, 0.03), rng.uniform(0.13, 0.17)])
    home_rot = np.array([0.0, 0.0, rng.uniform(-0.1, 0.1)])
    light = (float(rng.uniform(0.92, 1.08)), rng.uniform(0.97, 1.03, size=3))
    return color, objs, targets, home, home_rot, light


