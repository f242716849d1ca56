"""How the main environment and the Octo workers talk: stdlib + numpy only, imported on both sides.

The main environment (``vla_bridge.octo.client``, ``vla_bridge.hardware``) and the workers in ``.venv-octo``
(``vla_bridge.octo.worker``) or in the main environment (``vla_bridge.octo.standin_worker``) import this module, so
it imports only the standard library, numpy and ``vla_bridge.paths`` (never torch, lerobot, jax or octo):

* which worker runs and how it is started: ``WORKER_ENV`` / ``WORKER_MODULES``, :func:`octo_interpreter` (the
  ``.venv-octo`` interpreter, or :class:`OctoEnvError` with the one-line fix), :class:`WorkerCommand`,
  :func:`worker_command`, and the worker's command line (:func:`build_parser`; ``RANDOM_INIT`` names Octo-Small with
  random weights);
* ``train``'s result line (``RESULT_PREFIX`` + JSON);
* ``serve``'s framed protocol: :func:`write_frame` / :func:`read_frame` (both ends), :func:`protocol_streams` and
  :func:`serve_loop` (the worker's end).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import struct as _struct
import sys
import time
from pathlib import Path

import numpy as np

from ..paths import OCTO_SETUP_HINT as SETUP_HINT
from ..paths import octo_python

RANDOM_INIT = "octo-random"            # MODEL_ID asking for Octo-Small from octo's config with random weights
SERVE_BATCH = 16                       # predict requests go in chunks of at most this many frames
PROTOCOL = 1
RESULT_PREFIX = "RESULT "              # ``train``'s last stdout line: this prefix + the result as JSON

# Which worker the main environment starts: "octo" (default) is vla_bridge.octo.worker in .venv-octo; "standin" is
# vla_bridge.octo.standin_worker in this environment (no JAX, deterministic toy actions: for CI, not a policy).
WORKER_ENV = "VLA_BRIDGE_OCTO_WORKER"
WORKER_MODULES = {"octo": "vla_bridge.octo.worker", "standin": "vla_bridge.octo.standin_worker"}


# =================================================================================================== the worker


class OctoEnvError(RuntimeError):
    """The Octo environment is missing or broken: ``detail``, and ``fix`` (the one-line way out)."""

    def __init__(self, detail: str, fix: str):
        super().__init__(f"{detail}: {fix}")
        self.detail, self.fix = detail, fix


def octo_interpreter(root: str | os.PathLike | None = None) -> Path:
    """The Octo interpreter (``.venv-octo/bin/python``), or :class:`OctoEnvError` with the one-line fix."""
    py = octo_python(root)
    if not py.exists():
        raise OctoEnvError(f"POLICY=octo needs Octo's own JAX environment and {py} does not exist", SETUP_HINT)
    return py


@dataclasses.dataclass(frozen=True)
class WorkerCommand:
    """How to start the worker: ``python -m module <command> ...``."""

    python: Path
    module: str

    @property
    def standin(self) -> bool:
        return self.module == WORKER_MODULES["standin"]

    def argv(self, *args: str) -> list[str]:
        return [str(self.python), "-m", self.module, *args]

    def __str__(self) -> str:
        what = (f" (the stand-in selected by {WORKER_ENV}=standin: no JAX, deterministic toy actions, not Octo)"
                if self.standin else "")
        return f"{self.python} -m {self.module}{what}"


def worker_command(root: str | os.PathLike | None = None) -> WorkerCommand:
    """The worker ``VLA_BRIDGE_OCTO_WORKER`` selects (default: the real one in ``.venv-octo``, which must exist),
    or :class:`OctoEnvError` with the one-line fix."""
    choice = os.environ.get(WORKER_ENV, "").strip().lower() or "octo"
    if choice not in WORKER_MODULES:
        raise OctoEnvError(f"{WORKER_ENV}={choice!r} is not one of {', '.join(WORKER_MODULES)}",
                           f"unset {WORKER_ENV} for the real Octo worker, or set it to standin for the CI stand-in")
    if choice == "standin":
        return WorkerCommand(Path(sys.executable), WORKER_MODULES["standin"])
    return WorkerCommand(octo_interpreter(root), WORKER_MODULES["octo"])


def build_parser(prog: str = f"python -m {WORKER_MODULES['octo']}", description: str | None = None
                 ) -> argparse.ArgumentParser:
    """The worker's command line (``check``, ``train``, ``serve``); the stand-in parses the same one."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="import octo (with the stand-ins) and print versions")
    t = sub.add_parser("train", help="fine-tune Octo-Small on vla_bridge shards")
    t.add_argument("--shards", required=True)
    t.add_argument("--run", required=True)
    t.add_argument("--outputs", default="outputs")
    t.add_argument("--data-dir", default="data")
    t.add_argument("--init", default="hf://rail-berkeley/octo-small-1.5",
                   help=f"hf://…, a local Octo checkpoint, or {RANDOM_INIT}")
    t.add_argument("--t5", default=None, help="T5 hub id or local dir (octo-random; default: an offline stand-in)")
    t.add_argument("--max-steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--save-every", type=int, default=500)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-image-aug", dest="image_aug", action="store_false",
                   help="no crop / colour augmentation (Octo's recipe has it; IMAGE_AUG=False turns it off)")
    s = sub.add_parser("serve", help="answer predict requests on stdin/stdout (framed)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--base", default=None)
    s.add_argument("--batch-size", type=int, default=SERVE_BATCH)
    s.add_argument("--seed", type=int, default=0)
    return p


# =================================================================================================== framing


def _read_exact(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise EOFError("the other end closed the pipe (if that is the Octo worker, it crashed: see its lines "
                           "above)")
        buf += chunk
    return bytes(buf)


def write_frame(stream, header: dict, payload: bytes = b"") -> None:
    """One protocol frame: 4-byte big-endian header length, JSON header, 8-byte payload length, payload.
    Both ends use these two functions: the workers, and ``octo.client.OctoServer`` in the main environment
    (this module imports only the standard library and numpy, so both environments import it)."""
    h = json.dumps(header).encode()
    stream.write(_struct.pack(">I", len(h)) + h + _struct.pack(">Q", len(payload)) + payload)
    stream.flush()


def read_frame(stream) -> tuple[dict, bytes]:
    (hn,) = _struct.unpack(">I", _read_exact(stream, 4))
    header = json.loads(_read_exact(stream, hn))
    (pn,) = _struct.unpack(">Q", _read_exact(stream, 8))
    return header, _read_exact(stream, pn) if pn else b""


def protocol_streams():
    """(frames out, frames in) of ``serve``: the real stdout/stdin; ``print`` goes to stderr from here on, so
    nothing but frames reaches the protocol stream."""
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    sys.stdout = sys.stderr
    return out, inp


def serve_loop(out, inp, hello: dict, predict) -> None:
    """The serve protocol, shared by the worker and its stand-in (``vla_bridge.octo.standin_worker``): a hello frame
    (``ok``, ``protocol`` and ``hello``: ``weights``, ``window``, ``horizon``, ``action_dim``, ``statistics``), then
    one reply per request until ``close`` or end of input. ``predict``: op with ``weights`` (one of
    ``hello["weights"]``), ``shape`` and ``instructions`` plus the uint8 images as payload → ``predict(weights,
    images, instructions)`` → float32 normalized chunks (N, horizon, D) as payload; an error is reported and the
    loop goes on."""
    write_frame(out, {"ok": True, "protocol": PROTOCOL, **hello})
    loaded = list(hello["weights"])
    while True:
        try:
            req, payload = read_frame(inp)
        except EOFError:
            return
        op = req.get("op")
        if op == "close":
            write_frame(out, {"ok": True})
            return
        try:
            if op != "predict":
                raise ValueError(f"unknown op {op!r}")
            which = req.get("weights", "finetuned")
            if which not in loaded:
                raise ValueError(f"weights {which!r} not loaded (have {loaded})")
            shape = tuple(req["shape"])
            images = np.frombuffer(payload, np.uint8).reshape(shape)
            t1 = time.perf_counter()
            acts = predict(which, images, req["instructions"])
            write_frame(out, {"ok": True, "shape": list(acts.shape), "seconds": time.perf_counter() - t1},
                        np.ascontiguousarray(acts, np.float32).tobytes())
        except Exception as exc:  # report to the client, keep serving
            write_frame(out, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
