"""POLICY=octo from the main environment: drive the Octo worker (``vla_bridge.octo.worker``) in ``.venv-octo``.

Octo-Small is JAX/Flax and needs its own environment (numpy 1.24, jax 0.4.20, tensorflow 2.15; see
``bash setup.sh --octo``). Everything else stays here and is shared with the other paths: the data (the training
split goes over as shards, :mod:`vla_bridge.octo.shards`), the statistics and their normalization
(:mod:`vla_bridge.tokenization`), the evaluation (:func:`vla_bridge.evaluation.run_evaluation` with
:class:`OctoPolicy` objects: the same metrics, closed loop, table and eval.json), the plots and the reports.

* :func:`train_octo` runs ``octo.worker train`` as a subprocess and streams its progress lines into the cell.
* :class:`OctoServer` keeps ``octo.worker serve`` running (the fine-tuned and the before-fine-tuning weights
  loaded once) and exchanges framed messages over its pipes: uint8 images + instructions out, normalized action
  chunks back.
* :class:`OctoPolicy` is a :class:`vla_bridge.evaluation.Policy`: it sends the frames, takes the **first action of
  each predicted chunk** (receding horizon: the policy re-plans at every 5 Hz step, which is also what the
  per-frame open-loop metrics compare) and de-normalizes it with the training statistics.
* :func:`vla_bridge.octo.protocol.worker_command` picks the worker: the real one in ``.venv-octo``, or with
  ``VLA_BRIDGE_OCTO_WORKER=standin`` :mod:`vla_bridge.octo.standin_worker` in this environment (same protocol, no
  JAX: what CI runs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..images import to_uint8_hwc
from ..paths import PROJECT_ROOT
from ..tokenization import action_stats, unnormalize_actions
from .protocol import RESULT_PREFIX, WorkerCommand, read_frame, worker_command, write_frame

REQUEST_FRAMES = 64                 # frames per predict request (the worker pads to its own batch size)

# XLA's CPU backend at optimization level 0 compiles Octo's train step in ~30 s instead of 173-320 s (measured on 2
# CPU cores), but samples ~4x slower (13.5 s vs 3.5 s per batch of 16): CPU training uses it unless XLA_FLAGS sets
# a level already; serving always compiles fully (it compiles once and predicts for the whole evaluation).
XLA_FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(flags: str, fast_compile: bool) -> str:
    """``flags`` (XLA_FLAGS) with :data:`XLA_FAST_COMPILE` added when ``fast_compile`` and no optimization level is
    set, or with every optimization-level flag removed when not ``fast_compile``."""
    parts = flags.split()
    has_level = any(f.startswith("--xla_backend_optimization_level") for f in parts)
    if fast_compile:
        return " ".join(parts if has_level else parts + [XLA_FAST_COMPILE])
    return " ".join(f for f in parts if not f.startswith("--xla_backend_optimization_level"))


def worker_env(hub_ok: bool | None = None, fast_compile: bool | None = None) -> dict[str, str]:
    """The worker's environment: this checkout importable, quiet TensorFlow, HF_HUB_OFFLINE=1 when the hub is
    unreachable (otherwise transformers retries for 23–46 s per lookup before failing), and XLA_FLAGS by
    :func:`xla_flags` (``fast_compile`` None: XLA_FLAGS as it is)."""
    env = dict(os.environ)
    if fast_compile is not None:
        env["XLA_FLAGS"] = xla_flags(env.get("XLA_FLAGS", ""), fast_compile)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("USE_TF", "0")
    env["PYTHONUNBUFFERED"] = "1"
    if hub_ok is False:
        env["HF_HUB_OFFLINE"] = "1"
    for var in ("VIRTUAL_ENV", "PYTHONHOME"):  # the main venv's, not the worker's
        env.pop(var, None)
    return env


def _echo_default(line: str) -> None:
    print(line, flush=True)


def run_worker(args: Sequence[str], hub_ok: bool | None = None, echo: Callable[[str], None] | None = _echo_default,
               command: WorkerCommand | None = None, fast_compile: bool | None = None) -> tuple[int, list[str]]:
    """``octo.worker <args>`` (or the worker ``command`` names) to completion, each output line echoed as it
    arrives; (exit code, lines)."""
    command = command or worker_command()
    proc = subprocess.Popen(command.argv(*args), cwd=str(PROJECT_ROOT), env=worker_env(hub_ok, fast_compile),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        if echo is not None and not line.startswith(RESULT_PREFIX):
            echo(line)
    return proc.wait(), lines


# ============================================================================================== training


@dataclasses.dataclass
class OctoTrainResult:
    """What the notebook reads after fine-tuning (the attributes of :class:`vla_bridge.training.TrainResult` that
    the later cells use), plus the worker's full report in ``info``."""

    steps: int
    frames_seen: int
    seconds: float
    stopped_reason: str
    log_path: Path
    last_checkpoint: Path | None
    info: dict


def worker_train_args(cfg: Any, shards_dir: str | os.PathLike) -> list[str]:
    init = cfg.model_id
    return ["train", "--shards", str(Path(shards_dir).resolve()), "--run", cfg.run_name,
            "--outputs", str(Path(cfg.outputs_dir).resolve()), "--data-dir", str(Path(cfg.data_dir).resolve()),
            "--init", str(Path(init).resolve()) if Path(init).expanduser().is_dir() else init,
            "--max-steps", str(cfg.max_steps), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.learning_rate),
            "--warmup", str(cfg.warmup_steps), "--log-every", str(cfg.log_every), "--save-every", str(cfg.save_every),
            "--seed", str(cfg.seed)] + ([] if cfg.image_aug else ["--no-image-aug"])


def train_octo(cfg: Any, shards_dir: str | os.PathLike, echo: Callable[[str], None] | None = _echo_default
               ) -> OctoTrainResult:
    """Fine-tune Octo-Small in the worker on ``shards_dir`` for ``cfg.max_steps``; progress streams into ``echo``.
    On the CPU path (no CUDA here) XLA compiles at optimization level 0 unless XLA_FLAGS sets a level."""
    rc, lines = run_worker(worker_train_args(cfg, shards_dir), hub_ok=cfg.hub == "yes", echo=echo,
                           fast_compile=True if cfg.device == "cpu" else None)
    result = next((json.loads(line[len(RESULT_PREFIX):]) for line in reversed(lines)
                   if line.startswith(RESULT_PREFIX)), None)
    if rc != 0 or result is None:
        tail = "\n".join(lines[-25:])
        raise RuntimeError(f"the Octo worker failed (exit {rc}); its last lines:\n{tail}")
    return OctoTrainResult(steps=int(result["steps"]), frames_seen=int(result["frames_seen"]),
                           seconds=float(result["seconds"]), stopped_reason=str(result["stopped_reason"]),
                           log_path=Path(result["log_path"]),
                           last_checkpoint=Path(result["last_checkpoint"]) if result.get("last_checkpoint") else None,
                           info=result)


# ============================================================================================== serving


class OctoServer:
    """``octo.worker serve`` as a long-lived subprocess; ``predict`` returns normalized chunks (N, horizon, D)."""

    def __init__(self, checkpoint: str | os.PathLike, base: str | os.PathLike | None = None,
                 hub_ok: bool | None = None, echo: Callable[[str], None] | None = _echo_default,
                 command: WorkerCommand | None = None):
        command = command or worker_command()
        args = ["serve", "--checkpoint", str(Path(checkpoint).resolve())]
        if base is not None:
            args += ["--base", str(Path(base).resolve())]
        self.echo = echo
        self.proc = subprocess.Popen(command.argv(*args), cwd=str(PROJECT_ROOT), env=worker_env(hub_ok, False),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._log: list[str] = []
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        self.calls = 0
        self.seconds = 0.0
        try:
            hello, _ = read_frame(self.proc.stdout)
        except EOFError:
            self.proc.wait(timeout=30)
            self._thread.join(timeout=5)   # its last stderr lines
            raise RuntimeError("the Octo worker did not start:\n" + "\n".join(self._log[-25:])) from None
        self.info = hello
        self.weights = list(hello.get("weights", []))
        self.horizon = int(hello.get("horizon") or 1)
        self.statistics = hello.get("statistics") or {}

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self._log.append(line)
            if self.echo is not None and line.startswith("[octo]"):
                self.echo(line)

    def predict(self, images: np.ndarray, instructions: Sequence[str], weights: str = "finetuned") -> np.ndarray:
        """(N, 256, 256, 3) uint8 frames + N instructions → (N, horizon, D) normalized action chunks."""
        images = np.ascontiguousarray(images, np.uint8)
        if images.ndim != 4 or len(images) != len(instructions):
            raise ValueError(f"{images.shape} images for {len(instructions)} instructions")
        if self.proc.poll() is not None:
            raise RuntimeError("the Octo worker has exited:\n" + "\n".join(self._log[-25:]))
        t0 = time.perf_counter()
        write_frame(self.proc.stdin, {"op": "predict", "weights": weights, "shape": list(images.shape),
                                      "instructions": [str(s) for s in instructions]}, images.tobytes())
        header, payload = read_frame(self.proc.stdout)
        if not header.get("ok"):
            raise RuntimeError(f"the Octo worker could not predict: {header.get('error')}")
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return np.frombuffer(payload, np.float32).reshape(header["shape"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                write_frame(self.proc.stdin, {"op": "close"})
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "OctoServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class OctoPolicy:
    """An evaluation :class:`~vla_bridge.evaluation.Policy` backed by the Octo worker: first action of each chunk,
    de-normalized with ``stats_entry`` (the statistics the shards were normalized with)."""

    needs_images = True

    def __init__(self, server: OctoServer, stats_entry: Mapping[str, Any], weights: str = "finetuned",
                 name: str = "fine-tuned", image_size: int = 256, request_frames: int = REQUEST_FRAMES):
        if weights not in server.weights:
            raise ValueError(f"the Octo worker has no {weights!r} weights (has {server.weights})")
        self.server, self.weights, self.name = server, weights, name
        self.stats = action_stats(stats_entry)
        self.image_size, self.request_frames = int(image_size), int(request_frames)

    def act(self, images, instructions, envs=None, progress=None) -> np.ndarray:
        out = []
        for i in range(0, len(instructions), self.request_frames):
            frames = np.stack([to_uint8_hwc(im, self.image_size) for im in images[i:i + self.request_frames]])
            chunks = self.server.predict(frames, list(instructions[i:i + self.request_frames]), self.weights)
            out.append(chunks[:, 0, :].astype(np.float64))     # receding horizon: execute the first action
            # the diffusion head samples in [-5, 5] (octo's max_action); the targets were in [-1, 1] (normalized
            # dimensions) and inside the training range (pass-through ones, e.g. the gripper): clip to those
            if progress is not None:
                progress(len(frames))
        if not out:
            return np.zeros((0, len(self.stats["q01"])))
        mask = np.asarray(self.stats.get("mask", [True] * len(self.stats["q01"])), bool)
        normalized = np.concatenate(out)
        normalized = np.where(mask, np.clip(normalized, -1.0, 1.0), normalized)
        actions = np.asarray(unnormalize_actions(normalized, self.stats["q01"], self.stats["q99"], mask))
        if "min" in self.stats and "max" in self.stats:
            actions = np.where(mask, actions, np.clip(actions, self.stats["min"], self.stats["max"]))
        return actions

    def __repr__(self) -> str:
        return (f"OctoPolicy(weights={self.weights!r}, first action of each {self.server.horizon}-step chunk, "
                f"images {self.image_size}px, {self.request_frames} frames per request)")


def model_info(cfg: Any, result: OctoTrainResult | None, server: OctoServer | None = None) -> dict:
    """The ``model`` block of eval.json for Octo."""
    info: dict[str, Any] = {"class": "OctoModel (octo-models/octo, JAX/Flax)", "wrapper": None, "peft": False,
                            "policy": getattr(cfg, "policy", "octo"), "model_id": getattr(cfg, "model_id", None),
                            "precision": "fp32", "action_head": "diffusion (20 denoising steps)",
                            "execution": "first action of each predicted chunk, re-planned every step",
                            "base_description": "the same Octo model with the weights before fine-tuning "
                            "(outputs/checkpoints/<run>/base/: octo-small-1.5 merged into our config, or the random "
                            "initialization for octo-random), de-normalizing with the same statistics"}
    if result is not None:
        info.update(parameters=result.info.get("parameters"), trainable_parameters=result.info.get(
            "trainable_parameters"), training={"steps": result.steps, "frames_seen": result.frames_seen,
                                               "seconds": result.seconds, "last_checkpoint": result.last_checkpoint,
                                               "stopped_reason": result.stopped_reason},
                    versions=result.info.get("versions"), t5=result.info.get("t5"))
        if info.get("parameters"):
            info["trainable_percent"] = round(100.0 * info["trainable_parameters"] / info["parameters"], 4)
    if server is not None:
        info["worker"] = {"weights": server.weights, "horizon": server.horizon, "window": server.info.get("window"),
                          "kind": server.info.get("worker", "octo")}
        if server.info.get("worker") == "standin":
            info["class"] = ("the stand-in Octo worker (vla_bridge.octo.standin_worker: a linear map from the image's "
                             "mean colour, no JAX; checks the pipeline, not Octo)")
    return info
