"""Splits from metadata alone: the embedded catalog, the hub rule, blank-task filtering and the leakage check."""

from __future__ import annotations

import datasets
import pandas as pd
import pytest

from vla_bridge.data import build, splits, world
from vla_bridge.data.tasks import normalize_task

SMALL = {"pretrain": 20, "finetune": 16, "heldout": 5, "heldout_family": 5, "unseen_color": 5, "paraphrase": 5}


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    return build.ensure_demo_dataset(tmp_path_factory.getbasetemp() / "vla_data", episodes=SMALL, video_file_size_mb=1)


class FakeMeta:
    """Just what the splitter reads: meta/episodes (episode_index, tasks, length), meta/tasks and a root."""

    def __init__(self, tasks: list[str], root):
        self.root = root
        self.episodes = datasets.Dataset.from_dict({
            "episode_index": list(range(len(tasks))), "tasks": [[t] for t in tasks], "length": [10] * len(tasks)})
        uniq = list(dict.fromkeys(tasks))
        self.tasks = pd.DataFrame({"task_index": range(len(uniq))}, index=uniq)


def test_normalize_and_leakage():
    assert normalize_task("  Put the RED block,  on the plate. ") == "put the red block on the plate"
    assert splits.assert_no_leakage(["put the red block on the plate"], ["move the cup"]) == 1
    with pytest.raises(splits.LeakageError, match="Put the red block on the plate!"):
        splits.assert_no_leakage(["put the red block on the plate", ""], ["Put the red block on the plate!"])


def test_embedded_split(small):
    s = splits.make_split(small.root)
    rows = build.load_episode_sidecar(small.root)
    by = lambda name: {r["episode_index"] for r in rows if r["split"] == name}  # noqa: E731
    blank_ft = {r["episode_index"] for r in rows if r["split"] == "finetune" and not r["task"]}
    assert set(s.train) == by("finetune") - blank_ft and s.blank_dropped.get("train", 0) == len(blank_ft)
    assert set(s.pretrain) | {r["episode_index"] for r in rows if r["split"] == "pretrain" and not r["task"]} \
        == by("pretrain")
    for g in splits.EMBEDDED_GROUPS:
        assert set(s.eval[g]) == by(g)
    assert not set(s.train) & set().union(*map(set, s.eval.values()))
    held = set(s.heldout_tasks["heldout"])
    assert held <= set(world.SPLITS.heldout_tasks)
    assert all("banana" in t for t in s.heldout_tasks["heldout_family"])
    assert all("purple" in t for t in s.heldout_tasks["unseen_color"])
    assert s.details["leakage_checked"] == sum(len(v) for v in s.heldout_tasks.values())
    text = s.describe()
    assert "held-out object family" in text and "blank-task episodes dropped" in text or not blank_ft
    assert s.as_dict()["train"]["frames"] == sum(r["length"] for r in rows if r["episode_index"] in set(s.train))


def test_embedded_split_detects_injected_leakage(small):
    s = splits.make_split(small.root)
    s.tasks[s.train[0]] = s.heldout_tasks["heldout"][0].upper() + "."
    with pytest.raises(splits.LeakageError):
        s.check_leakage()


def test_hub_rule_is_deterministic_and_stated(tmp_path):
    tasks = (["pick up the spoon"] * 9 + ["put eggplant in pot"] * 8 + ["open the drawer"] * 7 + ["close drawer"] * 6
             + ["wipe the table"] * 5 + ["Fold the cloth."] * 4 + ["fold the cloth"] * 1 + ["stack blocks"] * 3
             + ["move the eggplant to the left"] * 2 + [""] * 4)
    s = splits.hub_split(FakeMeta(tasks, tmp_path))
    # eggplant tasks out first; the rest ranked by episode count after normalization: spoon 9, open drawer 7,
    # close drawer 6, fold the cloth 5 ("Fold the cloth." + "fold the cloth"), wipe 5 (ties: alphabetical), stack 3
    # → ranks 2, 4, 6 are held out
    held = {normalize_task(t) for t in s.heldout_tasks["heldout"]}
    assert held == {"open the drawer", "fold the cloth", "stack blocks"}
    assert len(s.eval["heldout_object"]) == 10 and all("eggplant" in s.tasks[e] for e in s.eval["heldout_object"])
    assert s.blank_dropped["train"] == 4
    assert s.check_leakage() == 5  # 3 held-out task strings + 2 eggplant strings
    assert not {normalize_task(s.tasks[e]) for e in s.train} & held
    again = splits.hub_split(FakeMeta(tasks, tmp_path))
    assert again.eval == s.eval and again.train == s.train
    assert "ranked 2nd, 4th, 6th" in s.rule


def test_hub_rule_via_make_split(tmp_path):
    tasks = [f"task {i % 8}" for i in range(40)]
    s = splits.make_split(FakeMeta(tasks, tmp_path))  # no sidecar under tmp_path → the hub rule
    assert s.rule.startswith("hub rule") and len(s.heldout_tasks["heldout"]) == 3
    with pytest.raises(ValueError, match="cannot hold out"):
        splits.hub_split(FakeMeta(["a", "b", "c"], tmp_path))
