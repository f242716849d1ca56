"""What the real Octo worker and its stand-in share: shard reading, augmentation, checkpoints, log lines.

Standard library + numpy (PIL inside :func:`augment_images`): the stand-in runs it in the main environment, the real
worker in ``.venv-octo``. The shards come from :mod:`vla_bridge.octo.shards` (main environment); the checkpoint and
``train_log.jsonl`` layouts are what the notebook reads back.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

IMAGE_KEY = "image_primary"


def log(msg: str) -> None:
    """Progress for the notebook cell (stderr: stdout belongs to the serve protocol)."""
    print(f"[octo] {msg}", file=sys.stderr, flush=True)


# =================================================================================================== shards


class ShardData:
    """All shards of one directory in memory: frames, windows, action chunks, instructions, statistics."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        mpath = self.dir / "manifest.json"
        if not mpath.is_file():
            raise FileNotFoundError(f"{self.dir} has no manifest.json: write the shards first "
                                    "(vla_bridge.octo.shards.write_octo_shards in the main environment)")
        self.manifest = json.loads(mpath.read_text())
        self.statistics = json.loads((self.dir / "dataset_statistics.json").read_text())
        images, windows, actions, masks, instr = [], [], [], [], []
        texts: list[str] = []
        offset = 0
        for name in self.manifest["shards"]:
            with np.load(self.dir / name, allow_pickle=False) as z:
                win = z["window_index"].astype(np.int64)
                windows.append(np.where(win >= 0, win + offset, -1))
                images.append(z["images"])
                actions.append(z["actions"].astype(np.float32))
                masks.append(z["action_pad_mask"].astype(bool))
                ids = z["instruction_id"].astype(np.int64)
                local = [str(s) for s in z["instructions"]]
                base = len(texts)
                texts += local
                instr.append(ids + base)
                offset += len(z["images"])
        self.images = np.concatenate(images)
        self.window_index = np.concatenate(windows)
        self.actions = np.concatenate(actions)            # (N, W, H, D) normalized
        self.action_pad_mask = np.concatenate(masks)      # (N, W, H)
        self.instruction_id = np.concatenate(instr)
        self.texts = texts
        self.window = int(self.manifest["window"])
        self.horizon = int(self.manifest["horizon"])
        self.action_dim = int(self.actions.shape[-1])
        self.unnorm_key = self.manifest["unnorm_key"]

    def __len__(self) -> int:
        return len(self.window_index)

    def batch(self, idx: Sequence[int]) -> dict:
        """Octo's batch layout for samples ``idx``: observation windows (padded steps masked), task text, chunks."""
        idx = np.asarray(idx, np.int64)
        win = self.window_index[idx]                              # (B, W)
        pad = win >= 0
        safe = np.where(pad, win, win.max(axis=1, keepdims=True))  # padded steps repeat a real frame (masked)
        obs = {IMAGE_KEY: self.images[safe], "timestep_pad_mask": pad,
               "pad_mask_dict": {IMAGE_KEY: pad.copy()}}
        act_mask = np.repeat(self.action_pad_mask[idx][..., None], self.action_dim, axis=-1)
        return {"observation": obs, "texts": [self.texts[i] for i in self.instruction_id[idx]],
                "action": self.actions[idx], "action_pad_mask": act_mask}


def augment_images(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Octo's fine-tuning augmentation of the primary camera, in numpy/PIL instead of tf.image: a random resized
    crop (area 80–100 %, aspect 0.9–1.1, resized back), then brightness ±0.1, contrast ×0.9–1.1, saturation
    ×0.9–1.1 and hue ±0.05 of a turn, each drawn per image. (N, H, W, 3) uint8 in and out."""
    from PIL import Image  # lazy: protocol-layer module (stdlib + numpy at import); PIL only for augmentation

    out = np.empty_like(images)
    n, h, w = images.shape[:3]
    for i in range(n):
        area = rng.uniform(0.8, 1.0) * h * w
        ratio = np.exp(rng.uniform(np.log(0.9), np.log(1.1)))
        ch = int(round(min(h, np.sqrt(area / ratio))))
        cw = int(round(min(w, np.sqrt(area * ratio))))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(images[i][y:y + ch, x:x + cw]).resize((w, h), Image.BILINEAR)
        hsv = np.asarray(im.convert("HSV"), np.int16)
        hsv[..., 0] = (hsv[..., 0] + int(round(rng.uniform(-0.05, 0.05) * 256))) % 256
        f = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), np.float32) / 255.0
        f = f + rng.uniform(-0.1, 0.1)
        f = (f - f.mean()) * rng.uniform(0.9, 1.1) + f.mean()
        grey = f.mean(axis=-1, keepdims=True)
        f = (f - grey) * rng.uniform(0.9, 1.1) + grey
        out[i] = np.clip(np.rint(f * 255.0), 0, 255).astype(np.uint8)
    return out


# =================================================================================================== checkpoints


def save_checkpoint(model, step: int, target: Path, extra: dict) -> Path:
    """octo's ``save_pretrained`` into a temporary directory, then renamed onto ``target`` (an existing target is
    moved aside first and removed after), so a reader never sees a half-written checkpoint."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(step, checkpoint_path=str(tmp.resolve()))
    (tmp / "training_state.json").write_text(json.dumps({"step": int(step), **extra}, indent=2, default=str))
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


# =================================================================================================== train log


def log_record(step: int, loss: float, mse: float, grad_norm: float, lr: float, frames_seen: int,
               elapsed_s: float) -> dict:
    """One ``train_log.jsonl`` line, in the training loop's layout (no action tokens: accuracy and L1 are null)."""
    return {"step": int(step), "loss": float(loss), "action_accuracy": None, "l1": None, "l1_normalized": None,
            "mse": float(mse), "grad_norm": float(grad_norm), "lr": float(lr), "frames_seen": int(frames_seen),
            "elapsed_s": round(float(elapsed_s), 3)}
