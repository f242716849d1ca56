"""Embedded demo world: a seeded tabletop pick-and-place world with BridgeData V2 conventions.

It lets the whole VLA loop (data -> fine-tune -> closed-loop evaluation) run offline on a laptop CPU,
and it gives a true closed-loop success rate, which Bridge itself cannot give without a WidowX.
Only numpy, Pillow and the standard library are used.

Conventions (the same as the LeRobot conversions of BridgeData V2 and OpenVLA's ``bridge_orig``)
---------------------------------------------------------------------------------------------------
* Control rate: 5 Hz (``FPS``); one action per frame.
* Frame: robot base frame, metres. +x points away from the robot base, +y to the robot's left,
  +z up; the table top is z = 0. Workspace of the end effector (``WORKSPACE_LOW``/``WORKSPACE_HIGH``):
  x in [0.15, 0.45], y in [-0.18, 0.18], z in [0.0, 0.2], like the WidowX 250 in Bridge.
* ``observation.state``: float32[8] = x, y, z (end effector, metres), roll, pitch, yaw (radians),
  pad (always 0.0), gripper (1.0 = fully open, 0.0 = closed).
* ``action``: float32[7] = dx, dy, dz (metres per step; the expert moves at most ``EXPERT_MAX_STEP`` =
  0.03 m per step plus small noise), droll, dpitch, dyaw (radians per step; the expert only yaws - its roll and
  pitch commands are 0, since a wrist tilt of a few degrees is next to invisible from the cameras), gripper
  (ABSOLUTE command: 1.0 = open, 0.0 = close, as in Bridge / bridge_orig; values > 0.5 mean open).
  The env clips dxyz per axis to +-``ACTION_XYZ_LIMIT`` and rotations to +-``ACTION_ROT_LIMIT``
  (``ACTION_LOW``/``ACTION_HIGH`` are those bounds), then clips the pose to the workspace.
* Images: ``observation.images.image_0`` = main third-person camera (mostly top-down, slight perspective;
  the robot base is at the top of the image, +y is to the image's right), ``observation.images.image_1``
  = an oblique side view (robot base on the image's left). uint8 HxWx3, default 128x128.
* One task string per episode, Bridge style ("put the red block on the plate"); a share of the
  training episodes carry the blank task "" (as many Bridge episodes do).

World
-----
* Object families ``FAMILIES`` (block, carrot, cup, cloth, spoon) + the held-out family ``HELDOUT_FAMILY``
  (banana), colours ``COLORS`` (red, green, blue, yellow) + the unseen colour ``UNSEEN_COLOR`` (purple),
  targets ``TARGETS`` (plate, pot, towel). Each family and target has its own shape.
* A scene = the instructed object + 1-2 distractor objects (same family in another colour, or same colour
  in another family, or neither) + 2 targets (the instructed one and another), at random non-overlapping
  positions. The scene is a deterministic function of (the task's parsed colour/family/target, seed): a
  paraphrase of a task with the same seed gives the same scene, and the verb does not matter.
* Physics (kinematic): the gripper grasps the nearest object when it CLOSES (command goes from > 0.5 to
  <= 0.5) with the fingertip horizontally within the family's grasp radius of the object centre and low
  enough (z <= object top + 1.5 cm); a grasped object follows the gripper; opening drops it on the table
  (or on the target under it). Success = the instructed object released and resting inside the
  instructed target's region. Success is sticky; ``done`` = success or ``t >= max_steps``.

Splits (by construction; see ``task_catalog`` and ``SPLITS``)
--------------------------------------------------------------
pretrain / finetune (disjoint sets of colour x family x target tasks over the training vocabulary),
held-out task strings (unseen object-target pairs whose object and target are trained in other combos),
a held-out family, an unseen colour, and paraphrased instructions (``paraphrases``).

Main API
--------
``task_catalog``, ``SPLITS``, ``parse_task``, ``task_string``, ``paraphrases``, ``TabletopEnv``
(``reset(task, seed, prompt=None)`` and ``step(action) -> (obs, done, success, info)``), ``Expert``,
``expert_action``, ``run_expert``, ``generate_episode``, ``generate_episodes``, ``sample_task_seeds``,
``Episode``, ``WORLD_VERSION``, ``world_fingerprint``.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "WORLD_VERSION", "world_fingerprint", "FPS", "IMAGE_KEYS", "STATE_KEY", "ACTION_KEY", "TASK_KEY",
    "STATE_NAMES", "ACTION_NAMES", "WORKSPACE_LOW", "WORKSPACE_HIGH", "ACTION_LOW", "ACTION_HIGH",
    "ACTION_XYZ_LIMIT", "ACTION_ROT_LIMIT", "EXPERT_MAX_STEP", "FAMILIES", "HELDOUT_FAMILY", "ALL_FAMILIES",
    "COLORS", "UNSEEN_COLOR", "ALL_COLORS", "TARGETS", "HELDOUT_TRIPLES", "SPLIT_NAMES", "TaskSplits",
    "task_catalog", "SPLITS", "task_string", "parse_task", "paraphrases", "canonical_task", "TabletopEnv",
    "Expert", "expert_action", "grasp_height", "Episode", "run_expert", "generate_episode", "generate_episodes",
    "sample_task_seeds", "default_blank_task_prob", "is_blank_episode",
]

WORLD_VERSION = "1.2.0"
FPS = 5

IMAGE_KEYS = ("observation.images.image_0", "observation.images.image_1")
STATE_KEY = "observation.state"
ACTION_KEY = "action"
TASK_KEY = "task"
STATE_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "pad", "gripper")
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")

WORKSPACE_LOW = np.array([0.15, -0.18, 0.0], dtype=np.float64)
WORKSPACE_HIGH = np.array([0.45, 0.18, 0.2], dtype=np.float64)
ACTION_XYZ_LIMIT = 0.04     # env clip per axis, metres per step
ACTION_ROT_LIMIT = 0.25     # env clip per axis, radians per step
EXPERT_MAX_STEP = 0.03      # the expert's per-axis xyz step limit (metres per step)
EXPERT_MAX_YAW_STEP = 0.12  # the expert's yaw step limit (radians per step)
ACTUATION_NOISE = 0.001     # std (m) of the env's execution error on each commanded xyz step
ACTION_LOW = np.array([-ACTION_XYZ_LIMIT] * 3 + [-ACTION_ROT_LIMIT] * 3 + [0.0], dtype=np.float32)
ACTION_HIGH = np.array([ACTION_XYZ_LIMIT] * 3 + [ACTION_ROT_LIMIT] * 3 + [1.0], dtype=np.float32)
ROLL_PITCH_LIMIT = 0.6
DEFAULT_MAX_STEPS = 60
DEFAULT_IMAGE_SIZE = 128

# ----------------------------------------------------------------------------------------------------
# Vocabulary and task strings
# ----------------------------------------------------------------------------------------------------
FAMILIES = ("block", "carrot", "cup", "cloth", "spoon")
HELDOUT_FAMILY = "banana"
ALL_FAMILIES = FAMILIES + (HELDOUT_FAMILY,)
COLORS = ("red", "green", "blue", "yellow")
UNSEEN_COLOR = "purple"
ALL_COLORS = COLORS + (UNSEEN_COLOR,)
TARGETS = ("plate", "pot", "towel")

COLOR_RGB = {
    "red": (205, 38, 38),
    "green": (40, 165, 60),
    "blue": (40, 85, 215),
    "yellow": (240, 200, 30),
    "purple": (140, 55, 185),
}

# Unseen object-target pairs (each object and target is trained with other partners).
HELDOUT_TRIPLES = (
    ("green", "carrot", "towel"),
    ("blue", "cup", "plate"),
    ("red", "spoon", "pot"),
    ("yellow", "cloth", "plate"),
    ("red", "block", "towel"),
)
HELDOUT_FAMILY_TRIPLES = (
    ("yellow", HELDOUT_FAMILY, "plate"),
    ("red", HELDOUT_FAMILY, "pot"),
    ("green", HELDOUT_FAMILY, "towel"),
    ("blue", HELDOUT_FAMILY, "plate"),
)
UNSEEN_COLOR_TRIPLES = (
    (UNSEEN_COLOR, "block", "plate"),
    (UNSEEN_COLOR, "carrot", "pot"),
    (UNSEEN_COLOR, "cup", "towel"),
    (UNSEEN_COLOR, "spoon", "plate"),
    (UNSEEN_COLOR, "cloth", "pot"),
)

SPLIT_NAMES = ("pretrain", "finetune", "heldout", "heldout_family", "unseen_color", "paraphrase")
_SPLIT_ALIASES = {"heldout_tasks": "heldout", "held_out": "heldout", "paraphrases": "paraphrase"}

# Canonical templates (one is assigned per task) and the extra paraphrase templates.
# {obj} = "red block", {prep} = "in" for the pot, "on" otherwise, {onto} = "into"/"onto".
_CANONICAL_TEMPLATES = (
    "put the {obj} {prep} the {target}",
    "move the {obj} to the {target}",
    "place the {obj} {prep} the {target}",
)
_PARAPHRASE_TEMPLATES = _CANONICAL_TEMPLATES + (
    "pick up the {obj} and put it {prep} the {target}",
    "place the {obj} {onto} the {target}",
    "grab the {obj} and drop it {prep} the {target}",
    "transfer the {obj} to the {target}",
    "can you put the {obj} {prep} the {target}?",
    "set the {obj} down {prep} the {target}",
    "move the {family} that is {color} to the {target}",
)
_VERBS = {"put": "put", "move": "move", "place": "place", "pick": "pick up", "grab": "grab",
          "transfer": "transfer", "set": "set", "drop": "drop"}


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def _fill(template: str, color: str | None, family: str, target: str) -> str:
    obj = f"{color} {family}" if color else family
    prep = "in" if target == "pot" else "on"
    onto = "into" if target == "pot" else "onto"
    return template.format(obj=obj, prep=prep, onto=onto, target=target, family=family, color=color or "")


def task_string(color: str | None, family: str, target: str, template: int | None = None) -> str:
    """The canonical Bridge-style task string of (colour, family, target).

    The verb template is a fixed function of the triple (so every task has exactly one canonical string);
    pass ``template`` (0..2) to force one.
    """
    if template is None:
        template = _crc(f"{color}|{family}|{target}") % len(_CANONICAL_TEMPLATES)
    return _fill(_CANONICAL_TEMPLATES[template], color, family, target)


def parse_task(task: str | None) -> dict:
    """Parse any string the world generates (canonical or paraphrase) into verb/colour/family/target.

    Returns ``{"verb", "color", "family", "target"}``; fields that are absent (e.g. the blank task "")
    are None. Word-based, so it is robust to punctuation and word order.
    """
    out = {"verb": None, "color": None, "family": None, "target": None}
    if not task:
        return out
    for w in re.findall(r"[a-z]+", task.lower()):
        if out["verb"] is None and w in _VERBS:
            out["verb"] = _VERBS[w]
        elif out["color"] is None and w in COLOR_RGB:
            out["color"] = w
        elif out["family"] is None and w in _FAMILY_WORDS:
            out["family"] = w
        elif out["target"] is None and w in TARGETS:
            out["target"] = w
    return out


def canonical_task(task: str) -> str:
    """Map any parseable task string (e.g. a paraphrase) to its canonical string; "" stays ""."""
    p = parse_task(task)
    if p["family"] is None or p["target"] is None:
        return task
    return task_string(p["color"], p["family"], p["target"])


def paraphrases(task: str) -> list[str]:
    """Other phrasings of ``task`` (all parse to the same colour, family and target). [] for blank."""
    p = parse_task(task)
    if p["family"] is None or p["target"] is None:
        return []
    out: list[str] = []
    for tpl in _PARAPHRASE_TEMPLATES:
        if "{color}" in tpl and not p["color"]:
            continue
        s = _fill(tpl, p["color"], p["family"], p["target"])
        if s != task and s not in out:
            out.append(s)
    return out


# ----------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSplits:
    """Task strings of each split (canonical strings; the paraphrase split uses the finetune tasks)."""

    pretrain: tuple[str, ...]
    finetune: tuple[str, ...]
    heldout_tasks: tuple[str, ...]
    heldout_family: str
    unseen_color: str
    heldout_family_tasks: tuple[str, ...]
    unseen_color_tasks: tuple[str, ...]
    seed: int = 0

    def tasks(self, split: str) -> tuple[str, ...]:
        split = _SPLIT_ALIASES.get(split, split)
        table = {
            "pretrain": self.pretrain,
            "finetune": self.finetune,
            "heldout": self.heldout_tasks,
            "heldout_family": self.heldout_family_tasks,
            "unseen_color": self.unseen_color_tasks,
            "paraphrase": self.finetune,
        }
        if split not in table:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLIT_NAMES}")
        return table[split]

    def split_of(self, task: str) -> str | None:
        """Which split a task string (canonical or paraphrase) belongs to; None for blank/unknown."""
        canon = canonical_task(task)
        for name in ("pretrain", "finetune", "heldout", "heldout_family", "unseen_color"):
            if canon in self.tasks(name):
                return "paraphrase" if (name == "finetune" and canon != task) else name
        return None

    @property
    def training(self) -> tuple[str, ...]:
        return self.pretrain + self.finetune

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "pretrain": list(self.pretrain),
            "finetune": list(self.finetune),
            "heldout_tasks": list(self.heldout_tasks),
            "heldout_family": self.heldout_family,
            "heldout_family_tasks": list(self.heldout_family_tasks),
            "unseen_color": self.unseen_color,
            "unseen_color_tasks": list(self.unseen_color_tasks),
            "paraphrase_tasks": list(self.finetune),
            "world_version": WORLD_VERSION,
        }


def task_catalog(seed: int = 0, n_finetune: int = 16) -> TaskSplits:
    """Build the splits. Deterministic in ``seed``.

    The 60 training-vocabulary triples (4 colours x 5 families x 3 targets) minus the held-out task
    triples are shuffled and split into finetune (``n_finetune``) and pretrain (the rest), with every
    finetune object and target also present in pretrain.
    """
    held = set(HELDOUT_TRIPLES)
    triples = [t for t in product(COLORS, FAMILIES, TARGETS) if t not in held]
    rng = np.random.default_rng([seed, 7])
    for _ in range(1000):
        order = rng.permutation(len(triples))
        ft = [triples[i] for i in order[:n_finetune]]
        pt = [triples[i] for i in order[n_finetune:]]
        pt_objects = {(c, f) for c, f, _ in pt}
        pt_targets = {t for _, _, t in pt}
        if all((c, f) in pt_objects and t in pt_targets for c, f, t in ft):
            break
    else:  # pragma: no cover - cannot happen with the default vocabulary
        raise RuntimeError("could not build a covering split")

    def as_str(ts):
        order = sorted(ts, key=lambda t: (ALL_COLORS.index(t[0]), ALL_FAMILIES.index(t[1]), TARGETS.index(t[2])))
        return tuple(task_string(*t) for t in order)

    return TaskSplits(
        pretrain=as_str(pt),
        finetune=as_str(ft),
        heldout_tasks=tuple(task_string(*t) for t in HELDOUT_TRIPLES),
        heldout_family=HELDOUT_FAMILY,
        unseen_color=UNSEEN_COLOR,
        heldout_family_tasks=tuple(task_string(*t) for t in HELDOUT_FAMILY_TRIPLES),
        unseen_color_tasks=tuple(task_string(*t) for t in UNSEEN_COLOR_TRIPLES),
        seed=seed,
    )


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
_FAMILY_WORDS = set(ALL_FAMILIES)


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


def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


# ----------------------------------------------------------------------------------------------------
# Closed-loop env
# ----------------------------------------------------------------------------------------------------
class TabletopEnv:
    """Closed-loop tabletop env.

    ``obs = env.reset(task, seed, prompt=None)``: the scene is a deterministic function of (the parsed
    colour/family/target of ``task``, ``seed``); ``obs["task"]`` is ``prompt`` if given (e.g. "" for a
    blank-task episode, or a paraphrase) else ``task``.

    ``obs, done, success, info = env.step(action)``: 4-tuple. ``done`` = success or t >= max_steps;
    ``success`` is sticky. Stepping after ``done`` is allowed (the expert uses it to record its retreat).
    ``info`` = {"t", "held" (family or None), "holding_instructed" (bool), "object_xyz", "target_xy",
    "distance_to_target"}.

    obs = {"observation.images.image_0": uint8 HxWx3, "observation.images.image_1": uint8 HxWx3,
    "observation.state": float32[8], "task": str}. ``render=False`` leaves the images out (faster).
    """

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, max_steps: int = DEFAULT_MAX_STEPS,
                 render: bool = True, actuation_noise: float = ACTUATION_NOISE):
        self.image_size = int(image_size)
        self.actuation_noise = float(actuation_noise)
        self._act_rng = np.random.default_rng(0)
        self.max_steps = int(max_steps)
        self.render_images = bool(render)
        self.task = ""
        self.instruction = ""
        self.seed = 0
        self.t = 0
        self.success = False
        self.held: int | None = None
        self._static: dict | None = None
        self._static_key = None

    # -- setup -------------------------------------------------------------------------------------
    def reset(self, task: str, seed: int, prompt: str | None = None) -> dict:
        p = parse_task(task)
        if p["family"] is None or p["target"] is None:
            raise ValueError(
                f"cannot build a scene from task {task!r}: it needs an object family and a target. For a "
                "blank-task episode pass its meta['instruction'] as task and prompt=''.")
        self.seed = int(seed)
        color, objs, targets, home, home_rot, light = _sample_scene(p["color"], p["family"], p["target"], seed)
        self.parsed = dict(p, color=color)
        self.instruction = task_string(color if p["color"] else None, p["family"], p["target"])
        self.task = task if prompt is None else prompt
        self.objects = objs
        self.targets = targets
        self.obj_index = 0
        self.target_index = 0
        self._light = light
        self.pos = home.astype(np.float64)
        self.rot = home_rot.astype(np.float64)
        self.gripper = 1.0
        self.held = None
        self._grip_offset = np.zeros(2)
        self._grip_dz = 0.0
        self.t = 0
        self.success = False
        self._static = None
        self._static_key = None
        self._expert_seed = (self.seed, _crc(f"{color}|{p['family']}|{p['target']}"))
        self._act_rng = np.random.default_rng(list(self._expert_seed) + [2])
        self._expert = None
        return self.observation()

    # -- state -------------------------------------------------------------------------------------
    @property
    def state(self) -> np.ndarray:
        return np.array([*self.pos, *self.rot, 0.0, self.gripper], dtype=np.float32)

    @property
    def instructed_object(self) -> _Obj:
        return self.objects[self.obj_index]

    @property
    def instructed_target(self) -> _Target:
        return self.targets[self.target_index]

    def _object_on_region(self, o: _Obj) -> float:
        for t in self.targets:
            if _in_target_region(t.kind, t.x, t.y, t.yaw, o.x, o.y):
                return TARGET_SPECS[t.kind].support
        return 0.0

    def _check_success(self) -> bool:
        o, t = self.instructed_object, self.instructed_target
        return self.held != self.obj_index and _in_target_region(t.kind, t.x, t.y, t.yaw, o.x, o.y)

    # -- dynamics ----------------------------------------------------------------------------------
    def step(self, action) -> tuple[dict, bool, bool, dict]:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] != 7 or not np.all(np.isfinite(a)):
            raise ValueError(f"action must be 7 finite floats, got {action!r}")
        was_open = self.gripper > 0.5
        dxyz = np.clip(a[:3], -ACTION_XYZ_LIMIT, ACTION_XYZ_LIMIT)
        drot = np.clip(a[3:6], -ACTION_ROT_LIMIT, ACTION_ROT_LIMIT)
        if self.actuation_noise > 0:  # the arm does not land exactly where it was told to (seeded per episode)
            dxyz = dxyz + self._act_rng.normal(0.0, self.actuation_noise, 3)
        self.pos = np.clip(self.pos + dxyz, WORKSPACE_LOW, WORKSPACE_HIGH)
        old_yaw = self.rot[2]
        self.rot[:2] = np.clip(self.rot[:2] + drot[:2], -ROLL_PITCH_LIMIT, ROLL_PITCH_LIMIT)
        self.rot[2] = _wrap(self.rot[2] + drot[2])
        self.gripper = float(np.clip(a[6], 0.0, 1.0))
        now_open = self.gripper > 0.5
        if self.held is not None:
            o = self.objects[self.held]
            dyaw = self.rot[2] - old_yaw
            c, s = math.cos(dyaw), math.sin(dyaw)
            ox, oy = self._grip_offset
            self._grip_offset = np.array([c * ox - s * oy, s * ox + c * oy])
            o.yaw = _wrap(o.yaw + dyaw)
            o.x, o.y = float(self.pos[0] + self._grip_offset[0]), float(self.pos[1] + self._grip_offset[1])
            if now_open:  # release: drop onto the table / the target below
                self.held = None
                o.z = self._object_on_region(o)
            else:
                o.z = max(0.0, float(self.pos[2]) - self._grip_dz)
        elif was_open and not now_open:  # closing: grasp the nearest graspable object
            best, best_d = None, None
            for i, o in enumerate(self.objects):
                spec = FAMILY_SPECS[o.family]
                d = math.hypot(o.x - self.pos[0], o.y - self.pos[1])
                low = o.z - 0.01 <= self.pos[2] <= o.z + spec.height + 0.015
                if d < spec.grasp_radius and low and (best_d is None or d < best_d):
                    best, best_d = i, d
            if best is not None:
                o = self.objects[best]
                self.held = best
                self._grip_offset = np.array([o.x - self.pos[0], o.y - self.pos[1]])
                self._grip_dz = float(self.pos[2]) - o.z
        self.t += 1
        if not self.success and self._check_success():
            self.success = True
        done = self.success or self.t >= self.max_steps
        o, t = self.instructed_object, self.instructed_target
        info = {
            "t": self.t,
            "held": None if self.held is None else self.objects[self.held].family,
            "holding_instructed": self.held == self.obj_index,
            "object_xyz": (o.x, o.y, o.z),
            "target_xy": (t.x, t.y),
            "distance_to_target": math.hypot(o.x - t.x, o.y - t.y),
        }
        return self.observation(), done, self.success, info

    # -- rendering ---------------------------------------------------------------------------------
    def observation(self) -> dict:
        obs = {}
        if self.render_images:
            obs.update(self.render())
        obs[STATE_KEY] = self.state
        obs[TASK_KEY] = self.task
        return obs

    def _resting_key(self):
        return tuple((i, round(o.x, 6), round(o.y, 6), round(o.yaw, 6), round(o.z, 6))
                     for i, o in enumerate(self.objects) if i != self.held)

    def _build_static(self) -> dict:
        cams = _cams(self.image_size)
        gain, tint = self._light
        out = {}
        for key, cam in cams.items():
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

    def render(self) -> dict:
        """Both camera images as uint8 HxWx3 arrays (keys = ``IMAGE_KEYS``)."""
        key = self._resting_key()
        if self._static is None or key != self._static_key:
            self._static = self._build_static()
            self._static_key = key
        cams = _cams(self.image_size)
        out = {}
        for k, cam in cams.items():
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
        arr = np.array(img)
        d2 = (cam.tx[v0:v1, u0:u1] - x) ** 2 + (cam.ty[v0:v1, u0:u1] - y) ** 2
        k = 1.0 - amp * np.exp(-d2 / (2 * sigma * sigma))
        arr[v0:v1, u0:u1] = (arr[v0:v1, u0:u1] * k[..., None]).astype(np.uint8)
        img.paste(Image.fromarray(arr[v0:v1, u0:u1]), (int(u0), int(v0)))

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


# ----------------------------------------------------------------------------------------------------
# Scripted expert
# ----------------------------------------------------------------------------------------------------
def grasp_height(o: _Obj) -> float:
    """The fingertip height at which the expert closes on object ``o`` (half its height, at least 8 mm up)."""
    return o.z + max(0.008, 0.5 * FAMILY_SPECS[o.family].height)


class Expert:
    """Scripted pick-and-place expert (5 Hz, Bridge conventions): a *reactive* controller.

    Each action is a function of what the camera shows at that step - where the gripper is relative to the
    instructed object (or, once it holds it, to the instructed target), its height, whether it holds the object,
    whether the gripper is open, and whether the object already rests on the target - not of a hidden phase
    counter. That is what makes the demonstrations learnable by a policy that sees only the image and the
    instruction, and it makes the expert recover from its own (and the env's) execution errors. The phase names
    (``phase``) are labels for the reader, recomputed every step:

    approach (xy to the object at hover height) -> descend (xy keeps servoing) -> grasp (close) -> lift (straight
    up while low) -> carry (xy to the target at carry height) -> lower -> release (open) -> retreat (up) ->
    finished. A missed grasp re-opens and approaches again; a wrong object is dropped; a release off the target
    picks the object up again.

    Motion: the xy command is the remaining xy error clipped to ``EXPERT_MAX_STEP`` per axis (so it saturates far
    away and is proportional near the goal), z likewise towards the phase's height, the wrist yaws towards the
    object's grasp orientation at up to ``EXPERT_MAX_YAW_STEP`` while reaching, and the wrist does not tilt (roll and
    pitch commands are 0). The recorded action is the command; the randomness is the env's actuation noise
    (``TabletopEnv.actuation_noise``) and a small per-episode placement offset. ``noise=False`` switches the
    actuation noise off.
    """

    HOVER_Z = 0.085
    CARRY_Z = 0.10
    LIFT_Z = 0.06        # while holding and below this height, lift straight up before moving sideways
    TOL = 0.006          # "there" along z (m)
    XY_NEAR = 0.012      # xy error (per axis) below which the arm goes down to grasp / place height
    XY_TOL = 0.008       # xy error (per axis) below which it closes / opens
    RETREAT_DZ = 0.05    # after a successful release, rise this far above the placing height

    def __init__(self, env: TabletopEnv, seed: int | None = None, noise: bool = True):
        self.env = env
        base = list(env._expert_seed) if seed is None else [int(seed), 0]
        self.rng = np.random.default_rng(base + [1])
        self.noise = bool(noise)
        if not self.noise:
            env.actuation_noise = 0.0
        self.phase = "approach"
        self.finished = False
        r, a = 0.009 * math.sqrt(self.rng.random()), self.rng.uniform(-math.pi, math.pi)
        self.place_offset = np.array([r * math.cos(a), r * math.sin(a)])

    def _grasp_yaw(self) -> float:
        env = self.env
        o = env.instructed_object
        per = FAMILY_SPECS[o.family].symmetry
        yaw = env.rot[2]
        if per is None:
            return yaw
        return yaw + ((o.yaw - yaw + per / 2) % per - per / 2)

    def _command(self, xy_goal: np.ndarray | None, z_goal: float | None, gripper: float,
                 yaw_goal: float | None = None) -> np.ndarray:
        env = self.env
        d = np.zeros(3)
        if xy_goal is not None:
            d[:2] = np.clip(xy_goal - env.pos[:2], -EXPERT_MAX_STEP, EXPERT_MAX_STEP)
        if z_goal is not None:
            d[2] = float(np.clip(z_goal - env.pos[2], -EXPERT_MAX_STEP, EXPERT_MAX_STEP))
        rot = np.zeros(3)
        if yaw_goal is not None:
            rot[2] = float(np.clip(yaw_goal - env.rot[2], -EXPERT_MAX_YAW_STEP, EXPERT_MAX_YAW_STEP))
        return np.array([*d, *rot, gripper], dtype=np.float32)

    def act(self) -> np.ndarray:
        env = self.env
        o, t = env.instructed_object, env.instructed_target
        pos = env.pos
        spec = FAMILY_SPECS[o.family]
        grasp_z = grasp_height(o)
        place_xy = np.array([t.x, t.y]) + self.place_offset
        place_z = TARGET_SPECS[t.kind].height + 0.5 * spec.height + 0.012
        if env.held is not None and env.held != env.obj_index:      # holding the wrong object: drop it
            self.phase = "drop"
            return self._command(None, pos[2] + 0.02, 1.0)
        if env.held == env.obj_index:
            err = place_xy - pos[:2]
            near = np.max(np.abs(err)) < self.XY_NEAR
            if not near and pos[2] < self.LIFT_Z:
                self.phase = "lift"
                return self._command(None, self.CARRY_Z, 0.0)
            if not near:
                self.phase = "carry"
                return self._command(place_xy, self.CARRY_Z, 0.0)
            if np.max(np.abs(err)) < self.XY_TOL and abs(pos[2] - place_z) < self.TOL:
                self.phase = "release"
                return self._command(None, None, 1.0)
            self.phase = "lower"
            return self._command(place_xy, place_z, 0.0)
        if _in_target_region(t.kind, t.x, t.y, t.yaw, o.x, o.y):    # the object rests on the target: done
            top = place_z + self.RETREAT_DZ
            if pos[2] >= min(top, WORKSPACE_HIGH[2]) - self.TOL:
                self.phase = "finished"
                self.finished = True
                return self._command(None, None, 1.0)
            self.phase = "retreat"
            return self._command(None, top, 1.0)
        if env.gripper <= 0.5:                                       # closed on nothing: re-open first
            self.phase = "reopen"
            return self._command(None, None, 1.0)
        err = np.array([o.x, o.y]) - pos[:2]
        yaw = self._grasp_yaw()
        if np.max(np.abs(err)) >= self.XY_NEAR:
            self.phase = "approach"
            return self._command(np.array([o.x, o.y]), max(self.HOVER_Z, grasp_z + 0.04), 1.0, yaw)
        if np.max(np.abs(err)) < self.XY_TOL and abs(pos[2] - grasp_z) < self.TOL:
            self.phase = "grasp"
            return self._command(None, None, 0.0, yaw)
        self.phase = "descend"
        return self._command(np.array([o.x, o.y]), grasp_z, 1.0, yaw)


def expert_action(env: TabletopEnv) -> np.ndarray:
    """The expert's next action for ``env`` (an ``Expert`` is attached to the env on first use)."""
    if getattr(env, "_expert", None) is None:
        env._expert = Expert(env)
    return env._expert.act()


# ----------------------------------------------------------------------------------------------------
# Episodes
# ----------------------------------------------------------------------------------------------------
@dataclass
class Episode:
    """One recorded expert episode.

    ``frames``: list of dicts with ``IMAGE_KEYS`` (uint8 HxWx3), ``observation.state`` (float32[8]) and
    ``action`` (float32[7]) - the observation at step t and the action then applied. ``task``: the task
    string shown to the policy (may be "" or a paraphrase). ``meta``: seed, instruction (canonical task;
    ``TabletopEnv().reset(meta["instruction"], meta["seed"], prompt=task)`` reproduces the episode's
    scene exactly), verb, color, family, target, split, success, n_steps, world_version.
    """

    frames: list
    task: str
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def actions(self) -> np.ndarray:
        return np.stack([f[ACTION_KEY] for f in self.frames])

    @property
    def states(self) -> np.ndarray:
        return np.stack([f[STATE_KEY] for f in self.frames])

    def images(self, key: str = IMAGE_KEYS[0]) -> np.ndarray:
        return np.stack([f[key] for f in self.frames])


def default_blank_task_prob(split: str) -> float:
    """Share of blank task strings: 10 % in the training splits (as in Bridge), 0 in the evaluation ones."""
    return 0.1 if _SPLIT_ALIASES.get(split, split) in ("pretrain", "finetune") else 0.0


def is_blank_episode(task: str, seed: int, blank_task_prob: float) -> bool:
    """Whether the episode (task, seed) shows the blank task "" (a seeded draw; no rendering)."""
    if blank_task_prob <= 0:
        return False
    p = parse_task(task)
    return bool(_scene_rng(p["color"], p["family"], p["target"], seed, 2).random() < blank_task_prob)


def generate_episode(task: str, seed: int, *, split: str | None = None, blank_task_prob: float = 0.0,
                     prompt: str | None = None, image_size: int = DEFAULT_IMAGE_SIZE,
                     max_steps: int = DEFAULT_MAX_STEPS, noise: bool = True) -> Episode:
    """Run the scripted expert on (task, seed) and record it. Deterministic: same arguments -> identical
    images and actions. The shown task is ``prompt`` if given, else "" with probability
    ``blank_task_prob`` (decided from the seed), else ``task``."""
    env = TabletopEnv(image_size=image_size, max_steps=max_steps)
    env.reset(task, seed)
    p = env.parsed
    if prompt is None:
        prompt = "" if is_blank_episode(task, seed, blank_task_prob) else task
    env.task = prompt
    expert = Expert(env, noise=noise)
    obs = env.observation()
    frames = []
    while env.t < max_steps:
        a = expert.act()
        if expert.finished:
            break
        frames.append({IMAGE_KEYS[0]: obs[IMAGE_KEYS[0]], IMAGE_KEYS[1]: obs[IMAGE_KEYS[1]],
                       STATE_KEY: obs[STATE_KEY], ACTION_KEY: a})
        obs, _done, _success, _info = env.step(a)
    meta = {
        "seed": int(seed),
        "instruction": env.instruction,
        "task": prompt,
        "verb": parse_task(task)["verb"],
        "color": p["color"],
        "family": p["family"],
        "target": p["target"],
        "split": split if split is not None else SPLITS.split_of(task),
        "success": bool(env.success),
        "n_steps": len(frames),
        "world_version": WORLD_VERSION,
        "image_size": image_size,
        "fps": FPS,
    }
    return Episode(frames=frames, task=prompt, meta=meta)


def run_expert(task: str, seed: int, prompt: str | None = None, **kwargs) -> Episode:
    """The full expert episode for (task, seed); same as ``generate_episode`` without blank tasks."""
    return generate_episode(task, seed, prompt=prompt, **kwargs)


def sample_task_seeds(n: int, seed: int = 0, split: str = "pretrain",
                      splits: TaskSplits | None = None) -> list[tuple[str, int, str]]:
    """``n`` (instruction, episode_seed, prompt) triples for ``split``: tasks cycle through shuffled
    rounds of the split's tasks (balanced); the prompt is a random paraphrase for the "paraphrase" split
    and the instruction otherwise. Blank prompts are applied by ``generate_episode``, not here."""
    splits = splits or SPLITS
    name = _SPLIT_ALIASES.get(split, split)
    tasks = splits.tasks(name)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, _crc(name)])
    out = []
    order: list[int] = []
    for _ in range(n):
        if not order:
            order = list(rng.permutation(len(tasks)))
        task = tasks[order.pop()]
        ep_seed = int(rng.integers(0, 2 ** 31 - 1))
        prompt = task
        if name == "paraphrase":
            alts = paraphrases(task)
            prompt = alts[int(rng.integers(len(alts)))]
        out.append((task, ep_seed, prompt))
    return out


def generate_episodes(n: int, seed: int = 0, split: str = "pretrain", *, blank_task_prob: float | None = None,
                      image_size: int = DEFAULT_IMAGE_SIZE, splits: TaskSplits | None = None,
                      max_steps: int = DEFAULT_MAX_STEPS) -> Iterator[Episode]:
    """Yield ``n`` expert episodes of ``split`` (one of ``SPLIT_NAMES``). ``blank_task_prob`` defaults to
    ``default_blank_task_prob(split)`` (0.1 for pretrain/finetune, 0 otherwise)."""
    name = _SPLIT_ALIASES.get(split, split)
    if blank_task_prob is None:
        blank_task_prob = default_blank_task_prob(name)
    for task, ep_seed, prompt in sample_task_seeds(n, seed, name, splits):
        shown = None if prompt == task else prompt
        yield generate_episode(task, ep_seed, split=name, blank_task_prob=blank_task_prob, prompt=shown,
                               image_size=image_size, max_steps=max_steps)


# ----------------------------------------------------------------------------------------------------
# Versioning
# ----------------------------------------------------------------------------------------------------
def world_fingerprint() -> str:
    """Hash of this module's source and ``WORLD_VERSION`` (a cache key for datasets built from it)."""
    h = hashlib.sha256()
    h.update(WORLD_VERSION.encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


SPLITS = task_catalog(0)
PRETRAIN_TASKS = SPLITS.pretrain
FINETUNE_TASKS = SPLITS.finetune
HELDOUT_TASKS = SPLITS.heldout_tasks
HELDOUT_FAMILY_TASKS = SPLITS.heldout_family_tasks
UNSEEN_COLOR_TASKS = SPLITS.unseen_color_tasks
