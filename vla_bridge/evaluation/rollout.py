"""The closed loop on the embedded world: a policy acting in parallel envs, one batched ``act`` call per step.

The evaluation's success column (the episode's scene rebuilt from its (instruction, seed)), the probes' closed-loop
re-measurement (another camera, a colour-shifted view) and the rollout video (recorded frames and gripper path)
all run here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from ..data import world
from ..progress import tqdm
from .policies import Policy


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
                    record: bool = False) -> list[dict]:
    """Run ``policy`` in one embedded-world env per episode, all in parallel: each step, ONE batched ``act`` call
    over the envs still running, then a step of each. An env stops at success (sticky) or ``max_steps``.

    Each episode's policy input is its ``camera`` view (image_0 by default) through its ``transform`` (if any) —
    the probes use that to run the loop on the other camera or a colour-shifted image.

    Returns per episode: {episode_index, success, steps, grasped (held the instructed object at some step),
    final_distance_cm (instructed object to target centre at the end), path ((steps + 1, 3) gripper xyz),
    gripper ((steps + 1,) opening)} and, with ``record``, frames (the unperturbed image_0 at every step).
    """
    max_steps = int(max_steps or world.DEFAULT_MAX_STEPS)
    size = int(image_size or world.DEFAULT_IMAGE_SIZE)
    render = bool(policy.needs_images or record)
    envs, obs = [], []
    for ep in episodes:
        env = world.TabletopEnv(image_size=size, max_steps=max_steps, render=render)
        obs.append(env.reset(ep.instruction, int(ep.seed), prompt=ep.prompt))
        envs.append(env)
    n = len(envs)
    done = np.zeros(n, bool)
    success = np.zeros(n, bool)
    grasped = np.zeros(n, bool)
    steps = np.zeros(n, int)
    dist = np.full(n, np.nan)
    paths = [[env.pos.copy()] for env in envs]
    grips = [[env.gripper] for env in envs]
    frames = [[o[world.IMAGE_KEYS[0]]] if record else [] for o in obs]
    bar = None
    if progress:
        bar = tqdm(total=max_steps, desc=desc or f"closed loop: {policy.name}", unit="step", leave=False,
                   mininterval=1.0)

    def view(i: int) -> np.ndarray:
        ep = episodes[i]
        im = obs[i][ep.camera or world.IMAGE_KEYS[0]]
        return ep.transform(im) if ep.transform is not None else im

    for _t in range(max_steps):
        active = np.flatnonzero(~done)
        if active.size == 0:
            break
        images = [view(i) for i in active] if policy.needs_images else None
        actions = policy.act(images, [episodes[i].prompt for i in active], [envs[i] for i in active])
        for j, i in enumerate(active):
            obs[i], d, s, info = envs[i].step(actions[j])
            steps[i] += 1
            grasped[i] |= bool(info["holding_instructed"])
            success[i] = bool(s)
            dist[i] = 100.0 * float(info["distance_to_target"])
            done[i] = bool(d)
            paths[i].append(envs[i].pos.copy())
            grips[i].append(envs[i].gripper)
            if record:
                frames[i].append(obs[i][world.IMAGE_KEYS[0]])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(running=int((~done).sum()), success=int(success.sum()))
    if bar is not None:
        bar.close()
    out = []
    for i, ep in enumerate(episodes):
        r = {"episode_index": ep.episode_index, "success": bool(success[i]), "steps": int(steps[i]),
             "grasped": bool(grasped[i]), "final_distance_cm": float(dist[i]), "path": np.asarray(paths[i]),
             "gripper": np.asarray(grips[i], dtype=np.float64)}
        if record:
            r["frames"] = frames[i]
        out.append(r)
    return out


__all__ = ["ClosedLoopEpisode", "run_closed_loop"]
