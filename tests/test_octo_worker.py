"""The Octo worker in .venv-octo (run when that environment exists; skipped with the reason otherwise — CI has no
GitHub to install octo from). Real octo, a random-weight Octo-Small, real shards from the small embedded dataset."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from vla_bridge.octo import client as octo
from vla_bridge.octo import protocol
from vla_bridge.paths import PROJECT_ROOT, octo_python

OCTO_PY = octo_python()
REAL = protocol.WorkerCommand(OCTO_PY, protocol.WORKER_MODULES["octo"])   # whatever VLA_BRIDGE_OCTO_WORKER says
pytestmark = pytest.mark.skipif(
    not OCTO_PY.exists(),
    reason=f"{OCTO_PY} does not exist: the Octo worker tests need `bash setup.sh --octo` "
           "(offline: OCTO_SOURCE=/path/to/octo); CI cannot reach GitHub, so they are skipped there")


def _octo(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(OCTO_PY), "-c", code], cwd=str(PROJECT_ROOT), env=octo.worker_env(False),
                          capture_output=True, text=True, timeout=timeout)


def test_check_imports_octo_with_the_pinned_stack():
    rc, lines = octo.run_worker(["check"], hub_ok=False, echo=None, command=REAL)
    assert rc == 0, "\n".join(lines[-20:])
    v = json.loads(next(line for line in lines if line.startswith("{")))
    assert v["jax"] == "0.4.20" and v["flax"] == "0.7.5" and v["numpy"] == "1.24.3"
    assert v["transformers"] == "4.40.2"


def test_worker_module_imports_neither_torch_nor_lerobot():
    r = _octo("import sys, vla_bridge.octo.worker as w; w.import_octo(); "
              "print(sorted(m for m in ('torch', 'lerobot') if m in sys.modules)); print(type(sys.modules['dlimp']))")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == "[]" and "module" in r.stdout


def test_offline_t5_tokenizer_is_byte_level(tmp_path):
    r = _octo(f"""
import json, vla_bridge.octo.worker as w
w.install_standins()
d = w.build_offline_t5({str(tmp_path / 't5-x')!r})
from transformers import AutoConfig, AutoTokenizer
tok = AutoTokenizer.from_pretrained(str(d)); cfg = AutoConfig.from_pretrained(str(d))
enc = tok(["put the red block on the plate", "é"], max_length=64, padding="max_length", truncation=True,
          return_tensors="np")
print(json.dumps({{"keys": sorted(enc.keys()), "n": int(enc["attention_mask"][0].sum()),
                  "n2": int(enc["attention_mask"][1].sum()), "model_type": cfg.model_type,
                  "vocab": cfg.vocab_size, "unk": int((enc["input_ids"] == tok.unk_token_id).sum())}}))
""")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["keys"] == ["attention_mask", "input_ids"]      # no token_type_ids: FlaxT5 would reject them
    assert out["n"] == len("put the red block on the plate") and out["n2"] == 2   # one token per UTF-8 byte
    assert out["model_type"] == "t5" and out["vocab"] == 259 and out["unk"] == 0
    bad = _octo(f"import vla_bridge.octo.worker as w; w.build_offline_t5({str(tmp_path / 'no-name')!r})")
    assert bad.returncode != 0 and "contains 't5'" in bad.stderr


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
    """Shards of 4 training episodes → `octo.worker train` (octo-random, 2 steps, batch 2) → checkpoints."""
    from vla_bridge.data import splits, stream
    from vla_bridge.octo import shards as octo_shards
    from vla_bridge.data import stats as dstats

    tmp = tmp_path_factory.mktemp("octo")
    ds = stream.open_dataset(str(small.root), seed=0)
    split = splits.make_split(ds)
    st = dstats.compute_action_stats(ds, episodes=split.train)
    shards = octo_shards.write_octo_shards(ds, sorted(split.train)[:4], st, "demo_world", tmp / "shards",
                                          progress=False)
    rc, lines = octo.run_worker(["train", "--shards", str(shards.dir), "--run", "t", "--outputs",
                                 str(tmp / "out"), "--data-dir", str(tmp / "data"), "--init", "octo-random",
                                 "--max-steps", "2", "--batch-size", "2", "--log-every", "1",
                                 "--save-every", "1"], hub_ok=False, echo=None, command=REAL,
                                fast_compile=True)   # XLA level 0: the train step compiles in ~30 s
    assert rc == 0, "\n".join(lines[-30:])
    prefix = protocol.RESULT_PREFIX
    result = json.loads(next(line for line in lines if line.startswith(prefix))[len(prefix):])
    return {"tmp": tmp, "stats": st, "result": result, "lines": lines, "shards": shards}


def test_train_logs_and_checkpoints(trained):
    res, out = trained["result"], trained["tmp"] / "out"
    assert res["steps"] == 2 and res["frames_seen"] == 4 and res["stopped_reason"] == "max_steps"
    assert 20_000_000 < res["trainable_parameters"] < res["parameters"] < 30_000_000   # Octo-Small + a small T5
    log = [json.loads(x) for x in (out / "logs" / "t" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["action_accuracy"] is None for r in log)
    assert log[0]["lr"] == 0.0 and log[1]["lr"] > 0.0                  # linear warmup from 0 (Octo's recipe)
    ck = out / "checkpoints" / "t"
    assert sorted(p.name for p in ck.iterdir()) == ["base", "latest", "step_000001", "step_000002"]
    for d in ("base", "latest", "step_000002"):
        assert {"config.json", "example_batch.msgpack", "dataset_statistics.json",
                "training_state.json"} <= {p.name for p in (ck / d).iterdir()}
    saved = json.loads((ck / "latest" / "dataset_statistics.json").read_text())
    assert saved["demo_world"]["action"]["q01"] == pytest.approx(trained["stats"]["action"]["q01"])
    assert json.loads((ck / "latest" / "training_state.json").read_text())["step"] == 2
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]      # no temporary directory left behind


def test_served_policy_predicts_denormalized_actions(trained):
    ck = trained["tmp"] / "out" / "checkpoints" / "t"
    st = trained["stats"]
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) for _ in range(3)]
    texts = ["put the red block on the plate"] * 3
    with octo.OctoServer(ck / "latest", base=ck / "base", hub_ok=False, echo=None, command=REAL) as srv:
        assert srv.weights == ["base", "finetuned"] and srv.horizon == 4
        assert srv.statistics["demo_world"]["action"]["q99"] == pytest.approx(st["action"]["q99"])
        chunks = srv.predict(np.stack([np.asarray(f) for f in frames]).repeat(2, 1).repeat(2, 2), texts)
        assert chunks.shape == (3, 4, 7) and np.isfinite(chunks).all()
        ft = octo.OctoPolicy(srv, st, "finetuned").act(frames, texts)
        base = octo.OctoPolicy(srv, st, "base").act(frames, texts)
        with pytest.raises(ValueError, match="no 'nope' weights"):
            octo.OctoPolicy(srv, st, "nope")
    a = st["action"]
    assert ft.shape == (3, 7)
    assert np.all(ft[:, :6] >= np.asarray(a["q01"][:6]) - 1e-9) and np.all(ft[:, :6] <= np.asarray(a["q99"][:6]) + 1e-9)
    assert np.all((ft[:, 6] >= a["min"][6]) & (ft[:, 6] <= a["max"][6]))
    assert not np.allclose(ft, base)                                    # two steps did change the weights


def test_image_augmentation_keeps_shape_and_varies_with_the_rng():
    r = _octo("""
import json, numpy as np, vla_bridge.octo.worker as w
x = np.zeros((3, 64, 64, 3), np.uint8); x[:, 16:48, 16:48] = (200, 40, 40)   # a red square on black
a = w.augment_images(x, np.random.default_rng(0)); b = w.augment_images(x, np.random.default_rng(0))
c = w.augment_images(x, np.random.default_rng(1))
print(json.dumps({"shape": list(a.shape), "dtype": str(a.dtype), "same_seed": bool((a == b).all()),
                  "other_seed": bool((a != c).any()), "changed": float(np.abs(a.astype(int) - x).mean()),
                  "red_kept": bool((a[..., 0].astype(int) - a[..., 2]).max() > 100)}))
""")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["shape"] == [3, 64, 64, 3] and out["dtype"] == "uint8"
    assert out["same_seed"] and out["other_seed"] and out["changed"] > 0.5 and out["red_kept"]
