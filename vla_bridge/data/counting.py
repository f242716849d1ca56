"""What training sees: per-epoch counts of unique and repeated ``(episode_index, frame_index)`` pairs, and the
per-process shards of a split.

:class:`SampleCounter` counts one process's stream epoch by epoch (a repeat within an epoch is a sampling bug:
:class:`RepeatedSampleError`). Data parallelism: :func:`shard_episodes` deals the split's sorted episodes
round-robin (``episodes[rank::world]``), so no frame reaches two processes; :func:`merge_counts` sums the processes'
counters per epoch and raises when a frame came to two of them. :func:`format_counts` prints either.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence


class RepeatedSampleError(RuntimeError):
    """The same (episode_index, frame_index) came twice within one epoch."""


@dataclasses.dataclass
class EpochCount:
    epoch: int
    frames: int = 0
    new: int = 0               # first time ever seen
    repeats_in_epoch: int = 0  # seen before in this same epoch: a sampling error
    expected: int | None = None
    seconds: float = 0.0

    @property
    def repeats_from_earlier_epochs(self) -> int:
        return self.frames - self.new - self.repeats_in_epoch


class SampleCounter:
    """Counts ``(episode_index, frame_index)`` pairs: unique overall, repeats overall, and per epoch.

    A pair seen again in a LATER epoch is the expected cost of looping over a finite split; the same pair twice
    within ONE epoch is a sampling bug (``strict`` raises :class:`RepeatedSampleError`).
    """

    def __init__(self, strict: bool = True):
        self.strict = strict
        self.seen: set[tuple[int, int]] = set()
        self.frames = 0
        self.epochs: list[EpochCount] = []
        self._epoch_seen: set[tuple[int, int]] = set()

    def start_epoch(self, epoch: int, expected: int | None = None) -> EpochCount:
        self._epoch_seen = set()
        self.epochs.append(EpochCount(epoch, expected=expected))
        return self.epochs[-1]

    def add(self, episode_index: int, frame_index: int) -> None:
        if not self.epochs:
            self.start_epoch(0)
        cur = self.epochs[-1]
        key = (int(episode_index), int(frame_index))
        cur.frames += 1
        self.frames += 1
        if key in self._epoch_seen:
            cur.repeats_in_epoch += 1
            if self.strict:
                raise RepeatedSampleError(f"(episode {key[0]}, frame {key[1]}) came twice within epoch {cur.epoch}")
        else:
            self._epoch_seen.add(key)
        if key not in self.seen:
            self.seen.add(key)
            cur.new += 1

    @property
    def unique(self) -> int:
        return len(self.seen)

    @property
    def repeats(self) -> int:
        return self.frames - self.unique

    @property
    def repeats_in_epoch(self) -> int:
        return sum(e.repeats_in_epoch for e in self.epochs)

    def as_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "unique": self.unique, "repeats": self.repeats,
                "repeats_within_an_epoch": self.repeats_in_epoch,
                "epochs": [dict(dataclasses.asdict(e), repeats_from_earlier_epochs=e.repeats_from_earlier_epochs)
                           for e in self.epochs]}

    def summary(self) -> str:
        return format_counts(self.as_dict())


def format_counts(c: Mapping[str, Any]) -> str:
    """A :meth:`SampleCounter.as_dict` (or :func:`merge_counts`) as the lines the notebook prints."""
    procs = f" over {c['processes']} processes" if c.get("processes", 1) > 1 else ""
    lines = [f"frames streamed{procs}: {c['frames']:,}  unique (episode, frame): {c['unique']:,}  "
             f"repeats: {c['repeats']:,}  repeats within an epoch: {c['repeats_within_an_epoch']}"]
    for e in c["epochs"]:
        expected, seconds = e.get("expected"), e.get("seconds") or 0
        full = "" if expected is None else (" (complete)" if e["frames"] == expected else f" of {expected:,}")
        lines.append(f"  epoch {e['epoch']}: {e['frames']:,} frames{full}, {e['new']:,} new, "
                     f"{e['repeats_from_earlier_epochs']:,} seen in an earlier epoch, {e['repeats_in_epoch']} repeated "
                     f"within the epoch" + (f", {e['frames'] / seconds:,.0f} frames/s" if seconds > 0 else ""))
    return "\n".join(lines)


def shard_episodes(episodes: Sequence[int], rank: int, world: int) -> list[int]:
    """Process ``rank``'s share of a split: its sorted episodes dealt round-robin over ``world`` processes."""
    eps = sorted(set(int(e) for e in episodes))
    if not 0 <= rank < world:
        raise ValueError(f"process rank {rank} is outside 0..{world - 1}")
    if world > len(eps):
        raise ValueError(f"{world} processes but the training split has {len(eps)} episodes: each process streams "
                         f"its own episodes, so use at most NUM_PROCESSES={len(eps)} (or more episodes)")
    return eps[rank::world]


def merge_counts(parts: Sequence[Mapping[str, Any]], seen: Sequence[Iterable] | None = None) -> dict[str, Any]:
    """The :meth:`SampleCounter.as_dict` of every process summed per epoch (epoch e = each process's e-th pass
    over its own shard: together one pass over the split). ``seen``: each process's ``(episode, frame)`` pairs;
    a pair two processes streamed raises :class:`RepeatedSampleError` (the shards overlap)."""
    owner: dict[tuple[int, int], int] = {}
    for rank, keys in enumerate(seen or []):
        for k in keys:
            k = (int(k[0]), int(k[1]))
            if owner.setdefault(k, rank) != rank:
                raise RepeatedSampleError(f"(episode {k[0]}, frame {k[1]}) came to process {owner[k]} and process "
                                          f"{rank}: the processes' episode shards overlap")
    epochs: dict[int, dict[str, Any]] = {}
    fields = ("frames", "new", "repeats_in_epoch", "repeats_from_earlier_epochs", "expected")
    for part in parts:
        for e in part["epochs"]:
            m = epochs.setdefault(int(e["epoch"]), {"epoch": int(e["epoch"]), **{f: 0 for f in fields}})
            for f in fields:
                m[f] += int(e.get(f) or 0)
    out = {k: sum(int(p[k]) for p in parts) for k in ("frames", "unique", "repeats", "repeats_within_an_epoch")}
    return {**out, "processes": len(parts), "epochs": [epochs[k] for k in sorted(epochs)],
            "per_process": [{k: p[k] for k in ("frames", "unique", "repeats_within_an_epoch")} for p in parts]}
