"""Task families, objects, targets and instructions of the embedded world, and its splits.

The vocabulary (``FAMILIES``, ``COLORS``, ``TARGETS`` and the held-out ones), Bridge-style task strings
(``task_string``, ``parse_task``, ``canonical_task``, ``paraphrases``) and the task splits (``TaskSplits``,
``task_catalog``, ``SPLITS``): pretrain / finetune (disjoint sets of colour x family x target tasks over the
training vocabulary), held-out task strings (unseen object-target pairs whose object and target are trained in
other combos), a held-out family, an unseen colour, and paraphrased instructions.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from itertools import product

import numpy as np

from .conventions import WORLD_VERSION

# ----------------------------------------------------------------------------------------------------
# Vocabulary and task strings
# ----------------------------------------------------------------------------------------------------
FAMILIES = ("block", "carrot", "cup", "cloth", "spoon")
HELDOUT_FAMILY = "banana"
ALL_FAMILIES = FAMILIES + (HELDOUT_FAMILY,)
COLORS = ("red", "green", "blue", "yellow")
UNSEEN_COLOR = "purple"
ALL_COLORS = COLORS + (UNSEEN_COLOR,)
TARGETS = ("plate", "pot", "towel")
_FAMILY_WORDS = set(ALL_FAMILIES)

COLOR_RGB = {
    "red": (205, 38, 38),
    "green": (40, 165, 60),
    "blue": (40, 85, 215),
    "yellow": (240, 200, 30),
    "purple": (140, 55, 185),
}

# Unseen object-target pairs (each object and target is trained with other partners).
HELDOUT_TRIPLES = (
    ("green", "carrot", "towel"),
    ("blue", "cup", "plate"),
    ("red", "spoon", "pot"),
    ("yellow", "cloth", "plate"),
    ("red", "block", "towel"),
)
HELDOUT_FAMILY_TRIPLES = (
    ("yellow", HELDOUT_FAMILY, "plate"),
    ("red", HELDOUT_FAMILY, "pot"),
    ("green", HELDOUT_FAMILY, "towel"),
    ("blue", HELDOUT_FAMILY, "plate"),
)
UNSEEN_COLOR_TRIPLES = (
    (UNSEEN_COLOR, "block", "plate"),
    (UNSEEN_COLOR, "carrot", "pot"),
    (UNSEEN_COLOR, "cup", "towel"),
    (UNSEEN_COLOR, "spoon", "plate"),
    (UNSEEN_COLOR, "cloth", "pot"),
)

SPLIT_NAMES = ("pretrain", "finetune", "heldout", "heldout_family", "unseen_color", "paraphrase")
_SPLIT_ALIASES = {"heldout_tasks": "heldout", "held_out": "heldout", "paraphrases": "paraphrase"}

# Canonical templates (one is assigned per task) and the extra paraphrase templates.
# {obj} = "red block", {prep} = "in" for the pot, "on" otherwise, {onto} = "into"/"onto".
_CANONICAL_TEMPLATES = (
    "put the {obj} {prep} the {target}",
    "move the {obj} to the {target}",
    "place the {obj} {prep} the {target}",
)
_PARAPHRASE_TEMPLATES = _CANONICAL_TEMPLATES + (
    "pick up the {obj} and put it {prep} the {target}",
    "place the {obj} {onto} the {target}",
    "grab the {obj} and drop it {prep} the {target}",
    "transfer the {obj} to the {target}",
    "can you put the {obj} {prep} the {target}?",
    "set the {obj} down {prep} the {target}",
    "move the {family} that is {color} to the {target}",
)
_VERBS = {"put": "put", "move": "move", "place": "place", "pick": "pick up", "grab": "grab",
          "transfer": "transfer", "set": "set", "drop": "drop"}


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def _fill(template: str, color: str | None, family: str, target: str) -> str:
    obj = f"{color} {family}" if color else family
    prep = "in" if target == "pot" else "on"
    onto = "into" if target == "pot" else "onto"
    return template.format(obj=obj, prep=prep, onto=onto, target=target, family=family, color=color or "")


def task_string(color: str | None, family: str, target: str, template: int | None = None) -> str:
    """The canonical Bridge-style task string of (colour, family, target).

    The verb template is a fixed function of the triple (so every task has exactly one canonical string);
    pass ``template`` (0..2) to force one.
    """
    if template is None:
        template = _crc(f"{color}|{family}|{target}") % len(_CANONICAL_TEMPLATES)
    return _fill(_CANONICAL_TEMPLATES[template], color, family, target)


def parse_task(task: str | None) -> dict:
    """Parse any string the world generates (canonical or paraphrase) into verb/colour/family/target.

    Returns ``{"verb", "color", "family", "target"}``; fields that are absent (e.g. the blank task "")
    are None. Word-based, so it is robust to punctuation and word order.
    """
    out = {"verb": None, "color": None, "family": None, "target": None}
    if not task:
        return out
    for w in re.findall(r"[a-z]+", task.lower()):
        if out["verb"] is None and w in _VERBS:
            out["verb"] = _VERBS[w]
        elif out["color"] is None and w in COLOR_RGB:
            out["color"] = w
        elif out["family"] is None and w in _FAMILY_WORDS:
            out["family"] = w
        elif out["target"] is None and w in TARGETS:
            out["target"] = w
    return out


def canonical_task(task: str) -> str:
    """Map any parseable task string (e.g. a paraphrase) to its canonical string; "" stays ""."""
    p = parse_task(task)
    if p["family"] is None or p["target"] is None:
        return task
    return task_string(p["color"], p["family"], p["target"])


def paraphrases(task: str) -> list[str]:
    """Other phrasings of ``task`` (all parse to the same colour, family and target). [] for blank."""
    p = parse_task(task)
    if p["family"] is None or p["target"] is None:
        return []
    out: list[str] = []
    for tpl in _PARAPHRASE_TEMPLATES:
        if "{color}" in tpl and not p["color"]:
            continue
        s = _fill(tpl, p["color"], p["family"], p["target"])
        if s != task and s not in out:
            out.append(s)
    return out


# ----------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSplits:
    """Task strings of each split (canonical strings; the paraphrase split uses the finetune tasks)."""

    pretrain: tuple[str, ...]
    finetune: tuple[str, ...]
    heldout_tasks: tuple[str, ...]
    heldout_family: str
    unseen_color: str
    heldout_family_tasks: tuple[str, ...]
    unseen_color_tasks: tuple[str, ...]
    seed: int = 0

    def tasks(self, split: str) -> tuple[str, ...]:
        split = _SPLIT_ALIASES.get(split, split)
        table = {
            "pretrain": self.pretrain,
            "finetune": self.finetune,
            "heldout": self.heldout_tasks,
            "heldout_family": self.heldout_family_tasks,
            "unseen_color": self.unseen_color_tasks,
            "paraphrase": self.finetune,
        }
        if split not in table:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLIT_NAMES}")
        return table[split]

    def split_of(self, task: str) -> str | None:
        """Which split a task string (canonical or paraphrase) belongs to; None for blank/unknown."""
        canon = canonical_task(task)
        for name in ("pretrain", "finetune", "heldout", "heldout_family", "unseen_color"):
            if canon in self.tasks(name):
                return "paraphrase" if (name == "finetune" and canon != task) else name
        return None

    @property
    def training(self) -> tuple[str, ...]:
        return self.pretrain + self.finetune

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "pretrain": list(self.pretrain),
            "finetune": list(self.finetune),
            "heldout_tasks": list(self.heldout_tasks),
            "heldout_family": self.heldout_family,
            "heldout_family_tasks": list(self.heldout_family_tasks),
            "unseen_color": self.unseen_color,
            "unseen_color_tasks": list(self.unseen_color_tasks),
            "paraphrase_tasks": list(self.finetune),
            "world_version": WORLD_VERSION,
        }


def task_catalog(seed: int = 0, n_finetune: int = 16) -> TaskSplits:
    """Build the splits. Deterministic in ``seed``.

    The 60 training-vocabulary triples (4 colours x 5 families x 3 targets) minus the held-out task
    triples are shuffled and split into finetune (``n_finetune``) and pretrain (the rest), with every
    finetune object and target also present in pretrain.
    """
    held = set(HELDOUT_TRIPLES)
    triples = [t for t in product(COLORS, FAMILIES, TARGETS) if t not in held]
    rng = np.random.default_rng([seed, 7])
    for _ in range(1000):
        order = rng.permutation(len(triples))
        ft = [triples[i] for i in order[:n_finetune]]
        pt = [triples[i] for i in order[n_finetune:]]
        pt_objects = {(c, f) for c, f, _ in pt}
        pt_targets = {t for _, _, t in pt}
        if all((c, f) in pt_objects and t in pt_targets for c, f, t in ft):
            break
    else:  # pragma: no cover - cannot happen with the default vocabulary
        raise RuntimeError("could not build a covering split")

    def as_str(ts):
        order = sorted(ts, key=lambda t: (ALL_COLORS.index(t[0]), ALL_FAMILIES.index(t[1]), TARGETS.index(t[2])))
        return tuple(task_string(*t) for t in order)

    return TaskSplits(
        pretrain=as_str(pt),
        finetune=as_str(ft),
        heldout_tasks=tuple(task_string(*t) for t in HELDOUT_TRIPLES),
        heldout_family=HELDOUT_FAMILY,
        unseen_color=UNSEEN_COLOR,
        heldout_family_tasks=tuple(task_string(*t) for t in HELDOUT_FAMILY_TRIPLES),
        unseen_color_tasks=tuple(task_string(*t) for t in UNSEEN_COLOR_TRIPLES),
        seed=seed,
    )


SPLITS = task_catalog(0)
PRETRAIN_TASKS = SPLITS.pretrain
FINETUNE_TASKS = SPLITS.finetune
HELDOUT_TASKS = SPLITS.heldout_tasks
HELDOUT_FAMILY_TASKS = SPLITS.heldout_family_tasks
UNSEEN_COLOR_TASKS = SPLITS.unseen_color_tasks
