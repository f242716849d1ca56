"""Action (and proprio) statistics in OpenVLA's ``norm_stats`` layout, saved as ``dataset_statistics.json``.

OpenVLA normalizes each action dimension with its 1st / 99th percentiles (q01 → -1, q99 → +1, clipped) except
where ``mask`` is False: Bridge's gripper (index 6) is already in [0, 1] and passes through untouched. The model
de-normalizes its predictions with the same numbers, looked up under an ``unnorm_key`` — so the statistics the
training normalized with are saved next to the adapter and registered under that key.

The definition is upstream OpenVLA's (``prismatic/vla/datasets/rlds/utils/data_utils.py: get_dataset_statistics``):
the action rows of every transition concatenated, then ``mean`` / ``std`` (population) / ``min`` / ``max`` and
``np.quantile(actions, 0.01 | 0.99, axis=0)`` over them. One deliberate difference: upstream pools every split of
the RLDS dataset; here the transitions are the TRAINING split's, so the held-out evaluation episodes do not shape
the normalization they are evaluated under.

Where the numbers come from (``source``):

* ``"auto"`` / ``"stream"`` (the default) — one pass over the ``episodes`` given (the training split), reading only
  the Parquet columns (no video is decoded), exact quantiles; cached under ``cache_dir`` by the dataset's revision
  (hub: the commit sha; local: a fingerprint of its metadata and data files) and the episode list. When
  ``meta/stats.json`` has quantiles, its figures are attached as ``entry["lerobot"]`` for a printed comparison only:
  lerobot 0.4.4 stores the frame-weighted MEAN of per-episode (histogram) quantiles over ALL episodes — narrower
  than the true quantiles, and it includes the held-out split;
* ``"meta"`` — ``meta/stats.json`` itself (whole dataset), for when that is really what is wanted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..jsonio import to_jsonable
from ..paths import STATS_FILENAME
from .schema import feature_names

ACTION_KEY = "action"
STATE_KEY = "observation.state"
GRIPPER_MASK = [True] * 6 + [False]           # OpenVLA bridge_orig: normalize xyz + rotation, not the gripper
STAT_FIELDS = ("mean", "std", "max", "min", "q01", "q99")
# The statistics predict_action needs per action dimension (mask is optional upstream: all True when absent).
REQUIRED_ACTION_STATS = ("q01", "q99")


def action_mask(dim: int) -> list[bool]:
    """[True]*6 + [False] for Bridge's 7-dim action; every other layout normalizes all but its last dimension."""
    return list(GRIPPER_MASK) if dim == 7 else [True] * (dim - 1) + [False]


def _fields(entry: Mapping[str, Any]) -> dict[str, list[float]]:
    return {k: [float(v) for v in np.asarray(entry[k], dtype=np.float64).reshape(-1)] for k in STAT_FIELDS}


def _exact(x: np.ndarray) -> dict[str, list[float]]:
    x = np.asarray(x, dtype=np.float64)
    q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "max": x.max(0).tolist(), "min": x.min(0).tolist(),
            "q01": q01.tolist(), "q99": q99.tolist()}


def _meta_root(ds_or_root: Any) -> Path | None:
    meta = getattr(ds_or_root, "meta", None)
    if meta is not None:
        return Path(meta.root)
    if isinstance(ds_or_root, (str, os.PathLike)) and Path(ds_or_root).is_dir():
        return Path(ds_or_root)
    return None


def stats_from_meta(root: str | os.PathLike) -> dict[str, Any] | None:
    """The norm_stats entry from meta/stats.json, or None when it lacks action q01/q99."""
    path = Path(root) / "meta" / "stats.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    act = raw.get(ACTION_KEY, {})
    if not all(k in act for k in STAT_FIELDS):
        return None
    info = json.loads((Path(root) / "meta" / "info.json").read_text())
    build = Path(root) / "meta" / "vla_bridge_build.json"
    action = _fields(act)
    action["mask"] = action_mask(len(action["q01"]))
    entry: dict[str, Any] = {"action": action}
    st = raw.get(STATE_KEY, {})
    if all(k in st for k in STAT_FIELDS):
        entry["proprio"] = _fields(st)
    count = act.get("count")
    entry["num_transitions"] = int(np.asarray(count).reshape(-1)[0]) if count is not None else int(info["total_frames"])
    entry["num_trajectories"] = int(info["total_episodes"])
    entry["source"] = "meta/stats.json (all episodes)"
    entry["quantiles_exact"] = build.is_file()
    return entry


def stats_from_stream(ds, episodes: Sequence[int] | None = None, batch_size: int = 10_000) -> dict[str, Any]:
    """Exact statistics over ``episodes`` (default: the ones ``ds`` streams) from the parquet columns only."""
    hf = ds._unfiltered if hasattr(ds, "_unfiltered") else ds.hf_dataset
    allowed = None if episodes is None else frozenset(int(e) for e in episodes)
    if allowed is None and hasattr(ds, "selected_episodes"):
        allowed = frozenset(int(e) for e in ds.selected_episodes)
    cols = [c for c in (ACTION_KEY, STATE_KEY, "episode_index") if c in ds.meta.features]
    acts, states, eps = [], [], set()
    for batch in hf.select_columns(cols).iter(batch_size=batch_size):
        e = np.asarray(batch["episode_index"])
        keep = np.ones(len(e), bool) if allowed is None else np.isin(e, list(allowed))
        if not keep.any():
            continue
        acts.append(np.asarray(batch[ACTION_KEY], dtype=np.float64)[keep])
        if STATE_KEY in batch:
            states.append(np.asarray(batch[STATE_KEY], dtype=np.float64)[keep])
        eps.update(int(x) for x in e[keep])
    if not acts:
        raise ValueError("no frames in the requested episodes: cannot compute action statistics")
    return stats_from_arrays(np.concatenate(acts), np.concatenate(states) if states else None, len(eps),
                             source=f"exact over {len(eps)} episodes' transitions (one pass over the Parquet "
                                    "columns, no video decoded)")


def stats_from_arrays(actions: np.ndarray, states: np.ndarray | None = None, num_trajectories: int = 0,
                      source: str = "arrays") -> dict[str, Any]:
    """The norm_stats entry of in-memory ``actions`` (N, D) (and ``states``): exact quantiles, the gripper mask."""
    a = np.asarray(actions, dtype=np.float64)
    if a.ndim != 2 or not len(a):
        raise ValueError(f"actions must be a non-empty (N, D) array, got shape {a.shape}")
    action = _exact(a)
    action["mask"] = action_mask(a.shape[1])
    entry: dict[str, Any] = {"action": action}
    if states is not None:
        entry["proprio"] = _exact(np.asarray(states, dtype=np.float64))
    entry.update(num_transitions=int(a.shape[0]), num_trajectories=int(num_trajectories), source=source,
                 quantiles_exact=True)
    return entry


STATS_CACHE_FORMAT = 1   # bump when the definition or the cached layout changes


def dataset_fingerprint(ds_or_root: Any) -> str:
    """What identifies the dataset's content: ``hub:<repo>@<commit sha>`` (or the revision name when the sha is not
    known), or for a local root ``local:<sha256>`` of meta/info.json, meta/episodes (per-episode lengths and stats,
    rewritten by lerobot whenever the data change) and the data files' names and sizes."""
    source = getattr(ds_or_root, "source", None)
    if source is not None and getattr(source, "root", None) is None:
        rev = getattr(source, "commit", None) or getattr(source, "revision", None) or "main"
        return f"hub:{source.repo_id}@{rev}"
    root = _meta_root(ds_or_root)
    if root is None:
        raise ValueError(f"cannot fingerprint {ds_or_root!r}: neither an opened stream nor a local dataset root")
    h = hashlib.sha256()
    h.update((root / "meta" / "info.json").read_bytes())
    for p in sorted((root / "meta" / "episodes").rglob("*.parquet")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    for p in sorted((root / "data").rglob("*.parquet")):
        h.update(f"{p.relative_to(root)}:{p.stat().st_size}".encode())
    return f"local:{h.hexdigest()[:24]}"


def _episodes_key(episodes: Sequence[int]) -> str:
    return hashlib.sha256(",".join(str(int(e)) for e in sorted(set(episodes))).encode()).hexdigest()[:12]


def stats_cache_path(cache_dir: str | os.PathLike, fingerprint: str, episodes: Sequence[int]) -> Path:
    fp = hashlib.sha256(f"{STATS_CACHE_FORMAT}|{fingerprint}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"action_stats-{fp}-{_episodes_key(episodes)}.json"


def _lerobot_figures(ds: Any) -> dict[str, Any] | None:
    root = _meta_root(ds)
    if root is None:
        return None
    with_q = stats_from_meta(root)
    if with_q is None:
        return None
    return {"action": {k: with_q["action"][k] for k in STAT_FIELDS}, "quantiles_exact": with_q["quantiles_exact"],
            "num_trajectories": with_q["num_trajectories"], "num_transitions": with_q["num_transitions"]}


def compute_action_stats(ds, episodes: Sequence[int] | None = None, source: str = "auto",
                         cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The norm_stats entry ``{"action": {...,"mask"}, "proprio": {...}, "num_transitions", "num_trajectories"}``
    plus ``source`` / ``quantiles_exact`` / ``lerobot`` (dropped when saving). ``ds``: an opened stream (or a local
    root for ``source="meta"``); ``episodes``: the training split (default: the episodes ``ds`` streams)."""
    if source not in ("auto", "meta", "stream"):
        raise ValueError(f"source={source!r}: expected auto, meta or stream")
    if source == "meta":
        root = _meta_root(ds)
        entry = stats_from_meta(root) if root is not None else None
        if entry is None:
            raise ValueError("meta/stats.json has no q01/q99 for 'action': use source='stream'")
        return entry
    if episodes is None:
        episodes = list(getattr(ds, "selected_episodes", []) or [])
    cache = None
    if cache_dir is not None and episodes:
        fingerprint = dataset_fingerprint(ds)
        cache = stats_cache_path(cache_dir, fingerprint, episodes)
        if cache.is_file():
            with contextlib.suppress(ValueError, KeyError):
                saved = json.loads(cache.read_text())
                if saved["fingerprint"] == fingerprint and saved["episodes"] == sorted(int(e) for e in episodes):
                    entry = saved["entry"]
                    entry["source"] = f"{entry['source']}; cached in {cache}"
                    return entry
    entry = stats_from_stream(ds, episodes or None)
    lerobot = _lerobot_figures(ds)
    if lerobot is not None:
        entry["lerobot"] = lerobot
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"format": STATS_CACHE_FORMAT, "fingerprint": fingerprint,
                                   "episodes": sorted(int(e) for e in episodes), "entry": entry}))
        tmp.replace(cache)
    return entry


def norm_stats_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Only OpenVLA's keys, lists of floats (what goes into dataset_statistics.json / model.config.norm_stats)."""
    out: dict[str, Any] = {"action": {k: [float(x) for x in entry["action"][k]] for k in STAT_FIELDS}}
    out["action"]["mask"] = [bool(m) for m in entry["action"]["mask"]]
    if entry.get("proprio"):
        out["proprio"] = {k: [float(x) for x in entry["proprio"][k]] for k in STAT_FIELDS}
    out["num_transitions"] = int(entry["num_transitions"])
    out["num_trajectories"] = int(entry["num_trajectories"])
    return out


def validated_entry(stats_entry: Mapping[str, Any]) -> dict[str, Any]:
    """OpenVLA's layout ``{"action": {q01, q99, mask?, mean?, ...}, "proprio"?: ..., ...}``, as plain JSON types."""
    entry = to_jsonable(stats_entry)
    if "action" not in entry and "q01" in entry:   # the inner action dict was passed
        entry = {"action": entry}
    action = entry.get("action")
    if not isinstance(action, Mapping):
        raise ValueError(f"statistics entry needs an 'action' dict (OpenVLA layout); got keys {sorted(entry)}")
    missing = [k for k in REQUIRED_ACTION_STATS if k not in action]
    if missing:
        raise ValueError(f"action statistics lack {missing}; predict_action de-normalizes with q01/q99 (+ mask)")
    dim = len(action["q01"])
    for k, v in action.items():
        if isinstance(v, list) and len(v) != dim:
            raise ValueError(f"action statistic {k!r} has {len(v)} values but q01 has {dim}")
    if "mask" in action:
        action["mask"] = [bool(m) for m in action["mask"]]
    return entry


def save_dataset_statistics(path: str | os.PathLike, norm_stats: Mapping[str, Mapping[str, Any]]) -> Path:
    """The one writer of ``dataset_statistics.json``: ``{unnorm_key: entry, ...}`` in OpenVLA's layout, each entry
    validated, written atomically. ``path`` may be a directory (a checkpoint, an adapter, a run's logs), then the
    file goes inside it. A dataset's freshly computed entry goes in as ``{key: norm_stats_entry(entry)}``."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / STATS_FILENAME
    payload = {str(k): validated_entry(v) for k, v in norm_stats.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path

def load_dataset_statistics(path: str | os.PathLike, unnorm_key: str | None = None) -> dict[str, Any]:
    """The one reader of ``dataset_statistics.json`` (``path``: the file or the directory holding it): the whole
    file, or one key's entry. A missing file or key is a one-line error that says what is missing."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / STATS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint or adapter needs the statistics it was trained with")
    data = json.loads(path.read_text())
    if unnorm_key is None:
        return data
    if unnorm_key not in data:
        raise KeyError(f"unnorm_key {unnorm_key!r} not in {path}; available: {sorted(data)}")
    return data[unnorm_key]

def format_stats_table(entry: Mapping[str, Any], names: Any = None) -> str:
    """Per-dimension q01 / q99 / mean / std / min / max and whether the dimension is normalized. ``names``: the
    action feature's spec or its ``names`` (a list, or the dict form ``{"motors": [...]}``; see
    ``schema.feature_names``)."""
    a = entry["action"]
    dim = len(a["q01"])
    names = feature_names(names, dim)
    head = f"{'dim':<8}{'q01':>10}{'q99':>10}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}  normalized"
    rows = [head, "-" * len(head)]
    for i in range(dim):
        rows.append(f"{names[i]:<8}" + "".join(f"{a[k][i]:>10.4f}" for k in ("q01", "q99", "mean", "std", "min", "max"))
                    + f"  {'yes (q01→-1, q99→+1)' if a['mask'][i] else 'no (passes through)'}")
    src = entry.get("source")
    if src:
        exact = entry.get("quantiles_exact")
        rows.append(f"source: {src}; {entry['num_transitions']:,} transitions, {entry['num_trajectories']:,} "
                    f"trajectories; quantiles {'exact' if exact else 'lerobot-aggregated (mean of per-episode)'}")
    lr = entry.get("lerobot")
    if lr:
        how = ("exact, all episodes" if lr.get("quantiles_exact") else
               "lerobot's mean of per-episode quantiles over all episodes, held-out included")
        rows += ["", f"for comparison only, meta/stats.json ({how}; {lr['num_trajectories']:,} trajectories) — "
                     "not used for normalization:",
                 f"{'dim':<8}{'q01':>10}{'q99':>10}  {'width vs the q01..q99 used':>26}"]
        for i in range(dim):
            used = a["q99"][i] - a["q01"][i]
            width = lr["action"]["q99"][i] - lr["action"]["q01"][i]
            ratio = f"{width / used:>25.2f}x" if used > 0 else f"{'-':>26}"
            rows.append(f"{names[i]:<8}{lr['action']['q01'][i]:>10.4f}{lr['action']['q99'][i]:>10.4f}  {ratio}")
    return "\n".join(rows)
