"""The tiny VLA offers OpenVLA's HF interface: tokenizer layout, forward, generate, predict_action, save/load, PEFT."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vla_bridge.models.lora import lora_target_modules, trainable_parameters, trainable_summary
from vla_bridge.models.tiny_vla import (
    TinyVLAForActionPrediction,
    TinyVLAProcessor,
    build_tiny_vla,
    build_tokenizer,
    count_parameters,
)
from vla_bridge.tokenization import (
    IGNORE_INDEX,
    ActionCollator,
    ActionTokenizer,
    action_metrics,
    build_prompt,
    make_training_example,
    num_image_patches,
)

STATS = {
    "demo_world": {
        "action": {
            "q01": [-0.03, -0.03, -0.03, -0.1, -0.1, -0.1, 0.0],
            "q99": [0.03, 0.03, 0.03, 0.1, 0.1, 0.1, 1.0],
            "mask": [True] * 6 + [False],
            "mean": [0.0] * 7, "std": [0.01] * 7, "min": [-0.05] * 6 + [0.0], "max": [0.05] * 6 + [1.0],
        }
    }
}
# Small enough that every test here runs in well under a second per step.
SMALL = dict(image_size=64, vision_width=64, vision_depth=3, vision_heads=2, hidden_size=128, num_layers=2,
             num_heads=2, intermediate_size=256)
INSTRUCTION = "put the red block on the plate"
ACTION = np.array([0.012, -0.02, 0.005, 0.04, -0.06, 0.075, 1.0])


def _image(seed=0, size=128):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _lora(model, **kw):
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=32, lora_alpha=16, lora_dropout=0.0, target_modules=lora_target_modules(model),
               init_lora_weights="gaussian")
    cfg.update(kw)
    return get_peft_model(model, LoraConfig(**cfg))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def small():
    return build_tiny_vla(norm_stats=STATS, seed=0, **SMALL)


@pytest.fixture(scope="module")
def overfit():
    """A small model with LoRA trained on ONE example until it reproduces that example's action tokens."""
    model, processor = build_tiny_vla(norm_stats=STATS, seed=1, **SMALL)
    at = ActionTokenizer(processor.tokenizer)
    example = make_training_example(_image(3), INSTRUCTION, ACTION, processor, at, STATS["demo_world"])
    batch = ActionCollator(processor.tokenizer.pad_token_id)([example])
    peft_model = _lora(model)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    peft_model.train()
    history = []
    # One thread: these ops are tiny, and with two threads on a busy 2-core machine every op waits at a barrier
    # for a descheduled thread (observed: 0.8 s -> 35 s for this loop).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(50):
            out = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], labels=batch["labels"])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append(action_metrics(out.logits, batch["labels"], num_image_patches(peft_model), at,
                                          STATS["demo_world"]))
    finally:
        torch.set_num_threads(threads)
    peft_model.eval()
    return peft_model, processor, history


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------
def test_tokenizer_layout(tokenizer):
    assert tokenizer.vocab_size == 1024 and len(tokenizer) == 1025
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token == "<PAD>" and tokenizer.pad_token_id == 1024          # above vocab_size, like 32000
    assert tokenizer.convert_ids_to_tokens(3) == "<0x00>" and tokenizer.convert_ids_to_tokens(258) == "<0xFF>"
    at = ActionTokenizer(tokenizer)
    ids = list(at.action_token_ids)
    assert ids[0] == 768 and ids[-1] == 1023 and at.action_token_begin_idx == 767
    assert tokenizer.convert_ids_to_tokens(ids) == [f"<act_{k}>" for k in range(255, -1, -1)]
    space = tokenizer.convert_tokens_to_ids("\u2581")
    assert space not in (None, tokenizer.unk_token_id) and space < 768
    print(f"\ntiny tokenizer: vocab_size={tokenizer.vocab_size} len={len(tokenizer)} action ids={ids[0]}..{ids[-1]} "
          f"pad={tokenizer.pad_token_id} space={space}")


def test_tokenizer_text_handling(tokenizer):
    at = ActionTokenizer(tokenizer)
    space = tokenizer.convert_tokens_to_ids("\u2581")
    prompt_ids = tokenizer(build_prompt(INSTRUCTION)).input_ids
    toks = tokenizer.convert_ids_to_tokens(prompt_ids)
    assert toks[0] == "<s>" and toks[-2:] == ["Out", ":"]            # no trailing "▁": added by id
    assert {"\u2581put", "\u2581red", "\u2581block", "\u2581plate", "\u2581robot"} <= set(toks)
    assert tokenizer("Out: ").input_ids[-1] == space                   # the space after "Out:" is the "▁" token
    texts = [build_prompt(INSTRUCTION), "Wipe the stove, then fold the towel!", "héllo 中文 🤖 tab\tnew\nline 42"]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids and not at.is_action_token(np.array(ids)).any()
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    again = build_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()                # deterministic


# ----------------------------------------------------------------------------------------------------------------------
# Model shape, forward, loss
# ----------------------------------------------------------------------------------------------------------------------
def test_default_model_size_and_forward():
    model, processor = build_tiny_vla(norm_stats=STATS)
    counts = count_parameters(model)
    print(f"\ntiny VLA parameters: {counts}")
    assert counts["total"] <= 10_000_000
    assert num_image_patches(model) == 64 == model.vision_backbone.featurizer.patch_embed.num_patches
    assert model.config.text_config.vocab_size == 1088                # 1025 rounded up to a multiple of 64
    inputs = processor([build_prompt(INSTRUCTION)] * 2, [_image(0), Image.fromarray(_image(1))], padding=True)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert inputs["pixel_values"].shape == (2, 3, 128, 128)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (2, inputs["input_ids"].shape[1] + 64, 1088)


def test_loss_is_shifted_ce_over_text_positions(small):
    model, processor = small
    at = ActionTokenizer(processor.tokenizer)
    exs = [make_training_example(_image(i), txt, ACTION, processor, at, STATS["demo_world"])
           for i, txt in enumerate([INSTRUCTION, "move the cup"])]
    batch = ActionCollator(processor.tokenizer.pad_token_id)(exs)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"])
    P, (B, T) = num_image_patches(model), batch["input_ids"].shape
    assert out.logits.shape == (B, T + P, model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)
    # Same loss by hand: logits[:, P:-1] predict labels[:, 1:] (patch positions carry IGNORE_INDEX).
    manual = F.cross_entropy(out.logits[:, P:-1].reshape(-1, out.logits.shape[-1]),
                             batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(out.loss, manual, atol=1e-5)
    # padding does not change a sequence's logits (right padding + attention mask)
    with torch.no_grad():
        single = model(input_ids=exs[1]["input_ids"][None], pixel_values=exs[1]["pixel_values"][None])
    n = len(exs[1]["input_ids"])
    assert torch.allclose(single.logits[0], out.logits[1, : n + P], atol=1e-4)


def test_image_processor_inputs(small):
    _, processor = small
    arr = _image(5, size=128)
    a = processor.image_processor(arr)["pixel_values"]
    b = processor.image_processor(Image.fromarray(arr))["pixel_values"]
    assert a.shape == (1, 3, 64, 64) and torch.equal(a, b)
    assert -1.0 <= a.min() and a.max() <= 1.0
    wide = processor.image_processor(np.zeros((48, 96, 3), np.uint8))["pixel_values"]   # letterboxed
    assert wide.shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------------------------------------------------
# Generation and actions
# ----------------------------------------------------------------------------------------------------------------------
def _inputs(processor, seed=3):
    return processor(build_prompt(INSTRUCTION), _image(seed))


@pytest.mark.parametrize("weights", ["as_built", "large_random"])
def test_kv_cache_generation_matches_no_cache(weights):
    model, processor = build_tiny_vla(norm_stats=STATS, seed=2, **SMALL)
    if weights == "large_random":  # std 4/sqrt(fan_in): varied tokens, so the comparison is not trivially constant
        with torch.no_grad():
            for p in model.language_model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 4.0 / p.shape[-1] ** 0.5)
    inputs = _inputs(processor)
    ids = torch.cat([inputs["input_ids"], torch.tensor([[model.config.space_token_id]])], dim=1)
    kw = dict(pixel_values=inputs["pixel_values"], max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] <= ids.shape[1] + 12


def test_predict_action_and_unnorm_key(small):
    model, processor = small
    inputs = _inputs(processor)
    a = model.predict_action(**inputs, unnorm_key="demo_world", do_sample=False)
    assert isinstance(a, np.ndarray) and a.shape == (7,) and np.issubdtype(a.dtype, np.floating)
    assert np.array_equal(model.predict_action(**inputs, do_sample=False), a)          # one key: None is fine
    # prompt that already ends with "▁": nothing appended, same result
    ids = torch.cat([inputs["input_ids"], torch.tensor([[model.config.space_token_id]])], dim=1)
    assert np.array_equal(model.predict_action(input_ids=ids, pixel_values=inputs["pixel_values"]), a)
    assert model.get_action_dim() == 7 and model.get_action_stats("demo_world")["q99"][6] == 1.0
    with pytest.raises(ValueError, match="demo_world") as err:
        model.predict_action(**inputs, unnorm_key="bridge_orig")
    assert "\n" not in str(err.value)
    two = dict(STATS, bridge_orig=STATS["demo_world"])
    model.config.norm_stats = two
    try:
        with pytest.raises(ValueError, match="bridge_orig"):
            model.get_action_dim()
    finally:
        model.config.norm_stats = STATS
    with pytest.raises(ValueError):  # batch generation is not supported, as in OpenVLA
        model.generate(inputs["input_ids"].repeat(2, 1), pixel_values=inputs["pixel_values"].repeat(2, 1, 1, 1),
                       max_new_tokens=2)


def test_save_and_reload_identical(small, tmp_path):
    from transformers import AutoModelForVision2Seq, AutoProcessor

    model, processor = small
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    inputs = _inputs(processor, seed=7)
    expected = model.predict_action(**inputs, unnorm_key="demo_world")
    for loaded, proc in [
        (TinyVLAForActionPrediction.from_pretrained(tmp_path), TinyVLAProcessor.from_pretrained(tmp_path)),
        (AutoModelForVision2Seq.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)),
    ]:
        assert isinstance(loaded, TinyVLAForActionPrediction) and isinstance(proc, TinyVLAProcessor)
        assert loaded.config.norm_stats == STATS
        assert proc.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
        got = loaded.predict_action(**proc(build_prompt(INSTRUCTION), _image(7)), unnorm_key="demo_world")
        assert np.array_equal(got, expected)


# ----------------------------------------------------------------------------------------------------------------------
# PEFT / LoRA
# ----------------------------------------------------------------------------------------------------------------------
def test_lora_targets_match_openvla_naming():
    model, _ = build_tiny_vla(norm_stats=STATS, seed=0, **SMALL)
    names = {n for n, _ in model.named_modules()}
    for expected in ["language_model.lm_head", "language_model.model.layers.0.self_attn.q_proj",
                     "language_model.model.layers.0.mlp.down_proj", "projector.fc1", "projector.fc2",
                     "vision_backbone.featurizer.blocks.0.attn.qkv", "vision_backbone.featurizer.blocks.0.mlp.fc1",
                     "vision_backbone.featurizer.patch_embed.convs.0"]:  # the conv stem
        assert expected in names
    targets = lora_target_modules(model)
    assert "lm_head" not in targets
    assert targets == sorted({"qkv", "proj", "fc1", "fc2", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                              "up_proj", "down_proj"})
    assert lora_target_modules(model, include_lm_head=True) == sorted(targets + ["lm_head"])

    # peft's own "all-linear" misses the nested head (it removes the full name "language_model.lm_head" from a set
    # of last-name components) - the same happens for OpenVLA - so the helper's explicit list is what excludes it.
    all_linear = _lora(build_tiny_vla(norm_stats=STATS, seed=0, **SMALL)[0], target_modules="all-linear")
    assert hasattr(all_linear.base_model.model.language_model.lm_head, "lora_A")

    peft_model = _lora(model)
    assert not hasattr(peft_model.base_model.model.language_model.lm_head, "lora_A")
    assert hasattr(peft_model.base_model.model.projector.fc1, "lora_A")
    trainable, total, share = trainable_parameters(peft_model)
    print("\n" + trainable_summary(peft_model))
    assert 0 < trainable < total and 0 < share < 100
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert lora_target_modules(peft_model) == targets          # also works on the wrapped model


def test_overfit_one_example_recovers_its_action(overfit):
    peft_model, processor, history = overfit
    assert history[-1]["action_accuracy"] == 1.0 and history[-1]["l1"] == 0.0
    assert history[-1]["n_action_tokens"] == 7
    pred = peft_model.predict_action(**processor(build_prompt(INSTRUCTION), _image(3)), unnorm_key="demo_world",
                                     do_sample=False)
    s = STATS["demo_world"]["action"]
    q01, q99, mask = np.array(s["q01"]), np.array(s["q99"]), np.array(s["mask"])
    bin_width = np.where(mask, (q99 - q01) / 255.0, 2.0 / 255.0)   # 2/255 in [-1, 1], de-normalized per dim
    assert np.all(np.abs(pred - ACTION) <= bin_width), (pred, ACTION)


def test_lora_adapter_save_and_reload(overfit, tmp_path):
    from peft import PeftModel

    peft_model, processor, _ = overfit
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    inputs = processor(build_prompt(INSTRUCTION), _image(3))
    expected = peft_model.predict_action(**inputs, unnorm_key="demo_world")
    base, _ = build_tiny_vla(norm_stats=STATS, seed=1, **SMALL)          # same base weights as the fixture
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    reloaded.eval()
    assert np.array_equal(reloaded.predict_action(**inputs, unnorm_key="demo_world"), expected)
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, peft_model(**inputs).logits, atol=1e-5)
    # the adapter changed the model: the bare base predicts something else
    with reloaded.disable_adapter():
        assert not np.array_equal(reloaded.predict_action(**inputs, unnorm_key="demo_world"), expected)


def test_vision_stem_is_saved_and_an_older_config_loads_as_patch(tmp_path):
    from vla_bridge.models.tiny_vla import ConvStem, TinyVLAConfig

    model, _ = build_tiny_vla(norm_stats=STATS, seed=0, **SMALL)
    assert isinstance(model.vision_backbone.featurizer.patch_embed, ConvStem)
    model.config.save_pretrained(tmp_path)
    assert TinyVLAConfig.from_pretrained(tmp_path).vision_stem == "conv"
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["vision_stem"]                                  # a config saved before the conv stem existed
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert TinyVLAConfig.from_pretrained(tmp_path).vision_stem == "patch"
