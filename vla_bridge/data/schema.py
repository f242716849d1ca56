"""What a LeRobot dataset holds, read from its metadata: the main camera, the task table, feature names, the schema.

:func:`feature_names` is THE one reading of a feature's ``names`` in this package (lists, or the dict of lists of
v2-era conversions); :func:`schema` / :func:`format_schema` are what the notebook prints about an opened stream.
"""

from __future__ import annotations

from typing import Any, Mapping

MAIN_CAMERA = "observation.images.image_0"


def task_table(meta) -> dict[int, str]:
    """task_index → task string, from meta/tasks (a DataFrame indexed by the task string)."""
    tasks = meta.tasks
    return {int(ti): str(task) for task, ti in zip(tasks.index, tasks["task_index"])}


def feature_names(feature: Any, dim: int | None = None) -> list[str]:
    """Per-dimension names of a LeRobot feature — THE one reading of a feature's ``names`` in this package.

    ``feature``: a feature spec from ``meta/info.json`` (a mapping with ``shape`` / ``dtype`` / ``names``) or its
    ``names`` value alone. ``names`` is a list, or — in v2-era conversions such as IPEC's Bridge — a dict of lists
    (``{"motors": [...]}``), whose lists are joined in order. The dimension count is the spec's ``shape[0]`` (or
    ``dim``); names that do not give exactly that many strings (none, a dict of non-lists, the wrong count) fall back
    to ``a0 … a{dim-1}``. Without any dimension count, whatever names there are come back ([] when none)."""
    names = feature
    if isinstance(feature, Mapping) and ("shape" in feature or "dtype" in feature or "names" in feature):
        names = feature.get("names")
        if dim is None and feature.get("shape"):
            dim = int(feature["shape"][0])
    if isinstance(names, Mapping):  # {"motors": [...]} (several lists: concatenated)
        lists = [v for v in names.values() if isinstance(v, (list, tuple))]
        names = [n for v in lists for n in v] if lists else None
    out = [str(n) for n in names] if isinstance(names, (list, tuple)) else []
    if dim is not None and len(out) != int(dim):
        return [f"a{i}" for i in range(int(dim))]
    return out


def schema(ds) -> dict[str, Any]:
    """What the notebook prints about a dataset: cameras, vectors, fps, counts and the first frames' tasks."""
    info, meta = ds.meta.info, ds.meta
    cams = {}
    for key in meta.camera_keys:
        ft = info["features"][key]
        vinfo = ft.get("info") or ft.get("video_info") or {}
        cams[key] = {"shape": list(ft["shape"]), "dtype": ft["dtype"], "codec": vinfo.get("video.codec")}
    vectors = {}
    for key in ("observation.state", "action"):
        if key in info["features"]:
            ft = info["features"][key]
            vectors[key] = {"dim": int(ft["shape"][0]), "names": feature_names(ft.get("names"))}
    tasks = task_table(meta)
    first = []
    for fr in getattr(ds, "first_frames", []) or []:
        ti = int(fr["task_index"])
        first.append({"episode_index": int(fr["episode_index"]), "frame_index": int(fr["frame_index"]),
                      "task_index": ti, "task": tasks.get(ti, "?")})
    return {
        "dataset": getattr(getattr(ds, "source", None), "dataset", ds.repo_id),
        "codebase_version": info.get("codebase_version"),
        "robot_type": info.get("robot_type"),
        "fps": info.get("fps"),
        "cameras": cams,
        "vectors": vectors,
        "total_episodes": int(info.get("total_episodes", 0)),
        "total_frames": int(info.get("total_frames", 0)),
        "total_tasks": len(tasks),
        "blank_tasks": sum(1 for t in tasks.values() if not t.strip()),
        "streamed_episodes": ds.num_episodes,
        "streamed_frames": ds.num_frames,
        "first_frames": first,
    }


def format_schema(s: Mapping[str, Any]) -> str:
    lines = [f"dataset          : {s['dataset']}  (LeRobot {s['codebase_version']}, robot {s['robot_type']}, "
             f"{s['fps']} fps)"]
    for key, c in s["cameras"].items():
        h, w, ch = (c["shape"] + [None, None, None])[:3]
        lines.append(f"camera           : {key:<28} {h}x{w}x{ch} {c['dtype']}" + (f" ({c['codec']})" if c["codec"] else ""))
    for key, v in s["vectors"].items():
        names = " ".join(v["names"]) if v["names"] else "(unnamed)"
        lines.append(f"{key:<17}: {v['dim']} floats: {names}")
    lines.append(f"episodes / frames: {s['total_episodes']:,} / {s['total_frames']:,}  "
                 f"(this stream: {s['streamed_episodes']:,} / {s['streamed_frames']:,})")
    lines.append(f"tasks            : {s['total_tasks']:,} distinct strings, {s['blank_tasks']} blank")
    for f in s["first_frames"]:
        lines.append(f"first frames     : episode {f['episode_index']} frame {f['frame_index']}: task_index "
                     f"{f['task_index']} → {f['task']!r} (meta/tasks)")
    return "\n".join(lines)
