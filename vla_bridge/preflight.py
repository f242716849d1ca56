"""The pre-flight checks: what this run needs, checked before anything heavy, each failure with its one-line fix.

Packages (lerobot, torchcodec with system FFmpeg, the timm pin, bitsandbytes), the Octo environment, free disk
where each thing is written, the hub when a hub id needs it, MODEL_ID and UNNORM_KEY. ``run_preflight`` runs the
ones the chosen path needs; the notebook prints them (``format_checks``) and ``raise_on_failure`` raises
:class:`vla_bridge.hardware.PreflightError` on the first required failure. What the machine is and which path it
takes is :mod:`vla_bridge.hardware`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata as md
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import huggingface_hub

from . import hardware
from .hardware import Decision, PreflightError, is_embedded, is_local_dir, looks_like_hub_id, no_such_directory
from .octo.protocol import RANDOM_INIT, OctoEnvError, worker_command   # stdlib + numpy only

# OpenVLA's remote code (modeling_prismatic.py) raises NotImplementedError for any other timm version.
OPENVLA_TIMM_VERSIONS = frozenset({"0.9.10", "0.9.11", "0.9.12", "0.9.16"})


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


@dataclasses.dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    if not hardware.package_available("bitsandbytes"):
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
    if is_local_dir(model_id):
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
    path = Path(model_id).expanduser() / "config.json" if is_local_dir(model_id) else None
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
