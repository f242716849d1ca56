"""The policies the evaluation and the probes run, all behind one :class:`Policy` protocol.

* :class:`VLAPolicy` — a VLA (OpenVLA-7B or the tiny VLA) through the batched predictor; ``adapter=False`` is the
  base model before LoRA. ``act`` gives actions (open and closed loop); ``run`` gives actions and the first action
  token's logits from the same ``generate()`` calls (the probes' KL).
* :class:`ConstantPolicy` — the mean-action baseline; :class:`ExpertPolicy` — the embedded world's scripted expert;
  :class:`RandomPolicy` — uniform random actions.
* Octo's policy (``models/octo.py``: ``OctoPolicy``) satisfies the same protocol from its own environment.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from ..data import world
from .inference import BatchedActionPredictor

POLICY_FINETUNED = "fine-tuned"
POLICY_BASE = "base (before LoRA)"
POLICY_MEAN = "mean-action"
DEFAULT_POLICIES = (POLICY_FINETUNED, POLICY_BASE, POLICY_MEAN)
_POLICY_ALIASES = {"finetuned": POLICY_FINETUNED, "fine-tuned": POLICY_FINETUNED, "ft": POLICY_FINETUNED,
                   "base": POLICY_BASE, POLICY_BASE: POLICY_BASE, "mean": POLICY_MEAN, "mean-action": POLICY_MEAN}


def resolve_policies(policies: Iterable[str]) -> list[str]:
    """Canonical policy names ("ft", "base", "mean", ... → :data:`DEFAULT_POLICIES`' names), unique, in order."""
    out = []
    for p in policies:
        if p not in _POLICY_ALIASES:
            raise ValueError(f"unknown policy {p!r}; expected some of {list(DEFAULT_POLICIES)}")
        out.append(_POLICY_ALIASES[p])
    return list(dict.fromkeys(out))


class Policy(Protocol):
    """What the open-loop and closed-loop evaluations call: actions for a batch of frames."""

    name: str
    needs_images: bool

    def act(self, images: Sequence[Any] | None, instructions: Sequence[str],
            envs: Sequence[Any] | None = None, progress: Any = None) -> np.ndarray:
        """(B, 7) de-normalized actions; ``envs`` (closed loop only) for policies that read the simulator;
        ``progress`` (open loop, optional) is called with the number of frames done."""


class VLAPolicy:
    """A VLA through :class:`BatchedActionPredictor`; ``adapter=False`` runs the PEFT model with its adapter
    disabled (the base model before LoRA)."""

    needs_images = True

    def __init__(self, predictor: BatchedActionPredictor, name: str = POLICY_FINETUNED, adapter: bool = True):
        self.predictor, self.name, self.adapter = predictor, name, bool(adapter)
        if not adapter and not hasattr(predictor.model, "disable_adapter"):
            raise ValueError("the base-model baseline needs a PEFT-wrapped model (model.disable_adapter())")

    @classmethod
    def from_model(cls, model, processor, unnorm_key: str, center_crop: bool = True, batch_size: int = 32,
                   name: str = POLICY_FINETUNED) -> "VLAPolicy":
        """The model as it is (its adapter active, if any) through a :class:`BatchedActionPredictor` of
        ``batch_size`` frames per call: the probes' and the rollout video's policy."""
        return cls(BatchedActionPredictor(model, processor, unnorm_key, center_crop, max_batch_size=batch_size), name)

    def _ctx(self):
        return contextlib.nullcontext() if self.adapter else self.predictor.model.disable_adapter()

    def act(self, images, instructions, envs=None, progress=None) -> np.ndarray:
        with self._ctx():
            return self.predictor.predict(images, instructions, progress)

    def run(self, images: Sequence[Any], instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(actions (N, 7) float64, first-action-token logits (N, 256) float32) from the same decode
        calls, the evaluation table's preprocessing: the probes' call."""
        if not len(images):
            return np.zeros((0, self.predictor.action_dim)), np.zeros((0, 256), dtype=np.float32)
        with self._ctx():
            acts, logits = self.predictor.predict_with_logits(list(images), list(instructions), action_only=True)
        logits = logits.detach().cpu().numpy() if hasattr(logits, "detach") else np.asarray(logits)
        return np.asarray(acts, dtype=np.float64), logits.astype(np.float32)


class ConstantPolicy:
    """The same action at every step (the mean-action baseline: the training split's mean action)."""

    needs_images = False

    def __init__(self, action: Sequence[float], name: str = POLICY_MEAN):
        self.action = np.asarray(action, np.float64).reshape(-1)
        self.name = name

    def act(self, images, instructions, envs=None, progress=None) -> np.ndarray:
        return np.tile(self.action, (len(instructions), 1))


class ExpertPolicy:
    """The embedded world's scripted expert, reading each env's internal state (an upper bound; tests use it)."""

    needs_images = False
    name = "expert"

    def act(self, images, instructions, envs=None, progress=None) -> np.ndarray:
        if envs is None:
            raise ValueError("the expert acts from the simulator: closed loop only")
        return np.stack([world.expert_action(env) for env in envs]).astype(np.float64)


class RandomPolicy:
    """Uniform random actions within the env's action bounds, gripper open/closed at random."""

    needs_images = False
    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def act(self, images, instructions, envs=None, progress=None) -> np.ndarray:
        n = len(instructions)
        a = self.rng.uniform(world.ACTION_LOW, world.ACTION_HIGH, size=(n, 7))
        a[:, 6] = (self.rng.random(n) < 0.5).astype(np.float64)
        return a


__all__ = ["POLICY_FINETUNED", "POLICY_BASE", "POLICY_MEAN", "DEFAULT_POLICIES", "resolve_policies", "Policy",
           "VLAPolicy", "ConstantPolicy", "ExpertPolicy", "RandomPolicy"]
