"""The main-environment side of POLICY=octo against the stand-in worker (``VLA_BRIDGE_OCTO_WORKER=standin``: the
real command line, shard reader, checkpoint layout and serve protocol, a numpy toy model inside). Always runs; the
real worker's tests (test_octo_worker.py) run wherever .venv-octo exists."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from vla_bridge.data import splits, stream
from vla_bridge.data import stats as dstats
from vla_bridge.octo import client as octo
from vla_bridge.octo import protocol
from vla_bridge.octo import shards as octo_shards


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setenv(protocol.WORKER_ENV, "standin")


@pytest.fixture(scope="module")
def shards(small, tmp_path_factory):
    ds = stream.open_dataset(str(small.root), seed=0)
    split = splits.make_split(ds)
    st = dstats.compute_action_stats(ds, episodes=split.train)
    out = octo_shards.write_octo_shards(ds, sorted(split.train)[:3], st, "demo_world",
                                        tmp_path_factory.mktemp("shards"), progress=False)
    return out, st


def test_worker_selection(monkeypatch, tmp_path):
    monkeypatch.delenv("VLA_BRIDGE_OCTO_PYTHON", raising=False)
    monkeypatch.delenv(protocol.WORKER_ENV, raising=False)
    with pytest.raises(protocol.OctoEnvError, match="bash setup.sh --octo"):
        protocol.worker_command(tmp_path)                         # the real worker needs .venv-octo
    monkeypatch.setenv(protocol.WORKER_ENV, "standin")
    cmd = protocol.worker_command(tmp_path)
    assert cmd.standin and cmd.argv("check") == [sys.executable, "-m", "vla_bridge.octo.standin_worker", "check"]
    assert "not Octo" in str(cmd)
    from vla_bridge import preflight

    assert preflight.check_octo_env("octo", tmp_path).ok       # pre-flight accepts the stand-in
    monkeypatch.setenv(protocol.WORKER_ENV, "jax")
    with pytest.raises(protocol.OctoEnvError, match="not one of octo, standin"):
        protocol.worker_command(tmp_path)
    res = preflight.check_octo_env("octo", tmp_path)
    assert not res.ok and protocol.WORKER_ENV in res.fix


def test_xla_flags_fast_compile_for_cpu_training_full_for_serving(monkeypatch, tmp_path):
    assert octo.xla_flags("", True) == octo.XLA_FAST_COMPILE
    assert octo.xla_flags("--xla_foo=1", True) == "--xla_foo=1 " + octo.XLA_FAST_COMPILE
    assert octo.xla_flags("--xla_backend_optimization_level=2", True) == "--xla_backend_optimization_level=2"
    assert octo.xla_flags("--xla_foo=1 " + octo.XLA_FAST_COMPILE, False) == "--xla_foo=1"
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    assert octo.worker_env(False)["XLA_FLAGS"] == "--xla_foo=1"                       # None: as the user set it
    assert octo.worker_env(False, True)["XLA_FLAGS"] == "--xla_foo=1 " + octo.XLA_FAST_COMPILE
    seen = {}
    monkeypatch.setattr(octo, "run_worker", lambda args, **kw: (seen.update(kw), (1, []))[1])
    for device, want in (("cpu", True), ("cuda", None)):
        cfg = SimpleNamespace(device=device, hub="no", model_id="octo-random", run_name="r", outputs_dir=tmp_path,
                              data_dir=tmp_path, max_steps=1, batch_size=1, learning_rate=1e-4, warmup_steps=1,
                              log_every=1, save_every=1, seed=0, image_aug=False)
        with pytest.raises(RuntimeError, match="the Octo worker failed"):
            octo.train_octo(cfg, tmp_path)
        assert seen["fast_compile"] is want, device


def test_train_octo_and_serve_through_the_standin(standin, shards, tmp_path):
    from vla_bridge.config import resolve_run_config
    from vla_bridge import hardware

    sh, st = shards
    cfg = resolve_run_config({"POLICY": "octo", "MODEL_ID": "octo-random", "MAX_STEPS": 3, "BATCH_SIZE": 2,
                              "LOG_EVERY": 1, "SAVE_EVERY": 2, "RUN_NAME": "standin",
                              "OUTPUTS_DIR": str(tmp_path / "out"), "DATA_DIR": str(tmp_path / "data")},
                             env={}, hw=hardware.detect_hardware(), hub=hardware.Decision("no", "offline"))
    echoed: list[str] = []
    res = octo.train_octo(cfg, sh.dir, echo=echoed.append)
    assert res.steps == 3 and res.frames_seen == 6 and res.stopped_reason == "max_steps"
    assert res.info["worker"] == "standin" and any("stand-in worker" in line for line in echoed)
    assert not any(line.startswith(protocol.RESULT_PREFIX) for line in echoed)
    log = [json.loads(x) for x in res.log_path.read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and log[0]["lr"] == 0.0 and log[1]["lr"] > 0.0
    assert all(r["action_accuracy"] is None and np.isfinite(r["loss"]) for r in log)
    ck = cfg.path("checkpoints")
    assert sorted(p.name for p in ck.iterdir()) == ["base", "latest", "step_000002", "step_000003"]
    assert res.last_checkpoint == ck / "step_000003"
    assert json.loads((ck / "latest" / "training_state.json").read_text())["step"] == 3

    frames = [np.full((128, 128, 3), v, np.uint8) for v in (0, 128, 255)]
    texts = ["put the red block on the plate"] * 3
    with octo.OctoServer(ck / "latest", base=ck / "base", hub_ok=False, echo=None) as srv:
        assert srv.weights == ["base", "finetuned"] and srv.horizon == sh.manifest["horizon"]
        assert srv.statistics["demo_world"]["action"]["q01"] == pytest.approx(st["action"]["q01"])
        seen: list[int] = []
        ft = octo.OctoPolicy(srv, st, "finetuned", request_frames=2)
        a1 = ft.act(frames, texts, None, seen.append)
        a2 = ft.act(frames, texts)
        base = octo.OctoPolicy(srv, st, "base").act(frames, texts)
        with pytest.raises(RuntimeError, match="weights 'nope' not loaded"):
            srv.predict(np.zeros((1, 8, 8, 3), np.uint8), ["x"], weights="nope")
        chunks = srv.predict(np.zeros((2, 8, 8, 3), np.uint8), ["x", "y"])   # the server keeps serving
        info = octo.model_info(cfg, res, srv)
    assert srv.proc.returncode == 0                                          # "close" ended it cleanly
    assert seen == [2, 1] and a1.shape == (3, 7) and np.array_equal(a1, a2)   # deterministic
    assert not np.allclose(a1[0], a1[2])                                      # it reads the image
    assert not np.allclose(a1, base)                                          # training moved the weights
    assert chunks.shape == (2, sh.manifest["horizon"], 7)
    assert "stand-in" in info["class"] and info["worker"]["kind"] == "standin"


def test_standin_refuses_a_checkpoint_it_did_not_write(standin, tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(RuntimeError, match="not a stand-in checkpoint"):
        octo.OctoServer(tmp_path / "ck", echo=None)
