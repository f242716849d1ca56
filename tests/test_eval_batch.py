"""The eval batch (frames per generate() call) is sized from free VRAM, not fixed at 64."""

from __future__ import annotations

import pytest
import torch

from vla_bridge.evaluation import inference as ev
from vla_bridge.models.tiny_vla import build_tiny_vla

GiB = 1024**3
LLAMA2_7B = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, dtype_bytes=2)
SEQ = 280  # OpenVLA-7B evaluation: 256 patches + prompt + "▁" + 7 action tokens


def test_kv_cache_of_64_frames_on_llama2_7b_is_about_9_gb():
    """The figure of the issue: 0.5 MiB per token, ~9 GB for 64 x 280 tokens - more than a 24 GB card has left
    after 15 GB of bf16 weights."""
    per_token = 2 * 32 * 4096 * 2
    assert per_token == 512 * 1024
    assert 9.0e9 < 64 * SEQ * per_token < 9.8e9
    # 12 GiB free, KV cache only: 0.7 * 12 GiB / (280 x 0.5 MiB) = 61.4 frames
    assert ev.eval_batch_size(12 * GiB, seq_len=SEQ, **LLAMA2_7B) == 61
    # with the prefill's logits (32064-token vocabulary, bf16 + the fp32 upcast): 44 frames
    assert ev.eval_batch_size(12 * GiB, seq_len=SEQ, vocab_size=32064, **LLAMA2_7B) == 44
    assert ev.eval_batch_size(1 * GiB, seq_len=SEQ, vocab_size=32064, **LLAMA2_7B) == 3


def test_floor_cap_and_monotonic():
    assert ev.eval_batch_size(0, seq_len=SEQ, **LLAMA2_7B) == 1            # never 0: one frame always tries
    assert ev.eval_batch_size(-5, seq_len=SEQ, **LLAMA2_7B) == 1
    assert ev.eval_batch_size(140 * GiB, seq_len=SEQ, **LLAMA2_7B) == ev.DEFAULT_MAX_BATCH   # H200: the cap
    assert ev.eval_batch_size(140 * GiB, seq_len=SEQ, cap=16, **LLAMA2_7B) == 16
    sizes = [ev.eval_batch_size(g * GiB, seq_len=SEQ, vocab_size=32064, **LLAMA2_7B) for g in range(0, 40, 2)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == ev.DEFAULT_MAX_BATCH
    assert ev.eval_batch_size(4 * GiB, seq_len=2 * SEQ, **LLAMA2_7B) < ev.eval_batch_size(4 * GiB, seq_len=SEQ,
                                                                                          **LLAMA2_7B)
    # grouped-query attention: 8 KV heads of 32 cache a quarter as much
    gqa = dict(LLAMA2_7B, num_kv_heads=8)
    assert ev.eval_batch_size(2 * GiB, seq_len=SEQ, **gqa) == pytest.approx(
        4 * ev.eval_batch_size(2 * GiB, seq_len=SEQ, **LLAMA2_7B), abs=3)
    # fp32 weights (a CPU check of a local checkpoint): twice the bytes per cached value
    assert ev.eval_batch_size(4 * GiB, seq_len=SEQ, **dict(LLAMA2_7B, dtype_bytes=4)) == \
        ev.eval_batch_size(2 * GiB, seq_len=SEQ, **LLAMA2_7B)


def test_predictor_sizes_itself_and_keeps_a_given_size():
    torch.set_num_threads(1)
    stats = {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}}
    model, processor = build_tiny_vla(norm_stats={"k": stats}, image_size=32, vision_width=32, vision_depth=2,
                                      vision_heads=2, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    auto = ev.BatchedActionPredictor(model, processor, "k", center_crop=False)
    if not torch.cuda.is_available():
        assert auto.max_batch_size == ev.DEFAULT_MAX_BATCH and "no CUDA device" in repr(auto)
    else:
        assert 1 <= auto.max_batch_size <= ev.DEFAULT_MAX_BATCH and "GiB free VRAM" in repr(auto)
    given = ev.BatchedActionPredictor(model, processor, "k", center_crop=False, max_batch_size=8)
    assert given.max_batch_size == 8 and "8 (given)" in repr(given)
