"""Hardware detection, the policy decision and the pre-flight checks.

Everything here is cheap and side-effect free so the notebook's first cells can call it before any heavy import
fails in a confusing way. Each failed check carries a one-line fix; ``PreflightError`` is what the notebook raises.

The decision table (``choose_policy``), highest priority first:

1. ``FORCE_PATH`` (environment) — ``openvla`` | ``openvla-4bit`` | ``octo`` | ``tiny``;
2. the ``POLICY`` parameter when it is not ``auto``;
3. ``auto``: no CUDA → tiny; no hub and no local MODEL_ID directory → tiny; ≥ 22 GiB VRAM → OpenVLA-7B bf16;
   12–22 GiB → OpenVLA-7B 4-bit (needs bitsandbytes, else Octo-Small); < 12 GiB → Octo-Small.
A forced ``openvla`` picks bf16 or 4-bit by the VRAM it finds.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import huggingface_hub
import torch

from .octo.protocol import RANDOM_INIT, OctoEnvError, worker_command   # stdlib + numpy only

POLICIES = ("openvla", "openvla-4bit", "octo", "tiny")
POLICY_CHOICES = ("auto",) + POLICIES

# VRAM thresholds (GiB, as torch reports total memory: a card sold as "12 GB" may report less than 12.0 GiB) of the
# decision table. OpenVLA-7B in bf16 needs ~15 GB for the weights alone plus
# activations/LoRA optimizer state at batch 4; 4-bit NF4 brings the weights to ~4.5 GB.
OPENVLA_BF16_MIN_GB = 22.0
OPENVLA_4BIT_MIN_GB = 12.0

# OpenVLA's remote code (modeling_prismatic.py) raises NotImplementedError for any other timm version.
OPENVLA_TIMM_VERSIONS = frozenset({"0.9.10", "0.9.11", "0.9.12", "0.9.16"})

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


# Free disk (GiB) each location needs (checked per location; locations on one disk add up, see `check_disks`):
# the model's weights in the HF hub cache (OpenVLA-7B: 15.2 GB of safetensors), the stream's metadata (lerobot's
# cache) and datasets' cache for a hub dataset, and checkpoints/logs/figures under OUTPUTS_DIR.
HUB_CACHE_NEEDS_GB = {"openvla": 20.0, "openvla-4bit": 20.0, "octo": 2.0, "tiny": 0.0}
STREAM_CACHE_NEEDS_GB = {"HF_LEROBOT_HOME": 5.0, "HF_DATASETS_CACHE": 1.0}
OUTPUTS_NEEDS_GB = {"openvla": 20.0, "openvla-4bit": 20.0, "octo": 8.0, "tiny": 2.0}

# Packages whose versions the install-verification cell prints.
REPORTED_PACKAGES = (
    "torch", "transformers", "tokenizers", "timm", "peft", "accelerate", "lerobot", "datasets",
    "torchcodec", "bitsandbytes", "papermill", "jupytext",
)


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


@dataclasses.dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def as_dict(self) -> dict[str, Any]:
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


def _is_local_dir(model_id: str | None) -> bool:
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
    if not hub_ok and not _is_local_dir(model_id):
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


# --------------------------------------------------------------------------------------------- pre-flight


def package_versions(names: tuple[str, ...] = REPORTED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def _vtuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def ffmpeg_install_hint() -> str:
    """The exact command that installs system FFmpeg on this OS."""
    if sys.platform == "darwin":
        return "brew install ffmpeg"
    os_release = ""
    try:
        os_release = Path("/etc/os-release").read_text().lower()
    except OSError:
        pass
    if any(k in os_release for k in ("debian", "ubuntu")):
        return "sudo apt-get update && sudo apt-get install -y ffmpeg"
    if any(k in os_release for k in ("fedora", "rhel", "centos", "rocky", "alma")):
        return "sudo dnf install -y ffmpeg-free (or ffmpeg from RPM Fusion)"
    if "arch" in os_release:
        return "sudo pacman -S ffmpeg"
    return "install FFmpeg 4-7 with your package manager (or `conda install -c conda-forge 'ffmpeg<8'`)"


def check_lerobot() -> CheckResult:
    v = package_versions(("lerobot",))["lerobot"]
    if v is None:
        return CheckResult("lerobot", False, "lerobot is not installed", "run `bash setup.sh` (pins lerobot==0.4.4)")
    if _vtuple(v) < (0, 4):
        return CheckResult("lerobot", False, f"lerobot {v} predates the v3.0 dataset format", "pip install lerobot==0.4.4")
    try:
        importlib.import_module("lerobot.datasets.lerobot_dataset")
        importlib.import_module("lerobot.datasets.streaming_dataset")
    except Exception as exc:
        return CheckResult("lerobot", False, f"lerobot {v}: v3 dataset classes do not import ({type(exc).__name__}: {exc})",
                           "reinstall with `bash setup.sh`")
    return CheckResult("lerobot", True, f"lerobot {v}: LeRobotDataset and StreamingLeRobotDataset import")


def _first_statement(exc: BaseException, limit: int = 160) -> str:
    """The exception's first line, without a trailing fragment that only introduces the next lines: torchcodec's
    "Could not load libtorchcodec. Likely causes:" becomes "Could not load libtorchcodec"."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0].strip()
    if line.endswith(":"):
        line = line.rsplit(". ", 1)[0] if ". " in line else line[:-1]
    return line.rstrip(" .")[:limit]


def check_torchcodec() -> CheckResult:
    """torchcodec is lerobot's video decoder; without FFmpeg's shared libraries the stream yields zero frames."""
    try:
        importlib.import_module("torchcodec.decoders")
    except Exception as exc:
        return CheckResult(
            "torchcodec", False,
            f"torchcodec cannot load ({_first_statement(exc)}); video streams would silently yield ZERO frames",
            f"install system FFmpeg: {ffmpeg_install_hint()}",
        )
    return CheckResult("torchcodec", True, f"torchcodec {package_versions(('torchcodec',))['torchcodec']} loads FFmpeg")


def check_timm(policy: str) -> CheckResult:
    v = package_versions(("timm",))["timm"]
    if not policy.startswith("openvla"):
        return CheckResult("timm", True, f"timm {v} (version only matters for OpenVLA)", required=False)
    if v not in OPENVLA_TIMM_VERSIONS:
        return CheckResult("timm", False, f"timm {v} is not in OpenVLA's accepted set {sorted(OPENVLA_TIMM_VERSIONS)}",
                           "pip install timm==0.9.10")
    return CheckResult("timm", True, f"timm {v} is one OpenVLA's remote code accepts")


def check_bitsandbytes(policy: str) -> CheckResult:
    if policy != "openvla-4bit":
        return CheckResult("bitsandbytes", True, "not needed for this policy", required=False)
    if not package_available("bitsandbytes"):
        return CheckResult("bitsandbytes", False, "the 4-bit path needs bitsandbytes",
                           "pip install bitsandbytes (Linux x86-64 + CUDA), or POLICY=octo")
    return CheckResult("bitsandbytes", True, f"bitsandbytes {package_versions(('bitsandbytes',))['bitsandbytes']}")


def hf_cache_dirs(env: dict[str, str] | None = None) -> dict[str, Path]:
    """Where the Hugging Face stack writes, resolved from ``env`` as huggingface_hub, datasets and lerobot do it:
    HF_HOME (else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface); HF_HUB_CACHE (else the legacy
    HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub: model weights, hub files); HF_DATASETS_CACHE (else $HF_HOME/datasets);
    HF_LEROBOT_HOME (else $HF_HOME/lerobot: a streamed dataset's metadata)."""
    env = os.environ if env is None else env

    def path(value: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(value)))

    home = path(env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                                                   "huggingface"))
    return {"HF_HOME": home,
            "HF_HUB_CACHE": path(env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or str(home / "hub")),
            "HF_DATASETS_CACHE": path(env.get("HF_DATASETS_CACHE") or str(home / "datasets")),
            "HF_LEROBOT_HOME": path(env.get("HF_LEROBOT_HOME") or str(home / "lerobot"))}


def _existing(path: Path) -> Path:
    p = Path(path).expanduser()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _disk(path: Path) -> tuple[int, float]:
    """(device id, free GiB) of an existing path."""
    return path.stat().st_dev, shutil.disk_usage(path).free / 1024**3


def check_disks(policy: str, dataset: str, model_id: str, outputs_dir: str | os.PathLike,
                env: dict[str, str] | None = None) -> list[CheckResult]:
    """Free space where each thing goes, each with its own threshold: the weights in the HF hub cache (a hub
    MODEL_ID), the stream's caches (a hub DATASET), checkpoints and figures under OUTPUTS_DIR. Locations on the same
    filesystem must fit together; a failing check names the location that is short and the variable that moves it."""
    dirs = hf_cache_dirs(env)
    wanted: list[tuple[str, str, Path, float, str]] = []   # (check name, variable, path, GB, what goes there)
    if policy != "tiny" and model_id_kind(policy, model_id) == "hub":
        wanted.append(("disk hf-hub", "HF_HUB_CACHE", dirs["HF_HUB_CACHE"], HUB_CACHE_NEEDS_GB.get(policy, 2.0),
                       f"the {policy} weights"))
    if not is_embedded(dataset) and not Path(dataset).expanduser().exists():
        for var, gb in STREAM_CACHE_NEEDS_GB.items():
            wanted.append((f"disk {var[3:].split('_')[0].lower()}", var, dirs[var], gb, f"{dataset}'s stream cache"))
    wanted.append(("disk outputs", "OUTPUTS_DIR", Path(outputs_dir), OUTPUTS_NEEDS_GB.get(policy, 2.0),
                   "checkpoints, logs, figures"))
    where = {}
    for name, _, path, _, _ in wanted:
        p = _existing(path)
        where[name] = (p, *_disk(p))
    results = []
    for name, var, path, need, what in wanted:
        p, dev, free = where[name]
        shared = [(v, gb) for n, v, _, gb, _ in wanted if n != name and where[n][1] == dev and gb > 0]
        total = need + sum(gb for _, gb in shared)
        ok = free >= total
        together = f"; ~{total:.0f} GB together with {', '.join(v for v, _ in shared)} on the same disk" if shared else ""
        fix = "" if ok else (f"free {total - free:.1f} GB on that disk, or point "
                             f"{'HF_HOME or ' if var.startswith('HF_') else ''}{var} at a bigger one")
        results.append(CheckResult(name, ok, f"{var}={path}{' is short' if not ok else ''}: {free:.1f} GB free, "
                                             f"{what} need ~{need:.0f} GB{together}", fix))
    return results


def check_octo_env(policy: str, root: str | os.PathLike | None = None) -> CheckResult:
    """POLICY=octo runs in .venv-octo (its own JAX environment): it must exist (unless the stand-in is selected)."""
    if policy != "octo":
        return CheckResult("octo env", True, "not needed for this policy", required=False)
    try:
        command = worker_command(root)
    except OctoEnvError as exc:
        return CheckResult("octo env", False, exc.detail, exc.fix)
    return CheckResult("octo env", True, str(command) if command.standin else f"{command.python} (Octo-Small's JAX "
                       "environment)")


def model_id_kind(policy: str, model_id: str) -> str:
    """What ``MODEL_ID`` names on ``policy``: "local" (an existing directory), "hub" (a hub id; on octo hf://…),
    "random" (octo-random), "built" (tiny: the cached base, built when missing) or "missing" (a path that does not
    exist; on octo anything that is neither hf://… nor octo-random)."""
    if _is_local_dir(model_id):
        return "local"
    if policy == "tiny":
        return "built"
    if policy == "octo":
        return "random" if model_id == RANDOM_INIT else "hub" if model_id.startswith("hf://") else "missing"
    return "hub" if looks_like_hub_id(model_id) else "missing"


def check_model_id(policy: str, model_id: str) -> CheckResult:
    kind = model_id_kind(policy, model_id)
    if kind != "missing":
        return CheckResult("model", True, f"MODEL_ID={model_id!r} ({kind})", required=kind != "built")
    fix = (f"point MODEL_ID at a local Octo checkpoint directory, or use hf://rail-berkeley/octo-small-1.5 (hub) or "
           f"{RANDOM_INIT} (offline, random weights)" if policy == "octo" else
           "point MODEL_ID at an existing local checkpoint directory or a hub id (owner/name)")
    return CheckResult("model", False, no_such_directory("MODEL_ID", model_id), fix)


def model_norm_stats_keys(model_id: str) -> list[str] | None:
    """The ``norm_stats`` keys in MODEL_ID's config.json when it can be read without a download (a local directory,
    or a hub id already in the HF cache); None otherwise (then the loader checks after loading)."""
    path = Path(model_id).expanduser() / "config.json" if _is_local_dir(model_id) else None
    if path is None and model_id and model_id.count("/") == 1 and not model_id.startswith((".", "/", "~")):
        try:
            cached = huggingface_hub.try_to_load_from_cache(model_id, "config.json")
            path = Path(cached) if isinstance(cached, str) else None
        except Exception:  # an unusual cache layout must not break the first cell
            path = None
    try:
        stats = json.loads(path.read_text()).get("norm_stats") if path is not None and path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return sorted(stats) if isinstance(stats, dict) else None


def unnorm_key_typo(unnorm_key: str, keys: list[str] | tuple[str, ...], cutoff: float = 0.85) -> str | None:
    """The existing key that a NEW ``unnorm_key`` is most likely a typo of ('bridge_orgi' → 'bridge_orig'), or None
    when it is not close to any (a new dataset's name). Compared ignoring case and '-' vs '_'."""
    if not keys or unnorm_key in keys:
        return None
    canon = {k.lower().replace("-", "_"): k for k in keys}
    close = difflib.get_close_matches(unnorm_key.lower().replace("-", "_"), list(canon), n=1, cutoff=cutoff)
    return canon[close[0]] if close else None


def check_unnorm_key_name(unnorm_key: str, keys: list[str] | None) -> None:
    """One-line PreflightError when UNNORM_KEY is new to the model but close to one of its keys."""
    close = unnorm_key_typo(unnorm_key, keys or [])
    if close is not None:
        raise PreflightError(f"UNNORM_KEY={unnorm_key!r} is not one of the model's norm_stats keys — did you mean "
                             f"{close!r}? (set UNNORM_KEY={close!r}; a new dataset's key must not be this close to an "
                             f"existing one)")


def check_hub_for(dataset: str, policy: str, model_id: str, hub: Decision) -> CheckResult:
    missing_local = not is_embedded(dataset) and not Path(dataset).expanduser().exists()
    if missing_local and not looks_like_hub_id(dataset):
        return CheckResult("dataset", False, no_such_directory("DATASET", dataset),
                           "point DATASET at an existing LeRobot v3.0 root, a hub id (owner/name) or 'embedded'")
    needs_hub = missing_local or (
        policy != "tiny" and model_id_kind(policy, model_id) == "hub"
    )
    detail = f"hub {'reachable' if hub.value == 'yes' else 'unreachable'}: {hub.reason}"
    if hub.value != "yes" and not needs_hub:  # "[ok] hub: hub unreachable" read as a contradiction
        detail = f"not needed by this run (hub unreachable: {hub.reason})"
    if needs_hub and hub.value != "yes":
        return CheckResult("hub", False, detail, "connect, or set HF_HUB_OFFLINE=1 with MODEL_ID/DATASET local paths")
    return CheckResult("hub", True, detail, required=needs_hub)


def check_tiny_base(policy: str, dataset: str) -> CheckResult:
    """POLICY=tiny fine-tunes a base pretrained on the embedded demo world; on another dataset say so (a warning)."""
    if policy != "tiny":
        return CheckResult("tiny base", True, "not used by this policy", required=False)
    if is_embedded(dataset):
        return CheckResult("tiny base", True, "pretrained on the embedded demo world's pretraining tasks (this "
                                              "dataset's world)", required=False)
    return CheckResult("tiny base", False, f"the tiny VLA's base is pretrained on the embedded demo world, not on "
                       f"{dataset}: fine-tuning starts from a model that has never seen this dataset's scenes",
                       "for a real base use POLICY=openvla (or a local OpenVLA checkpoint as MODEL_ID)",
                       required=False)


def run_preflight(policy: str, dataset: str, model_id: str, hub: Decision, outputs_dir: str | os.PathLike) -> list[CheckResult]:
    """All checks for the chosen path; the notebook prints them and raises on the first required failure."""
    return [
        check_lerobot(),
        check_torchcodec(),
        check_model_id(policy, model_id),
        check_hub_for(dataset, policy, model_id, hub),
        *check_disks(policy, dataset, model_id, outputs_dir),
        check_timm(policy),
        check_bitsandbytes(policy),
        check_octo_env(policy),
        check_tiny_base(policy, dataset),
    ]


def raise_on_failure(results: list[CheckResult]) -> None:
    failed = [r for r in results if r.required and not r.ok]
    if failed:
        r = failed[0]
        more = f" (+{len(failed) - 1} more failed check(s) above)" if len(failed) > 1 else ""
        raise PreflightError(f"pre-flight '{r.name}' failed: {r.detail}. Fix: {r.fix}{more}")


def format_checks(results: list[CheckResult]) -> str:
    lines = []
    for r in results:
        mark = "ok  " if r.ok else ("FAIL" if r.required else "warn")
        lines.append(f"[{mark}] {r.name:<13} {r.detail}" + (f"\n       fix: {r.fix}" if not r.ok and r.fix else ""))
    return "\n".join(lines)
