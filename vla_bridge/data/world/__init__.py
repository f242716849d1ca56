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

Layout (one concept per module; this ``__init__`` re-exports the names callers use)
-------------------------------------------------------------------------------------
``conventions`` (keys, units, workspace, action bounds, ``WORLD_VERSION``), ``tasks`` (vocabulary, task strings,
splits), ``scene`` (object / target geometry, target regions, seeded scene layout), ``render`` (shapes, cameras,
drawing the images), ``env`` (``TabletopEnv``: reset / step / observe), ``expert`` (the scripted expert),
``recording`` (episodes of a split), ``labels`` (ground-truth labels for the tiny VLA's pretraining; import it as
``vla_bridge.data.world.labels``, it is not re-exported here).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .conventions import (
    ACTION_HIGH,
    ACTION_KEY,
    ACTION_LOW,
    ACTION_NAMES,
    ACTION_ROT_LIMIT,
    ACTION_XYZ_LIMIT,
    ACTUATION_NOISE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_STEPS,
    EXPERT_MAX_STEP,
    EXPERT_MAX_YAW_STEP,
    FPS,
    IMAGE_KEYS,
    ROLL_PITCH_LIMIT,
    STATE_KEY,
    STATE_NAMES,
    TASK_KEY,
    WORKSPACE_HIGH,
    WORKSPACE_LOW,
    WORLD_VERSION,
)
from .env import TabletopEnv
from .expert import Expert, expert_action, grasp_height
from .recording import (
    Episode,
    default_blank_task_prob,
    generate_episode,
    generate_episodes,
    is_blank_episode,
    run_expert,
    sample_task_seeds,
)
from .render import _SS, CAMERAS, _cams  # noqa: F401  (_cams / _SS: the camera model, used by vla_bridge.evaluation.video)
from .scene import FAMILY_SPECS, TARGET_SPECS
from .tasks import (
    ALL_COLORS,
    ALL_FAMILIES,
    COLOR_RGB,
    COLORS,
    FAMILIES,
    FINETUNE_TASKS,
    HELDOUT_FAMILY,
    HELDOUT_FAMILY_TASKS,
    HELDOUT_FAMILY_TRIPLES,
    HELDOUT_TASKS,
    HELDOUT_TRIPLES,
    PRETRAIN_TASKS,
    SPLIT_NAMES,
    SPLITS,
    TARGETS,
    UNSEEN_COLOR,
    UNSEEN_COLOR_TASKS,
    UNSEEN_COLOR_TRIPLES,
    TaskSplits,
    canonical_task,
    paraphrases,
    parse_task,
    task_catalog,
    task_string,
)

__all__ = [
    "WORLD_VERSION", "world_fingerprint", "FPS", "IMAGE_KEYS", "STATE_KEY", "ACTION_KEY", "TASK_KEY",
    "STATE_NAMES", "ACTION_NAMES", "WORKSPACE_LOW", "WORKSPACE_HIGH", "ACTION_LOW", "ACTION_HIGH",
    "ACTION_XYZ_LIMIT", "ACTION_ROT_LIMIT", "EXPERT_MAX_STEP", "FAMILIES", "HELDOUT_FAMILY", "ALL_FAMILIES",
    "COLORS", "UNSEEN_COLOR", "ALL_COLORS", "TARGETS", "HELDOUT_TRIPLES", "SPLIT_NAMES", "TaskSplits",
    "task_catalog", "SPLITS", "task_string", "parse_task", "paraphrases", "canonical_task", "TabletopEnv",
    "Expert", "expert_action", "grasp_height", "Episode", "run_expert", "generate_episode", "generate_episodes",
    "sample_task_seeds", "default_blank_task_prob", "is_blank_episode",
    # also re-exported (module attributes callers read)
    "ACTUATION_NOISE", "DEFAULT_IMAGE_SIZE", "DEFAULT_MAX_STEPS", "EXPERT_MAX_YAW_STEP", "ROLL_PITCH_LIMIT", "CAMERAS",
    "FAMILY_SPECS", "TARGET_SPECS", "COLOR_RGB", "HELDOUT_FAMILY_TRIPLES", "UNSEEN_COLOR_TRIPLES", "PRETRAIN_TASKS",
    "FINETUNE_TASKS", "HELDOUT_TASKS", "HELDOUT_FAMILY_TASKS", "UNSEEN_COLOR_TASKS",
]

# The generator's code: every module of this package except ``labels`` (pretraining labels, not the dataset).
_GENERATOR_SOURCES = ("__init__.py", "conventions.py", "tasks.py", "scene.py", "render.py", "env.py", "expert.py",
                      "recording.py")


def world_fingerprint() -> str:
    """Hash of the world generator's source (``_GENERATOR_SOURCES``) and ``WORLD_VERSION`` (a cache key for datasets
    built from it)."""
    h = hashlib.sha256()
    h.update(WORLD_VERSION.encode())
    here = Path(__file__).parent
    for name in _GENERATOR_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]
