"""Data-parallel training for real: 2 CPU processes (gloo) under torchrun and accelerate launch, running
``python -m vla_bridge train`` on the small embedded dataset with a small tiny VLA, against the same run in one
process; kills, resumes (same and another number of processes), the one checkpoint writer, the shards' frames."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vla_bridge import finetune
from vla_bridge.checkpoints import (LATEST, META_FILE, STATE_FILE, TrainingError, check_resume_parameters,
                                    resume_checkpoint)
from vla_bridge.config import resolve_run_config
from vla_bridge.data import counting, stream
from vla_bridge.data.splits import make_split
from vla_bridge.data.stats import compute_action_stats, norm_stats_entry
from vla_bridge.hardware import Decision, HardwareInfo, PreflightError
from vla_bridge.models.openvla import attach_lora, load_openvla
from vla_bridge.models.tiny_vla import build_tiny_vla
from vla_bridge.policy import load_policy
from vla_bridge.train_log import read_log
from vla_bridge.training import train

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KEY = "demo_world"
SMALL = dict(image_size=64, vision_width=96, vision_depth=2, hidden_size=128, num_layers=2, intermediate_size=256)
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def setup(small, tmp_path_factory):
    """(dataset root, training split, a small random tiny VLA saved as a local MODEL_ID)."""
    root = small.root
    split = make_split(root)
    ds = stream.open_dataset(root, probe=False)
    stats = {KEY: norm_stats_entry(compute_action_stats(ds, split.train, source="stream"))}
    model, processor = build_tiny_vla(norm_stats=stats, seed=0, **SMALL)
    model_dir = tmp_path_factory.mktemp("tiny") / "vla"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return root, split, model_dir


def _params(tmp: Path, setup, **kw) -> dict:
    root, _, model_dir = setup
    p = {"POLICY": "tiny", "MODEL_ID": str(model_dir), "DATASET": str(root), "UNNORM_KEY": KEY, "RUN_NAME": "dp",
         "OUTPUTS_DIR": str(tmp / "outputs"), "DATA_DIR": str(tmp / "data"), "MAX_STEPS": 6, "BATCH_SIZE": 4,
         "GRAD_ACCUM": 1, "LEARNING_RATE": 2e-3, "WARMUP_STEPS": 2, "LOG_EVERY": 1, "SAVE_EVERY": 3,
         "IMAGE_AUG": False, "LORA_RANK": 8}
    p.update(kw)
    return p


def _env(marker: str = "") -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "VLA_BRIDGE_TEST_RUN": marker}


def _write(tmp: Path, params: dict) -> Path:
    path = tmp / f"run-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(params))
    return path


def torchrun(params_file: Path, *extra: str, nproc: int = 2) -> list[str]:
    """README: torchrun --standalone --nproc-per-node 8 -m vla_bridge train --params run.json"""
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "-m", "vla_bridge", "train",
            "--params", str(params_file), *extra]


def accelerate_launch(params_file: Path, *extra: str, nproc: int = 2) -> list[str]:
    """README: accelerate launch --multi_gpu --num_processes 8 -m vla_bridge train --params run.json (on a CPU too:
    gloo)."""
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(finetune.free_port()),
            "-m", "vla_bridge", "train", "--params", str(params_file), *extra]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.fixture(scope="module")
def two_procs(setup, tmp_path_factory):
    """One 2-process torchrun of 6 steps at BATCH_SIZE 4: its directory and output."""
    tmp = tmp_path_factory.mktemp("dp")
    params = _params(tmp, setup)
    res = _run(torchrun(_write(tmp, params)), tmp)
    return tmp, params, res.stdout + res.stderr


class Interleaved:
    """The frames 2 processes read in one optimizer step, in one process's micro-batch order: ``per`` frames of
    shard 0, then ``per`` of shard 1 (a ``training.FrameSource``)."""

    def __init__(self, shards, per: int):
        self.shards, self.per = shards, per

    def iterate(self, start: int = 0):
        assert start == 0
        its = [s.iterate(0) for s in self.shards]
        while True:
            for it in its:
                for _ in range(self.per):
                    yield next(it)


def test_two_processes_equal_one_process_reading_the_same_shards(two_procs, setup, tmp_path):
    """Exact by design up to float rounding: 2 processes × BATCH_SIZE 4 × GRAD_ACCUM 1 take the same optimizer
    steps as 1 process × BATCH_SIZE 4 × GRAD_ACCUM 2 whose two micro-batches are the two shards' frames (DDP's mean
    of two gradients = accumulation's sum of two halves; only the order of the float additions differs)."""
    tmp, params, _ = two_procs
    root, split, _ = setup
    torch.set_num_threads(1)   # as each launched process (OMP_NUM_THREADS=1): the same matmul reductions
    cfg = resolve_run_config({**params, "GRAD_ACCUM": 2, "RUN_NAME": "ref", "OUTPUTS_DIR": str(tmp_path)},
                             hub=Decision("no", "test"))
    ds = stream.open_dataset(root, probe=False)
    stats = compute_action_stats(ds, episodes=split.train, cache_dir=Path(cfg.data_dir) / "action_stats")
    loaded = load_policy(cfg, stats, progress=False)
    model = attach_lora(loaded.model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
    shards = [stream.TrainingStream(root, episodes=split.train, image_size=64, seed=cfg.seed, shard=(r, 2))
              for r in range(2)]
    ref = train(model, loaded.processor, Interleaved(shards, per=4), {KEY: stats},
                finetune.train_config(cfg, progress=False))
    two = read_log(Path(params["OUTPUTS_DIR"]) / "logs" / "dp" / "train_log.jsonl")
    one = read_log(ref.log_path)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    for a, b in zip(two, one):
        assert a["frames_seen"] == b["frames_seen"] == 8 * a["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)          # the schedule counts optimizer steps
        for k in ("loss", "action_accuracy", "l1", "l1_normalized"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a, b)
    assert two[-1]["loss"] != pytest.approx(two[0]["loss"], rel=1e-3)  # it trained: the comparison is not vacuous
    got = load_file(str(Path(params["OUTPUTS_DIR"]) / "checkpoints" / "dp" / LATEST / "adapter_model.safetensors"))
    want = load_file(str(ref.last_checkpoint / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and got
    worst = max(float((got[k] - want[k]).abs().max()) for k in got)
    moved = max(float((want[k] - v).abs().max()) for k, v in load_file(str(
        Path(params["OUTPUTS_DIR"]) / "checkpoints" / "dp" / "step_000003" / "adapter_model.safetensors")).items())
    print(f"2 processes vs 1: adapter max |diff| {worst:.2e} (moved {moved:.2e} over the last 3 steps)")
    assert worst < 1e-5 < moved, (worst, moved)


def test_no_frame_reaches_two_processes_and_counts_are_summed(two_procs, setup):
    tmp, params, out = two_procs
    _, split, _ = setup
    logs = Path(params["OUTPUTS_DIR"]) / "logs" / "dp"
    launch = json.loads((logs / finetune.LAUNCH_FILE).read_text())
    assert launch["world_size"] == 2 and launch["global_batch"] == 8
    a, b = (set(e) for e in launch["episodes_per_process"])
    assert a and b and not a & b and a | b == set(split.train)
    counts = json.loads((logs / finetune.COUNTS_FILE).read_text())
    assert counts["processes"] == 2 and [p["frames"] for p in counts["per_process"]] == [24, 24]
    assert counts["frames"] == counts["unique"] == 48 and counts["repeats_within_an_epoch"] == 0
    assert counts["epochs"][0]["frames"] == 48
    assert "global batch 8 frames per optimizer step = BATCH_SIZE 4 × GRAD_ACCUM 1 × 2 processes" in out


def test_overlapping_shards_raise(setup):
    """The check that would catch two processes reading the same data (the bug users report)."""
    root, split, _ = setup

    def counted(shard):
        s = stream.TrainingStream(root, episodes=split.train, image_size=32, shard=shard)
        it = s.iterate(0)
        for _ in range(6):
            next(it)
        return s.counter

    c0, c1, same = counted((0, 2)), counted((1, 2)), counted((0, 2))
    merged = counting.merge_counts([c0.as_dict(), c1.as_dict()], [c0.seen, c1.seen])
    assert merged["frames"] == merged["unique"] == 12
    with pytest.raises(counting.RepeatedSampleError, match="came to process 0 and process 1"):
        counting.merge_counts([c0.as_dict(), same.as_dict()], [c0.seen, same.seen])
    with pytest.raises(ValueError, match=f"at most NUM_PROCESSES={len(split.train)} "):
        counting.shard_episodes(split.train, 0, len(split.train) + 1)


def test_only_process_zero_writes_checkpoints_in_the_usual_layout(two_procs, setup):
    from peft import PeftModel

    tmp, params, _ = two_procs
    ckpts = Path(params["OUTPUTS_DIR"]) / "checkpoints" / "dp"
    assert sorted(p.name for p in ckpts.iterdir()) == [LATEST, "step_000003", "step_000006"]  # no leftovers
    writers = [json.loads((ckpts / s / META_FILE).read_text())["written_by"] for s in ("step_000003", "step_000006")]
    assert {w["rank"] for w in writers} == {0} and len({w["pid"] for w in writers}) == 1
    assert {w["world_size"] for w in writers} == {2}
    steps = [r["step"] for r in read_log(Path(params["OUTPUTS_DIR"]) / "logs" / "dp" / "train_log.jsonl")]
    assert steps == list(range(1, 7))                                   # one log writer: each step once
    state = torch.load(ckpts / LATEST / STATE_FILE, weights_only=False)
    assert state["data_position"] == {"world_size": 2, "frames": [24, 24]} and len(state["rank_rng"]) == 2
    assert state["frames_seen"] == 48
    _, base = load_openvla(str(setup[2]), precision="fp32", verbose=False)
    peft = PeftModel.from_pretrained(base, str(ckpts / LATEST))
    saved = load_file(str(ckpts / LATEST / "adapter_model.safetensors"))
    loaded = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) and all(
        torch.equal(loaded[k.replace(".weight", ".default.weight")], v) for k, v in saved.items())


def _worker_pid(marker: str, rank: int) -> int | None:
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = env_file.read_bytes().split(b"\0")
        except OSError:
            continue
        if f"VLA_BRIDGE_TEST_RUN={marker}".encode() in env and f"RANK={rank}".encode() in env \
                and b"LOCAL_RANK=" + str(rank).encode() in env:
            return int(env_file.parent.name)
    return None


def test_kill_one_process_then_resume_from_the_last_complete_checkpoint(setup, tmp_path):
    params = _params(tmp_path, setup, RUN_NAME="kill", MAX_STEPS=40, SAVE_EVERY=3)
    cmd = torchrun(_write(tmp_path, params))
    ckpts = Path(params["OUTPUTS_DIR"]) / "checkpoints" / "kill"
    marker = uuid.uuid4().hex
    log = tmp_path / "killed.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(marker), stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + LAUNCH_TIMEOUT_S
    while not (ckpts / "step_000003" / META_FILE).is_file():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    pid = _worker_pid(marker, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=LAUNCH_TIMEOUT_S)
    out = log.read_text()
    assert proc.returncode != 0, out[-2000:]
    last = resume_checkpoint(ckpts)
    done = int(last.name.split("_")[1])
    assert 3 <= done < 40, out[-2000:]
    res = _run(cmd + ["-p", "RESUME=True"], tmp_path)
    assert f"resumed from {last} at step {done}" in res.stdout
    assert [r["step"] for r in read_log(Path(params["OUTPUTS_DIR"]) / "logs" / "kill" / "train_log.jsonl")] == \
        list(range(1, 41))
    assert (ckpts / LATEST).resolve().name == "step_000040"


def test_accelerate_launch_resumes_a_one_process_run_on_two(setup, tmp_path):
    """RESUME with another number of processes: the global batch stays (8 = 8 × 1 × 1 = 4 × 1 × 2), the episodes
    are dealt anew and each process starts at the same fraction of its new shard's epoch."""
    root, split, _ = setup
    params = _params(tmp_path, setup, RUN_NAME="ws", BATCH_SIZE=8, MAX_STEPS=4, SAVE_EVERY=2)
    torch.set_num_threads(1)
    finetune.run(params, progress=False, stop_after=2)                  # 1 process, stopped after step 2: 16 frames
    res = _run(accelerate_launch(_write(tmp_path, {**params, "BATCH_SIZE": 4}), "-p", "RESUME=True"), tmp_path)
    assert "1 → 2 processes" in res.stdout
    lengths = stream.open_dataset(root, probe=False).episode_lengths()
    shard = [sum(lengths[e] for e in counting.shard_episodes(split.train, r, 2)) for r in range(2)]
    starts = [16 * n // sum(shard) for n in shard]
    state = torch.load(Path(params["OUTPUTS_DIR"]) / "checkpoints" / "ws" / LATEST / STATE_FILE, weights_only=False)
    assert state["step"] == 4 and state["data_position"] == {"world_size": 2, "frames": [s + 8 for s in starts]}
    steps = [r["step"] for r in read_log(Path(params["OUTPUTS_DIR"]) / "logs" / "ws" / "train_log.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_resume_across_world_sizes_keeps_the_global_batch():
    ckpt = Path("outputs/checkpoints/x/step_000100")
    one = {"BATCH_SIZE": 8, "GRAD_ACCUM": 2, "LEARNING_RATE": 1e-3}
    check_resume_parameters(one, {"BATCH_SIZE": 4, "GRAD_ACCUM": 2, "LEARNING_RATE": 1e-3, "WORLD_SIZE": 2}, ckpt)
    check_resume_parameters(one, {"BATCH_SIZE": 8, "GRAD_ACCUM": 1, "LEARNING_RATE": 1e-3, "WORLD_SIZE": 2}, ckpt)
    with pytest.raises(TrainingError) as exc:
        check_resume_parameters(one, {"BATCH_SIZE": 8, "GRAD_ACCUM": 2, "LEARNING_RATE": 1e-3, "WORLD_SIZE": 2}, ckpt)
    msg = str(exc.value)
    assert msg.startswith("RESUME refused:") and "\n" not in msg, msg
    assert "global batch of 16" in msg and "BATCH_SIZE × GRAD_ACCUM = 8 with 2 processes" in msg, msg
    with pytest.raises(TrainingError, match="a number of processes that divides 16"):
        check_resume_parameters(one, {"BATCH_SIZE": 5, "GRAD_ACCUM": 1, "LEARNING_RATE": 1e-3, "WORLD_SIZE": 3}, ckpt)
    with pytest.raises(TrainingError, match="LEARNING_RATE=0.001; this run asks for LEARNING_RATE=0.002"):
        check_resume_parameters(one, {"BATCH_SIZE": 4, "GRAD_ACCUM": 2, "LEARNING_RATE": 2e-3, "WORLD_SIZE": 2}, ckpt)


def _hw(gpus: int) -> HardwareInfo:
    return HardwareInfo(cuda_available=gpus > 0, device_name="gpu" if gpus else "cpu", gpu_count=gpus,
                        total_vram_gb=80.0 if gpus else None, free_vram_gb=80.0 if gpus else None,
                        bf16_supported=gpus > 0, cpu_count=16, ram_gb=64.0, python="3.11", platform="linux")


def test_num_processes_is_resolved_and_checked_early():
    def resolve(hw, **p):
        return resolve_run_config(p, env={}, hw=hw, hub=Decision("yes", "test"), bnb_available=True)

    assert resolve(_hw(8), POLICY="openvla", NUM_PROCESSES="auto").num_processes == 8
    assert resolve(_hw(8), POLICY="openvla").num_processes == 1            # the default stays one process
    assert resolve(_hw(0), POLICY="tiny", NUM_PROCESSES="auto").num_processes == 1
    assert resolve(_hw(0), POLICY="tiny", NUM_PROCESSES=2).num_processes == 2   # CPU processes (gloo)
    with pytest.raises(PreflightError, match=r"^NUM_PROCESSES=4 but this machine shows 2 GPU\(s\).*NUM_PROCESSES=2"):
        resolve(_hw(2), POLICY="openvla", NUM_PROCESSES=4)
    with pytest.raises(PreflightError, match="POLICY=octo trains in one JAX worker"):
        resolve(_hw(0), POLICY="octo", NUM_PROCESSES=2)
    with pytest.raises(PreflightError, match="NUM_PROCESSES='two' must be an integer or 'auto'"):
        resolve(_hw(0), POLICY="tiny", NUM_PROCESSES="two")
    with pytest.raises(PreflightError, match="launched as one of 2"):
        finetune.check_world(3, 2, env={})
    with pytest.raises(PreflightError, match=r"started ONE process.*--multi_gpu --num_processes N"):
        finetune.check_world(1, 1, env={"ACCELERATE_USE_CPU": "True", "MASTER_PORT": "29500"})  # --cpu, no MPI
    finetune.check_world(1, 1, env={"ACCELERATE_USE_CPU": "True", "MASTER_PORT": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    finetune.check_world(2, 2)
    finetune.check_world("auto", 16)


def test_notebook_launcher_path_of_section_7(setup, tmp_path):
    """Section 7 with NUM_PROCESSES=2 on a CPU: accelerate.notebook_launcher forks 2 processes that run sections
    3b–8 themselves; the result comes back from process 0's files and the adapter into this process's model."""
    params = _params(tmp_path, setup, RUN_NAME="nl", MAX_STEPS=2, SAVE_EVERY=2, NUM_PROCESSES=2)
    cfg = resolve_run_config(params, hub=Decision("no", "test"))
    assert cfg.num_processes == 2 and not torch.cuda.is_initialized()
    fit = finetune.launch(params, cfg)
    assert fit.world_size == 2 and fit.result.steps == 2 and fit.result.frames_seen == fit.counts["frames"] == 16
    assert fit.curve is not None and fit.curve.is_file()
    _, base = load_openvla(str(setup[2]), precision="fp32", verbose=False)
    model = attach_lora(base, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
    finetune.load_adapter(model, fit)
    saved = load_file(str(fit.result.last_checkpoint / "adapter_model.safetensors"))
    mine = {k.replace(".default.weight", ".weight"): v for k, v in model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(mine[k], v) for k, v in saved.items())
