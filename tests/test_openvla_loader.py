"""The OpenVLA loader's offline-testable parts: unnorm keys, dataset statistics, LoRA targets, load errors.

CI has neither OpenVLA's remote code nor the hub, so these tests use the tiny VLA (same module names and
``norm_stats`` interface) and small stand-ins. ``test_real_remote_code`` additionally drives OpenVLA's own
``prismatic/extern/hf`` files through ``load_openvla`` when ``OPENVLA_HF_CODE`` points at that directory
(e.g. a checkout of github.com/openvla/openvla); it is skipped, with the reason, otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from vla_bridge.data import stats as dstats
from vla_bridge.models import openvla as ov
from vla_bridge.tokenization import build_prompt

torch.set_num_threads(2)

STATS = {"action": {"q01": [-0.03, -0.04, -0.03, -0.08, -0.09, -0.2, 0.0],
                    "q99": [0.03, 0.04, 0.04, 0.08, 0.08, 0.2, 1.0],
                    "mask": [True] * 6 + [False]}}


@pytest.fixture(scope="module")
def tiny():
    from vla_bridge.models.tiny_vla import build_tiny_vla

    model, processor = build_tiny_vla(norm_stats={"demo_world": json.loads(json.dumps(STATS))}, image_size=32,
                                      vision_width=32, vision_depth=2, vision_heads=2, hidden_size=32, num_layers=1,
                                      num_heads=2, intermediate_size=64)
    return model.eval(), processor


class _OpenVLALike(nn.Module):
    """OpenVLA keeps ``self.norm_stats = config.norm_stats`` (a plain attribute) and reads it in predict_action."""

    def __init__(self, norm_stats=None):
        super().__init__()
        self.config = types.SimpleNamespace(norm_stats=norm_stats)
        self.norm_stats = self.config.norm_stats
        self.vision_backbone = nn.Linear(2, 2)


# ---------------------------------------------------------------------------------------------------------------
# unnorm keys
# ---------------------------------------------------------------------------------------------------------------
def test_check_unnorm_key_lists_available_keys(tiny):
    model, _ = tiny
    assert ov.check_unnorm_key(model, "demo_world") == "demo_world"
    assert ov.check_unnorm_key(model, None) == "demo_world"  # a single key may be implied, as upstream
    with pytest.raises(ValueError) as e:
        ov.check_unnorm_key(model, "bridge_orig")
    msg = str(e.value)
    assert "\n" not in msg and "'bridge_orig'" in msg and "demo_world" in msg


def test_check_unnorm_key_through_peft_and_without_stats(tiny):
    from peft import get_peft_model

    model, _ = tiny
    peft_model = get_peft_model(model, ov.lora_config(4, 8, model=model))
    try:
        assert ov.check_unnorm_key(peft_model, "demo_world") == "demo_world"
        with pytest.raises(ValueError, match="available keys: \\[demo_world\\]"):
            ov.check_unnorm_key(peft_model, "nope")
    finally:
        peft_model.unload()  # remove the LoRA layers again: the fixture is shared
    with pytest.raises(ValueError, match="no norm_stats"):
        ov.check_unnorm_key(_OpenVLALike(None), "bridge_orig")


# ---------------------------------------------------------------------------------------------------------------
# dataset statistics
# ---------------------------------------------------------------------------------------------------------------
def test_register_statistics_openvla_style_attribute():
    model = _OpenVLALike({"bridge_orig": {"action": {"q01": [0.0] * 7, "q99": [1.0] * 7}}})
    entry = {"action": {k: np.asarray(v) for k, v in STATS["action"].items()}, "num_transitions": np.int64(5)}
    stored = ov.register_dataset_statistics(model, "demo_world", entry)
    assert sorted(model.config.norm_stats) == ["bridge_orig", "demo_world"]
    assert model.norm_stats is model.config.norm_stats          # what predict_action reads sees the new key
    assert stored["action"]["mask"] == [True] * 6 + [False] and isinstance(stored["action"]["q01"], list)
    assert stored["num_transitions"] == 5
    json.dumps(model.config.norm_stats)                          # the config stays JSON-serializable

    empty = _OpenVLALike(None)                                   # a model loaded without any statistics
    ov.register_dataset_statistics(empty, "demo_world", STATS["action"])  # the inner dict is accepted too
    assert empty.norm_stats is empty.config.norm_stats and "action" in empty.norm_stats["demo_world"]


def test_register_statistics_tiny_vla_and_predict_uses_them(tiny):
    model, processor = tiny
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    inputs = ov.action_inputs(processor, "put the red block on the plate", image, model=model)
    with torch.no_grad():
        a1 = model.predict_action(**inputs, unnorm_key="demo_world", do_sample=False)
        scaled = json.loads(json.dumps(STATS))
        scaled["action"]["q01"] = [2 * x for x in scaled["action"]["q01"]]
        scaled["action"]["q99"] = [2 * x for x in scaled["action"]["q99"]]
        ov.register_dataset_statistics(model, "scaled", scaled)
        try:
            a2 = model.predict_action(**inputs, unnorm_key="scaled", do_sample=False)
        finally:
            del model.config.norm_stats["scaled"]
    np.testing.assert_allclose(a2[:6], 2 * a1[:6], rtol=1e-5, atol=1e-8)  # same tokens, doubled q01/q99
    assert a2[6] == a1[6]                                                   # gripper is not normalized (mask)


@pytest.mark.parametrize("bad, match", [
    ({"proprio": {}}, "'action' dict"),
    ({"action": {"q01": [0.0] * 7}}, "q99"),
    ({"action": {"q01": [0.0] * 7, "q99": [1.0] * 6}}, "has 6 values"),
])
def test_register_statistics_rejects_bad_entries(bad, match):
    with pytest.raises(ValueError, match=match):
        ov.register_dataset_statistics(_OpenVLALike({}), "k", bad)
    with pytest.raises(ValueError, match="non-empty"):
        ov.register_dataset_statistics(_OpenVLALike({}), "", STATS)


def test_save_dataset_statistics_layout(tmp_path):
    stats = {"demo_world": {"action": {"q01": np.array([-1.0, 0.0]), "q99": np.array([1.0, 1.0]),
                                       "mask": np.array([True, False]), "mean": np.zeros(2), "std": np.ones(2),
                                       "min": np.array([-2.0, 0.0]), "max": np.array([2.0, 1.0])},
                            "num_transitions": np.int64(10)}}
    path = dstats.save_dataset_statistics(tmp_path / "adapter", stats)
    assert path == tmp_path / "adapter" / "dataset_statistics.json"
    data = json.loads(path.read_text())
    assert list(data) == ["demo_world"]
    assert sorted(data["demo_world"]["action"]) == ["mask", "max", "mean", "min", "q01", "q99", "std"]
    assert data["demo_world"]["action"]["mask"] == [True, False] and data["demo_world"]["num_transitions"] == 10
    assert dstats.load_dataset_statistics(tmp_path / "adapter") == data
    with pytest.raises(FileNotFoundError, match="dataset_statistics.json"):
        dstats.load_dataset_statistics(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------
class _NestedHead(nn.Module):
    """The Prismatic layout in miniature: the output head is language_model.lm_head, not a top-level lm_head."""

    def __init__(self):
        super().__init__()
        self.vision_backbone = nn.Module()
        self.vision_backbone.featurizer = nn.Sequential(nn.Linear(4, 4))
        self.projector = nn.Module()
        self.projector.fc1 = nn.Linear(4, 8)
        self.language_model = nn.Module()
        self.language_model.q_proj = nn.Linear(8, 8)
        self.language_model.lm_head = nn.Linear(8, 16)


def test_lora_targets_exclude_nested_lm_head():
    cfg = ov.lora_config(8, 16, model=_NestedHead())
    assert "lm_head" not in cfg.target_modules
    assert {"fc1", "q_proj", "0"} <= set(cfg.target_modules)
    assert cfg.r == 8 and cfg.lora_alpha == 16 and cfg.lora_dropout == 0.0 and cfg.init_lora_weights == "gaussian"


def test_lora_on_tiny_vla_wraps_no_lm_head_and_counts(tiny):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny

    def wrapped(pm):
        return {n for n, m in pm.named_modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)}

    ours = get_peft_model(model, ov.lora_config(4, 8, model=model))
    try:
        mods, (tr, total, share) = wrapped(ours), ov.trainable_parameters(ours)
    finally:
        ours.unload()
    assert not any(n.endswith("lm_head") for n in mods)
    assert any(".language_model." in n for n in mods) and any(".projector." in n for n in mods)
    assert any(".vision_backbone." in n for n in mods)
    assert 0 < tr < total and 0 < share < 100

    plain = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             init_lora_weights="gaussian"))
    try:
        all_linear, (tr_all, _, _) = wrapped(plain), ov.trainable_parameters(plain)
    finally:
        plain.unload()
    assert {n for n in all_linear if not n.endswith("lm_head")} == mods   # the only difference is the head
    if any(n.endswith("lm_head") for n in all_linear):                   # peft 0.13.2: the nested head slips in
        assert tr_all > tr


@pytest.mark.parametrize("rank", [0, -4, 2.5, True])
def test_lora_rank_must_be_positive_int(rank):
    with pytest.raises(ValueError, match="rank"):
        ov.lora_config(rank, 16, model=_NestedHead())


def test_lora_config_needs_model_or_targets():
    with pytest.raises(ValueError, match="needs the model"):
        ov.lora_config(8, 16)
    assert ov.lora_config(8, 16, target_modules=["q_proj", "v_proj"]).target_modules == {"q_proj", "v_proj"}


# ---------------------------------------------------------------------------------------------------------------
# loading: validation and errors that need no checkpoint
# ---------------------------------------------------------------------------------------------------------------
def test_local_dir_validation_names_missing_files(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"auto_map": {
        "AutoConfig": "configuration_prismatic.OpenVLAConfig",
        "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"}}))
    (d / "tokenizer.json").write_text("{}")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (d / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        ov.load_openvla(str(d), precision="fp32")
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("preprocessor_config.json", "tokenizer_config.json", "model-00002-of-00002.safetensors",
                 "configuration_prismatic.py", "modeling_prismatic.py"):
        assert name in msg
    missing = ov.missing_checkpoint_files(d)
    assert "config.json" not in missing and "model-00001-of-00002.safetensors" not in missing
    assert not any(m.startswith("tokenizer.json") for m in missing)  # tokenizer.json present is enough

    with pytest.raises(FileNotFoundError, match="not a directory"):
        ov.load_openvla(str(tmp_path / "nope" / "ckpt"), precision="fp32")


def test_load_openvla_loads_a_saved_tiny_vla(tiny, tmp_path):
    """The loader is model-agnostic: a saved tiny VLA directory loads through the same Auto classes."""
    model, processor = tiny
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    assert ov.missing_checkpoint_files(tmp_path / "tiny") == []
    processor2, model2 = ov.load_openvla(str(tmp_path / "tiny"), precision="fp32", verbose=False)
    assert model2.vla_bridge_load_info.attn_implementation == "sdpa" and type(model2) is type(model)
    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    with torch.no_grad():
        a = model.predict_action(**ov.action_inputs(processor, "open the drawer", image, model=model),
                                 unnorm_key="demo_world")
        b = model2.predict_action(**ov.action_inputs(processor2, "open the drawer", image, model=model2),
                                  unnorm_key="demo_world")
    np.testing.assert_array_equal(a, b)


def test_offline_hub_id_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(ov.ModelLoadError, match="neither a local directory nor in the Hugging Face cache"):
        ov.load_openvla("openvla/openvla-7b", precision="fp32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_4bit_on_cpu_is_a_clear_error():
    with pytest.raises(ov.ModelLoadError, match="needs a CUDA GPU"):
        ov.load_openvla("openvla/openvla-7b", precision="4bit")
    with pytest.raises(ValueError, match="precision must be one of"):
        ov.load_openvla("openvla/openvla-7b", precision="int8")


def test_choose_attention(monkeypatch):
    assert ov.choose_attention("fp32", cuda=False)[0] == "sdpa"
    assert ov.choose_attention("bf16", "eager", cuda=False)[0] == "eager"
    assert "action_inputs" in ov.choose_attention("bf16", "eager", cuda=False)[1]
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    monkeypatch.setattr(ov.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert ov.choose_attention("bf16", cuda=True)[0] == "flash_attention_2"
    assert ov.choose_attention("4bit", cuda=True)[0] == "flash_attention_2"
    assert ov.choose_attention("fp32", cuda=True)[0] == "sdpa"


# ---------------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------------
def test_action_inputs_appends_space_token_and_mask(tiny):
    model, processor = tiny
    image = np.full((40, 48, 3), 127, dtype=np.uint8)
    plain = processor(build_prompt("wipe the table"), Image.fromarray(image))
    ours = ov.action_inputs(processor, "wipe the table", image, model=model)
    space = model.config.space_token_id
    assert ours["input_ids"].shape[1] == plain["input_ids"].shape[1] + 1 and int(ours["input_ids"][0, -1]) == space
    assert ours["attention_mask"].shape == ours["input_ids"].shape and bool(ours["attention_mask"].all())
    assert ours["pixel_values"].dtype == ov.model_dtype(model)
    with torch.no_grad():
        a = model.predict_action(**ours, unnorm_key="demo_world", do_sample=False)
        b = model.predict_action(**plain, unnorm_key="demo_world", do_sample=False)
    np.testing.assert_array_equal(a, b)


def test_model_image_size(tiny):
    _, processor = tiny
    assert ov.model_image_size(processor) == 32
    openvla_like = types.SimpleNamespace(image_processor=types.SimpleNamespace(input_sizes=[(3, 224, 224)] * 2))
    assert ov.model_image_size(openvla_like) == 224


# ---------------------------------------------------------------------------------------------------------------
# optional: OpenVLA's real remote code
# ---------------------------------------------------------------------------------------------------------------
def _remote_code_dir():
    path = os.environ.get("OPENVLA_HF_CODE")
    if not path:
        pytest.skip("set OPENVLA_HF_CODE=<openvla checkout>/prismatic/extern/hf to run OpenVLA's remote code")
    if not os.path.isfile(os.path.join(path, "modeling_prismatic.py")):
        pytest.skip(f"OPENVLA_HF_CODE={path} has no modeling_prismatic.py")
    return path


def _tiny_llama_tokenizer():
    """Llama-2-like fast tokenizer, offline: 32000 base ids, "▁" = 29871, 256 action pieces at 31744..31999."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import LlamaTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in [chr(i) for i in range(33, 127)] + ["\u2581" + c for c in letters]:
        vocab[piece] = len(vocab)
    filler = 0
    while len(vocab) < 32000:
        i = len(vocab)
        piece = "\u2581" if i == 29871 else chr(0x4E00 + i - 31744) if i >= 31744 else f"<f{filler}>"
        filler += piece.startswith("<f")
        vocab[piece] = i
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("\u2581", c) for c in letters], unk_token="<unk>",
                              byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = LlamaTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                             padding_side="right", legacy=True)
    tok.add_special_tokens({"pad_token": "<PAD>"})
    return tok


def test_real_remote_code(tmp_path, monkeypatch):
    """A tiny random OpenVLA checkpoint built from OpenVLA's own HF files, loaded through load_openvla."""
    code = _remote_code_dir()
    pkg = tmp_path / "pkg" / "openvla_hf_under_test"
    pkg.mkdir(parents=True)
    for f in ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py"):
        shutil.copy(os.path.join(code, f), pkg / f)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("transformers.utils.HF_MODULES_CACHE", str(tmp_path / "hf_home" / "modules"))
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "hf_home" / "modules"))
    from openvla_hf_under_test.configuration_prismatic import OpenVLAConfig
    from openvla_hf_under_test.modeling_prismatic import OpenVLAForActionPrediction
    from openvla_hf_under_test.processing_prismatic import PrismaticImageProcessor, PrismaticProcessor

    size = 64  # both ViTs: 16 patches of 16 px
    config = OpenVLAConfig(
        norm_stats={"bridge_orig": json.loads(json.dumps(STATS))}, n_action_bins=256,
        vision_backbone_id="dinosiglip-vit-so-224px", llm_backbone_id="llama2-7b-pure",
        arch_specifier="no-align+fused-gelu-mlp", image_resize_strategy="resize-naive",
        text_config=dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=32000),
        pad_token_id=32000, pad_to_multiple_of=64, timm_model_ids=["vit_tiny_patch16_224", "vit_tiny_patch16_224"],
        timm_override_act_layers=[None, None], image_sizes=[size, size])
    torch.manual_seed(0)
    model = OpenVLAForActionPrediction(config)
    image_processor = PrismaticImageProcessor(
        use_fused_vision_backbone=True, image_resize_strategy="resize-naive", input_sizes=[(3, size, size)] * 2,
        interpolations=["bicubic", "bicubic"], means=[(0.5, 0.5, 0.5)] * 2, stds=[(0.5, 0.5, 0.5)] * 2)
    processor = PrismaticProcessor(image_processor=image_processor, tokenizer=_tiny_llama_tokenizer())
    OpenVLAConfig.register_for_auto_class()
    OpenVLAForActionPrediction.register_for_auto_class("AutoModelForVision2Seq")
    PrismaticImageProcessor.register_for_auto_class("AutoImageProcessor")
    PrismaticProcessor.register_for_auto_class("AutoProcessor")
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    assert ov.missing_checkpoint_files(ckpt) == []

    processor, model = ov.load_openvla(str(ckpt), precision="fp32")
    assert model.vla_bridge_load_info.attn_implementation == "sdpa" or torch.cuda.is_available()
    assert ov.check_unnorm_key(model, "bridge_orig") == "bridge_orig"
    with pytest.raises(ValueError, match="bridge_orig"):
        ov.check_unnorm_key(model, "bridge")
    ov.register_dataset_statistics(model, "demo_world", STATS)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        action = model.predict_action(**ov.action_inputs(processor, "put the block on the plate", image, model=model),
                                      unnorm_key="demo_world", do_sample=False)
    assert action.shape == (7,)

    # the evaluation's batched predictor on OpenVLA's own model: the per-frame predict_action's actions on frames of
    # three prompt lengths (SDPA attention, so its packed path), in one call and in calls of 2 frames
    from vla_bridge.evaluation.inference import BatchedActionPredictor, per_frame_predict

    with torch.no_grad():   # larger random weights than the init's 0.02, so that the actions depend on the inputs
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.startswith("vision_backbone"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        head = model.language_model.get_output_embeddings().weight   # only the 256 action tokens can win the argmax
        head[:31744] = 0
        head[32000:] = 0
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    prompts = ["put the block on the plate", "open the drawer", "move the red spoon to the left of the pot"] * 2
    ref = per_frame_predict(model, processor, frames, prompts, "demo_world", center_crop=False)
    assert len({tuple(a) for a in ref}) > 1, "a parity check on one repeated action would show nothing"
    for batch, chunk in ((64, None), (2, 2)):
        pred = BatchedActionPredictor(model, processor, "demo_world", center_crop=False, max_batch_size=batch,
                                      chunk_size=chunk)
        assert pred._sdpa and len({len(pred.prompt_ids(p)) for p in prompts}) == 3
        np.testing.assert_array_equal(pred.predict(frames, prompts), ref)

    from peft import get_peft_model

    from vla_bridge.tokenization import ActionCollator, ActionTokenizer, make_training_example, num_image_patches

    pm = get_peft_model(model, ov.lora_config(8, 16, model=model))
    assert not any(n.endswith("lm_head") for n, m in pm.named_modules() if hasattr(m, "lora_A"))
    ex = make_training_example(image, "put the block on the plate", [0.01] * 6 + [1.0], processor,
                               ActionTokenizer(processor.tokenizer), STATS)
    assert int(ex["input_ids"][-9]) == 29871 and int((ex["labels"] != -100).sum()) == 8
    batch = ActionCollator(pad_token_id=32000)([ex])
    out = pm(**batch)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] + num_image_patches(pm)
    sys.modules.pop("openvla_hf_under_test", None)
