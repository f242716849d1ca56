"""The notebook's section timer: cell time per section through IPython's events, or the wall clock without them."""

from __future__ import annotations

import json
import types

from IPython.core.events import EventManager, available_events

from vla_bridge.timings import SectionTimer


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _kernel() -> types.SimpleNamespace:
    return types.SimpleNamespace(events=EventManager(None, available_events))


def _cell(ip, clock: _Clock, seconds: float, body=None) -> None:
    ip.events.trigger("pre_run_cell", None)
    if body:
        body()
    clock.t += seconds
    ip.events.trigger("post_run_cell", None)


def test_cell_time_goes_to_the_section_current_when_the_cell_ends(tmp_path):
    clock, ip = _Clock(), _kernel()
    timer = SectionTimer(ipython=ip, clock=clock)
    timer.section("0 imports")
    clock.t += 2.0                        # the rest of the cell that created the timer
    ip.events.trigger("post_run_cell", None)
    timer.save_to(tmp_path / "timings.json")
    _cell(ip, clock, 5.0, lambda: timer.section("3 data"))
    clock.t += 600.0                      # someone reads the markdown: not counted
    _cell(ip, clock, 7.0)
    _cell(ip, clock, 1.0, lambda: timer.section("9 evaluation"))
    _cell(ip, clock, 0.5, lambda: timer.section("3 data"))   # reopening a section adds to it
    d = json.loads((tmp_path / "timings.json").read_text())
    assert [s["section"] for s in d["sections"]] == ["0 imports", "3 data", "9 evaluation"]
    secs = {s["section"]: s["seconds"] for s in d["sections"]}
    assert secs == {"0 imports": 2.0, "3 data": 12.5, "9 evaluation": 1.0}
    assert d["total_s"] == 15.5 and d["counts"] == "cell execution time"
    assert {s["section"]: s["cells"] for s in d["sections"]} == {"0 imports": 1, "3 data": 3, "9 evaluation": 1}
    table = timer.table(budget_s=10.0)
    assert "| 3 data | 12.5 | 81% |" in table and "**15.5**" in table and "OVER the 10 s budget" in table
    assert "within the 600 s budget" in timer.table(budget_s=600.0)
    timer.close()
    _cell(ip, clock, 50.0)                # no longer listening
    assert timer.total == 15.5


def test_without_a_kernel_sections_are_timed_by_the_wall_clock(tmp_path):
    clock = _Clock()
    timer = SectionTimer(tmp_path / "t.json", clock=clock)
    timer.section("a")
    clock.t += 3.0
    timer.section("b")
    clock.t += 4.0
    timer.close()
    assert timer.as_dict()["sections"] == [
        {"section": "a", "seconds": 3.0, "cells": 1, "share": 0.4286},
        {"section": "b", "seconds": 4.0, "cells": 1, "share": 0.5714}]
    assert json.loads(timer.save().read_text())["counts"] == "wall clock"


def test_the_machine_speed_is_measured_saved_and_printed_with_the_timings(tmp_path, monkeypatch):
    import torch

    from vla_bridge import timings

    gflops = timings.matmul_gflops(n=256, reps=2)
    assert 0.1 < gflops < 1e6                      # a real measurement: 2 n^3 flops over a positive time
    speeds = iter([150.04, 120.0])
    monkeypatch.setattr(timings, "matmul_gflops", lambda: next(speeds))
    clock = _Clock()
    timer = SectionTimer(tmp_path / "t.json", clock=clock)
    assert "machine speed" not in timer.table()    # nothing measured, nothing claimed
    timer.section("a")
    assert timer.calibrate("start") == 150.04
    clock.t += 3.0
    timer.calibrate("end")
    saved = json.loads((tmp_path / "t.json").read_text())["machine"]
    assert saved == {"matmul_gflops": {"start": 150.0, "end": 120.0}, "torch_threads": torch.get_num_threads()}
    assert "150 GFLOPS at the start, 120 GFLOPS at the end." in timer.table(budget_s=600.0)
