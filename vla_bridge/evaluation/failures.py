"""Failure mining: held-out episodes ranked by error (failures first where success was measured, then open-loop L1),
sliced by verb and by object noun (``data.tasks.verb_noun``: ``world.parse_task`` on the embedded world, a heuristic
on Bridge) with n, mean L1 and success per slice, and a contact sheet of the worst 8
(``outputs/figures/<run>/worst_episodes.png``). Its input is best the evaluation report
(``evaluation.run_evaluation``: every evaluated held-out episode, closed-loop success on the world, the proxy on
Bridge); a :class:`ProbeResult` or hand-made rows work too.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .. import plots
from ..data.tasks import verb_noun
from .evaluate import CONTRAST_GROUPS
from .policies import POLICY_FINETUNED
from .probes import ProbeResult


def rank_failures(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Worst first: closed-loop failures (success False) before unknown before successes, then by open-loop L1."""
    order = {False: 0, None: 1, True: 2}
    return sorted((dict(r) for r in rows), key=lambda r: (order.get(r.get("success"), 1), -float(r["l1"])))


def slice_failures(rows: Sequence[Mapping[str, Any]], by: str) -> list[dict]:
    """Per value of ``by`` ("verb", "noun", "group", ...): n, mean L1, closed-loop successes/n (where measured);
    sorted by mean L1, worst first."""
    acc: dict[Any, list] = {}
    for r in rows:
        acc.setdefault(r.get(by) or "(none)", []).append(r)
    out = []
    for k, rs in acc.items():
        meas = [r["success"] for r in rs if r.get("success") is not None]
        out.append({by: k, "n": len(rs), "mean_l1": float(np.mean([float(r["l1"]) for r in rs])),
                    "successes": int(sum(meas)) if meas else None, "n_closed_loop": len(meas),
                    "success_rate": float(np.mean(meas)) if meas else None})
    return sorted(out, key=lambda s: -s["mean_l1"])


def format_slices(slices: Sequence[Mapping[str, Any]], by: str) -> str:
    lines = [f"| {by} | n | mean L1 | success |", "|---|---:|---:|---:|"]
    for s in slices:
        succ = f"{s['successes']}/{s['n_closed_loop']}" if s.get("successes") is not None else "—"
        lines.append(f"| {s[by]} | {s['n']} | {s['mean_l1']:.4f} | {succ} |")
    return "\n".join(lines)


@dataclasses.dataclass
class FailureReport:
    ranked: list[dict]
    slices: dict[str, list[dict]]
    sheet_path: Path | None
    n_with_image: int = 0  # contact-sheet panels that show the episode's first frame (the rest say "(no image)")

    def text(self, n: int = 8) -> str:
        parts = []
        if self.sheet_path is not None:
            n_panels = min(n, len(self.ranked))
            parts.append(f"Contact sheet: {self.n_with_image} of {n_panels} panels show the episode's first frame.")
        parts += ["Worst episodes:", "| rank | episode | group | instruction | L1 | success |",
                 "|---:|---:|---|---|---:|---:|"]
        for i, r in enumerate(self.ranked[:n], 1):
            s = {True: "yes", False: "no", None: "—"}[r.get("success")]
            parts.append(f"| {i} | {r.get('episode', '')} | {r.get('group', '')} | {r.get('task', '')} | "
                         f"{float(r['l1']):.4f} | {s} |")
        for by, sl in self.slices.items():
            parts += ["", f"By {by}:", format_slices(sl, by)]
        return "\n".join(parts)


def failure_rows_from_eval(report, policy: str | None = None) -> tuple[list[dict], dict[int, np.ndarray]]:
    """Per-episode rows (and first frames) of the held-out groups from ``evaluation.run_evaluation``'s report, for
    ``policy`` (default: the fine-tuned model). Its success is closed-loop on the embedded world and the documented
    proxy on Bridge (``success_kind`` says which). Contrast groups (fine-tuning tasks) are left out."""
    data = report.data
    policy = policy or POLICY_FINETUNED
    kind = data.get("success_definition", {}).get("kind", "closed_loop")
    world_mode = kind == "closed_loop"
    rows, images = [], {}
    for r in data["per_episode"]:
        if r["policy"] != policy or r["group"] in CONTRAST_GROUPS:
            continue
        e = int(r["episode_index"])
        vn = verb_noun(r.get("instruction", ""), world_mode)
        rows.append({"episode": e, "group": r["group"], "task": r.get("instruction", ""), "verb": vn["verb"],
                     "noun": vn["noun"], "n_frames": r.get("n_frames"), "l1": float(r["l1"]),
                     "success": None if r.get("success") is None else bool(r["success"]),
                     "success_kind": "closed loop" if world_mode else "proxy"})
        ep = getattr(report, "episodes", {}).get(e)
        if ep is not None and len(ep.images):
            images[e] = np.asarray(ep.images[0])
    return rows, images


def mine_failures(source, out_dir: str | os.PathLike | None = None, n_worst: int = 8,
                  by: Sequence[str] = ("verb", "noun"), images: Mapping[int, np.ndarray] | None = None
                  ) -> FailureReport:
    """Rank the held-out episodes by error, slice them by verb and object noun, draw the worst ``n_worst`` as a
    contact sheet (``worst_episodes.png`` in ``out_dir``: first image_0 frame, instruction, L1, success).

    ``source``: the evaluation report (``evaluation.run_evaluation``: every evaluated held-out episode, closed-loop
    success for all of them on the world), a :class:`ProbeResult` (the probed episodes; closed loop where run), or
    rows with episode, task, l1, success (None when not measured), verb, noun, group — then ``images`` (episode →
    image) for the sheet."""
    if isinstance(source, ProbeResult):
        rows, images = source.episodes, source.first_frames if images is None else images
    elif hasattr(source, "data") and "per_episode" in getattr(source, "data", {}):
        rows, found = failure_rows_from_eval(source)
        images = found if images is None else images
    else:
        rows = list(source)
    ranked = rank_failures(rows)
    slices = {b: slice_failures(rows, b) for b in by}
    sheet, n_with_image = None, 0
    if out_dir is not None and ranked:
        worst = ranked[:n_worst]
        imgs = [None if images is None else images.get(r.get("episode")) for r in worst]
        n_with_image = sum(img is not None for img in imgs)
        sheet = plots.plot_worst_episodes(worst, imgs, out_dir)
    return FailureReport(ranked, slices, sheet, n_with_image)


__all__ = ["rank_failures", "slice_failures", "format_slices", "FailureReport", "failure_rows_from_eval",
           "mine_failures"]
