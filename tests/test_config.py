"""Parameters as a person writes them, checked before anything heavy: types, numbers, UNNORM_KEY, the tiny base."""

from __future__ import annotations

import math

import pytest

from vla_bridge import config
from vla_bridge.config import DEFAULT_PARAMS, check_param, parse_param, resolve_run_config
from vla_bridge.hardware import Decision, HardwareInfo, PreflightError
from vla_bridge import policy
from vla_bridge.pretrain import PretrainParams
from vla_bridge.tools.runner import execute_notebook, parse_kv


def fake_cpu() -> HardwareInfo:
    return HardwareInfo(cuda_available=False, device_name="cpu", gpu_count=0, total_vram_gb=None, free_vram_gb=None,
                        bf16_supported=False, cpu_count=2, ram_gb=8.0, python="3.11", platform="linux")


def _resolve(params: dict, hw=None):
    return resolve_run_config(params, env={}, hw=hw or fake_cpu(), hub=Decision("no", "test"), bnb_available=False)


def _one_line(msg: str) -> bool:
    return "\n" not in msg and len(msg) < 300


# ----------------------------------------------------------------------------------------------- 2. -p parsing


@pytest.mark.parametrize("pair, value", [
    ("RESUME=False", False), ("RESUME=false", False), ("RESUME=True", True), ("IMAGE_AUG=False", False),
    ("USE_WANDB=true", True), ("LEARNING_RATE=1e-4", 1e-4), ("LEARNING_RATE=.5", 0.5), ("LEARNING_RATE=2", 2.0),
    ("SAVE_EVERY=1e3", 1000), ("SEED=7", 7), ("ABLATION_RANKS=[1,2]", [1, 2]), ("ABLATION_RANKS=8,16", "8,16"),
    ("MAX_STEPS=auto", "auto"), ("MAX_STEPS=40", 40), ("RUN_NAME=123", "123"), ("UNNORM_KEY=None", "None"),
    ("DEMO_EPISODES=finetune=12", "finetune=12"), ("DEMO_EPISODES=60", 60), ("HUB_TIMEOUT_S=3", 3.0),
])
def test_values_are_parsed_as_a_person_writes_them(pair, value):
    got = parse_kv([pair])[pair.split("=", 1)[0]]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("pair, words", [
    ("RESUME=None", "RESUME=None must be True or False"), ("RESUME=yes", "RESUME='yes' must be True or False"),
    ("IMAGE_AUG=1", "IMAGE_AUG=1 must be True or False"), ("LORA_RANK=8.5", "LORA_RANK=8.5 must be an integer"),
    ("SEED=True", "SEED=True must be an integer"), ("LEARNING_RATE=fast", "LEARNING_RATE='fast' must be a number"),
    ("MAX_STEPS=many", "MAX_STEPS='many' must be an integer or 'auto'"),
])
def test_a_value_of_the_wrong_type_is_a_one_line_error(pair, words):
    with pytest.raises(SystemExit) as exc:
        parse_kv([pair])
    msg = str(exc.value)
    assert msg.startswith("error: ") and words in msg and _one_line(msg), msg


def test_every_parameter_default_passes_its_own_check():
    assert {k: check_param(k, v) for k, v in DEFAULT_PARAMS.items()} == DEFAULT_PARAMS
    assert parse_param("LEARNING_RATE", "nan") != parse_param("LEARNING_RATE", "nan")  # parsed; rejected below


def test_runner_rejects_mistyped_values_before_starting_a_kernel(tmp_path):
    src = tmp_path / "nb.py"
    src.write_text('# %% tags=["parameters"]\nRESUME = False\n')
    with pytest.raises(SystemExit, match=r"error: RESUME='False' must be True or False, not str"):
        execute_notebook(src, tmp_path / "out.ipynb", {"RESUME": "False"})   # e.g. from a --params-file
    assert not (tmp_path / "out.ipynb").exists()


def test_resolve_run_config_takes_only_the_parameters_type():
    assert _resolve({"RESUME": False, "IMAGE_AUG": False}).resume is False
    with pytest.raises(PreflightError, match="RESUME='False' must be True or False"):
        _resolve({"RESUME": "False"})
    with pytest.raises(PreflightError, match="IMAGE_AUG='False' must be True or False"):
        _resolve({"IMAGE_AUG": "False"})


# ----------------------------------------------------------------------------------------------- 7. numbers


@pytest.mark.parametrize("params, words", [
    ({"LEARNING_RATE": math.nan}, "LEARNING_RATE=nan must be a finite number > 0"),
    ({"LEARNING_RATE": 0.0}, "LEARNING_RATE=0.0 must be a finite number > 0"),
    ({"LEARNING_RATE": -1e-4}, "LEARNING_RATE=-0.0001 must be a finite number > 0"),
    ({"LEARNING_RATE": math.inf}, "LEARNING_RATE=inf must be a finite number > 0"),
    ({"HUB_TIMEOUT_S": 0}, "HUB_TIMEOUT_S=0.0 must be a finite number > 0"),
    ({"SEED": -1}, "SEED=-1 must be ≥ 0"), ({"WARMUP_STEPS": -5}, "WARMUP_STEPS=-5 must be ≥ 0"),
    ({"LORA_ALPHA": 0}, "LORA_ALPHA=0 must be ≥ 1"), ({"LOG_EVERY": 0}, "LOG_EVERY=0 must be ≥ 1"),
    ({"SAVE_EVERY": -1}, "SAVE_EVERY=-1 must be ≥ 1"), ({"BATCH_SIZE": 0}, "BATCH_SIZE=0 must be ≥ 1"),
    ({"GRAD_ACCUM": 0}, "GRAD_ACCUM=0 must be ≥ 1"), ({"EVAL_EPISODES": 0}, "EVAL_EPISODES=0 must be ≥ 1"),
    ({"PRETRAIN_STEPS": 0}, "PRETRAIN_STEPS=0 must be ≥ 1"), ({"STREAM_BATCHES": 0}, "STREAM_BATCHES=0 must be ≥ 1"),
    ({"DEMO_EPISODES": 0}, "DEMO_EPISODES=0 must be ≥ 1"), ({"ABLATION_RANKS": [8, 0]}, "must be ≥ 1"),
])
def test_every_number_is_checked_before_anything_is_loaded(params, words, monkeypatch):
    def no_probe(*a, **k):
        raise AssertionError("the hardware was probed before the numbers were checked")

    monkeypatch.setattr(config.hwmod, "detect_hardware", no_probe)
    with pytest.raises(PreflightError) as exc:
        resolve_run_config(params, env={}, hub=Decision("no", "test"), bnb_available=False,
                           hw=fake_cpu() if "PRETRAIN_STEPS" in params else None)  # 0 is fine off the tiny path
    assert words in str(exc.value) and _one_line(str(exc.value)), str(exc.value)


# ----------------------------------------------------------------------------------------------- 8. the tiny base


def test_unnorm_key_typo_on_the_embedded_world_is_an_error():
    assert _resolve({"UNNORM_KEY": "demo_world"}).unnorm_key == "demo_world"
    with pytest.raises(PreflightError) as exc:
        _resolve({"UNNORM_KEY": "demo_wrld"})
    msg = str(exc.value)
    assert "UNNORM_KEY='demo_wrld'" in msg and "'demo_world'" in msg and _one_line(msg)


def test_no_fine_tuning_parameter_selects_or_repretrains_the_tiny_base(monkeypatch, tmp_path):
    """The cached base is asked for with the embedded world's key and the pretraining's own seed, whatever
    UNNORM_KEY and SEED say, so neither can re-pretrain it and overwrite the cache."""
    import vla_bridge.pretrain as pretrain

    asked = []

    def fake_base(out_dir, unnorm_key, params, progress=True):
        asked.append((unnorm_key, params))
        raise RuntimeError("stop here")

    monkeypatch.setattr(pretrain, "ensure_tiny_base", fake_base)
    for params in ({"SEED": 7}, {"SEED": 0}, {"DATASET": str(tmp_path), "UNNORM_KEY": "bridge_orig", "SEED": 3}):
        cfg = _resolve({"POLICY": "tiny", "DATA_DIR": str(tmp_path), **params})
        with pytest.raises(RuntimeError, match="stop here"):
            policy.load_policy(cfg, {})
    assert [a[0] for a in asked] == ["demo_world"] * 3
    assert all(a[1] == PretrainParams(steps=600) for a in asked)
