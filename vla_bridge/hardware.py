"""Hardware detection and the policy decision (the pre-flight checks are :mod:`vla_bridge.preflight`).

Everything here is cheap and side-effect free so the notebook's first cells can call it before any heavy import
fails in a confusing way. ``PreflightError`` is the one-line error a parameter that cannot work raises.

The decision table (``choose_policy``), highest priority first:

1. ``FORCE_PATH`` (environment) — ``openvla`` | ``openvla-4bit`` | ``octo`` | ``tiny``;
2. the ``POLICY`` parameter when it is not ``auto``;
3. ``auto``: no CUDA → tiny; no hub and no local MODEL_ID directory → tiny; ≥ 22 GiB VRAM → OpenVLA-7B bf16;
   12–22 GiB → OpenVLA-7B 4-bit (needs bitsandbytes, else Octo-Small); < 12 GiB → Octo-Small.
A forced ``openvla`` picks bf16 or 4-bit by the VRAM it finds.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

POLICIES = ("openvla", "openvla-4bit", "octo", "tiny")
POLICY_CHOICES = ("auto",) + POLICIES

# VRAM thresholds (GiB, as torch reports total memory: a card sold as "12 GB" may report less than 12.0 GiB) of the
# decision table. OpenVLA-7B in bf16 needs ~15 GB for the weights alone plus
# activations/LoRA optimizer state at batch 4; 4-bit NF4 brings the weights to ~4.5 GB.
OPENVLA_BF16_MIN_GB = 22.0
OPENVLA_4BIT_MIN_GB = 12.0


HUB_BRIDGE_V3 = "nvidia/bridge_lerobot_v3"
EMBEDDED_DATASET = "embedded"
DEFAULT_MODEL_IDS = {
    "openvla": "openvla/openvla-7b",
    "openvla-4bit": "openvla/openvla-7b",
    "octo": "hf://rail-berkeley/octo-small-1.5",
    "tiny": "data/tiny_vla_base",
}


def is_embedded(dataset: str | os.PathLike | None) -> bool:
    """Whether DATASET names the embedded demo world (the one question, asked in one place)."""
    return str(dataset) == EMBEDDED_DATASET


class PreflightError(RuntimeError):
    """A pre-flight check failed; the message is one line and says how to fix it."""


@dataclasses.dataclass
class HardwareInfo:
    cuda_available: bool
    device_name: str
    gpu_count: int
    total_vram_gb: float
    free_vram_gb: float
    bf16_supported: bool
    cpu_count: int
    ram_gb: float
    python: str
    platform: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Decision:
    """A choice with the reason printed next to it."""

    value: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return 0.0


def detect_hardware() -> HardwareInfo:
    """Read CUDA, VRAM, bf16 support, CPU count and RAM. Never raises when torch has no CUDA."""
    cuda, name, count, total, free, bf16 = False, "cpu", 0, 0.0, 0.0, False
    try:
        cuda = bool(torch.cuda.is_available())
        if cuda:
            count = torch.cuda.device_count()
            name = torch.cuda.get_device_name(0)
            free_b, total_b = torch.cuda.mem_get_info(0)
            total, free = total_b / 1024**3, free_b / 1024**3
            bf16 = bool(torch.cuda.is_bf16_supported())
    except Exception as exc:  # a broken CUDA driver must not kill the hardware cell
        name = f"cpu (CUDA probe failed: {type(exc).__name__}: {exc})"
        cuda = False
    return HardwareInfo(
        cuda_available=cuda,
        device_name=name,
        gpu_count=count,
        total_vram_gb=round(total, 2),
        free_vram_gb=round(free, 2),
        bf16_supported=bf16,
        cpu_count=os.cpu_count() or 1,
        ram_gb=round(_ram_gb(), 2),
        python=platform.python_version(),
        platform=f"{platform.system()} {platform.machine()}",
    )


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_hub(timeout: float = 3.0, env: dict[str, str] | None = None) -> Decision:
    """Is the Hugging Face hub reachable? value is "yes"/"no"; the reason never contains a token."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return Decision("no", "HF_HUB_OFFLINE is set")
    url = f"{hub_endpoint()}/api/models/openvla/openvla-7b"
    try:
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "vla_bridge-preflight"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (fixed https endpoint)
            return Decision("yes", f"{hub_endpoint()} answered HTTP {resp.status}")
    except urllib.error.HTTPError as exc:  # the hub answered: reachable (401/429 still mean reachable)
        return Decision("yes", f"{hub_endpoint()} answered HTTP {exc.code}")
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Decision("no", f"{hub_endpoint()} unreachable within {timeout:.0f} s ({type(reason).__name__})")


def package_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")


def looks_like_hub_id(text: str | os.PathLike) -> bool:
    """Whether a DATASET / MODEL_ID value that is not an existing directory should be read as a hub id: exactly
    ``owner/name`` with the hub's characters (letters, digits, ``-``, ``_``, ``.``, not at either end). Anything
    else that names a directory is a (mistyped) local path: it starts with ``.``, ``/`` or ``~``, ends with ``/``,
    has more than one ``/`` — or its first part is a directory here (``data/bridge_copy`` with ``data/`` present)."""
    t = str(text).strip()
    if not _HUB_ID.fullmatch(t) or ".." in t:
        return False
    return not Path(t.split("/", 1)[0]).is_dir()


def no_such_directory(label: str, text: str | os.PathLike) -> str:
    """The one-line error for a DATASET / MODEL_ID that reads as a local path that does not exist."""
    t = str(text).strip()
    full = Path(t).expanduser().resolve()
    return (f"{label}={t!r}: no such directory: {full} (read as a local path; a hub id is exactly owner/name). "
            f"Check the path, or give the hub id")


def is_local_dir(model_id: str | None) -> bool:
    return bool(model_id) and model_id != "auto" and Path(model_id).expanduser().is_dir()


def choose_policy(
    hw: HardwareInfo,
    hub_ok: bool,
    requested: str = "auto",
    force_path: str | None = None,
    bnb_available: bool | None = None,
    model_id: str | None = None,
) -> Decision:
    """Apply the decision table in the module docstring. Raises PreflightError for an unknown name."""
    if bnb_available is None:
        bnb_available = package_available("bitsandbytes")
    force = (force_path or "").strip().lower()
    req = (requested or "auto").strip().lower()
    for label, val in (("FORCE_PATH", force), ("POLICY", req)):
        if val and val not in POLICY_CHOICES:
            raise PreflightError(f"{label}={val!r} is not one of {', '.join(POLICY_CHOICES)}")
    vram = hw.total_vram_gb if hw.cuda_available else 0.0
    gpu = f"{hw.device_name} with {vram:.1f} GiB" if hw.cuda_available else "no CUDA GPU"

    if force and force != "auto":
        return _forced(force, "FORCE_PATH (environment)", hw, vram, gpu, bnb_available)
    if req != "auto":
        return _forced(req, "POLICY parameter", hw, vram, gpu, bnb_available)

    if not hw.cuda_available:
        return Decision("tiny", f"{gpu}: the tiny VLA on the embedded demo world (same cells as the 7B path)")
    if not hub_ok and not is_local_dir(model_id):
        return Decision("tiny", f"{gpu}, but the hub is unreachable and MODEL_ID is not a local directory")
    if vram >= OPENVLA_BF16_MIN_GB:
        return Decision("openvla", f"{gpu} ≥ {OPENVLA_BF16_MIN_GB:.1f} GiB: OpenVLA-7B in bf16 with LoRA")
    if vram >= OPENVLA_4BIT_MIN_GB:
        if bnb_available:
            return Decision(
                "openvla-4bit",
                f"{gpu} is {OPENVLA_4BIT_MIN_GB:.1f}–{OPENVLA_BF16_MIN_GB:.1f} GiB: OpenVLA-7B in 4-bit NF4 with LoRA",
            )
        return Decision("octo", f"{gpu} needs 4-bit for OpenVLA-7B but bitsandbytes is not installed: Octo-Small")
    return Decision("octo", f"{gpu} < {OPENVLA_4BIT_MIN_GB:.1f} GiB: too small for OpenVLA-7B even in 4-bit → Octo-Small")


def _forced(name: str, source: str, hw: HardwareInfo, vram: float, gpu: str, bnb: bool) -> Decision:
    if name == "openvla-4bit" and not hw.cuda_available:
        # caught here, in the first cell, not in section 4 after the data section has streamed its batches
        raise PreflightError(
            f"{source.split()[0]}=openvla-4bit needs a CUDA GPU and bitsandbytes (NF4 kernels), and this machine has "
            "no CUDA GPU: use POLICY=tiny (the demo world), POLICY=octo, or POLICY=openvla (fp32 on CPU, only "
            "practical for a small local checkpoint)"
        )
    if name == "openvla" and hw.cuda_available and vram < OPENVLA_BF16_MIN_GB:
        if vram >= OPENVLA_4BIT_MIN_GB and bnb:
            return Decision("openvla-4bit", f"{source} asks for OpenVLA; {gpu} < {OPENVLA_BF16_MIN_GB:.1f} GiB → 4-bit")
        return Decision("openvla", f"{source} asks for OpenVLA on {gpu}: bf16 may run out of memory")
    if name.startswith("openvla") and not hw.cuda_available:
        return Decision(name, f"{source} asks for {name} with {gpu}: fp32 on CPU, only practical for a small local checkpoint")
    if name == "openvla-4bit" and not bnb:
        raise PreflightError(
            f"{source} asks for openvla-4bit but bitsandbytes is not importable: "
            "`pip install bitsandbytes` (Linux x86-64 + CUDA only) or use POLICY=octo"
        )
    return Decision(name, f"{source} asks for {name} ({gpu})")


def choose_dataset(requested: str, policy: str, hub_ok: bool) -> Decision:
    """``auto`` → the hub's v3.0 Bridge when reachable (and the policy is a real one), else the embedded world."""
    req = (requested or "auto").strip()
    if req.lower() == "auto":
        if policy == "tiny":
            return Decision(EMBEDDED_DATASET, "the tiny VLA was pretrained on the embedded demo world")
        if hub_ok:
            return Decision(HUB_BRIDGE_V3, "hub reachable: BridgeData V2 in LeRobot v3.0 format, streamed")
        return Decision(EMBEDDED_DATASET, "hub unreachable: the embedded demo dataset (Bridge schema, built locally)")
    if req.lower() == EMBEDDED_DATASET:
        return Decision(EMBEDDED_DATASET, "DATASET parameter asks for the embedded demo dataset")
    if Path(req).expanduser().exists():
        return Decision(str(Path(req).expanduser()), "DATASET parameter is a local LeRobot root")
    if "/" in req and not looks_like_hub_id(req):
        raise PreflightError(no_such_directory("DATASET", req))
    if looks_like_hub_id(req):
        if not hub_ok:
            raise PreflightError(
                f"DATASET={req!r} is a hub id but the hub is unreachable: set DATASET to a local root or 'embedded'"
            )
        return Decision(req, "DATASET parameter is a hub id")
    raise PreflightError(f"DATASET={req!r} is neither 'auto', 'embedded', a hub id (owner/name) nor an existing directory")




