"""The Octo-Small worker: runs inside ``.venv-octo`` (JAX/Flax), started by the notebook through
:mod:`vla_bridge.octo.client` with ``.venv-octo/bin/python -m vla_bridge.octo.worker <command>``.

It imports only the standard library, numpy, jax/flax/optax, transformers/tokenizers, octo and, of ``vla_bridge``,
:mod:`vla_bridge.octo.protocol` and :mod:`vla_bridge.octo.worker_common` (stdlib + numpy) — never torch, lerobot or
the rest of ``vla_bridge`` — because none of those exist in that environment. The data arrives as the
shards :mod:`vla_bridge.octo.shards` wrote in the main environment (images already at 256×256, actions already
normalized with the project's q01/q99 rule and chunked to the window / horizon); predictions leave as *normalized*
action chunks, which the main environment de-normalizes with the same statistics. So the normalization formula lives
in one place (``vla_bridge.tokenization``) and this module never needs it.

Commands (each prints human-readable progress lines on stderr/stdout; ``serve`` speaks a framed protocol on stdout):

* ``check`` — import octo with the stand-ins below and print versions (``bash setup.sh --octo`` runs it).
* ``train`` — build or load Octo-Small, fine-tune it on the shards with Octo's fine-tuning recipe (AdamW with weight
  decay 0.01 on kernels, linear warmup then cosine decay, global-norm clip 1.0, frozen T5 encoder ``*hf_model*``,
  diffusion loss, random-resized-crop + colour augmentation of the camera), log ``train_log.jsonl``, write atomic checkpoints ``step_XXXXXX/`` and ``latest/`` (octo's own
  ``save_pretrained`` layout plus our ``dataset_statistics.json``) and the weights before fine-tuning as ``base/``.
* ``serve`` — load ``latest/`` (and ``base/``) and answer predict requests: images + instructions in, normalized
  action chunks out, in fixed-size padded batches so XLA compiles ``sample_actions`` once.

Stand-ins: ``octo.data.utils.data_utils`` does ``import dlimp`` (a GitHub-only tf.data helper) at module level;
octo's model, training utilities and save/load never call it, only octo's tf.data pipeline does, which we replace
with the shards. :func:`install_standins` registers a small module of ours under that name before octo is imported.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import sys
import time
import types
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .protocol import RANDOM_INIT, RESULT_PREFIX, SERVE_BATCH, build_parser, protocol_streams, serve_loop
from .worker_common import IMAGE_KEY, ShardData, augment_images, log, log_record, save_checkpoint

LANGUAGE_KEY = "language_instruction"
FROZEN_KEYS = ("*hf_model*",)          # Octo's recipe: the T5 language encoder stays frozen
OFFLINE_T5_DIRNAME = "t5-offline-bytes"  # octo's LanguageTokenizer builds a T5 encoder when the name contains "t5"
T5_FORMAT = 2                          # bump when build_offline_t5 changes (the directory is rebuilt)


# =================================================================================================== environment


class _Unavailable:
    """Placeholder for dlimp's API: octo's data pipeline is not used in this project."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("dlimp stand-in: octo's tf.data pipeline is not available in vla_bridge's Octo "
                           "environment; the worker reads vla_bridge's shards instead")


def install_standins() -> None:
    """Environment variables for a quiet, offline-friendly import, and a ``dlimp`` stand-in in ``sys.modules``."""
    os.environ.setdefault("USE_TF", "0")                    # transformers: no TF model classes
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "dlimp" in sys.modules:
        return
    mod = types.ModuleType("dlimp")
    mod.__doc__ = "vla_bridge stand-in for dlimp (octo's tf.data helper), enough for octo's model code to import"
    mod.DLataset = type("DLataset", (_Unavailable,), {})
    transforms = types.ModuleType("dlimp.transforms")

    def _missing(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("dlimp stand-in: octo's tf.data transforms are not available here")

    transforms.selective_tree_map = _missing
    mod.transforms = transforms
    sys.modules["dlimp"] = mod
    sys.modules["dlimp.transforms"] = transforms


def import_octo():
    """Import octo's model and training utilities (after the stand-ins); returns the modules we use."""
    install_standins()
    import jax  # noqa: F401  # lazy: octo/jax only after install_standins() (dlimp stand-in, quiet TF)

    from octo.model import octo_model
    from octo.utils import train_utils

    return octo_model, train_utils


def versions() -> dict[str, str]:
    out = {}
    for name in ("octo", "jax", "jaxlib", "flax", "optax", "numpy", "scipy", "transformers", "tensorflow-cpu",
                 "orbax-checkpoint"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


# =================================================================================================== offline T5


def build_offline_t5(directory: str | os.PathLike, d_model: int = 128, num_layers: int = 2) -> Path:
    """A T5-shaped language encoder config and a tokenizer that need no download, for offline random-weight runs.

    The tokenizer is byte-level (every UTF-8 byte is one token; ids 0-2 are <pad>, </s>, <unk>), so any instruction
    — paraphrases and unseen colours included — encodes without an out-of-vocabulary token. The encoder is a small
    T5 (``d_model``, ``num_layers``) with random weights, frozen as in Octo's recipe; Octo projects its output to the
    transformer's width, so the size only changes the language features, not the policy's architecture. The
    directory name must contain "t5": octo's ``LanguageTokenizer`` picks ``FlaxT5EncoderModel`` by that test.
    Idempotent (rewritten only when missing).
    """
    d = Path(directory)
    if "t5" not in d.name:
        raise ValueError(f"{d}: octo builds a T5 encoder only when the directory name contains 't5'")
    marker = d / "vla_bridge_t5.json"
    want = {"format": T5_FORMAT, "d_model": int(d_model), "num_layers": int(num_layers)}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return d
    # lazy: transformers only after install_standins() set USE_TF / TF_CPP_MIN_LOG_LEVEL
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config

    tmp = d.with_name(d.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specials = ["<pad>", "</s>", "<unk>"]
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(str(tmp))
    T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=max(8, d_model // 4), d_ff=4 * d_model,
             num_layers=num_layers, num_heads=4, pad_token_id=0, eos_token_id=1,
             decoder_start_token_id=0).save_pretrained(str(tmp))
    (tmp / "README.md").write_text("Built offline by vla_bridge.octo.worker.build_offline_t5: byte-level tokenizer, "
                                   "small random T5 encoder config (no weights). For offline checks only.\n")
    (tmp / marker.name).write_text(json.dumps(want))
    if d.exists():
        shutil.rmtree(d)
    tmp.rename(d)
    return d


# =================================================================================================== model


def octo_small_config(t5_name: str, window: int, horizon: int, action_dim: int = 7, max_length: int = 64) -> dict:
    """Octo-Small's architecture (octo's ``vit_s`` transformer, SmallStem16 patch encoder on the 256×256 primary
    camera stacked with an optional goal image, frozen T5 language tokens, one action readout, diffusion action head
    over ``horizon`` × ``action_dim``), written from octo's building blocks. ``t5_name``: a hub id ("t5-base", as
    octo-small-1.5) or a local T5-shaped directory."""
    # lazy: octo only after install_standins() (dlimp stand-in)
    from octo.data.utils.text_processing import HFTokenizer
    from octo.model.components.action_heads import DiffusionActionHead
    from octo.model.components.tokenizers import ImageTokenizer, LanguageTokenizer
    from octo.model.components.transformer import common_transformer_sizes
    from octo.model.components.vit_encoders import SmallStem16
    from octo.utils.spec import ModuleSpec

    width, transformer_kwargs = common_transformer_sizes("vit_s")
    model = {
        "observation_tokenizers": {
            "primary": ModuleSpec.create(ImageTokenizer, obs_stack_keys=[IMAGE_KEY], task_stack_keys=[IMAGE_KEY],
                                         encoder=ModuleSpec.create(SmallStem16)),
        },
        "task_tokenizers": {
            "language": ModuleSpec.create(LanguageTokenizer, encoder=t5_name, finetune_encoder=False),
        },
        "heads": {
            "action": ModuleSpec.create(DiffusionActionHead, readout_key="readout_action", use_map=False,
                                        action_horizon=int(horizon), action_dim=int(action_dim),
                                        n_diffusion_samples=1, dropout_rate=0.0),
        },
        "readouts": {"action": 1},
        "token_embedding_size": width,
        "transformer_kwargs": transformer_kwargs,
        "max_horizon": 10,
        "repeat_task_tokens": True,
        "use_correct_attention": True,
    }
    text = ModuleSpec.create(HFTokenizer, tokenizer_name=t5_name, encode_with_model=False,
                             tokenizer_kwargs={"max_length": int(max_length), "padding": "max_length",
                                               "truncation": True, "return_tensors": "np"})
    return {"model": model, "text_processor": text, "window_size": int(window)}


def stats_tree(stats: dict) -> dict:
    """Our dataset_statistics.json (lists) → numpy leaves (octo's save_pretrained calls ``.tolist()`` on leaves)."""
    if isinstance(stats, dict):
        return {k: stats_tree(v) for k, v in stats.items()}
    return np.asarray(stats)


# =================================================================================================== tasks


def make_tasks(model, texts: Sequence[str]) -> dict:
    """Language-conditioned tasks (goal image absent and masked), through the model's own text processor."""
    return model.create_tasks(texts=list(texts))


# =================================================================================================== build / load


def build_model(init: str, data: ShardData, t5_dir: str | None, seed: int):
    """``init``: ``octo-random`` (octo's Octo-Small config, random weights), ``hf://…`` or a local checkpoint
    (Octo's fine-tuning recipe: a new model from the pretrained config and our example batch, then every
    pretrained parameter of matching name and shape copied in)."""
    import jax  # lazy: jax/octo only after install_standins()

    octo_model, train_utils = import_octo()
    OctoModel = octo_model.OctoModel
    stats = stats_tree(data.statistics)
    ex = data.batch([0])
    if init == RANDOM_INIT:
        if not t5_dir:
            raise ValueError("octo-random needs --t5 (a T5-shaped local directory or hub id)")
        config = octo_small_config(t5_dir, data.window, data.horizon, data.action_dim)
        from octo.utils.spec import ModuleSpec  # lazy: octo only after install_standins()

        text_processor = ModuleSpec.instantiate(config["text_processor"])()
        pretrained = None
    else:
        if not init.startswith("hf://") and not Path(init).is_dir():
            raise FileNotFoundError(f"MODEL_ID={init!r} is neither {RANDOM_INIT}, an hf:// id nor a local Octo "
                                    "checkpoint directory")
        pretrained = OctoModel.load_pretrained(init)
        config = dict(pretrained.config)
        head = config["model"]["heads"]["action"]["kwargs"]
        head["action_horizon"] = data.horizon
        head["action_dim"] = data.action_dim
        config["window_size"] = data.window
        text_processor = pretrained.text_processor
    example = {"observation": ex["observation"],
               "task": _tasks_with(text_processor, ex["texts"], ex["observation"]),
               "action": ex["action"], "action_pad_mask": ex["action_pad_mask"]}
    model = OctoModel.from_config(config, example, text_processor, rng=jax.random.PRNGKey(seed),
                                  dataset_statistics=stats)
    if pretrained is not None:
        model = model.replace(params=train_utils.merge_params(model.params, pretrained.params))
    return model


def _tasks_with(text_processor, texts: Sequence[str], observation: dict) -> dict:
    """The task dict of the example batch: language + an absent (zero, masked) goal image."""
    b = len(texts)
    goal = np.zeros((b, *observation[IMAGE_KEY].shape[2:]), observation[IMAGE_KEY].dtype)
    return {IMAGE_KEY: goal, LANGUAGE_KEY: text_processor.encode(list(texts)),
            "pad_mask_dict": {IMAGE_KEY: np.zeros(b, bool), LANGUAGE_KEY: np.ones(b, bool)}}


def count_params(params, frozen: Sequence[str] = FROZEN_KEYS) -> tuple[int, int]:
    """(trainable, total) parameter counts with ``frozen`` fnmatch patterns on '.'-joined paths."""
    import flax  # lazy: jax/flax only after install_standins()

    flat = flax.traverse_util.flatten_dict(params)
    total = sum(int(np.prod(v.shape)) for v in flat.values())
    frozen_n = sum(int(np.prod(v.shape)) for k, v in flat.items() if any(fnmatch(".".join(k), f) for f in frozen))
    return total - frozen_n, total


# =================================================================================================== checkpoints


def load_checkpoint(path: str | os.PathLike):
    octo_model, _ = import_octo()
    return octo_model.OctoModel.load_pretrained(str(Path(path).resolve()))


# =================================================================================================== train


def train(args: argparse.Namespace) -> dict:
    # lazy: jax/optax only after install_standins()
    import jax
    import optax

    octo_model, train_utils = import_octo()
    t_start = time.perf_counter()
    data = ShardData(args.shards)
    log(f"shards: {len(data):,} samples from {data.manifest['n_episodes']} episodes, window {data.window}, "
        f"horizon {data.horizon}, images {data.images.shape[1]}x{data.images.shape[2]}, unnorm_key {data.unnorm_key!r}")
    t5 = args.t5
    if args.init == RANDOM_INIT and not t5:
        t5 = str(build_offline_t5(Path(args.data_dir) / "octo" / OFFLINE_T5_DIRNAME))
        log(f"offline T5 stand-in (byte-level tokenizer, small random encoder): {t5}")
    t0 = time.perf_counter()
    model = build_model(args.init, data, t5, args.seed)
    trainable, total = count_params(model.params)
    log(f"model from {args.init}: {total:,} parameters, {trainable:,} trained (T5 encoder frozen) "
        f"in {time.perf_counter() - t0:.1f} s")

    ckpt_dir = Path(args.outputs) / "checkpoints" / args.run
    log_dir = Path(args.outputs) / "logs" / args.run
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    extra = {"init": args.init, "shards": str(args.shards), "unnorm_key": data.unnorm_key, "image_aug": args.image_aug,
             "window": data.window, "horizon": data.horizon, "normalization": data.manifest.get("normalization")}
    save_checkpoint(model, 0, ckpt_dir / "base", {**extra, "what": "weights before fine-tuning"})

    steps = int(args.max_steps)
    warmup = max(1, min(int(args.warmup), steps))
    # optax counts decay_steps from step 0, warmup included (octo: warmup 2000, decay_steps = num_steps)
    lr = dict(name="cosine", init_value=0.0, peak_value=float(args.lr), warmup_steps=warmup,
              decay_steps=max(steps, warmup + 1), end_value=0.0)
    tx, lr_fn, _ = train_utils.create_optimizer(model.params, learning_rate=lr, weight_decay=0.01,
                                                clip_gradient=1.0, frozen_keys=list(FROZEN_KEYS))
    state = train_utils.TrainState.create(rng=jax.random.PRNGKey(args.seed + 1), model=model, tx=tx)

    def loss_fn(params, batch, rng):
        bound = state.model.module.bind({"params": params}, rngs={"dropout": rng})
        emb = bound.octo_transformer(batch["observation"], batch["task"], batch["observation"]["timestep_pad_mask"],
                                     train=True)
        return bound.heads["action"].loss(emb, batch["action"], batch["observation"]["timestep_pad_mask"],
                                          batch["action_pad_mask"], train=True)

    @jax.jit
    def train_step(st, batch):
        rng, drop = jax.random.split(st.rng)
        (loss, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.model.params, batch, drop)
        info = dict(info, grad_norm=optax.global_norm(grads), learning_rate=lr_fn(st.step))
        return st.apply_gradients(grads=grads, rng=rng), info

    rng = np.random.default_rng(args.seed)
    order = np.array([], np.int64)
    log_path = log_dir / "train_log.jsonl"
    log_path.write_text("")
    frames, last_ckpt, stopped = 0, None, "max_steps"
    t_train = time.perf_counter()
    for step in range(1, steps + 1):
        if len(order) < args.batch_size:                   # epochs: a fresh permutation when one runs out
            order = np.concatenate([order, rng.permutation(len(data))])
        idx, order = order[:args.batch_size], order[args.batch_size:]
        b = data.batch(idx)
        if args.image_aug:
            obs_im = b["observation"][IMAGE_KEY]
            flat = augment_images(obs_im.reshape(-1, *obs_im.shape[2:]), rng)
            b["observation"][IMAGE_KEY] = flat.reshape(obs_im.shape)
        batch = {"observation": b["observation"], "task": make_tasks(state.model, b["texts"]),
                 "action": b["action"], "action_pad_mask": b["action_pad_mask"]}
        if step == 1:
            log("step 1 compiles the train step with XLA first (minutes on a CPU at full optimization; "
                f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}) ...")
        t1 = time.perf_counter()
        state, info = train_step(state, batch)
        loss = float(info["loss"])
        dt = time.perf_counter() - t1
        frames += len(idx)
        if not np.isfinite(loss):
            stopped = f"non-finite loss at step {step}"
            log(stopped + ": stopping, the last good checkpoint is kept")
            break
        if step % args.log_every == 0 or step == 1 or step == steps:
            rec = log_record(step, loss, float(info.get("mse", np.nan)), float(info["grad_norm"]),
                             float(info["learning_rate"]), frames, time.perf_counter() - t_train)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            log(f"step {step}/{steps} loss {loss:.4f} lr {rec['lr']:.2e} grad_norm {rec['grad_norm']:.2f} "
                f"({dt:.1f} s this step)")
        if step % args.save_every == 0 or step == steps:
            last_ckpt = save_checkpoint(state.model, step, ckpt_dir / f"step_{step:06d}", extra)
            save_checkpoint(state.model, step, ckpt_dir / "latest", extra)
            log(f"checkpoint {last_ckpt.name} + latest/")
    done_steps = int(state.step)
    if last_ckpt is None and done_steps > 0:
        last_ckpt = save_checkpoint(state.model, done_steps, ckpt_dir / f"step_{done_steps:06d}", extra)
        save_checkpoint(state.model, done_steps, ckpt_dir / "latest", extra)
    result = {"steps": done_steps, "frames_seen": frames, "seconds": time.perf_counter() - t_start,
              "train_seconds": time.perf_counter() - t_train, "stopped_reason": stopped,
              "log_path": str(log_path), "last_checkpoint": str(last_ckpt) if last_ckpt else None,
              "parameters": total, "trainable_parameters": trainable, "init": args.init, "t5": t5,
              "versions": versions()}
    (log_dir / "octo_train_result.json").write_text(json.dumps(result, indent=2))
    log(f"done: {done_steps} steps, {frames:,} samples in {result['seconds']:.0f} s")
    return result


# =================================================================================================== serve


class Predictor:
    """Normalized action chunks for images + instructions: chunks of at most ``batch_size`` frames, each padded to
    the next power of two (XLA compiles once per size: at most log2(batch_size) + 1 compiles, little padding)."""

    def __init__(self, model, window: int, batch_size: int = SERVE_BATCH, seed: int = 0):
        import jax  # lazy: jax only after install_standins()

        self.model, self.window, self.batch_size = model, int(window), int(batch_size)
        self.key = jax.random.PRNGKey(seed)
        self.calls = 0

    def predict(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        import jax  # lazy: jax only after install_standins()

        n = len(texts)
        out = []
        for i in range(0, n, self.batch_size):
            im = images[i:i + self.batch_size]
            tx = list(texts[i:i + self.batch_size])
            k = len(tx)
            size = 1 << (k - 1).bit_length()
            if k < size:
                im = np.concatenate([im, np.repeat(im[-1:], size - k, axis=0)])
                tx += [tx[-1]] * (size - k)
            # the current frame in the window's last slot; earlier slots are padding (masked) — see README
            w = self.window
            obs_im = np.repeat(im[:, None], w, axis=1)
            pad = np.zeros((size, w), bool)
            pad[:, -1] = True
            obs = {IMAGE_KEY: obs_im, "timestep_pad_mask": pad, "pad_mask_dict": {IMAGE_KEY: pad.copy()}}
            self.key, sub = jax.random.split(self.key)
            acts = self.model.sample_actions(obs, make_tasks(self.model, tx), timestep_pad_mask=pad, rng=sub)
            out.append(np.asarray(acts, np.float32)[:k])
            self.calls += 1
        return np.concatenate(out) if out else np.zeros((0, 1, 1), np.float32)


def serve(args: argparse.Namespace) -> None:
    out, inp = protocol_streams()
    t0 = time.perf_counter()
    models = {"finetuned": load_checkpoint(args.checkpoint)}
    if args.base and Path(args.base).is_dir():
        models["base"] = load_checkpoint(args.base)
    window = int(models["finetuned"].example_batch["observation"]["timestep_pad_mask"].shape[1])
    preds = {k: Predictor(m, window, args.batch_size, args.seed) for k, m in models.items()}
    head = models["finetuned"].config["model"]["heads"]["action"]["kwargs"]
    log(f"serving {sorted(models)} from {args.checkpoint} (loaded in {time.perf_counter() - t0:.1f} s; "
        f"window {window}, horizon {head.get('action_horizon')}, batches of {args.batch_size})")
    hello = {"weights": sorted(models), "window": window, "horizon": head.get("action_horizon"),
             "action_dim": head.get("action_dim"),
             "statistics": json.loads(json.dumps(models["finetuned"].dataset_statistics,
                                                 default=lambda a: np.asarray(a).tolist()))}
    serve_loop(out, inp, hello, lambda which, images, texts: preds[which].predict(images, texts))


# =================================================================================================== CLI


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    if args.cmd == "check":
        import_octo()
        v = versions()
        print(json.dumps(v))
        print(f"octo {v['octo']} imports with jax {v['jax']}, flax {v['flax']}, tensorflow-cpu {v['tensorflow-cpu']}, "
              f"transformers {v['transformers']} (dlimp: vla_bridge stand-in)")
        return 0
    if args.cmd == "train":
        result = train(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
