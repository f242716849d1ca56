"""The scripted expert: a reactive pick-and-place controller that records the demonstrations."""

from __future__ import annotations

import math

import numpy as np

from .conventions import EXPERT_MAX_STEP, EXPERT_MAX_YAW_STEP, WORKSPACE_HIGH
from .env import TabletopEnv
from .scene import FAMILY_SPECS, TARGET_SPECS, _in_target_region, _Obj

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
