"""Recorded expert episodes: which (task, seed, prompt) a split draws, and running the expert on them.

``Episode``, ``sample_task_seeds``, ``generate_episode`` / ``generate_episodes`` / ``run_expert``, and the blank
task share (``default_blank_task_prob``, ``is_blank_episode``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .conventions import (
    ACTION_KEY,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_STEPS,
    FPS,
    IMAGE_KEYS,
    STATE_KEY,
    WORLD_VERSION,
)
from .env import TabletopEnv
from .expert import Expert
from .scene import _scene_rng
from .tasks import _SPLIT_ALIASES, SPLITS, TaskSplits, _crc, paraphrases, parse_task

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
