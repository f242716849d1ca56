"""The batched decode loop of evaluation.inference against the reference, one frame at a time through the model's
own generate() (what predict_action runs): the same 7 token ids on a mixed batch (prompt lengths, chunked
prefill, several decode calls, left padding), with a LoRA adapter on and off (lm_head adapted too), and the same
raw first-token logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from vla_bridge.data import world
from vla_bridge.evaluation import inference
from vla_bridge.models.lora import lora_target_modules, merged_adapter
from vla_bridge.models.openvla import action_inputs, base_model, lora_config
from vla_bridge.models.tiny_vla import build_tiny_vla

pytestmark = [pytest.mark.filterwarnings("ignore:target_modules includes lm_head")]

KEY = "demo_world"
STATS = {KEY: {"action": {"q01": [-0.03, -0.03, -0.03, -0.1, -0.1, -0.1, 0.0],
                          "q99": [0.03, 0.03, 0.03, 0.1, 0.1, 0.1, 1.0], "mask": [True] * 6 + [False]}}}
SMALL = dict(image_size=64, patch_size=16, vision_width=96, vision_depth=3, vision_heads=3, hidden_size=128,
             num_layers=2, num_heads=2, intermediate_size=256)


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def lora_vla():
    """A PEFT-wrapped tiny VLA whose adapter (every linear layer, lm_head included) is non-zero."""
    from peft import get_peft_model

    model, processor = build_tiny_vla(norm_stats=STATS, seed=1, **SMALL)
    targets = lora_target_modules(model, include_lm_head=True)
    peft_model = get_peft_model(model, lora_config(8, 16, target_modules=targets))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.eval()
    return peft_model, processor


@pytest.fixture(scope="module")
def frames():
    """10 frames, 4 instructions of 3+ prompt lengths, in an order that interleaves them."""
    tasks = [world.SPLITS.heldout_tasks[0], world.SPLITS.finetune[2], world.SPLITS.unseen_color_tasks[1]]
    prompts = [tasks[0], world.paraphrases(tasks[1])[3], "can you put the purple carrot in the pot?", ""]
    images, instructions = [], []
    for step in range(3):
        for i, (t, p) in enumerate(zip(tasks + [tasks[0]], prompts)):
            if step == 2 and i % 2:
                continue
            env = world.TabletopEnv(image_size=64)
            obs = env.reset(t, 200 + 10 * i + step, prompt=p)
            images.append(obs[world.IMAGE_KEYS[0]])
            instructions.append(p)
    return images, instructions


def _reference(model, processor, pred, images, instructions):
    """Per frame, the model's own generate() exactly as predict_action calls it: (token ids (N, 7), raw logits of
    the first action token (N, V)). Checks on the way that predict_action decodes those tokens."""
    vla = base_model(model)
    tokens, logits = [], []
    with torch.no_grad():
        for im, ins in zip(images, instructions):
            inputs = action_inputs(processor, ins, pred.preprocess(im), model=model)
            out = vla.generate(**inputs, max_new_tokens=7, min_new_tokens=7, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
            tokens.append(out.sequences[0, -7:].numpy())
            logits.append(out.logits[0][0])
            action = vla.predict_action(**inputs, unnorm_key=KEY, do_sample=False)
            np.testing.assert_array_equal(pred.decode(tokens[-1][None])[0], action)
    return np.stack(tokens), torch.stack(logits)


@pytest.mark.parametrize("adapter", [True, False])
def test_tokens_and_logits_match_per_frame_generate(lora_vla, frames, adapter):
    model, processor = lora_vla
    images, instructions = frames
    ctx = model.disable_adapter() if not adapter else torch.no_grad()
    with ctx:
        # max 4 frames per call, prefill in chunks of 2: groups split across calls and chunks
        pred = inference.BatchedActionPredictor(model, processor, KEY, center_crop=True, max_batch_size=4,
                                                chunk_size=2)
        lengths = {len(pred.prompt_ids(i)) for i in instructions}
        assert len(lengths) >= 3
        ref_tokens, ref_logits = _reference(model, processor, pred, images, instructions)
        np.testing.assert_array_equal(pred.predict_token_ids(images, instructions), ref_tokens)
        assert pred.calls == 3                                        # ceil(10 / 4)
        logits = pred.first_token_logits(images, instructions, action_only=False)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        whole = inference.BatchedActionPredictor(model, processor, KEY, center_crop=True, max_batch_size=64)
        np.testing.assert_array_equal(whole.predict_token_ids(images, instructions), ref_tokens)
        assert whole.calls == 1                                       # every prompt length in one decode call
        padded = inference.BatchedActionPredictor(model, processor, KEY, center_crop=True, padding=True,
                                                  chunk_size=4)
        np.testing.assert_array_equal(padded.predict_token_ids(images, instructions), ref_tokens)
        torch.testing.assert_close(padded.first_token_logits(images, instructions, action_only=False), ref_logits,
                                   atol=1e-5, rtol=1e-5)
    if adapter:
        with model.disable_adapter():
            base = whole.predict_token_ids(images, instructions)
        assert not np.array_equal(base, ref_tokens), "the adapter should change some tokens"


def test_batches_pack_prompt_lengths_into_calls(lora_vla, frames):
    model, processor = lora_vla
    _, instructions = frames
    pred = inference.BatchedActionPredictor(model, processor, KEY, center_crop=False, max_batch_size=4)
    batches = pred._batches(instructions)
    assert [sum(len(g) for g in b) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for g in b for i in g) == list(range(len(instructions)))
    for b in batches:
        for g in b:
            assert len({len(pred.prompt_ids(instructions[i])) for i in g}) == 1
    padded = inference.BatchedActionPredictor(model, processor, KEY, center_crop=False, max_batch_size=4,
                                              padding=True)
    assert padded._batches(instructions) == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9]]]


def test_prefill_packs_span_prompt_lengths():
    packs = inference._fill([6, 1, 3], 4)     # groups of 6, 1 and 3 frames in prefill packs of 4
    assert [[(g, (p.start, p.stop)) for g, p in pack] for pack in packs] == [
        [(0, (0, 4))], [(0, (4, 6)), (1, (0, 1)), (2, (0, 1))], [(2, (1, 3))]]


def test_one_projection_per_pack_is_the_attention_modules_own_computation(lora_vla, frames):
    """The SDPA path (q/k/v/o and RoPE once over a pack, the last layer's queries at the last positions only)
    against the layers' own attention modules called once per prompt length: the same tokens, and first-token
    logits equal to float rounding, adapter on."""
    model, processor = lora_vla
    images, instructions = frames
    fast = inference.BatchedActionPredictor(model, processor, KEY, center_crop=True, chunk_size=4)
    assert fast._sdpa, "the tiny VLA's Llama uses transformers' SDPA attention: the fast path should be taken"
    modules = inference.BatchedActionPredictor(model, processor, KEY, center_crop=True, chunk_size=4)
    modules._sdpa = False
    tokens, logits = fast._run(images, instructions, True)
    ref_tokens, ref_logits = modules._run(images, instructions, True)
    np.testing.assert_array_equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_rope_is_transformers_rotary_embedding_bit_for_bit():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)   # (batch, heads, n, dim)
    cos, sin = LlamaRotaryEmbedding(16)(k, torch.arange(3, 12).repeat(2, 1))
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    flat = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[-1])           # (tokens, heads, dim)
    assert torch.equal(inference._rope(flat(q), cos.reshape(-1, 16), sin.reshape(-1, 16)), flat(ref_q))
    assert torch.equal(inference._rope(flat(k), cos.reshape(-1, 16), sin.reshape(-1, 16)), flat(ref_k))


def test_refuses_a_generation_config_with_other_logits_processors():
    inference.check_greedy_config(GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0))
    with pytest.raises(ValueError, match="repetition_penalty"):
        inference.check_greedy_config(GenerationConfig(repetition_penalty=1.2))


def test_merged_adapter_is_the_same_function_and_restores_the_exact_weights(lora_vla, frames):
    model, processor = lora_vla
    images, instructions = frames
    layers = [m for m in model.modules() if hasattr(m, "merged_adapters")]
    ptrs = [m.get_base_layer().weight.data_ptr() for m in layers]
    copies = [m.get_base_layer().weight.detach().clone() for m in layers]
    with merged_adapter(model) as merged:
        assert merged and all(m.merged for m in layers)
        assert sum(not torch.equal(m.get_base_layer().weight, c) for m, c in zip(layers, copies)) == len(layers)
    assert not any(m.merged for m in layers)
    assert [m.get_base_layer().weight.data_ptr() for m in layers] == ptrs   # the original tensors, not unmerge()'s
    assert all(torch.equal(m.get_base_layer().weight, c) for m, c in zip(layers, copies))
    with model.disable_adapter(), merged_adapter(model) as merged:
        assert not merged                                                   # the base model is never merged
    side = inference.BatchedActionPredictor(model, processor, KEY, center_crop=True, merge=False)
    fused = inference.BatchedActionPredictor(model, processor, KEY, center_crop=True)
    np.testing.assert_array_equal(fused.predict_token_ids(images, instructions),
                                  side.predict_token_ids(images, instructions))
    torch.testing.assert_close(fused.first_token_logits(images, instructions, action_only=False),
                               side.first_token_logits(images, instructions, action_only=False), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(m.get_base_layer().weight, c) for m, c in zip(layers, copies))
