"""Train / held-out splits from metadata alone (meta/episodes, meta/tasks, and our sidecar when present).

No frame or video is read: a split is a list of episode indices per group, so the stream decodes only what a split
allows and an evaluation set is fixed before training starts.

Two rules, picked by what the dataset carries:

* **Embedded world** (``meta/vla_bridge_episodes.jsonl`` present): the world's catalog decides. ``train`` = the
  "finetune" episodes, ``pretrain`` = the "pretrain" episodes (the tiny VLA's base is trained on those), and four
  evaluation groups: held-out task strings (unseen object–target pairs), the held-out object family, the unseen
  colour, and paraphrased instructions of the fine-tuning tasks. ``contrast`` holds "finetune_eval" when the build
  has it: FRESH episodes (new seeds) of a few fine-tuning tasks — not held out (their task strings are training
  strings, so the leakage check skips them), evaluated beside the held-out groups for contrast.
* **Hub Bridge** (no sidecar), deterministic and stated:
  - task strings are normalized (lower case, punctuation → space, whitespace collapsed); blank ones do not count;
  - **object holdout**: every episode whose normalized task contains the word ``heldout_object`` (default
    "eggplant", an object Bridge has in a few hundred episodes) is held out;
  - **task-string holdout**: rank the remaining non-blank normalized task strings by episode count (ties:
    alphabetical) and hold out the ones ranked 2nd, 4th, 6th, … (``n_heldout_tasks`` of them, default 3). Real,
    frequent tasks — with the most frequent one left in training;
  - ``train`` = every other episode with a non-blank task.
In both rules, episodes whose task string is blank are dropped from training and counted (OpenVLA also trains only
on language-labelled episodes), and :func:`assert_no_leakage` checks that no held-out task string appears among the
training task strings after normalization.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

from .source import _local_repo_id
from .tasks import normalize_task, verb_noun

HUB_HELDOUT_OBJECT = "eggplant"
HUB_N_HELDOUT_TASKS = 3
EMBEDDED_GROUPS = ("heldout", "heldout_family", "unseen_color", "paraphrase")
GROUP_TITLES = {
    "heldout": "held-out task strings",
    "heldout_family": "held-out object family",
    "unseen_color": "unseen colour",
    "paraphrase": "paraphrased instructions",
    "heldout_object": "held-out object",
    "finetune_eval": "fine-tuning tasks, fresh episodes",
}
# Groups of episodes of TRAINING tasks (not held out) that the evaluation reports for contrast.
CONTRAST_GROUPS = ("finetune_eval",)


class LeakageError(AssertionError):
    """A held-out task string is among the training task strings."""


def assert_no_leakage(train_tasks: Iterable[str], heldout_tasks: Iterable[str]) -> int:
    """Raise :class:`LeakageError` if a held-out task string (normalized) is among the training ones; return the
    number of distinct normalized held-out strings checked."""
    train = {normalize_task(t) for t in train_tasks} - {""}
    held = {normalize_task(t): t for t in heldout_tasks if normalize_task(t)}
    leaked = sorted(raw for norm, raw in held.items() if norm in train)
    if leaked:
        raise LeakageError(f"{len(leaked)} held-out task string(s) also appear in training (after normalizing case, "
                           f"whitespace and punctuation): {leaked[:5]}")
    return len(held)


@dataclasses.dataclass
class Split:
    """Episode indices per group, the task strings behind them and how they were chosen."""

    rule: str
    train: list[int]
    eval: dict[str, list[int]]
    pretrain: list[int] = dataclasses.field(default_factory=list)
    tasks: dict[int, str] = dataclasses.field(default_factory=dict)       # episode → task string as written
    lengths: dict[int, int] = dataclasses.field(default_factory=dict)     # episode → frames
    blank_dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)     # e.g. held-out object / colour
    # fresh episodes of training tasks (not held out, not leakage-checked): the evaluation's contrast rows
    contrast: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def frames(self, episodes: Sequence[int]) -> int:
        return int(sum(self.lengths.get(int(e), 0) for e in episodes))

    def task_strings(self, episodes: Sequence[int]) -> list[str]:
        return sorted({self.tasks.get(int(e), "") for e in episodes} - {""})

    @property
    def train_tasks(self) -> list[str]:
        return self.task_strings(self.train + self.pretrain)

    @property
    def heldout_tasks(self) -> dict[str, list[str]]:
        return {g: self.task_strings(eps) for g, eps in self.eval.items()}

    def check_leakage(self) -> int:
        """assert_no_leakage over every evaluation group; returns how many held-out strings were checked."""
        return assert_no_leakage(self.train_tasks, [t for ts in self.heldout_tasks.values() for t in ts])

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "details": self.details, "blank_dropped": self.blank_dropped,
            "train": {"episodes": self.train, "frames": self.frames(self.train),
                      "tasks": self.task_strings(self.train)},
            "pretrain": {"episodes": self.pretrain, "frames": self.frames(self.pretrain),
                         "tasks": self.task_strings(self.pretrain)},
            "eval": {g: {"episodes": eps, "frames": self.frames(eps), "tasks": self.task_strings(eps)}
                     for g, eps in self.eval.items()},
            "contrast": {g: {"episodes": eps, "frames": self.frames(eps), "tasks": self.task_strings(eps)}
                         for g, eps in self.contrast.items()},
        }

    def describe(self) -> str:
        def row(name: str, eps: Sequence[int], extra: str = "") -> str:
            return (f"{name:<26}: {len(eps):>6,} episodes {self.frames(eps):>8,} frames "
                    f"{len(self.task_strings(eps)):>5,} task strings{extra}")

        lines = [f"rule: {self.rule}"]
        blank = lambda k: f"  ({self.blank_dropped[k]} blank-task episodes dropped)" if self.blank_dropped.get(k) else ""  # noqa: E731
        lines.append(row("train", self.train, blank("train")))
        if self.pretrain:
            lines.append(row("pretrain (tiny VLA base)", self.pretrain, blank("pretrain")))
        for g, eps in self.eval.items():
            lines.append(row(GROUP_TITLES.get(g, g), eps, f"  {self.details.get(g, '')}".rstrip()))
        for g, eps in self.contrast.items():
            lines.append(row(GROUP_TITLES.get(g, g), eps, "  (training tasks, unseen seeds: contrast, not held out)"))
        for g, ts in self.heldout_tasks.items():
            shown = ", ".join(repr(t) for t in ts[:3]) + (f", … (+{len(ts) - 3})" if len(ts) > 3 else "")
            lines.append(f"  {GROUP_TITLES.get(g, g)}: {shown}")
        return "\n".join(lines)


def instruction_overlap(split: Split, parse=None) -> dict[str, Any]:
    """How much of the held-out instructions' vocabulary training saw: per evaluation group, the share of its
    episodes whose verb / object noun / whole task string occur in the training (train + pretrain) instructions.

    ``parse(task) -> {"verb": ..., "noun": ...}``; default :func:`vla_bridge.data.tasks.verb_noun` (the world's parser on
    the embedded world, a first-verb / last-noun heuristic on Bridge). Blank tasks are skipped. A held-out split
    whose verbs and nouns were all trained measures recombination, not new concepts; this says which one it is."""
    if parse is None:
        world_mode = split.rule.startswith("embedded")
        parse = lambda t: verb_noun(t, world_mode)  # noqa: E731
    train_eps = [e for e in split.train + split.pretrain if normalize_task(split.tasks.get(int(e), ""))]
    parsed_train = [parse(split.tasks[int(e)]) for e in train_eps]
    verbs = {p["verb"] for p in parsed_train if p["verb"]}
    nouns = {p["noun"] for p in parsed_train if p["noun"]}
    train_strings = {normalize_task(split.tasks[int(e)]) for e in train_eps}
    out: dict[str, Any] = {"train_verbs": sorted(verbs), "train_nouns": sorted(nouns), "groups": {}}
    for g, eps in {**split.eval, **split.contrast}.items():
        rows = [(normalize_task(split.tasks.get(int(e), "")), parse(split.tasks.get(int(e), ""))) for e in eps]
        rows = [(t, p) for t, p in rows if t]
        n = len(rows)
        share = lambda hits: (hits / n) if n else float("nan")  # noqa: E731
        out["groups"][g] = {
            "n_episodes": n,
            "verb_seen": share(sum(p["verb"] in verbs for _, p in rows)),
            "noun_seen": share(sum(p["noun"] in nouns for _, p in rows)),
            "string_seen": share(sum(t in train_strings for t, _ in rows)),
            "unseen_nouns": sorted({p["noun"] for _, p in rows if p["noun"] and p["noun"] not in nouns}),
            "unseen_verbs": sorted({p["verb"] for _, p in rows if p["verb"] and p["verb"] not in verbs}),
        }
    return out


# --------------------------------------------------------------------------------------------------- metadata


def _episodes_table(meta) -> list[dict]:
    """[{episode_index, task, length}] from lerobot metadata (meta/episodes; first task of each episode)."""
    cols = [c for c in ("episode_index", "tasks", "length") if c in meta.episodes.column_names]
    df = meta.episodes.select_columns(cols).to_pandas()
    out = []
    for row in df.itertuples(index=False):
        tasks = list(getattr(row, "tasks", []) or [])
        out.append({"episode_index": int(row.episode_index), "task": str(tasks[0]) if tasks else "",
                    "length": int(row.length)})
    return out


def _load_meta(dataset_or_meta: Any, root: str | Path | None = None):
    """Accept a LeRobotDatasetMetadata, anything with ``.meta`` (a dataset), or a local root path."""
    if hasattr(dataset_or_meta, "episodes") and hasattr(dataset_or_meta, "tasks"):
        return dataset_or_meta
    if hasattr(dataset_or_meta, "meta"):
        return dataset_or_meta.meta
    path = Path(root or dataset_or_meta)
    return LeRobotDatasetMetadata(_local_repo_id(path), root=path)


def _sidecar(meta) -> list[dict] | None:
    p = Path(meta.root) / "meta" / "vla_bridge_episodes.jsonl"
    if not p.is_file():
        return None
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------- rules


def embedded_split(meta, sidecar: list[dict]) -> Split:
    """The world's catalog, read from the sidecar (episode → split) and meta/episodes (lengths, tasks)."""
    table = {r["episode_index"]: r for r in _episodes_table(meta)}
    by_split: dict[str, list[int]] = {}
    blank: dict[str, int] = {}
    tasks, lengths = {}, {}
    details: dict[str, Any] = {}
    for r in sorted(sidecar, key=lambda r: r["episode_index"]):
        e = int(r["episode_index"])
        tasks[e] = table.get(e, {}).get("task", r.get("task", ""))
        lengths[e] = table.get(e, {}).get("length", r.get("length", 0))
        s = r["split"]
        if s in ("pretrain", "finetune") and not tasks[e].strip():
            key = "train" if s == "finetune" else "pretrain"
            blank[key] = blank.get(key, 0) + 1
            continue
        by_split.setdefault(s, []).append(e)
        if s == "heldout_family":
            details[s] = f"(family: {r['family']})"
        if s == "unseen_color":
            details[s] = f"(colour: {r['color']})"
    return Split(
        rule="embedded world catalog (meta/vla_bridge_episodes.jsonl): train = finetune episodes",
        train=by_split.get("finetune", []),
        pretrain=by_split.get("pretrain", []),
        eval={g: by_split.get(g, []) for g in EMBEDDED_GROUPS},
        tasks=tasks, lengths=lengths, blank_dropped=blank, details=details,
        contrast={g: by_split[g] for g in CONTRAST_GROUPS if by_split.get(g)},
    )


def hub_split(meta, heldout_object: str = HUB_HELDOUT_OBJECT, n_heldout_tasks: int = HUB_N_HELDOUT_TASKS) -> Split:
    """The stated rule for a dataset without our sidecar (the hub's Bridge): see the module docstring."""
    rows = _episodes_table(meta)
    tasks = {r["episode_index"]: r["task"] for r in rows}
    lengths = {r["episode_index"]: r["length"] for r in rows}
    obj = normalize_task(heldout_object)
    norm = {e: normalize_task(t) for e, t in tasks.items()}
    has_obj = {e for e, t in norm.items() if obj and obj in t.split()}
    counts = Counter(t for e, t in norm.items() if t and e not in has_obj)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    picked = ranked[1::2][:n_heldout_tasks]
    if len(picked) < n_heldout_tasks:
        raise ValueError(f"only {len(ranked)} distinct non-blank task strings: cannot hold out {n_heldout_tasks}")
    picked_set = set(picked)
    train, held, held_obj, blank = [], [], [], 0
    for e in sorted(tasks):
        t = norm[e]
        if e in has_obj:
            held_obj.append(e)
        elif t in picked_set:
            held.append(e)
        elif not t:
            blank += 1
        else:
            train.append(e)
    rule = (f"hub rule: object holdout = tasks containing {obj!r}; task holdout = non-blank normalized task strings "
            f"ranked 2nd, 4th, 6th… by episode count ({n_heldout_tasks}); train = the rest with a task")
    return Split(
        rule=rule, train=train, eval={"heldout": held, "heldout_object": held_obj},
        tasks=tasks, lengths=lengths, blank_dropped={"train": blank},
        details={"heldout": "(ranks " + ", ".join(f"{2 * i + 2}: {counts[t]} eps" for i, t in enumerate(picked)) + ")",
                 "heldout_object": f"(object: {obj})"},
    )


def make_split(dataset_or_meta: Any, root: str | Path | None = None, *, check: bool = True, **hub_kwargs: Any) -> Split:
    """The split for a dataset: the embedded rule when our sidecar is there, else the hub rule. ``check`` runs the
    leakage assertion before returning."""
    meta = _load_meta(dataset_or_meta, root)
    side = _sidecar(meta)
    split = embedded_split(meta, side) if side is not None else hub_split(meta, **hub_kwargs)
    if check:
        split.details["leakage_checked"] = split.check_leakage()
    return split
