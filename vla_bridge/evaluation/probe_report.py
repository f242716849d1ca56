"""The probes' write-up: verdicts per probe, the 5-10 bullets generated from the numbers, the table, and
``probe.json`` / ``probe.md`` (thresholds stated in the file)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..jsonio import to_jsonable
from .perturbations import HUE_SHIFT_DEG, PROBES, REFERENCE, probe_title

# Thresholds the generated bullets use (stated in probe.md).
KL_SMALL = 0.10               # nats: below it the first action token's distribution "barely moves"
COLLAPSE_SPREAD = 0.2         # predictions' within-episode spread / the demonstrations' below this = "collapsed"
L1_SMALL = 0.10               # relative change of open-loop L1 below which the error "barely moves"
L1_BREAK_RATIO = 1.5          # L1 with the probe / without it at or above which the probe "breaks" the policy


def _fmt_rel(x: float) -> str:
    return f"{x:+.0%}" if math.isfinite(x) else "n/a"


def _ci_text(row: Mapping[str, Any]) -> str:
    ci = row.get("dl1_ci95")
    if not ci:
        return ""
    lo, hi = ci
    verdict = "includes 0: within noise" if lo <= 0 <= hi else "excludes 0"
    return f"; 95 % CI of ΔL1 [{lo:+.4f}, {hi:+.4f}], {verdict}"


def ci_includes_zero(row: Mapping[str, Any]) -> bool:
    """True when the row's 95 % bootstrap CI of ΔL1 contains 0 (no change in error is detectable at its n)."""
    ci = row.get("dl1_ci95")
    return bool(ci) and ci[0] <= 0 <= ci[1]


def probe_verdict(row: Mapping[str, Any]) -> str:
    """'barely' | 'breaks' | 'degrades' | 'shifts' (distribution moves, error does not) | 'improves' |
    'undetected' (the error moves by ≥ L1_SMALL on average, but its CI includes 0: no conclusion at this n)."""
    rel, ratio, kl = row["dl1_rel"], row["l1_ratio"], row["kl"]
    if abs(rel) < L1_SMALL:
        return "barely" if kl < KL_SMALL else "shifts"
    if ci_includes_zero(row):
        return "undetected"
    if math.isfinite(ratio) and ratio >= L1_BREAK_RATIO:
        return "breaks"
    return "improves" if rel < 0 else "degrades"


def _short(probe: str, deg: float = HUE_SHIFT_DEG) -> str:
    return {"paraphrase": "paraphrased instructions", "color_shift": f"the {deg:g}° hue rotation",
            "other_camera": "the other camera", "other_scene": "another scene"}.get(probe, probe)


def _agree(probe: str, singular: str, plural: str) -> str:
    return plural if probe == "paraphrase" else singular


def _probe_sentence(row: Mapping[str, Any], deg: float) -> str:
    p = row["probe"]
    title = probe_title(p, deg)
    n = f"n={row['n_frames']} frames in {row['n_episodes']} episodes"
    l1 = f"{row['l1_base']:.4f} → {row['l1_probe']:.4f}"
    kl = f"KL {row['kl']:.2f} nats"
    rel = _fmt_rel(row["dl1_rel"])
    flips = f"{row.get('argmax_changed', float('nan')):.0%} of frames"
    v = probe_verdict(row)
    if v == "breaks":
        return (f"{title} {_agree(p, 'breaks', 'break')} the policy: open-loop L1 ×{row['l1_ratio']:.1f} ({l1}), "
                f"{kl}, the most likely first action token changes on {flips} ({n}).")
    if v == "barely":
        return (f"{title} {_agree(p, 'barely moves', 'barely move')} the policy: {kl}, L1 {rel} ({l1}; "
                f"{n}{_ci_text(row)}).")
    if v == "shifts":
        return (f"{title} {_agree(p, 'shifts', 'shift')} what the model believes ({kl}, the first action token changes "
                f"on {flips}) but {_agree(p, 'moves', 'move')} its error little: L1 {rel} ({l1}; {n}{_ci_text(row)}).")
    if v == "undetected":
        return (f"{title} {_agree(p, 'moves', 'move')} the error by L1 {rel} on average ({l1}), but no change is "
                f"detectable at {n}{_ci_text(row)}; {kl}.")
    if v == "improves":
        return f"{title} {_agree(p, 'does', 'do')} not hurt: L1 {rel} ({l1}), {kl} ({n}{_ci_text(row)})."
    return (f"{title} {_agree(p, 'costs', 'cost')} accuracy: L1 {rel} (×{row['l1_ratio']:.2f}, {l1}), {kl} "
            f"({n}{_ci_text(row)}).")


def probe_bullets(summary: Mapping[str, Any], max_bullets: int = 10) -> list[str]:
    """5-10 sentences generated from the measured numbers (``ProbeResult.summary()``), most important first:

    a caution when the policy's predictions hardly vary within an episode (spread ratio < ``COLLAPSE_SPREAD``);
    one verdict per probe, pooled over the groups (thresholds ``KL_SMALL``, ``L1_SMALL``, ``L1_BREAK_RATIO``); the
    other-scene reference and how far each image probe moves the policy relative to it; closed-loop success with
    and without each probe; skipped episodes; where the unperturbed policy does best and worst; which group the
    most damaging probe hurts most; which action dimension it moves most. Cut to ``max_bullets``."""
    measured = [r for r in summary["rows"] if r.get("n_frames")]
    rows = [r for r in measured if all(math.isfinite(r[k]) for k in ("kl", "dl1_rel", "l1_base", "l1_probe"))]
    groups = summary.get("groups", {})
    cl = summary.get("closed_loop", {})
    deg = float(summary.get("config", {}).get("hue_shift_deg", HUE_SHIFT_DEG))
    ranked: list[tuple[int, str]] = []   # (priority, sentence); lower first
    pooled = [r for r in rows if r["group"] == "all" and r["probe"] != REFERENCE]
    ref = next((r for r in rows if r["group"] == "all" and r["probe"] == REFERENCE), None)

    # 0. a collapsed policy makes every "robust" verdict suspect
    allg = groups.get("all", {})
    spread = allg.get("pred_spread_ratio", float("nan"))
    if math.isfinite(spread) and spread < COLLAPSE_SPREAD:
        ranked.append((0, f"Caution: the policy's actions hardly change within an episode (on average "
                          f"{allg['pred_distinct_per_episode']:.1f} distinct predicted actions per episode vs "
                          f"{allg['demo_distinct_per_episode']:.1f} in the demonstrations; within-episode spread "
                          f"{spread:.0%} of the demonstrations'): it has collapsed towards one action per "
                          "instruction, so a probe that barely moves it is being ignored, not handled."))
    if len(rows) < len(measured):  # a NaN is not a finding
        ranked.append((0, f"{len(measured) - len(rows)} of {len(measured)} probe measurements came out non-finite "
                          "(NaN/inf): the policy's outputs are broken there, and nothing is concluded from them."))
    # 1. one verdict per probe
    for r in pooled:
        ranked.append((1, _probe_sentence(r, deg)))
    # 2. the reference: what no visual information does, and the image probes relative to it
    if ref is not None:
        img = [r for r in pooled if r["probe"] in ("color_shift", "other_camera")]
        if ref["kl"] < KL_SMALL and abs(ref["dl1_rel"]) < L1_SMALL:
            tail = ("the policy barely looks at the scene, so small colour and camera effects mean ignored, "
                    "not robust.")
        elif ci_includes_zero(ref):
            lo, hi = ref["dl1_ci95"]
            tail = (f"the error's change has a 95 % CI of [{lo:+.4f}, {hi:+.4f}], which includes 0, so this run "
                    "cannot show that the policy's accuracy depends on the scene it sees; the image probes are "
                    "judged by their own intervals, not against this yardstick.")
        elif img:
            tail = "relative to that, " + ", ".join(
                f"{_short(r['probe'], deg)} moves the first-token distribution {r['kl'] / ref['kl']:.0%} as far "
                f"and the error {r['dl1'] / ref['dl1']:.0%} as much" if ref["dl1"] > 1e-9 else
                f"{_short(r['probe'], deg)} moves the first-token distribution {r['kl'] / ref['kl']:.0%} as far"
                for r in img) + "."
        else:
            tail = "this is the yardstick for image perturbations."
        ranked.append((2, f"Reference, another episode's scene in place of this one: KL {ref['kl']:.2f} nats, L1 "
                          f"{_fmt_rel(ref['dl1_rel'])} (n={ref['n_frames']} frames); {tail}"))
    # 3. closed loop: one sentence over every condition measured on the same scenes
    allcl = cl.get("all", {})
    base = allcl.get("base")
    conds = [p for p in PROBES if allcl.get(p)]
    if base and conds:
        parts = [f"{allcl[p]['successes']}/{allcl[p]['n']} with {_short(p, deg)}" for p in conds]
        if base["successes"] == 0 and all(allcl[p]["successes"] == 0 for p in conds):
            ranked.append((3, f"Closed loop on {base['n']} held-out scenes: 0/{base['n']} successes unperturbed and "
                              "under every probe, so closed loop cannot separate the probes here; the open-loop "
                              "numbers are the evidence."))
        else:
            drops = {p: base["successes"] / base["n"] - allcl[p]["successes"] / allcl[p]["n"] for p in conds}
            worst = max(drops, key=drops.get)
            tail = (f"; {_short(worst, deg)} costs most ({100 * drops[worst]:.0f} percentage points)"
                    if drops[worst] > 0 else "; no probe lowers it")
            ranked.append((3, f"Closed loop on the same {base['n']} held-out scenes: success "
                              f"{base['successes']}/{base['n']} unperturbed, " + ", ".join(parts) + tail + "."))
    # 4. skipped episodes (also when a probe had no frame left at all)
    for r in (r for r in summary["rows"] if r["group"] == "all"):
        if r.get("n_skipped"):
            what = "image_1 missing or black" if r["probe"] == "other_camera" else "no paraphrase available"
            ranked.append((4, f"{probe_title(r['probe'], deg)}: {r['n_skipped']} episode(s) skipped ({what})."))
    # 5. where the unperturbed policy generalizes and where it falls apart
    named = {g: v for g, v in groups.items() if g != "all" and v.get("n_frames")}
    if len(named) >= 2:
        best = min(named, key=lambda g: named[g]["l1_base"])
        worst = max(named, key=lambda g: named[g]["l1_base"])
        ratio = named[worst]["l1_base"] / max(named[best]["l1_base"], 1e-12)
        ranked.append((5, f"Without any probe, the policy does best on {named[best]['title']} (L1 "
                          f"{named[best]['l1_base']:.4f}, n={named[best]['n_episodes']} episodes) and worst on "
                          f"{named[worst]['title']} (L1 {named[worst]['l1_base']:.4f}, ×{ratio:.2f}, "
                          f"n={named[worst]['n_episodes']})."))
    # 6-7. the most damaging probe: which group it hurts most / least, which dimension it moves
    if pooled:
        worst_p = max(pooled, key=lambda r: (r["l1_ratio"] if math.isfinite(r["l1_ratio"]) else -1, r["kl"]))
        per_g = [r for r in rows if r["probe"] == worst_p["probe"] and r["group"] != "all"]
        title = probe_title(worst_p["probe"], deg)
        if len(per_g) >= 2:
            hi = max(per_g, key=lambda r: r["dl1_rel"])
            lo = min(per_g, key=lambda r: r["dl1_rel"])
            t_hi = named.get(hi["group"], {}).get("title", hi["group"])
            t_lo = named.get(lo["group"], {}).get("title", lo["group"])
            ranked.append((6, f"{title} {_agree(worst_p['probe'], 'hurts', 'hurt')} {t_hi} most (L1 "
                              f"{_fmt_rel(hi['dl1_rel'])}, KL {hi['kl']:.2f}) and {t_lo} least (L1 "
                              f"{_fmt_rel(lo['dl1_rel'])}, KL {lo['kl']:.2f})."))
        rng_d = worst_p.get("mean_abs_delta_range") or {}
        if rng_d:
            top = max(rng_d, key=rng_d.get)
            low = min(rng_d, key=rng_d.get)
            ranked.append((7, f"Under {title[0].lower() + title[1:]}, the predicted {top} moves most (mean |Δ| "
                              f"{worst_p['mean_abs_delta'][top]:.4g} = {rng_d[top]:.0%} of its q01–q99 range) and "
                              f"{low} least ({rng_d[low]:.0%})."))
    keep = sorted(range(len(ranked)), key=lambda i: (ranked[i][0], i))[:max_bullets]
    return [ranked[i][1] for i in sorted(keep)]


def format_probe_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ("| group | probe | episodes | frames | skipped | L1 base | L1 probe | ΔL1 | ΔL1 95 % CI | KL (nats) | "
            "largest mean abs Δ (share of range) |\n|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    lines = [head]
    for r in rows:
        if not r.get("n_frames"):
            lines.append(f"| {r['group']} | {r['probe']} | 0 | 0 | {r.get('n_skipped', 0)} | | | | | | |")
            continue
        rng = r["mean_abs_delta_range"]
        top = max(rng, key=rng.get)
        ci = r.get("dl1_ci95")
        ci_s = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "—"
        lines.append(f"| {r['group']} | {r['probe']} | {r['n_episodes']} | {r['n_frames']} | {r['n_skipped']} | "
                     f"{r['l1_base']:.4f} | {r['l1_probe']:.4f} | {_fmt_rel(r['dl1_rel'])} | {ci_s} | {r['kl']:.3f} | "
                     f"{top} {rng[top]:.0%} |")
    return "\n".join(lines)


def write_probe_report(result, out_dir: str | os.PathLike) -> dict[str, Path]:
    """``probe.json`` (everything) and ``probe.md`` (bullets, thresholds, table, closed loop) of ``result`` (a
    ``probes.ProbeResult``) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = result.config
    md = ["# Generalization probes", "",
          f"Dataset: {c['dataset']}; groups: {', '.join(c['groups'])}; every {c['frame_stride']}. frame; "
          f"KL = {c['kl']}; L1 = {c['l1']}.", "",
          f"Thresholds: \"barely\" = KL < {KL_SMALL} nats and |ΔL1| < {L1_SMALL:.0%}; \"breaks\" = L1 ratio ≥ "
          f"{L1_BREAK_RATIO}; \"shifts\" = KL ≥ {KL_SMALL} with |ΔL1| < {L1_SMALL:.0%}; \"no change detectable\" "
          "= |ΔL1| ≥ that but its 95 % CI includes 0; otherwise \"costs accuracy\" (or \"does not hurt\" when L1 "
          "drops). Reference: the same camera's frame from "
          "another evaluated episode (the instruction kept); \"collapsed\" = the predictions' within-episode "
          f"spread below {COLLAPSE_SPREAD:.0%} of the demonstrations'.", ""]
    md += [f"- {b}" for b in result.bullets]
    md += ["", "## Open loop", "", result.table(), ""]
    if any(result.closed_loop.values()):
        md += ["## Closed loop (success on the same scenes)", "", "| group | condition | successes | n | rate |",
               "|---|---|---:|---:|---:|"]
        for g, conds in result.closed_loop.items():
            for cond, v in conds.items():
                md.append(f"| {g} | {cond} | {v['successes']} | {v['n']} | {v['rate']:.0%} |")
        md.append("")
    p_md, p_json = out / "probe.md", out / "probe.json"
    p_md.write_text("\n".join(md))
    p_json.write_text(json.dumps(to_jsonable(result.as_dict() | {"paths": {"probe_md": str(p_md),
                                                                           "probe_json": str(p_json)}}), indent=2))
    return {"probe_md": p_md, "probe_json": p_json}


__all__ = ["KL_SMALL", "COLLAPSE_SPREAD", "L1_SMALL", "L1_BREAK_RATIO", "ci_includes_zero", "probe_verdict",
           "probe_bullets", "format_probe_table", "write_probe_report"]
