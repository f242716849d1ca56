"""Task text: normalizing a task string, its verb and object noun, and the paraphrase rules.

The concepts the split (leakage check, instruction overlap), the evaluation's task grouping, the probes
(paraphrased instructions) and failure mining (slices by verb / noun) share. The embedded world's own grammar
(``world.parse_task``, ``world.paraphrases``) answers on the world; the Bridge heuristics here answer elsewhere.
"""

from __future__ import annotations

import re

from . import world


def normalize_task(text: str | None) -> str:
    """Lower case, punctuation → space, whitespace collapsed ("Put the red block, on the plate." → "put the red
    block on the plate")."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", str(text or "").lower()).split())


_BRIDGE_VERB_SWAPS = {"put": "place", "place": "put", "move": "bring", "pick": "grab", "take": "grab",
                      "push": "slide", "slide": "push", "flip": "turn over", "open": "pull open", "close": "shut"}


def bridge_paraphrases(task: str) -> list[str]:
    """Template rewrites of a Bridge task string: a verb synonym (put ↔ place, move → bring, pick up → grab, ...),
    "please …" and "go ahead and …". [] for a blank task."""
    t = " ".join(str(task or "").strip().rstrip(".").split())
    if not t:
        return []
    low = t.lower()
    words = low.split()
    out: list[str] = []
    if words[0] in _BRIDGE_VERB_SWAPS:
        rest = words[1:]
        if words[0] == "pick" and rest[:1] == ["up"]:
            rest = rest[1:]
        out.append(" ".join([_BRIDGE_VERB_SWAPS[words[0]]] + rest))
    out += [f"please {low}", f"go ahead and {low}"]
    return [s for i, s in enumerate(out) if s != low and s not in out[:i]]


def paraphrase_for(task: str, k: int, world_mode: bool) -> str | None:
    """The k-th paraphrase (cycled) of ``task``: ``world.paraphrases`` on the embedded world, else
    :func:`bridge_paraphrases`; None when there is none (blank task)."""
    if world_mode:
        alts = world.paraphrases(task)
    else:
        alts = bridge_paraphrases(task)
    return alts[k % len(alts)] if alts else None


_PREPS = {"on", "in", "into", "onto", "to", "from", "at", "inside", "near", "under", "over", "off", "out", "of",
          "and", "then", "towards", "toward", "next", "beside", "behind", "across", "with", "so", "until", "upright",
          "top", "left", "right"}
_PARTICLES = {"up", "down", "over", "out", "off", "away"}


def verb_noun(task: str, world_mode: bool = False) -> dict[str, str | None]:
    """Verb and object noun of an instruction. World: ``world.parse_task`` (verb, family). Bridge heuristic: the verb
    is the first word (plus a particle: "pick up"), the noun the last word of the phrase after it, up to the first
    preposition or "and" ("put the red block on the plate" → put / block; "pick up the spoon and ..." → pick up /
    spoon)."""
    if world_mode:
        p = world.parse_task(task)
        if p["family"] is not None:
            return {"verb": p["verb"], "noun": p["family"]}
    words = re.findall(r"[a-z]+", str(task or "").lower())
    if not words:
        return {"verb": None, "noun": None}
    verb, i = words[0], 1
    if i < len(words) and words[i] in _PARTICLES:
        verb, i = f"{verb} {words[i]}", i + 1
    phrase = []
    for w in words[i:]:
        if w in _PREPS and phrase:
            break
        if w not in _PREPS:
            phrase.append(w)
    noun = next((w for w in reversed(phrase) if w not in ("the", "a", "an", "it")), None)
    return {"verb": verb, "noun": noun}


__all__ = ["normalize_task", "bridge_paraphrases", "paraphrase_for", "verb_noun"]
