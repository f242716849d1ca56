"""Headless runs keep one progress line per loop; every bar in the package comes from vla_bridge.progress."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A loop the way the notebook's cells run one headless: stderr is a pipe, not a terminal; the bar asks for frequent
# redraws (mininterval) and updates its postfix every step, as the training loop does.
LOOP = """
import time
from vla_bridge.progress import tqdm
bar = tqdm(total=400, desc="train", mininterval=0.0, dynamic_ncols=True)
for i in range(400):
    time.sleep(0.002)
    bar.update(1)
    bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
bar.close()
for _ in tqdm(range(300), desc="training batches", mininterval=0.0):
    time.sleep(0.001)
"""


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if k != "VLA_BRIDGE_PROGRESS"}
    env.update(env_extra, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", LOOP], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_headless_loop_leaves_one_line_per_loop():
    for extra in ({}, {"VLA_BRIDGE_PROGRESS": "line"}):
        p = _run(extra)
        assert p.returncode == 0, p.stderr
        redraws = [s for s in re.split(r"[\r\n]", p.stderr) if s.strip()]
        assert len(redraws) <= 4, redraws          # opened + closed, per loop
        assert len(p.stderr) < 600 and "TqdmWarning" not in p.stderr
        assert "400/400" in p.stderr and "300/300" in p.stderr


def test_live_mode_still_redraws():
    p = _run({"VLA_BRIDGE_PROGRESS": "live"})
    assert p.returncode == 0, p.stderr
    assert len([s for s in re.split(r"[\r\n]", p.stderr) if s.strip()]) > 20


def test_every_bar_goes_through_vla_bridge_progress():
    offenders = []
    for f in [*sorted((ROOT / "vla_bridge").rglob("*.py")), ROOT / "notebook.py"]:
        if f.name == "progress.py":
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"^\s*(from tqdm|import tqdm)", line):
                offenders.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_run_notebook_sets_line_mode_for_the_kernel():
    assert 'os.environ.setdefault("VLA_BRIDGE_PROGRESS", "line")' in (ROOT / "vla_bridge" / "tools" / "runner.py").read_text()
