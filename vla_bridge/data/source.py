"""Where a dataset is, and whether lerobot 0.4.4 can stream it — read before anything else is touched.

:func:`resolve_source` turns a hub id or a local root into a :class:`DatasetSource` with its ``meta/info.json`` (a
local file, or one small hub download); :func:`check_version` passes v3.x and raises :class:`DatasetVersionError`
for v2.x / v1.x naming the version and the conversion path (lerobot 0.4.4 itself raises
``NotImplementedError("Contact the maintainer on Discord")`` for a v2.0 dataset); :func:`require_torchcodec` stops
before streaming when torchcodec cannot load FFmpeg (the stream would yield zero frames). Failures are one-line
:class:`StreamError` / :class:`DatasetVersionError` messages with the way out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import hf_hub_download

from .. import hardware, preflight
from ..hardware import HUB_BRIDGE_V3


class DatasetVersionError(ValueError):
    """The dataset's LeRobot codebase version cannot be streamed by lerobot 0.4.x; the message says the way out."""


class StreamError(RuntimeError):
    """The dataset cannot be streamed (no torchcodec, zero frames, no first frame in time); one line with the fix."""


@dataclasses.dataclass
class DatasetSource:
    """Where a dataset lives: ``root`` is a local LeRobot root, or None for a hub id (streamed)."""

    dataset: str
    repo_id: str
    root: Path | None
    info: dict
    revision: str | None = None
    commit: str | None = None      # hub: the commit sha the info.json was read at (its snapshot directory)

    @property
    def is_local(self) -> bool:
        return self.root is not None

    @property
    def codebase_version(self) -> str:
        return str(self.info.get("codebase_version", "unknown"))


def _local_repo_id(root: Path) -> str:
    build = root / "meta" / "vla_bridge_build.json"
    if build.is_file():
        with contextlib.suppress(Exception):
            return json.loads(build.read_text())["repo_id"]
    return f"local/{root.resolve().name}"


def _hub_info(repo_id: str) -> tuple[dict, str | None, str | None]:
    """meta/info.json from the hub: lerobot streams the "v3.0" tag when there is one, else the default branch."""
    last: Exception | None = None
    for revision in ("v3.0", None):
        try:
            path = Path(hf_hub_download(repo_id, "meta/info.json", repo_type="dataset", revision=revision))
            snapshot = path.parent.parent.name  # <cache>/snapshots/<commit sha>/meta/info.json
            commit = snapshot if len(snapshot) == 40 and all(c in "0123456789abcdef" for c in snapshot) else None
            return json.loads(path.read_text()), revision, commit
        except Exception as exc:  # RevisionNotFoundError, EntryNotFoundError, offline, gated ...
            last = exc
            if type(exc).__name__ != "RevisionNotFoundError":
                break
    msg = str(last).strip().splitlines()[0][:200] if last and str(last).strip() else type(last).__name__
    raise StreamError(
        f"cannot read meta/info.json of the hub dataset {repo_id!r} ({type(last).__name__}: {msg}). Offline or "
        "gated? Set DATASET to a local LeRobot v3.0 root or 'embedded'; for gated data run `huggingface-cli login`"
    )


def resolve_source(dataset: str | os.PathLike, root: str | os.PathLike | None = None) -> DatasetSource:
    """A hub id or a local root → :class:`DatasetSource` with its info.json (read first, nothing else is touched).

    ``root`` given: a local copy of ``dataset`` (a hub id used as the name) is read from there.
    """
    text = str(dataset)
    local = Path(root) if root is not None else (Path(text).expanduser() if Path(text).expanduser().exists() else None)
    if local is not None:
        info_path = local / "meta" / "info.json"
        if not info_path.is_file():
            raise StreamError(f"{local} has no meta/info.json: not a LeRobot dataset root")
        info = json.loads(info_path.read_text())
        repo_id = text if (root is not None and hardware.looks_like_hub_id(text)) else _local_repo_id(local)
        return DatasetSource(text, repo_id, local, info)
    if not hardware.looks_like_hub_id(text):
        if "/" in text or text.startswith((".", "~")):
            raise StreamError(hardware.no_such_directory("DATASET", text))
        raise StreamError(f"{text!r} is neither an existing local directory nor a hub id of the form owner/name")
    info, revision, commit = _hub_info(text)
    return DatasetSource(text, text, None, info, revision, commit)


def read_info(dataset: str | os.PathLike, root: str | os.PathLike | None = None) -> dict:
    return resolve_source(dataset, root).info


def _version_tuple(v: str) -> tuple[int, int]:
    parts = v.lstrip("vV").split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise DatasetVersionError(f"unreadable codebase_version {v!r} in meta/info.json") from None


def check_version(info: Mapping[str, Any], name: str = "the dataset") -> str:
    """Return the codebase version when lerobot 0.4.x can stream it, else raise :class:`DatasetVersionError`."""
    v = info.get("codebase_version")
    if not v:
        raise DatasetVersionError(f"{name}: meta/info.json has no codebase_version — not a LeRobot dataset")
    major, minor = _version_tuple(str(v))
    if major == 3:
        return str(v)
    lerobot_v = preflight.package_versions(("lerobot",)).get("lerobot") or "0.4.x"
    to_v30 = (f"v2.1→v3.0 with lerobot ≥ 0.4 (this one): `python -m lerobot.datasets.v30.convert_dataset_v21_to_v30 "
              f"--repo-id=<your copy> [--root=<local dir> --push-to-hub=false]`")
    if major == 2 and minor == 0:
        way = ("convert it in two steps: v2.0→v2.1 with lerobot 0.3.x in a separate venv (`pip install "
               "'lerobot>=0.3,<0.4'`; `python -m lerobot.datasets.v21.convert_dataset_v20_to_v21 --repo-id=<a hub copy "
               f"you can push to>`), then {to_v30}")
    elif major == 2:
        way = f"convert it: {to_v30}"
    elif major < 2:
        way = ("convert it with lerobot's historical scripts: v1.x→v2.0 (lerobot ≤ 0.2, lerobot/common/datasets/v2/"
               f"convert_dataset_v1_to_v2.py), v2.0→v2.1 (lerobot 0.3.x), then {to_v30}")
    else:
        raise DatasetVersionError(f"{name} is LeRobot {v}, newer than lerobot {lerobot_v} can read: upgrade lerobot")
    raise DatasetVersionError(
        f"{name} is a LeRobot {v} dataset; lerobot {lerobot_v} streams only v3.0. Way out: use BridgeData V2 in v3.0, "
        f"DATASET='{HUB_BRIDGE_V3}', or {way}"
    )


def require_torchcodec() -> None:
    """torchcodec (lerobot's video decoder) must load FFmpeg, else every stream yields zero frames."""
    res = preflight.check_torchcodec()
    if not res.ok:
        raise StreamError(f"{res.detail}. Fix: {res.fix}, then rerun `bash setup.sh`")

