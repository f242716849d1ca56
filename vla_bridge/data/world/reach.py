"""A provable lower bound on the steps any policy needs from an env's state to success: ``min_steps_to_success``.

The closed loop (``evaluation.rollout``) stops an episode when this bound exceeds the steps it has left: such an
episode cannot succeed whatever the policy does, so stopping it changes no success. Only what ``TabletopEnv.step``
forces is counted, never what a policy usually does; see :func:`min_steps_to_success` for the argument.

This module is not one of the world's generator sources (``world._GENERATOR_SOURCES``): it reads the env, it does
not change what the world records, so it is not part of the dataset's cache key. It mirrors three facts of
``env.py`` / ``scene.py`` (the grasp's height band, the target regions, the actuation-noise stream);
``tests/test_rollout.py`` checks each against the env.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .conventions import ACTION_XYZ_LIMIT
from .scene import _TOWEL_HALF, FAMILY_SPECS

# A disk about the target's centre that contains its success region (``scene._in_target_region``): plate and pot
# are disks; the towel's region is a rectangle (half sides _TOWEL_HALF - 8 mm), inside its circumscribed circle.
REGION_RADIUS = {
    "plate": 0.040,
    "pot": 0.036,
    "towel": math.hypot(_TOWEL_HALF[0] - 0.008, _TOWEL_HALF[1] - 0.008),
}
# The grasp's height band (``TabletopEnv.step``): o.z - GRASP_BELOW <= fingertip z <= o.z + height + GRASP_ABOVE.
GRASP_BELOW = 0.01
GRASP_ABOVE = 0.015
_SCRATCH = threading.local()
_SLACK = 1e-9  # metres: float rounding in the env's clips never turns a reachable goal into "one step too far"


def chebyshev_to_disk(dx: float, dy: float, r: float) -> float:
    """The smallest per-axis (max-norm) displacement that brings a point to within Euclidean distance ``r`` of a
    point ``(dx, dy)`` away: min over q in the closed disk B((dx, dy), r) of max(|q_x|, |q_y|)."""
    a1, a2 = abs(dx), abs(dy)
    if a1 < a2:
        a1, a2 = a2, a1
    if a1 * a1 + a2 * a2 <= r * r:
        return 0.0
    if a1 - a2 >= r:           # the square [-s, s]^2 meets the disk on its side: only the larger axis matters
        return a1 - r
    # the square [-s, s]^2 touches the disk at its corner: (a1 - s)^2 + (a2 - s)^2 = r^2, the smaller root
    return 0.5 * ((a1 + a2) - math.sqrt(2.0 * r * r - (a1 - a2) ** 2))


def noise_peak(env, horizon: int) -> float:
    """max |actuation noise| (any axis) over the env's next ``horizon`` steps; 0 without actuation noise.

    ``TabletopEnv.step`` draws ``_act_rng.normal(0, actuation_noise, 3)`` once every step, whatever the action, so
    the noise of the coming steps is fixed by the episode's seed, not by the policy: it is read here from a copy of
    the generator (the env's own stream is not advanced)."""
    sigma = float(getattr(env, "actuation_noise", 0.0))
    if sigma <= 0 or horizon <= 0:
        return 0.0
    src = env._act_rng.bit_generator
    gens = _SCRATCH.__dict__.setdefault("gens", {})  # one scratch generator per bit-generator type and thread
    scratch = gens.get(type(src))
    if scratch is None:
        scratch = gens[type(src)] = np.random.Generator(type(src)(0))
    scratch.bit_generator.state = src.state
    return float(np.abs(scratch.normal(0.0, sigma, (int(horizon), 3))).max())


def step_reach(env, horizon: int) -> float:
    """An upper bound on how far (metres, per axis) the gripper can move in any one of the next ``horizon`` steps:
    ``ACTION_XYZ_LIMIT`` (the env clips each commanded axis to it) plus that window's largest noise draw. The pose
    clip to the workspace box only shortens a step (the pose is inside the box, the clip is a projection)."""
    return ACTION_XYZ_LIMIT + noise_peak(env, horizon)


def min_steps_to_success(env, horizon: int | None = None) -> int:
    """A lower bound on the number of further ``step`` calls ANY action sequence needs to reach success from the
    env's current state, valid for every success within ``horizon`` steps (default: the steps left,
    ``env.max_steps - env.t``). 0 once the episode has succeeded. So ``min_steps_to_success(env) > env.max_steps -
    env.t`` proves the episode can no longer succeed.

    The rules (``TabletopEnv.step``) it rests on:

    * Motion: each step moves the gripper at most ``L`` per axis, ``L = ACTION_XYZ_LIMIT + max |noise|`` over the
      window (:func:`step_reach`): the command is clipped per axis, the noise is a seeded per-step stream that does
      not depend on the actions, and the workspace clip only shortens a step. ``k`` steps move it at most ``k L``
      along each axis, so reaching a set at max-norm distance ``d`` takes at least ``ceil(d / L)`` steps.
    * Only a held object moves; it sits at ``gripper + offset``, ``|offset|`` < the family's ``grasp_radius``
      (the grasp needs the fingertip within it horizontally; a yaw turns the offset, never lengthens it).
    * Success = the instructed object NOT held and inside the instructed target's region (here: the disk of radius
      ``REGION_RADIUS`` about the target's centre that contains it). The object never starts there (the scene keeps
      objects off the targets) and a resting object does not move, so success needs the object held and released
      (gripper command > 0.5) over the region: on that step ``T`` the gripper is within ``REGION_RADIUS +
      grasp_radius`` of the target's centre (xy), and ``T`` comes after the grasp, whose step closes the gripper.
    * A grasp happens on a step whose command closes a gripper that was open (> 0.5 -> <= 0.5), while nothing is
      held, with the fingertip (after that step's motion) horizontally within ``grasp_radius`` of the object's
      centre and within the height band [o.z - 1 cm, o.z + height + 1.5 cm]. So a closed empty gripper needs one
      opening step first, and a gripper holding another object one release step (which opens it).

    Hence, with ``g`` the grasp radius and ``r`` the region radius:

    * holding the instructed object: ``max(1, ceil(d_inf(gripper, B(target, r + g)) / L))`` (one releasing step at
      least; a release and re-grasp on the way only adds steps and ends within ``r + g`` as well);
    * otherwise ``k1 + k2``: reaching the grasp, ``k1 >= max(gripper steps (1 if open and empty, else 2),
      ceil(d_inf(gripper, grasp set) / L))``, the grasp set being the disk B(object, g) x the height band; then
      carrying, ``k2 >= max(1, ceil(d_inf(B(object, g), B(target, r + g)) / L))`` = the max-norm distance from the
      object's centre to B(target, r + 2g).

    Straight lines, no hover, no wrist turn, no obstacle, the largest region, the loosest grasp: each term is what
    the rules force, so the sum is a true lower bound (``tests/test_rollout.py`` checks it against the scripted
    expert and a faster straight-line picker at every step of many episodes). What it buys is the tail of a failing
    episode only: from a typical state the bound is ~5 steps (the straight-line picker needs ~2 more), so a failing
    episode of the default evaluation stops at step 52-58 of 60 (~4.6 steps, ~7.6 % of its policy calls). The world
    has no dead state worth detecting earlier: an object always rests within ``g`` of a gripper pose inside the
    workspace (it was released from one, or starts inside it), on the table or a target, within the grasp band's
    reach, so it can be grasped again. (Not detected, so merely not stopped early: contrived cases such as a
    distractor dropped so close to it, at the workspace's edge, that every reachable grasp pose is nearer the
    distractor - the nearest object is the one grasped.)
    """
    if env.success:
        return 0
    h = env.max_steps - env.t if horizon is None else int(horizon)
    L = step_reach(env, h)
    o, tgt = env.instructed_object, env.instructed_target
    spec = FAMILY_SPECS[o.family]
    g, r = spec.grasp_radius, REGION_RADIUS[tgt.kind]
    px, py, pz = (float(v) for v in env.pos)

    def steps(d: float) -> int:
        return max(0, math.ceil((d - _SLACK) / L))

    if env.held == env.obj_index:
        return max(1, steps(chebyshev_to_disk(tgt.x - px, tgt.y - py, r + g)))
    gripper_steps = 1 if (env.held is None and env.gripper > 0.5) else 2
    dz = max(o.z - GRASP_BELOW - pz, pz - (o.z + spec.height + GRASP_ABOVE), 0.0)
    reach = max(chebyshev_to_disk(o.x - px, o.y - py, g), dz)
    carry = chebyshev_to_disk(tgt.x - o.x, tgt.y - o.y, r + 2 * g)
    return max(gripper_steps, steps(reach)) + max(1, steps(carry))


def can_still_succeed(env) -> bool:
    """False when the episode provably cannot succeed in its remaining ``max_steps - t`` steps (see
    :func:`min_steps_to_success`); True once it has succeeded."""
    return env.success or min_steps_to_success(env) <= env.max_steps - env.t


__all__ = ["REGION_RADIUS", "chebyshev_to_disk", "noise_peak", "step_reach", "min_steps_to_success",
           "can_still_succeed"]
