"""A small local LeRobot v3.0 dataset with BridgeData V2's layout, written with lerobot's own writer.

What the embedded world does not have and a real Bridge conversion does, so the real path can be tried offline:

* feature ``names`` in the dict form of IPEC's conversions (``{"motors": [...]}``), Bridge's dimension names;
* ``meta/stats.json`` exactly as lerobot 0.4.4 writes it: per-episode (histogram) quantiles averaged over all
  episodes, weighted by frames — not patched, unlike the embedded build;
* several cameras: ``image_0`` (the main view, a moving blob on a table colour) and a black ``image_1`` (Bridge's
  side cameras are black in some episodes);
* Bridge's task-string mix: a frequent task with a case/punctuation variant, several mid-frequency ones, an
  "eggplant" task (the hub split's object holdout) and blank strings;
* actions whose scale differs from episode to episode (and is larger in the episodes the hub split holds out), so
  the mean of per-episode quantiles is visibly narrower than the exact quantiles over the training transitions.

No sidecar is written, so ``splits.make_split`` applies the hub Bridge rule. ``python -m vla_bridge.data.bridge_layout
<root>`` writes one (about 10–30 s on two cores at the default 32 px).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from .build import VIDEO_CODEC, _quiet
from .schema import MAIN_CAMERA

REPO_ID = "local/bridge_layout"
FPS = 5
SIDE = "observation.images.image_1"
STATE_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "pad", "gripper")
BRIDGE_ACTION_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
# (task string, episodes). Ranked by normalized count: 1 spoon (5, one a variant), 2 drawer, 3 cloth, 4 carrot,
# 5 close, 6 cup, 7 wipe; the hub split holds out ranks 2, 4, 6 and every eggplant episode.
TASKS: tuple[tuple[str, int], ...] = (
    ("put the spoon in the pot", 4), ("Put the spoon in the pot.", 1), ("open the drawer", 4),
    ("move the cloth to the left", 3), ("pick up the carrot", 3), ("close the drawer", 2),
    ("put the cup on the plate", 2), ("wipe the table", 2), ("put the eggplant in the sink", 2), ("", 2),
)
HELDOUT_TASKS = ("open the drawer", "pick up the carrot", "put the cup on the plate", "put the eggplant in the sink")
ACTION_SCALE = np.array([0.01, 0.01, 0.01, 0.02, 0.02, 0.04])   # m, m, m, rad, rad, rad per step (Bridge-like)


def features(image_size: int, names_as_dict: bool = True) -> dict[str, dict]:
    img = {"dtype": "video", "shape": (image_size, image_size, 3), "names": ["height", "width", "channels"]}

    def named(names: Sequence[str]):
        return {"motors": list(names)} if names_as_dict else list(names)

    return {
        MAIN_CAMERA: dict(img), SIDE: dict(img),
        "observation.state": {"dtype": "float32", "shape": (8,), "names": named(STATE_NAMES)},
        "action": {"dtype": "float32", "shape": (7,), "names": named(BRIDGE_ACTION_NAMES)},
    }


def episode_plan(seed: int = 0) -> list[tuple[str, int]]:
    """(task, length) per episode, shuffled with ``seed``; lengths 8–14 frames."""
    rng = np.random.default_rng(seed)
    tasks = [t for t, n in TASKS for _ in range(n)]
    order = rng.permutation(len(tasks))
    return [(tasks[i], int(rng.integers(8, 15))) for i in order]


def episode_arrays(task: str, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(actions (T, 7), states (T, 8)) float32: Student-t deltas at a per-episode scale, a gripper step."""
    scale = ACTION_SCALE * float(rng.lognormal(0.0, 0.6)) * (2.0 if task.strip() in HELDOUT_TASKS else 1.0)
    deltas = rng.standard_t(3, size=(length, 6)) * scale
    grip = np.ones((length, 1))
    grip[length // 3: 2 * length // 3] = 0.0
    actions = np.concatenate([deltas, grip], axis=1)
    pose = np.array([0.3, 0.0, 0.1, 0.0, 0.0, 0.0]) + np.cumsum(np.vstack([np.zeros((1, 6)), deltas[:-1]]), axis=0)
    states = np.concatenate([pose, np.zeros((length, 1)), grip], axis=1)
    return actions.astype(np.float32), states.astype(np.float32)


def main_image(state: np.ndarray, size: int, shade: int) -> np.ndarray:
    """A table-coloured image with a bright blob where the gripper is (x, y → pixel)."""
    img = np.full((size, size, 3), (150, 120, 90), np.uint8)
    img[..., 2] = shade
    cy = int(np.clip((state[0] - 0.1) / 0.4 * size, 2, size - 3))
    cx = int(np.clip((state[1] + 0.2) / 0.4 * size, 2, size - 3))
    r = max(2, size // 10)
    img[max(cy - r, 0): cy + r, max(cx - r, 0): cx + r] = (230, 40, 40) if state[7] > 0.5 else (40, 40, 230)
    return img


def write_bridge_layout(root: str | Path, image_size: int = 32, seed: int = 0, names_as_dict: bool = True,
                        overwrite: bool = False) -> Path:
    """Write the dataset to ``root`` with ``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` and return
    ``root``. An existing ``root`` is reused unless ``overwrite``."""
    root = Path(root)
    if (root / "meta" / "info.json").is_file() and not overwrite:
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    with _quiet():
        ds = LeRobotDataset.create(repo_id=REPO_ID, fps=FPS, root=root, features=features(image_size, names_as_dict),
                                   robot_type="widowx", use_videos=True, vcodec=VIDEO_CODEC)
        black = np.zeros((image_size, image_size, 3), np.uint8)
        try:
            for e, (task, length) in enumerate(episode_plan(seed)):
                actions, states = episode_arrays(task, length, rng)
                for t in range(length):
                    ds.add_frame({MAIN_CAMERA: main_image(states[t], image_size, (e * 37) % 256), SIDE: black,
                                  "observation.state": states[t], "action": actions[t], "task": task})
                ds.save_episode()
        finally:
            ds.finalize()
    return root


def _main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    print(write_bridge_layout(a.root, a.image_size, overwrite=a.overwrite))


if __name__ == "__main__":
    _main()
