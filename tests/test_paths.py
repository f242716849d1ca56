"""Issue 14 item 8: a mistyped local DATASET / MODEL_ID path that contains "/" is reported as a missing directory,
not as "a hub id but the hub is unreachable"; a real owner/name still reads as a hub id."""

from __future__ import annotations

from pathlib import Path

import pytest

from vla_bridge import hardware
from vla_bridge import preflight
from vla_bridge.data import source

DOWN = hardware.Decision("no", "unreachable within 3 s (URLError)")


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


MISTYPED = ["data/bridge_copy", "~/bridge_copy", "bridge_copy/", "./bridge_copy", "/nowhere/bridge_copy",
            "data/bridge/copy", "../bridge_copy"]


@pytest.mark.parametrize("text", MISTYPED)
def test_mistyped_dataset_path_is_no_such_directory(in_tmp, text):
    expanded = str(Path(text).expanduser().resolve())
    with pytest.raises(hardware.PreflightError) as exc:
        hardware.choose_dataset(text, "openvla", False)
    msg = str(exc.value)
    assert "no such directory" in msg and expanded in msg and "unreachable" not in msg and "\n" not in msg
    r = preflight.check_hub_for(text, "openvla", "openvla/openvla-7b", hardware.Decision("yes", "reachable"))
    assert not r.ok and "no such directory" in r.detail and r.name == "dataset"
    with pytest.raises(source.StreamError, match="no such directory"):
        source.resolve_source(text)


@pytest.mark.parametrize("text", MISTYPED)
def test_mistyped_model_id_path_is_no_such_directory(in_tmp, text):
    assert preflight.model_id_kind("openvla", text) == "missing"
    r = preflight.check_model_id("openvla", text)
    assert not r.ok and "no such directory" in r.detail and str(Path(text).expanduser().resolve()) in r.detail
    assert preflight.check_hub_for("embedded", "openvla", text, DOWN).ok   # the hub is not what is wrong


@pytest.mark.parametrize("text", ["nvidia/bridge_lerobot_v3", "openvla/openvla-7b", "IPEC-COMMUNITY/bridge_orig_lerobot",
                                  "some_one/my.data-set"])
def test_hub_ids_still_read_as_hub_ids(in_tmp, text):
    assert hardware.looks_like_hub_id(text)
    with pytest.raises(hardware.PreflightError, match="hub is unreachable"):
        hardware.choose_dataset(text, "openvla", False)
    assert preflight.model_id_kind("openvla", text) == "hub"


@pytest.mark.parametrize("text", ["a/b/c", "-x/y", "x/y-", "x//y", "x y/z", "owner/", "/owner/name", "owner/na..me"])
def test_not_hub_ids(text):
    assert not hardware.looks_like_hub_id(text)
