"""The closed loop on the embedded world: a policy acting in parallel envs, one batched ``act`` call per step.

The evaluation's success column (the episode's scene rebuilt from its (instruction, seed)), the probes' closed-loop
re-measurement (another camera, a colour-shifted view) and the rollout video (recorded frames and gripper path)
all run here. An episode that provably cannot succeed in its remaining steps is stopped there (``stop_hopeless``,
on by default; the video turns it off to show the whole episode).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from ..data import world
from ..data.world.reach import can_still_succeed, min_steps_to_success
from ..progress import tqdm
from .policies import Policy

# The closed loop's horizon (steps at 5 Hz). The world's expert finishes every demonstration of the default build
# in 14-28 steps (mean 21), so 40 steps give a policy 1.4x the slowest demonstration and ~2x the average. A longer
# horizon mostly adds steps to failing episodes (every one runs until the stop rule below ends it). The world's own
# recording cap (``world.DEFAULT_MAX_STEPS`` = 60) is a guard for the expert, not a measure of success.
CLOSED_LOOP_STEPS = 40


@dataclasses.dataclass
class ClosedLoopEpisode:
    instruction: str       # canonical task (builds the scene)
    seed: int
    prompt: str            # what the policy is told (the task as shown in the dataset)
    episode_index: int = -1
    camera: str | None = None                                   # the view the policy sees (default image_0)
    transform: Callable[[np.ndarray], np.ndarray] | None = None  # a perturbation of that view (probes)


def run_closed_loop(policy: Policy, episodes: Sequence[ClosedLoopEpisode], max_steps: int | None = None,
                    image_size: int | None = None, progress: bool = False, desc: str | None = None,
                    record: bool = False, stop_hopeless: bool = True) -> list[dict]:
    """Run ``policy`` in one embedded-world env per episode, all in parallel: each step, ONE batched ``act`` call
    over the envs still running, then a step of each. An env stops at success (sticky) or ``max_steps`` and, with
    ``stop_hopeless`` (the default), as soon as it provably cannot succeed in the steps it has left:
    ``world.reach.min_steps_to_success`` (a lower bound on the steps ANY policy needs from the state, from the
    world's rules: per-step motion limit, grasp, carry, release) exceeds ``max_steps - t``. That changes no
    episode's ``success``; it saves the policy calls (and renders) of steps that cannot matter.

    Each episode's policy input is its ``camera`` view (image_0 by default) through its ``transform`` (if any) —
    the probes use that to run the loop on the other camera or a colour-shifted image. Only the cameras needed are
    drawn: the policy's view (when ``policy.needs_images``) and image_0 with ``record``; nothing is drawn for the
    state after an episode's last step unless ``record``.

    Returns per episode: {episode_index, success, steps (the steps actually run), grasped (held the instructed object
    at some step), final_distance_cm (instructed object to target centre at the end), path ((steps + 1, 3) gripper
    xyz), gripper ((steps + 1,) opening), stopped_early (ended by ``stop_hopeless`` before ``max_steps``),
    stopped_at (that step, = steps, or None), min_steps_to_success (the bound at the end: 0 after a success, more
    than ``max_steps - stopped_at`` when stopped early)} and, with ``record``, frames (the unperturbed image_0 at every
    step). "At the end" is as of the stop for an episode stopped early: its ``final_distance_cm`` and ``grasped``
    describe the first ``steps`` steps, not what the policy would have done in the steps it was spared.
    """
    max_steps = int(max_steps or CLOSED_LOOP_STEPS)
    size = int(image_size or world.DEFAULT_IMAGE_SIZE)
    main = world.IMAGE_KEYS[0]
    cams = [list(dict.fromkeys(([ep.camera or main] if policy.needs_images else []) + ([main] if record else [])))
            for ep in episodes]
    envs, views = [], []
    for ep, c in zip(episodes, cams):
        env = world.TabletopEnv(image_size=size, max_steps=max_steps, render=False)
        env.reset(ep.instruction, int(ep.seed), prompt=ep.prompt)
        envs.append(env)
        views.append(env.render(c) if c else {})
    n = len(envs)
    done = np.zeros(n, bool)
    stopped = np.zeros(n, bool)
    success = np.zeros(n, bool)
    grasped = np.zeros(n, bool)
    steps = np.zeros(n, int)
    dist = np.array([100.0 * math.hypot(e.instructed_object.x - e.instructed_target.x,
                                        e.instructed_object.y - e.instructed_target.y) for e in envs])
    paths = [[env.pos.copy()] for env in envs]
    grips = [[env.gripper] for env in envs]
    frames = [[v[main]] if record else [] for v in views]
    if stop_hopeless:
        for i, env in enumerate(envs):
            stopped[i] = done[i] = not can_still_succeed(env)
    bar = None
    if progress:
        bar = tqdm(total=max_steps, desc=desc or f"closed loop: {policy.name}", unit="step", leave=False,
                   mininterval=1.0)

    def view(i: int) -> np.ndarray:
        ep = episodes[i]
        im = views[i][ep.camera or main]
        return ep.transform(im) if ep.transform is not None else im

    for _t in range(max_steps):
        active = np.flatnonzero(~done)
        if active.size == 0:
            break
        images = [view(i) for i in active] if policy.needs_images else None
        actions = policy.act(images, [episodes[i].prompt for i in active], [envs[i] for i in active])
        for j, i in enumerate(active):
            env = envs[i]
            _obs, d, s, info = env.step(actions[j])
            steps[i] += 1
            grasped[i] |= bool(info["holding_instructed"])
            success[i] = bool(s)
            dist[i] = 100.0 * float(info["distance_to_target"])
            done[i] = bool(d)
            if stop_hopeless and not done[i] and not can_still_succeed(env):
                done[i] = stopped[i] = True
            paths[i].append(env.pos.copy())
            grips[i].append(env.gripper)
            if cams[i] and (record or not done[i]):
                views[i] = env.render(cams[i])
            if record:
                frames[i].append(views[i][main])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(running=int((~done).sum()), success=int(success.sum()))
    if bar is not None:
        bar.close()
    out = []
    for i, ep in enumerate(episodes):
        r = {"episode_index": ep.episode_index, "success": bool(success[i]), "steps": int(steps[i]),
             "grasped": bool(grasped[i]), "final_distance_cm": float(dist[i]), "path": np.asarray(paths[i]),
             "gripper": np.asarray(grips[i], dtype=np.float64), "stopped_early": bool(stopped[i]),
             "stopped_at": int(steps[i]) if stopped[i] else None,
             "min_steps_to_success": int(min_steps_to_success(envs[i]))}
        if record:
            r["frames"] = frames[i]
        out.append(r)
    return out


__all__ = ["CLOSED_LOOP_STEPS", "ClosedLoopEpisode", "run_closed_loop"]
