"""The closed-loop simulator: ``TabletopEnv`` (reset a seeded scene, step a 7-D action, observe).

Kinematic physics: the gripper grasps the nearest object when it closes within the family's grasp radius and low
enough; a grasped object follows the gripper; opening drops it on the table (or on the target under it). Success
(sticky) = the instructed object released inside the instructed target's region. Drawing the images is
``render.TabletopRenderer``'s job.
"""

from __future__ import annotations

import math

import numpy as np

from .conventions import (
    ACTION_ROT_LIMIT,
    ACTION_XYZ_LIMIT,
    ACTUATION_NOISE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_STEPS,
    ROLL_PITCH_LIMIT,
    STATE_KEY,
    TASK_KEY,
    WORKSPACE_HIGH,
    WORKSPACE_LOW,
)
from .render import TabletopRenderer
from .scene import FAMILY_SPECS, TARGET_SPECS, _in_target_region, _Obj, _sample_scene, _Target
from .tasks import _crc, parse_task, task_string


def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


# ----------------------------------------------------------------------------------------------------
# Closed-loop env
# ----------------------------------------------------------------------------------------------------
class TabletopEnv(TabletopRenderer):
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

    # -- observation -------------------------------------------------------------------------------
    def observation(self) -> dict:
        obs = {}
        if self.render_images:
            obs.update(self.render())
        obs[STATE_KEY] = self.state
        obs[TASK_KEY] = self.task
        return obs
