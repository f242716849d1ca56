"""The notebook headless on POLICY=octo against the stand-in worker (params/ci-octo.json): shards → train hand-off →
serve → evaluation table → skipped cells → reflection, all in the main environment (about 40 s on 2 CPU cores).
The real worker's version of this run needs .venv-octo (see the README's offline command)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import nbformat

from vla_bridge import evaluation as ev
from vla_bridge import plots
from vla_bridge.paths import PROJECT_ROOT
from vla_bridge.octo import protocol


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts += [str(v) for k, v in out.get("data", {}).items() if k in ("text/plain", "text/markdown")]
    return "\n".join(parts)


def test_octo_notebook_runs_to_the_reflection_with_the_standin_worker(tmp_path):
    out_nb = tmp_path / "notebook.ci-octo.ipynb"
    env = dict(os.environ, **{protocol.WORKER_ENV: "standin", "HF_HUB_OFFLINE": "1"})
    cmd = [sys.executable, "-m", "vla_bridge", "run-notebook", "--params-file", str(PROJECT_ROOT / "params" /
           "ci-octo.json"), "-p", f"OUTPUTS_DIR={tmp_path / 'outputs'}", "-p", f"DATA_DIR={tmp_path / 'data'}",
           "--out", str(out_nb)]
    proc = subprocess.run(cmd, cwd=str(PROJECT_ROOT), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    run = json.loads((PROJECT_ROOT / "params" / "ci-octo.json").read_text())["RUN_NAME"]
    outputs = tmp_path / "outputs"
    log = (outputs / "logs" / run / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == [1, 2, 3]
    ck = outputs / "checkpoints" / run
    assert {"base", "latest", "step_000003"} <= {p.name for p in ck.iterdir()}

    ev_dir = outputs / "eval" / run
    data = json.loads((ev_dir / "eval.json").read_text())
    assert data["evaluation"]["policies"] == [ev.POLICY_FINETUNED, ev.POLICY_BASE, ev.POLICY_MEAN]
    assert "stand-in" in data["model"]["class"] and data["model"]["worker"]["kind"] == "standin"
    assert data["per_episode"] and {g["group"] for g in data["groups"]} >= {"heldout", "finetune_eval"}
    assert (ev_dir / "table.md").read_text().startswith(f"### Evaluation: {run}")
    reflection = (ev_dir / "reflection.md").read_text()
    assert "**What it scored.**" in reflection and "stand-in worker" in reflection

    text = _outputs_text(nbformat.read(str(out_nb), as_version=4))
    assert "vla_bridge.octo.standin_worker" in text                   # section 4 names the worker it starts
    assert text.count("skipped on POLICY=octo") == 5                  # sections 5, 6, 10, 10a, 13
    assert "Octo is fully fine-tuned, so its checkpoints/<run>/latest/ is already standalone" in text  # 13
    assert "POLICY=octo: the rank sweep is a LoRA ablation" in text   # section 11
    assert "### Evaluation" in text and "What it scored" in text      # the table and the reflection, displayed
    sheet = re.search(r"Contact sheet: (\d+) of (\d+) panels show the episode's first frame", text)  # 10b
    assert sheet and sheet[1] == sheet[2] and int(sheet[1]) >= 6, sheet and sheet[0]
    figures, problems = plots.check_figures(outputs / "figures" / run)
    assert {p.name for p in figures} >= {"episode_frames.png", "worst_episodes.png", "loss_curve.png"}
    assert problems == []
