"""The benchmarks' ratio lines and bench-all's JSON, on small fake results (the benches themselves are timed in
``bench-all``, never in the suite; ``test_data_stream.test_bench_loader_small`` runs one real loader bench)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from vla_bridge.tools import bench, bench_all, bench_train
from vla_bridge.tools.ratios import Ratio, format_ratios, ratio

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^RATIO (?P<name>[\w.-]+) = (?P<value>\d+\.\d\d|nan)x \(goal (?P<op>[≥≤]) (?P<goal>[\d.]+)x: "
                  r"(?P<verdict>meets|MISSES)\)$")


@pytest.mark.parametrize("value, goal, op, verdict", [
    (1.12, 1.3, "≤", "meets"), (1.31, 1.3, "≤", "MISSES"), (1.3, 1.3, "≤", "meets"),
    (5.2, 5.0, "≥", "meets"), (4.99, 5.0, "≥", "MISSES"), (5.0, 5.0, "≥", "meets"),
    (float("nan"), 2.0, "≥", "MISSES"), (float("nan"), 1.3, "≤", "MISSES"), (float("inf"), 2.0, "≥", "MISSES"),
])
def test_ratio_line_and_verdict(value, goal, op, verdict):
    r = Ratio("bench-x.thing", value, goal, op)
    m = LINE.match(r.line())
    assert m, r.line()
    assert m["name"] == "bench-x.thing" and m["op"] == op and float(m["goal"]) == goal and m["verdict"] == verdict
    assert r.meets is (verdict == "meets")
    d = r.as_dict()
    assert d["meets"] is r.meets and d["op"] == op and d["goal"] == goal
    assert (d["value"] is None) == (not math.isfinite(value))
    json.dumps(d)  # no NaN in the JSON


def test_ratio_examples_and_checks():
    assert Ratio("bench-loader.overhead", 1.1234, 1.3, "≤").line() == \
        "RATIO bench-loader.overhead = 1.12x (goal ≤ 1.3x: meets)"
    assert Ratio("bench-eval.speedup", 3.9, 5.0, "≥").line() == "RATIO bench-eval.speedup = 3.90x (goal ≥ 5x: MISSES)"
    assert math.isnan(ratio("a.b", 1.0, 0.0, 2, "≥").value) and ratio("a.b", 3.0, 1.5, 2, "≥").value == 2.0
    with pytest.raises(ValueError):
        Ratio("a.b", 1.0, 1.0, ">=")
    with pytest.raises(ValueError):
        Ratio("a b", 1.0, 1.0, "≥")
    assert format_ratios([]) == ""


def _loader_res(workers=True, trainer_row=True):
    rows = [{"name": "bare stream (StreamingLeRobotDataset)", "frames": 100, "seconds": 1.0, "fps": 100.0},
            {"name": "pipeline (decode + resize 224 + count)", "frames": 100, "seconds": 1.25, "fps": 80.0}]
    res = {"dataset": "fake", "episodes": 3, "frames": 100, "buffer_size": 32, "rows": rows, "warmup_frames": 10,
           "cameras": ["observation.images.image_0"], "overhead": 1.25, "image_size": 224}
    if workers:
        rows.append({"name": "pipeline, DataLoader workers=2 (batch 16)", "frames": 100, "seconds": 2.0, "fps": 50.0})
        res["workers_speedup_vs_bare"] = 0.5
    fed = 1
    if trainer_row:
        rows.append({"name": "pipeline (decode + resize 128 + count)", "frames": 100, "seconds": 1.0, "fps": 90.0})
        fed = len(rows) - 1
    res["trainer"] = {"steps": 4, "warmup": 1, "batch_size": 16, "grad_accum": 1, "lora_rank": 32, "image_size": 128,
                      "threads": 2, "device": "cpu", "samples_per_s": 60.0, "samples_timed": 48, "seconds_timed": 0.8}
    res["pipeline_vs_trainer_row"] = fed
    return res


def test_loader_ratios_from_a_fake_result():
    got = {r.name: r for r in bench.loader_ratios(_loader_res())}
    assert list(got) == ["bench-loader.overhead", "bench-loader.pipeline_vs_trainer", "bench-loader.workers_vs_bare"]
    assert got["bench-loader.overhead"].value == pytest.approx(1.25) and got["bench-loader.overhead"].op == "≤"
    assert got["bench-loader.overhead"].meets
    # the pipeline row at the trainer's 128 px (90 frames/s), not the 224 px row: 90 / 60
    assert got["bench-loader.pipeline_vs_trainer"].value == pytest.approx(1.5)
    assert got["bench-loader.pipeline_vs_trainer"].op == "≥" and not got["bench-loader.pipeline_vs_trainer"].meets
    assert got["bench-loader.workers_vs_bare"].value == pytest.approx(0.5)
    same_size = {r.name: r for r in bench.loader_ratios(_loader_res(workers=False, trainer_row=False))}
    assert list(same_size) == ["bench-loader.overhead", "bench-loader.pipeline_vs_trainer"]
    assert same_size["bench-loader.pipeline_vs_trainer"].value == pytest.approx(80 / 60)
    text = bench.format_bench(_loader_res())
    ratio_lines = [line for line in text.splitlines() if line.startswith("RATIO ")]
    assert len(ratio_lines) == 3 and all(LINE.match(line) for line in ratio_lines)
    assert "trainer (tiny VLA + LoRA, in-memory frames)" in text and "pipeline overhead: 1.25x bare" in text


def _train_row(processes, threads, sps):
    return {"processes": processes, "batch_size": 16, "batch_per_process": 16 // processes, "threads": threads,
            "steps": 6, "warmup": 1, "lora_rank": 32, "steps_per_s": sps / 16, "s_per_step": 16 / sps,
            "samples_per_s": sps, "peak_rss_mb": 1000.0, "total_s": 5.0, "device": "cpu"}


def test_train_ratio_only_with_processes():
    one = {"rows": [_train_row(1, 2, 20.0)], **_train_row(1, 2, 20.0)}
    assert bench_train.train_ratios(one) == [] and "RATIO" not in bench_train.format_bench_train(one)
    rows = [_train_row(1, 2, 20.0), _train_row(1, 1, 18.0), _train_row(2, 1, 15.0)]
    (r,) = bench_train.train_ratios({"rows": rows, **rows[0]})
    assert r.name == "bench-train.processes" and r.value == pytest.approx(0.75) and r.op == "≥"
    assert r.goal == bench_train.GOAL_PROCESS_SCALING and not r.meets   # on a CPU: the same cores, goal 0.8x
    assert LINE.match(bench_train.format_bench_train({"rows": rows, **rows[0]}).splitlines()[-1])


def test_eval_ratio_reads_the_goal_from_the_result_or_the_module():
    (r,) = bench_all.eval_ratios({"speedup": 6.0})
    assert r.name == "bench-eval.speedup" and r.goal == bench.GOAL_EVAL_SPEEDUP and r.meets and r.op == "≥"
    (r,) = bench_all.eval_ratios({"speedup": 6.0, "goal": 8.0})
    assert r.goal == 8.0 and not r.meets


def _fake_benches(monkeypatch, fail=None):
    seen = {}

    def loader(dataset, **kw):
        seen["loader"] = kw
        if fail == "loader":
            raise RuntimeError("boom")
        return _loader_res()

    def train(data_dir, **kw):
        seen["train"] = kw
        rows = [_train_row(1, 2, 20.0), _train_row(2, 1, 19.0)]
        return {"rows": rows, **rows[0]}

    def evaluate(data_dir, **kw):
        seen["eval"] = kw
        return {"model": "fake", "dataset": "fake", "frames": 8, "instructions": 2, "batch_size": 8, "threads": 1,
                "rows": [{"name": "per-frame predict_action", "frames": 8, "seconds": 2.0, "fps": 4.0},
                         {"name": "batched, bucketed", "frames": 8, "seconds": 0.4, "fps": 20.0},
                         {"name": "batched, left-padded", "frames": 8, "seconds": 0.5, "fps": 16.0}],
                "speedup": 5.0, "speedup_padded": 4.0, "identical_bucketed": True, "identical_padded": True}

    monkeypatch.setattr(bench_all, "bench_loader", loader)
    monkeypatch.setattr(bench_all, "bench_train", train)
    monkeypatch.setattr(bench_all, "bench_eval", evaluate)
    return seen


def test_bench_all_writes_one_json_with_every_ratio(monkeypatch, tmp_path, capsys):
    seen = _fake_benches(monkeypatch)
    out = tmp_path / "b" / "bench_all.json"
    report, rc = bench_all.bench_all("smallest", out, data_dir=str(tmp_path))
    assert rc == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("RATIO ")]
    assert [LINE.match(line)["name"] for line in printed] == list(bench_all.EXPECTED_RATIOS)
    saved = json.loads(out.read_text())
    assert saved["size"] == "smallest" and saved["missing_ratios"] == [] and "plumbing" in saved["note"]
    env = saved["environment"]
    assert env["cpu_count"] >= 1 and env["torch_threads"] >= 1 and env["versions"]["torch"]
    assert list(saved["benches"]) == ["bench-loader", "bench-train", "bench-eval"]
    for name, b in saved["benches"].items():
        assert b["rows"] and b["ratios"] and "params" in b and "seconds" in b and "error" not in b, name
        for r in b["ratios"]:
            assert set(r) >= {"name", "value", "goal", "op", "meets"} and r["op"] in ("≥", "≤")
    assert [r["name"] for r in saved["ratios"]] == list(bench_all.EXPECTED_RATIOS)
    assert saved["benches"]["bench-loader"]["params"]["frames"] == bench_all.SIZES["smallest"]["bench-loader"]["frames"]
    # the smallest size streams the small dataset
    assert seen["loader"]["demo_episodes"] == bench_all.SMALLEST_EPISODES
    assert seen["train"]["episodes"] == bench_all.SMALLEST_EPISODES and seen["train"]["processes"] == 2
    # smallest is a small dataset that keeps every split non-empty
    from vla_bridge.data.build import resolve_episode_counts
    counts = resolve_episode_counts(bench_all.SMALLEST_EPISODES)
    assert all(v >= 1 for v in counts.values()) and sum(counts.values()) < 30


def test_bench_all_reports_a_failed_bench_and_exits_1(monkeypatch, tmp_path, capsys):
    _fake_benches(monkeypatch, fail="loader")
    report, rc = bench_all.bench_all("smallest", tmp_path / "x.json", data_dir=str(tmp_path))
    assert rc == 1
    assert report["benches"]["bench-loader"]["error"] == "RuntimeError: boom"
    assert report["missing_ratios"] == [n for n in bench_all.EXPECTED_RATIOS if n.startswith("bench-loader.")]
    assert "bench-train.processes" in capsys.readouterr().out   # the others still ran


def test_ci_greps_for_every_expected_ratio():
    text = (ROOT / "setup.sh").read_text()
    m = re.search(r"for r in ([^;]+); do\n\s+grep -q \"\^RATIO \$r = \"", text)
    assert m, "setup.sh --test: the bench-all step's ratio loop"
    assert tuple(m.group(1).split()) == bench_all.EXPECTED_RATIOS
