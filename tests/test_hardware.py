"""The policy/dataset decision table, run-config resolution and every pre-flight failure's message."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections import namedtuple

import pytest

from vla_bridge import hardware as hwm
from vla_bridge import preflight
from vla_bridge.config import resolve_run_config
from vla_bridge.hardware import Decision, HardwareInfo, PreflightError


def fake_hw(vram: float | None, bf16: bool = True) -> HardwareInfo:
    cuda = vram is not None
    return HardwareInfo(cuda_available=cuda, device_name="FakeGPU" if cuda else "cpu", gpu_count=int(cuda),
                        total_vram_gb=vram or 0.0, free_vram_gb=vram or 0.0, bf16_supported=bf16 and cuda,
                        cpu_count=2, ram_gb=24.0, python="3.11", platform="Linux x86_64")


@pytest.mark.parametrize(
    "vram, hub, force, policy, bnb, expected",
    [
        (None, True, None, "auto", True, "tiny"),          # no GPU
        (None, False, None, "auto", True, "tiny"),
        (80.0, True, None, "auto", True, "openvla"),       # H100
        (24.0, True, None, "auto", True, "openvla"),       # 4090 / A10G-24
        (22.0, True, None, "auto", True, "openvla"),       # boundary is inclusive
        (16.0, True, None, "auto", True, "openvla-4bit"),  # T4/V100-16 / 4080
        (12.0, True, None, "auto", True, "openvla-4bit"),
        (16.0, True, None, "auto", False, "octo"),         # 4-bit impossible without bitsandbytes
        (8.0, True, None, "auto", True, "octo"),
        (80.0, False, None, "auto", True, "tiny"),         # GPU but no hub and no local checkpoint
        (80.0, True, "tiny", "auto", True, "tiny"),        # FORCE_PATH overrides
        (80.0, True, "octo", "auto", True, "octo"),
        (16.0, True, "openvla", "auto", True, "openvla-4bit"),  # forced OpenVLA picks its precision by VRAM
        (80.0, True, "tiny", "openvla", True, "tiny"),     # FORCE_PATH beats the POLICY parameter
        (80.0, True, None, "octo", True, "octo"),          # POLICY parameter beats auto
        (80.0, True, "auto", "tiny", True, "tiny"),        # FORCE_PATH=auto defers to POLICY
        (None, True, "openvla", "auto", True, "openvla"),  # CPU + forced OpenVLA: allowed for small local checkpoints
    ],
)
def test_policy_decision_table(vram, hub, force, policy, bnb, expected):
    d = hwm.choose_policy(fake_hw(vram), hub, policy, force, bnb)
    assert d.value == expected
    assert d.reason  # every decision says why


def test_forced_openvla_on_cpu_says_fp32():
    d = hwm.choose_policy(fake_hw(None), True, "auto", "openvla", True)
    assert "fp32" in d.reason and "CPU" in d.reason


def test_local_model_dir_counts_as_reachable(tmp_path):
    assert hwm.choose_policy(fake_hw(80.0), False, "auto", None, True, model_id=str(tmp_path)).value == "openvla"


@pytest.mark.parametrize("force, policy", [("gpt4", "auto"), (None, "openvla-7b")])
def test_unknown_policy_names_raise(force, policy):
    with pytest.raises(PreflightError, match="is not one of"):
        hwm.choose_policy(fake_hw(80.0), True, policy, force, True)


def test_forced_4bit_without_bitsandbytes_is_an_error():
    with pytest.raises(PreflightError, match="bitsandbytes"):
        hwm.choose_policy(fake_hw(16.0), True, "openvla-4bit", None, False)


@pytest.mark.parametrize("force, policy, bnb, name", [
    (None, "openvla-4bit", True, "POLICY"), (None, "openvla-4bit", False, "POLICY"),
    ("openvla-4bit", "auto", True, "FORCE_PATH"),
])
def test_4bit_without_cuda_fails_in_the_first_cell_in_notebook_terms(force, policy, bnb, name):
    """Not in section 4 after the data section, and not in terms of load_openvla's ``precision=``."""
    with pytest.raises(PreflightError) as e:
        resolve_run_config({"POLICY": policy}, env={"FORCE_PATH": force} if force else {}, hw=fake_hw(None),
                           hub=Decision("yes", "test"), bnb_available=bnb)
    msg = str(e.value)
    assert _one_line(msg) and f"{name}=openvla-4bit needs a CUDA GPU and bitsandbytes" in msg
    assert "POLICY=tiny" in msg and "POLICY=octo" in msg and "POLICY=openvla" in msg and "precision" not in msg


def test_dataset_decision(tmp_path):
    assert hwm.choose_dataset("auto", "tiny", True).value == "embedded"
    assert hwm.choose_dataset("auto", "openvla", True).value == hwm.HUB_BRIDGE_V3
    assert hwm.choose_dataset("auto", "openvla", False).value == "embedded"
    assert hwm.choose_dataset("embedded", "openvla", True).value == "embedded"
    assert hwm.choose_dataset(str(tmp_path), "openvla", False).value == str(tmp_path)
    assert hwm.choose_dataset("someone/bridge", "octo", True).value == "someone/bridge"
    with pytest.raises(PreflightError, match="hub is unreachable"):
        hwm.choose_dataset("someone/bridge", "octo", False)
    with pytest.raises(PreflightError, match="no such directory"):
        hwm.choose_dataset("./no/such/dir", "octo", True)


def test_resolve_run_config_cpu_defaults():
    cfg = resolve_run_config({}, env={}, hw=fake_hw(None), hub=Decision("no", "test"), bnb_available=False)
    assert (cfg.policy, cfg.dataset, cfg.unnorm_key) == ("tiny", "embedded", "demo_world")
    assert cfg.device == "cpu" and cfg.precision == "fp32"
    assert cfg.run_name == "tiny-embedded"
    assert cfg.ablation_ranks == [8, 16, 32, 64]
    assert cfg.model_id.endswith("tiny_vla_base")
    assert cfg.path("eval").as_posix() == "outputs/eval/tiny-embedded"


def test_resolve_run_config_gpu_defaults_and_env_force():
    cfg = resolve_run_config({}, env={}, hw=fake_hw(80.0), hub=Decision("yes", "t"), bnb_available=True)
    assert (cfg.policy, cfg.model_id, cfg.dataset, cfg.unnorm_key) == (
        "openvla", "openvla/openvla-7b", "nvidia/bridge_lerobot_v3", "bridge_orig")
    assert (cfg.max_steps, cfg.batch_size, cfg.grad_accum, cfg.precision) == (1000, 4, 2, "bf16")
    assert cfg.ablation_ranks == []  # opt-in on the 7B path
    forced = resolve_run_config({}, env={"FORCE_PATH": "tiny"}, hw=fake_hw(80.0), hub=Decision("yes", "t"))
    assert forced.policy == "tiny" and "FORCE_PATH" in forced.policy_reason


def test_resolve_run_config_rejects_bad_values():
    kw = dict(env={}, hw=fake_hw(None), hub=Decision("no", "t"))
    with pytest.raises(PreflightError, match="unknown parameter"):
        resolve_run_config({"MAX_STEP": 3}, **kw)
    with pytest.raises(PreflightError, match="MAX_STEPS=0 must be"):
        resolve_run_config({"MAX_STEPS": 0}, **kw)
    with pytest.raises(PreflightError, match="LORA_RANK=0 must be"):
        resolve_run_config({"LORA_RANK": 0}, **kw)
    with pytest.raises(PreflightError, match="BATCH_SIZE='big'"):
        resolve_run_config({"BATCH_SIZE": "big"}, **kw)
    assert resolve_run_config({"ABLATION_RANKS": "4, 8"}, **kw).ablation_ranks == [4, 8]


# ----------------------------------------------------------------------------------------------- hub probe


def test_hub_offline_env_short_circuits():
    assert hwm.check_hub(env={"HF_HUB_OFFLINE": "1"}).value == "no"


def test_hub_unreachable_and_reachable(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    assert hwm.check_hub(timeout=1.0, env={}).value == "no"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802
            self.send_response(401)  # the hub answered: reachable, even if unauthenticated
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.handle_request, daemon=True)
    t.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    d = hwm.check_hub(timeout=5.0, env={})
    t.join(5)
    srv.server_close()
    assert d.value == "yes" and "401" in d.reason
    assert "hf_secret" not in d.reason


# ----------------------------------------------------------------------------------------------- pre-flight


def _one_line(msg: str) -> bool:
    return "\n" not in msg and len(msg) < 400


def test_torchcodec_unavailable_gives_ffmpeg_fix(monkeypatch):
    real = preflight.importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("torchcodec"):
            raise RuntimeError("Could not load libtorchcodec. Likely causes: FFmpeg is not properly installed")
        return real(name, *a, **k)

    monkeypatch.setattr(preflight.importlib, "import_module", fake)
    r = preflight.check_torchcodec()
    assert not r.ok and "ZERO frames" in r.detail and "ffmpeg" in r.fix.lower()
    with pytest.raises(PreflightError) as exc:
        preflight.raise_on_failure([r])
    assert "torchcodec" in str(exc.value) and "ffmpeg" in str(exc.value).lower() and _one_line(str(exc.value))


def test_torchcodec_message_has_no_dangling_fragment(monkeypatch):
    """torchcodec's real error: a first line that only introduces a list of causes on the following lines."""
    real = preflight.importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("torchcodec"):
            raise RuntimeError("Could not load libtorchcodec. Likely causes:\n  1. FFmpeg is not properly installed "
                               "in your environment. We support versions 4, 5, 6 and 7.\n  2. The PyTorch version ...")
        return real(name, *a, **k)

    monkeypatch.setattr(preflight.importlib, "import_module", fake)
    r = preflight.check_torchcodec()
    assert r.detail.startswith("torchcodec cannot load (Could not load libtorchcodec); video streams"), r.detail
    assert "causes" not in r.detail and ":)" not in r.detail


def test_lerobot_missing_or_old(monkeypatch):
    real_version = preflight.md.version

    def missing(name):
        if name == "lerobot":
            raise preflight.md.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(preflight.md, "version", missing)
    r = preflight.check_lerobot()
    assert not r.ok and "not installed" in r.detail and "setup.sh" in r.fix
    monkeypatch.setattr(preflight.md, "version", lambda n: "0.3.3" if n == "lerobot" else real_version(n))
    r = preflight.check_lerobot()
    assert not r.ok and "0.3.3" in r.detail and "lerobot==0.4.4" in r.fix


def test_real_environment_passes_lerobot_and_torchcodec_checks():
    assert preflight.check_lerobot().ok
    assert preflight.check_torchcodec().ok, preflight.check_torchcodec().detail


def test_timm_outside_openvla_set(monkeypatch):
    real_version = preflight.md.version
    monkeypatch.setattr(preflight.md, "version", lambda n: "1.0.9" if n == "timm" else real_version(n))
    r = preflight.check_timm("openvla")
    assert not r.ok and "1.0.9" in r.detail and "timm==0.9.10" in r.fix
    assert preflight.check_timm("tiny").ok  # only OpenVLA cares


def _fake_disks(monkeypatch, disks):
    """``disks``: {directory: (device id, free GiB)}; a path is on the disk of its nearest listed ancestor."""
    def disk(p):
        owner = max((d for d in disks if p == d or d in p.parents), key=lambda d: len(d.parts))
        return disks[owner]
    monkeypatch.setattr(preflight, "_disk", disk)


def test_disk_check_measures_the_hf_cache_not_only_the_outputs(monkeypatch, tmp_path):
    """~15 GB of weights go to HF_HOME's hub cache: a small HF_HOME disk must fail pre-flight even when OUTPUTS_DIR
    is on a big one, and the message must say which location is short and which variable moves it."""
    hf, out = tmp_path / "small_disk" / "hf", tmp_path / "big_disk" / "outputs"
    (tmp_path / "small_disk").mkdir()
    (tmp_path / "big_disk").mkdir()
    _fake_disks(monkeypatch, {tmp_path: (0, 0.0), tmp_path / "small_disk": (1, 5.0), tmp_path / "big_disk": (2, 500.0)})
    monkeypatch.setenv("HF_HOME", str(hf))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_LEROBOT_HOME"):
        monkeypatch.delenv(var, raising=False)
    checks = preflight.run_preflight("openvla", hwm.HUB_BRIDGE_V3, "openvla/openvla-7b", Decision("yes", "test"), out)
    by_name = {c.name: c for c in checks}
    hub = by_name["disk hf-hub"]
    assert not hub.ok and f"HF_HUB_CACHE={hf / 'hub'} is short: 5.0 GB free" in hub.detail
    assert "~20 GB" in hub.detail and "HF_HUB_CACHE" in hub.fix and "HF_HOME" in hub.fix
    assert by_name["disk outputs"].ok and "500.0 GB free" in by_name["disk outputs"].detail
    # the stream's caches of a hub dataset live under HF_HOME too: short as well, each with its own threshold
    assert not by_name["disk lerobot"].ok and f"HF_LEROBOT_HOME={hf / 'lerobot'}" in by_name["disk lerobot"].detail
    assert f"HF_DATASETS_CACHE={hf / 'datasets'}" in by_name["disk datasets"].detail
    with pytest.raises(PreflightError) as e:
        preflight.raise_on_failure(checks)
    assert "'disk hf-hub' failed" in str(e.value) and "HF_HUB_CACHE" in str(e.value) and _one_line(str(e.value))

    # HF_HUB_CACHE moved to the big disk: the weights fit, the stream caches (still under HF_HOME) do not
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "big_disk" / "hub"))
    by_name = {c.name: c for c in preflight.run_preflight("openvla", hwm.HUB_BRIDGE_V3, "openvla/openvla-7b",
                                                    Decision("yes", "test"), out)}
    assert by_name["disk hf-hub"].ok and not by_name["disk lerobot"].ok
    # local model and dataset: nothing goes to the HF caches, only OUTPUTS_DIR is checked
    names = [c.name for c in preflight.check_disks("openvla", "embedded", str(tmp_path), out)]
    assert names == ["disk outputs"]


def test_disk_locations_on_one_disk_add_up(monkeypatch, tmp_path):
    _fake_disks(monkeypatch, {tmp_path: (7, 30.0)})
    env = {"HF_HOME": str(tmp_path / "hf")}
    checks = preflight.check_disks("openvla", "embedded", "openvla/openvla-7b", tmp_path / "outputs", env=env)
    assert [c.name for c in checks] == ["disk hf-hub", "disk outputs"]
    assert not any(c.ok for c in checks)             # 20 + 20 GB on one 30 GB disk, although each alone fits
    assert "~40 GB together with OUTPUTS_DIR" in checks[0].detail and "free 10.0 GB" in checks[0].fix
    assert all(c.ok for c in preflight.check_disks("tiny", "embedded", "data/tiny_vla_base", tmp_path / "o", env=env))


def test_hf_cache_dirs_resolve_as_the_libraries_do():
    """The same directories huggingface_hub, datasets and lerobot compute from the same environment (their
    constants modules re-read in one subprocess per environment)."""
    envs = [{"HF_HOME": "/x/hfhome"}, {"XDG_CACHE_HOME": "/x/xdg"},
            {"HF_HOME": "/x/hfhome", "HF_HUB_CACHE": "/y/hub", "HF_DATASETS_CACHE": "/z/ds"},
            {"HF_HOME": "/x/hfhome", "HUGGINGFACE_HUB_CACHE": "/y/legacy", "HF_LEROBOT_HOME": "/w/lr"}]
    code = ("import importlib, json, os, sys\n"
            "import huggingface_hub.constants as h, datasets.config as d, lerobot.utils.constants as l\n"
            "for env in json.loads(sys.argv[1]):\n"
            "    for k in [k for k in os.environ if k.startswith(('HF_', 'HUGGINGFACE_', 'XDG_CACHE'))]:\n"
            "        del os.environ[k]\n"
            "    os.environ.update(env)\n"
            "    h, d, l = (importlib.reload(m) for m in (h, d, l))\n"
            "    print(json.dumps([h.HF_HOME, h.HF_HUB_CACHE, str(d.HF_DATASETS_CACHE), str(l.HF_LEROBOT_HOME)]))\n")
    lines = subprocess.run([sys.executable, "-c", code, json.dumps(envs)], capture_output=True, text=True,
                           timeout=300, check=True).stdout.strip().splitlines()[-len(envs):]
    for env, line in zip(envs, lines):
        ours = preflight.hf_cache_dirs({"HOME": os.environ.get("HOME", ""), **env})
        assert [str(ours[k]) for k in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_LEROBOT_HOME")] == \
            json.loads(line), env


def test_bitsandbytes_needed_for_4bit(monkeypatch):
    monkeypatch.setattr(hwm, "package_available", lambda n: False)
    r = preflight.check_bitsandbytes("openvla-4bit")
    assert not r.ok and "bitsandbytes" in r.fix
    assert preflight.check_bitsandbytes("openvla").ok


def test_hub_needed_but_unreachable(tmp_path):
    down = Decision("no", "unreachable within 3 s")
    r = preflight.check_hub_for(hwm.HUB_BRIDGE_V3, "openvla", "openvla/openvla-7b", down)
    assert not r.ok and "HF_HUB_OFFLINE" in r.fix
    # everything local: the hub is not needed
    assert preflight.check_hub_for("embedded", "openvla", str(tmp_path), down).ok
    assert preflight.check_hub_for("embedded", "tiny", "data/tiny_vla_base", down).ok


def test_raise_on_failure_reports_first_and_counts_rest():
    bad = [preflight.CheckResult("a", False, "A broke", "fix A"), preflight.CheckResult("b", False, "B broke", "fix B"),
           preflight.CheckResult("c", False, "optional", "x", required=False)]
    with pytest.raises(PreflightError) as exc:
        preflight.raise_on_failure(bad)
    msg = str(exc.value)
    assert "'a' failed: A broke. Fix: fix A" in msg and "+1 more" in msg and _one_line(msg)
    preflight.raise_on_failure([preflight.CheckResult("ok", True, "fine")])  # no raise
