"""The notebook's sections 3b–8 (split, statistics, load, LoRA, train, loss curve) without Jupyter, in one process or
in N data-parallel ones: ``python -m vla_bridge train``, ``accelerate launch … -m vla_bridge train``, ``torchrun …
-m vla_bridge train`` and, from the notebook's section 7, :func:`launch` (``accelerate.notebook_launcher``).

Every process runs :func:`run`: it prepares the data and the model itself (process 0 first, then the others from
its caches: the embedded dataset, the action statistics, the tiny base, the hub download), streams its own share
of the training episodes (``TrainingStream(shard=(rank, world))``) and calls the shared ``training.train``. Process
0 alone writes ``split.json``, ``dataset_statistics.json``, the training log, W&B, the checkpoints, the per-epoch
frame counts summed over the processes (``stream_counts.json``), ``launch.json`` (world size, global batch, each
process's episodes), ``train_result.json`` and the loss curve.

Evaluation is not here: it stays single-process (the notebook's section 9 on the kernel's model, with the trained
adapter loaded), because it is minutes next to hours of training and one process keeps its episode order, CIs and
closed-loop rollouts exactly the single-GPU ones.

This is the top layer for training: nothing imports it except ``__main__`` and the notebook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from . import hardware, plots
from .checkpoints import TrainingError, load_checkpoint_weights
from .config import RunConfig, resolve_run_config, write_json
from .data import build, counting, source, splits, stream
from .data import stats as dstats
from .data.splits import LeakageError
from .hardware import PreflightError
from .models.lora import trainable_parameters
from .models.openvla import ModelLoadError, attach_lora, model_image_size
from .policy import PolicyLoadError, load_policy
from .train_log import loss_descent_check, read_log
from .training import TrainConfig, TrainResult, train

# The project's one-line errors: the CLI prints them as one line (anything else keeps its traceback).
ONE_LINE_ERRORS = (PreflightError, TrainingError, source.StreamError, counting.RepeatedSampleError,
                   source.DatasetVersionError, PolicyLoadError, ModelLoadError, LeakageError, ValueError)

RESULT_FILE = "train_result.json"
COUNTS_FILE = "stream_counts.json"
LAUNCH_FILE = "launch.json"
PARAMS_FILE = "run_params.json"     # what a subprocess launch hands to `python -m vla_bridge train --params`


def train_config(cfg: RunConfig, **overrides: Any) -> TrainConfig:
    """THE map from the notebook's resolved run configuration to the training loop's; ``overrides`` replace fields
    (a benchmark's ``save_every=10**9``, a test's ``stop_after``)."""
    fields = dict(run_name=cfg.run_name, outputs_dir=cfg.outputs_dir, max_steps=cfg.max_steps,
                  batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, learning_rate=cfg.learning_rate,
                  warmup_steps=cfg.warmup_steps, log_every=cfg.log_every, save_every=cfg.save_every, seed=cfg.seed,
                  image_aug=cfg.image_aug, use_wandb=cfg.use_wandb, resume=cfg.resume, unnorm_key=cfg.unnorm_key)
    fields.update(overrides)
    return TrainConfig(**fields)


def launched_world(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) this process was launched as by torchrun / accelerate launch / notebook_launcher."""
    env = os.environ if env is None else env
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))


MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")


def check_world(requested: Any, world: int, env: Mapping[str, str] | None = None) -> None:
    """NUM_PROCESSES against the launcher's world size: under a launcher the launcher decides; an explicit
    NUM_PROCESSES other than 1 or 'auto' must agree with it. Also catches ``accelerate launch --cpu
    --num_processes N`` without MPI, which starts ONE process (accelerate's CPU launcher needs mpirun)."""
    env = os.environ if env is None else env
    if (world == 1 and str(env.get("ACCELERATE_USE_CPU", "")).lower() == "true" and "MASTER_PORT" in env
            and not any(k in env for k in MPI_SIZE_VARS)):
        raise PreflightError("`accelerate launch --cpu --num_processes N` started ONE process (accelerate's CPU "
                             "launcher needs MPI): on a CPU use `accelerate launch --multi_gpu --num_processes N "
                             "-m vla_bridge train …` (gloo) or `torchrun --standalone --nproc-per-node N …`")
    if world > 1 and requested not in (1, "auto", world):
        raise PreflightError(f"NUM_PROCESSES={requested!r} but this process was launched as one of {world} "
                             f"(WORLD_SIZE={world}): drop NUM_PROCESSES (the launcher decides) or launch {requested}")


@dataclasses.dataclass
class Finetuned:
    """What sections 3b–8 produce. In the launching notebook (``launch``) only ``cfg``, ``result``, ``counts``,
    ``check`` and ``curve`` are set: the model and data live in the worker processes."""

    cfg: RunConfig
    result: TrainResult
    counts: dict
    check: dict
    curve: Path | None
    world_size: int = 1
    model: Any = None
    processor: Any = None
    split: Any = None
    action_stats: Any = None

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world_size

    def summary(self) -> str:
        r = self.result
        return "\n".join([
            f"{r.steps} optimizer steps × global batch {self.global_batch} (BATCH_SIZE {self.cfg.batch_size} × "
            f"GRAD_ACCUM {self.cfg.grad_accum} × {self.world_size} process{'es' if self.world_size > 1 else ''}), "
            f"{r.frames_seen:,} frames in {r.seconds:.0f} s; stopped: {r.stopped_reason}",
            f"log: {r.log_path}\nlast checkpoint: {r.last_checkpoint}",
            counting.format_counts(self.counts),
            f"loss: first tenth {self.check.get('first_tenth', float('nan')):.3f} → last tenth "
            f"{self.check.get('last_tenth', float('nan')):.3f}; below our 0.7× bar: {self.check.get('ok')}"])


def _state(cfg: RunConfig):
    from accelerate import PartialState  # lazy: accelerate imports take seconds

    return PartialState(cpu=cfg.device == "cpu")


@contextlib.contextmanager
def _main_first(state):
    """Process 0 first, then each node's first process, then the rest: caches are written once per file system."""
    with state.main_process_first(), state.local_main_process_first():
        yield


def run(params: Mapping[str, Any], *, progress: bool = True, **train_overrides: Any) -> Finetuned:
    """Sections 3b–8 in this process, which may be one of several a launcher started (module docstring)."""
    check_world(params.get("NUM_PROCESSES", 1), launched_world()[1])
    cfg = resolve_run_config({**params, "NUM_PROCESSES": 1})
    if cfg.policy == "octo":
        raise PreflightError("python -m vla_bridge train fine-tunes the torch VLAs (openvla, openvla-4bit, tiny); "
                             "POLICY=octo trains in its own JAX worker: run the notebook")
    state = _state(cfg)
    rank, world = state.process_index, state.num_processes   # torchrun / accelerate / notebook_launcher / MPI
    check_world(params.get("NUM_PROCESSES", 1), world)
    cfg = dataclasses.replace(cfg, num_processes=world)
    main = state.is_main_process
    say = print if main else (lambda *a, **k: None)
    say(cfg.summary())

    with _main_first(state):                                             # sections 3–4
        if cfg.dataset == hardware.EMBEDDED_DATASET:
            data_source = str(build.ensure_demo_dataset(cfg.data_dir, episodes=params.get("DEMO_EPISODES", "auto"),
                                                        eval_episodes=cfg.eval_episodes,
                                                        progress=progress and main).root)
        else:
            data_source = cfg.dataset
        source.check_version(source.resolve_source(data_source).info, data_source)
        ds = stream.open_dataset(data_source, seed=cfg.seed)
        split = splits.make_split(ds)                                    # 3b; raises LeakageError
        action_stats = dstats.compute_action_stats(ds, episodes=split.train,                 # 3c
                                                   cache_dir=Path(cfg.data_dir) / "action_stats")
        loaded = load_policy(cfg, action_stats, progress=progress and main)                  # 4
    if main:
        write_json(cfg.path("logs") / "split.json", split.as_dict())
        dstats.save_dataset_statistics(cfg.path("logs"), {cfg.unnorm_key: dstats.norm_stats_entry(action_stats)})
        say(split.describe())
    model = attach_lora(loaded.model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)          # 6
    trainable, total, share = trainable_parameters(model)
    say(f"LoRA r={cfg.lora_rank}, alpha={cfg.lora_alpha}: {trainable:,} trainable of {total:,} = {share:.2f} %")

    fit_stream = stream.TrainingStream(data_source, episodes=split.train, seed=cfg.seed, shard=(rank, world),
                                       image_size=model_image_size(loaded.processor))        # 7
    shards = _gather(state, sorted(fit_stream.ds.selected_episodes))
    if main:
        write_json(cfg.path("logs") / LAUNCH_FILE, {"world_size": world, "global_batch": cfg.batch_size *
                                                    cfg.grad_accum * world, "episodes_per_process": shards})
    result = train(model, loaded.processor, fit_stream, {cfg.unnorm_key: action_stats},
                   train_config(cfg, progress=progress, **train_overrides))
    counts = counting.merge_counts(_gather(state, fit_stream.counter.as_dict()),
                                   _gather(state, sorted(fit_stream.counter.seen)) if world > 1 else None)
    check, curve = {}, None
    if main:                                                                                 # 8
        check = loss_descent_check(read_log(result.log_path), within_steps=500)
        write_json(cfg.path("logs") / COUNTS_FILE, counts)
        write_json(cfg.path("logs") / RESULT_FILE, dataclasses.asdict(result))
        curve = plots.plot_loss_curve(read_log(result.log_path), cfg.path("figures") / "loss_curve.png")
    state.wait_for_everyone()
    return Finetuned(cfg, result, counts, check, curve, world, model, loaded.processor, split, action_stats)


def _gather(state, obj: Any) -> list:
    if state.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object  # lazy: accelerate imports take seconds

    return gather_object([obj])


def load_finetuned(cfg: RunConfig) -> Finetuned:
    """A finished run's :class:`Finetuned` from what process 0 wrote (the launching notebook's view)."""
    logs = cfg.path("logs")
    if not (logs / RESULT_FILE).is_file():
        raise FileNotFoundError(f"{logs / RESULT_FILE} is missing: the training processes did not finish")
    r = json.loads((logs / RESULT_FILE).read_text())
    for k in ("log_path", "last_checkpoint", "resumed_from"):
        r[k] = Path(r[k]) if r.get(k) else None
    result = TrainResult(**r)
    launch_info = json.loads((logs / LAUNCH_FILE).read_text())
    curve = cfg.path("figures") / "loss_curve.png"
    return Finetuned(cfg, result, json.loads((logs / COUNTS_FILE).read_text()),
                     loss_descent_check(read_log(result.log_path), within_steps=500),
                     curve if curve.is_file() else None, int(launch_info["world_size"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(num_processes: int, params_path: str | os.PathLike | None, port: int | None = None,
                   extra: list[str] | None = None) -> list[str]:
    """``accelerate launch --multi_gpu --num_processes N -m vla_bridge train --params FILE``, with this Python.
    ``--multi_gpu`` on a CPU too: it is accelerate's torch-elastic launcher (the processes then use gloo), while
    its ``--cpu`` launcher starts one process unless MPI is set up."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port or free_port()),
            "-m", "vla_bridge", *(extra or ["train", "--params", str(params_path)])]


def run_launcher(cmd: list[str], quiet: bool = False) -> None:
    """Run a launcher command, its output streamed here (the notebook cell; ``quiet``: only its last lines, on a
    failure); a failure is one line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            lines.append(line)
            if not quiet:
                print(line, end="")
    if proc.returncode and quiet:
        print("".join(lines[-40:]), end="")
    if proc.returncode:
        raise RuntimeError(f"the {cmd[cmd.index('--num_processes') + 1]}-process launch exited with "
                           f"{proc.returncode} (its output is above): {' '.join(cmd[1:])}")


def _launched_run(params: dict) -> None:
    run(params, progress=False)


def launch(params: Mapping[str, Any], cfg: RunConfig) -> Finetuned:
    """Section 7 with ``NUM_PROCESSES`` > 1: ``cfg.num_processes`` processes each run :func:`run`.

    Through ``accelerate.notebook_launcher`` (fork) while this process has neither touched CUDA nor imported
    bitsandbytes. On a GPU the notebook has touched CUDA (sections 1 and 4) and fork cannot carry it, and
    notebook_launcher refuses once bitsandbytes is loaded, so then the same run is started as
    ``accelerate launch … -m vla_bridge train --params outputs/logs/<run>/run_params.json``. Either way the result is
    read back from what process 0 wrote."""
    params = {**params, "NUM_PROCESSES": cfg.num_processes}
    # notebook_launcher refuses to fork once bitsandbytes is imported (peft imports it when installed, so on a Linux
    # box any earlier LoRA cell did): then the subprocess launcher too
    if (torch.cuda.is_available() and torch.cuda.is_initialized()) or "bitsandbytes" in sys.modules:
        path = write_json(cfg.path("logs") / PARAMS_FILE, params)
        run_launcher(launch_command(cfg.num_processes, path))
    else:
        from accelerate import notebook_launcher  # lazy: accelerate imports take seconds
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # this kernel's single-process state (pretraining)
        notebook_launcher(_launched_run, (params,), num_processes=cfg.num_processes, use_port=str(free_port()))
    return load_finetuned(cfg)


def load_adapter(model, fit: Finetuned) -> None:
    """The launched run's final adapter into this process's LoRA model (what section 9 evaluates)."""
    load_checkpoint_weights(model, fit.result.last_checkpoint)


def cli_train(params: Mapping[str, Any]) -> int:
    """``python -m vla_bridge train``: run here (one process, or one of a launcher's), or — NUM_PROCESSES > 1
    without a launcher — start ``accelerate launch`` with the same parameters."""
    rank, world = launched_world()
    try:
        if world == 1 and params.get("NUM_PROCESSES", 1) != 1:
            cfg = resolve_run_config(params)
            if cfg.num_processes > 1:
                path = write_json(cfg.path("logs") / PARAMS_FILE, dict(params))
                run_launcher(launch_command(cfg.num_processes, path))
                return 0
        fit = run(params)
    except ONE_LINE_ERRORS as exc:
        if rank == 0:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        print(fit.summary())
    return 0
