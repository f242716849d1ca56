"""Ground truth the embedded world gives for free, for pretraining the tiny VLA's base (never for fine-tuning).

OpenVLA-7B starts from vision encoders pretrained on hundreds of millions of images; a tiny VLA trained from
scratch on a CPU budget does not, and without help it learns to ignore the image (it predicts the average motion of
each phase). The world knows where everything is, so the base's pretraining adds two auxiliary losses built from
these labels (``vla_bridge.pretrain``):

* **per patch** of image_0's 8 x 8 token grid: the colour, family and target kind under it (0 = none), whether the
  gripper's fingertip projects into it, and the table-plane offset from the patch to the fingertip (x, y in units
  of 10 cm, clipped to +-3); plus the frame's gripper height (10 cm units), opening and "holding the instructed
  object" (``state``);
* **privileged**, for the language model's last prompt position: the offsets from the fingertip to the instructed
  object's grasp point (x, y, z) and to the instructed target (x, y), the fingertip height, the opening and
  "holding" (``PRIVILEGED_NAMES``) - what the expert itself looks at.

Only numpy and the world package are used. ``labelled_frames`` runs the (reactive) expert on generated episodes of a
split and returns every frame's image_0, action, instruction and labels as stacked arrays.
"""

from __future__ import annotations

import numpy as np

from ...progress import tqdm
from .conventions import DEFAULT_IMAGE_SIZE, IMAGE_KEYS
from .env import TabletopEnv
from .expert import Expert, grasp_height
from .recording import sample_task_seeds
from .render import _cams
from .scene import FAMILY_SPECS, TARGET_SPECS
from .tasks import ALL_COLORS, ALL_FAMILIES, TARGETS

GRID = 8
COLOR_IDS = {c: i + 1 for i, c in enumerate(ALL_COLORS)}
FAMILY_IDS = {f: i + 1 for i, f in enumerate(ALL_FAMILIES)}
TARGET_IDS = {t: i + 1 for i, t in enumerate(TARGETS)}
N_CLASSES = {"color": len(COLOR_IDS) + 1, "family": len(FAMILY_IDS) + 1, "target": len(TARGET_IDS) + 1,
             "gripper": 2}
STATE_NAMES = ("z", "opening", "holding")
PRIVILEGED_NAMES = ("object_dx", "object_dy", "object_dz", "target_dx", "target_dy", "z", "opening", "holding")
UNIT = 0.1   # metres per label unit
_CLIP = 3.0

__all__ = ["GRID", "N_CLASSES", "STATE_NAMES", "PRIVILEGED_NAMES", "UNIT", "scene_labels", "labelled_frames"]


class _PatchGeometry:
    """Table points seen at the patch centres of image_0 and a point -> patch lookup, for one image size."""

    def __init__(self, image_size: int, grid: int = GRID):
        self.cam = _cams(image_size)[IMAGE_KEYS[0]]
        self.ss = self.cam.size // image_size
        self.grid, self.patch = grid, image_size // grid
        centres = ((np.arange(grid) * self.patch + self.patch / 2) * self.ss).astype(int)
        cu, cv = np.meshgrid(centres, centres)            # columns (u) and rows (v)
        self.tx, self.ty = self.cam.tx[cv, cu].astype(np.float64), self.cam.ty[cv, cu].astype(np.float64)

    def patch_of(self, p) -> tuple[int, int]:
        uv, _ = self.cam.project(np.asarray(p, np.float64)[None])
        u, v = uv[0] / self.ss
        g = self.grid - 1
        return int(np.clip(v // self.patch, 0, g)), int(np.clip(u // self.patch, 0, g))


_GEOMETRY: dict[tuple[int, int], _PatchGeometry] = {}


def _geometry(image_size: int, grid: int) -> _PatchGeometry:
    key = (int(image_size), int(grid))
    if key not in _GEOMETRY:
        _GEOMETRY[key] = _PatchGeometry(*key)
    return _GEOMETRY[key]


def scene_labels(env: TabletopEnv, grid: int = GRID) -> dict[str, np.ndarray]:
    """The labels of ``env``'s current frame: color / family / target / gripper (grid x grid int64), offset
    (grid x grid x 2 float32), state (3,) and privileged (8,) float32 (see the module docstring)."""
    geo = _geometry(env.image_size, grid)
    color = np.zeros((grid, grid), np.int64)
    family = np.zeros((grid, grid), np.int64)
    target = np.zeros((grid, grid), np.int64)
    gripper = np.zeros((grid, grid), np.int64)
    for t in env.targets:
        r = TARGET_SPECS[t.kind].radius
        target[(geo.tx - t.x) ** 2 + (geo.ty - t.y) ** 2 < (0.8 * r) ** 2] = TARGET_IDS[t.kind]
        target[geo.patch_of([t.x, t.y, 0.0])] = TARGET_IDS[t.kind]
    for o in env.objects:
        spec = FAMILY_SPECS[o.family]
        under = (geo.tx - o.x) ** 2 + (geo.ty - o.y) ** 2 < (0.6 * spec.radius) ** 2
        under[geo.patch_of([o.x, o.y, o.z + spec.height / 2])] = True
        color[under], family[under] = COLOR_IDS[o.color], FAMILY_IDS[o.family]
    gripper[geo.patch_of(env.pos)] = 1
    offset = np.stack([env.pos[0] - geo.tx, env.pos[1] - geo.ty], -1) / UNIT
    offset = np.clip(np.where(np.isfinite(offset), offset, 0.0), -_CLIP, _CLIP).astype(np.float32)
    holding = float(env.held == env.obj_index)
    o, t = env.instructed_object, env.instructed_target
    grasp_z = grasp_height(o)
    privileged = np.array([(o.x - env.pos[0]) / UNIT, (o.y - env.pos[1]) / UNIT, (grasp_z - env.pos[2]) / UNIT,
                           (t.x - env.pos[0]) / UNIT, (t.y - env.pos[1]) / UNIT, env.pos[2] / UNIT, env.gripper,
                           holding], np.float32)
    state = privileged[5:].copy()
    return {"color": color, "family": family, "target": target, "gripper": gripper, "offset": offset,
            "state": state, "privileged": privileged}


def labelled_frames(n_episodes: int, seed: int, split: str = "pretrain", image_size: int = DEFAULT_IMAGE_SIZE,
                    progress: bool = False, perturb: float = 0.0, grid: int = GRID) -> dict[str, np.ndarray]:
    """Every frame of ``n_episodes`` expert episodes of ``split`` (``world.sample_task_seeds(n, seed, split)``):
    ``image`` (N, S, S, 3) uint8 image_0, ``action`` (N, 7) float32, ``instruction`` (N,) str, ``episode`` (N,)
    int64, and the :func:`scene_labels` fields stacked (on a ``grid`` x ``grid`` patch grid: the model's).
    Deterministic in its arguments.

    ``perturb`` > 0 (metres): DART-style noise - the executed xyz step is the expert's plus N(0, perturb) per axis
    while the *recorded* action stays the expert's clean command, so the data also covers states slightly off the
    expert's path, each labelled with the correction (the reactive expert can label any state)."""
    if n_episodes <= 0:
        raise ValueError(f"n_episodes must be positive, got {n_episodes}")
    cols: dict[str, list] = {k: [] for k in ("image", "action", "instruction", "episode", "color", "family",
                                             "target", "gripper", "offset", "state", "privileged")}
    triples = sample_task_seeds(int(n_episodes), seed=int(seed), split=split)
    bar = None
    if progress:
        bar = tqdm(total=len(triples), desc="rendering labelled pretraining episodes", unit="episode",
                   leave=False, mininterval=1.0)
    for k, (task, ep_seed, prompt) in enumerate(triples):
        env = TabletopEnv(image_size=image_size)
        obs = env.reset(task, ep_seed, prompt=prompt)
        expert = Expert(env)
        noise = np.random.default_rng([int(seed), k, 5])
        while env.t < env.max_steps:
            action = expert.act()
            if expert.finished:
                break
            for name, value in scene_labels(env, grid).items():
                cols[name].append(value)
            cols["image"].append(obs[IMAGE_KEYS[0]])
            cols["action"].append(action)
            cols["instruction"].append(prompt)
            cols["episode"].append(k)
            executed = action.copy()
            if perturb > 0:
                executed[:3] += noise.normal(0.0, perturb, 3)
            obs, _done, _success, _info = env.step(executed)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out = {k: np.stack(v) for k, v in cols.items() if k != "instruction"}
    out["instruction"] = np.asarray(cols["instruction"], dtype=object)
    out["action"] = out["action"].astype(np.float32)
    out["episode"] = out["episode"].astype(np.int64)
    return out
