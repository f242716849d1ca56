"""vla_bridge.tokenization: OpenVLA's action normalization / discretization, prompt, examples, collation, metrics."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vla_bridge.tokenization import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    ActionCollator,
    ActionTokenizer,
    action_metrics,
    build_prompt,
    make_training_example,
    normalize_actions,
    normalize_with_stats,
    num_image_patches,
    unnormalize_actions,
    unnormalize_with_stats,
)

V = 32000  # OpenVLA / Llama-2 base vocabulary
HALF_BIN = 1.0 / 255.0  # bins are 2/255 wide

BRIDGE_LIKE = {
    "action": {
        "q01": [-0.029, -0.041, -0.026, -0.081, -0.092, -0.116, 0.0],
        "q99": [0.028, 0.040, 0.040, 0.082, 0.077, 0.113, 1.0],
        "mask": [True, True, True, True, True, True, False],
    }
}


# ----------------------------------------------------------------------------------------------------------------------
# Discretization
# ----------------------------------------------------------------------------------------------------------------------
def test_round_trip_within_half_a_bin():
    at = ActionTokenizer(V)
    x = np.linspace(-1.0, 1.0, 20001)
    err = np.abs(at.decode(at.encode(x)) - x)
    assert err.max() <= HALF_BIN + 1e-12


def test_hand_computed_upstream_cases():
    at = ActionTokenizer(V)
    assert at.action_token_begin_idx == V - 257 == 31743
    assert list(at.action_token_ids)[0] == 31744 and list(at.action_token_ids)[-1] == 31999
    # x = -1: digitize -> 1 -> id V-1; it decodes to the first bin centre -1 + 1/255.
    assert at.encode(np.array([-1.0]))[0] == V - 1
    assert at.decode(np.array([V - 1]))[0] == pytest.approx(-1 + 1 / 255)
    # x = +1: digitize -> 256 -> id V-256; clip(V - id - 1 = 255 -> 254) -> last centre 1 - 1/255.
    assert at.encode(np.array([1.0]))[0] == V - 256
    assert at.decode(np.array([V - 256]))[0] == pytest.approx(1 - 1 / 255)
    # x = 0: edges are -1 + 2k/255; 0 lies in [edge 127, edge 128) -> digitize 128 -> id 31872;
    # decode: V - 31872 - 1 = 127 -> bin_centers[127] = (edge127 + edge128) / 2 = 0.
    assert at.encode(np.array([0.0]))[0] == V - 128 == 31872
    assert at.decode(np.array([31872]))[0] == pytest.approx(0.0, abs=1e-12)
    # x = 0.5: largest k with -1 + 2k/255 <= 0.5 is 191 -> digitize 192 -> id 31808 -> centre (2*191+1)/255 - 1.
    assert at.encode(np.array([0.5]))[0] == 31808
    assert at.decode(np.array([31808]))[0] == pytest.approx(383 / 255 - 1)
    # a value just above -1 stays in the first interval
    assert at.encode(np.array([-0.999]))[0] == V - 1


def test_clipping_and_non_action_ids():
    at = ActionTokenizer(V)
    assert at.encode(np.array([5.0]))[0] == at.encode(np.array([1.0]))[0]
    assert at.encode(np.array([-3.0]))[0] == at.encode(np.array([-1.0]))[0]
    # ids outside the action range are clipped onto the extreme centres, as upstream
    assert at.decode(np.array([2]))[0] == pytest.approx(at.bin_centers[-1])      # EOS -> +1 side
    assert at.decode(np.array([V + 5]))[0] == pytest.approx(at.bin_centers[0])   # above vocab -> -1 side
    mask = at.is_action_token(np.array([31743, 31744, 31999, 32000, 2]))
    assert mask.tolist() == [False, True, True, False, False]


def test_tokenizer_object_and_torch_parity():
    at = ActionTokenizer(SimpleNamespace(vocab_size=1024))
    assert at.base_vocab_size == 1024 and at.action_token_begin_idx == 767
    x = np.random.default_rng(0).uniform(-1.2, 1.2, size=(4, 7))
    ids_np = at.encode(x)
    ids_t = at.encode(torch.tensor(x, dtype=torch.float32))
    assert isinstance(ids_t, torch.Tensor) and ids_t.dtype == torch.long
    # float32 vs float64 may differ only for values sitting exactly on an edge; none here
    assert np.array_equal(ids_np, ids_t.numpy())
    assert ids_np.shape == (4, 7) and ids_np.min() >= 768 and ids_np.max() <= 1023
    dec_t = at.decode(ids_t)
    assert isinstance(dec_t, torch.Tensor)
    assert np.allclose(dec_t.numpy(), at.decode(ids_np), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Normalization
# ----------------------------------------------------------------------------------------------------------------------
def test_normalize_unnormalize_inverse_and_gripper_untouched():
    s = BRIDGE_LIKE["action"]
    q01, q99, mask = np.array(s["q01"]), np.array(s["q99"]), np.array(s["mask"])
    rng = np.random.default_rng(1)
    a = rng.uniform(q01, q99, size=(5, 3, 7))             # any leading dims
    a[..., 6] = rng.integers(0, 2, size=(5, 3))            # gripper open / closed
    n = normalize_actions(a, q01, q99, mask)
    assert n.shape == a.shape and np.all(np.abs(n) <= 1.0)
    assert np.array_equal(n[..., 6], a[..., 6])            # mask False: unchanged
    assert np.allclose(n[..., :6], 2 * (a[..., :6] - q01[:6]) / (q99[:6] - q01[:6] + 1e-8) - 1)
    back = unnormalize_actions(n, q01, q99, mask)
    assert np.allclose(back, a, atol=1e-6)
    assert np.array_equal(back[..., 6], a[..., 6])
    # q01 -> -1, q99 -> +1, beyond q99 clipped
    edge = normalize_actions(np.stack([q01, q99, q99 + 1.0]), q01, q99, mask)
    assert np.allclose(edge[0, :6], -1) and np.allclose(edge[1, :6], 1, atol=1e-6) and np.allclose(edge[2, :6], 1)


def test_normalization_torch_and_stats_helpers():
    a = torch.tensor([[0.01, -0.02, 0.0, 0.05, -0.05, 0.1, 1.0]] * 2, dtype=torch.float32)
    n_t = normalize_with_stats(a, BRIDGE_LIKE)
    n_np = normalize_with_stats(a.numpy(), BRIDGE_LIKE["action"])     # inner dict accepted too
    assert isinstance(n_t, torch.Tensor) and n_t.dtype == torch.float32
    assert np.allclose(n_t.numpy(), n_np, atol=1e-6)
    assert torch.allclose(unnormalize_with_stats(n_t, BRIDGE_LIKE), a, atol=1e-6)
    # no mask given -> every dimension normalized (upstream default)
    q = np.zeros(3), np.ones(3)
    assert np.allclose(normalize_actions(np.array([0.0, 0.5, 1.0]), *q), [-1, 0, 1], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt, examples, collation
# ----------------------------------------------------------------------------------------------------------------------
def test_prompt():
    assert PROMPT_TEMPLATE == "In: What action should the robot take to {instruction}?\nOut:"
    assert build_prompt("  Put the Red Block on the plate \n") == (
        "In: What action should the robot take to put the red block on the plate?\nOut:")


class _StubTokenizer:
    """Llama-like ids: BOS=1, EOS=2, "▁"=29871, vocab 32000; a prompt is tokenized to one id per word."""

    vocab_size, bos_token_id, eos_token_id, unk_token_id, pad_token_id = 32000, 1, 2, 0, 32000

    def __init__(self, end_with_space=False):
        self.end_with_space = end_with_space

    def convert_tokens_to_ids(self, token):
        return 29871 if token == "\u2581" else 0

    def __call__(self, text, add_special_tokens=True):
        ids = [1] + [100 + (hash(w) % 1000) for w in text.split()]
        if self.end_with_space:
            ids.append(29871)
        return SimpleNamespace(input_ids=ids)


class _StubImageProcessor:
    def __init__(self, channels):
        self.channels = channels

    def __call__(self, image, return_tensors="pt"):
        assert image.size == (32, 32)  # arrays arrive converted to PIL, as OpenVLA's image processor needs
        return {"pixel_values": torch.zeros(1, self.channels, 8, 8)}


def _stub_processor(channels=6, end_with_space=False):
    return SimpleNamespace(tokenizer=_StubTokenizer(end_with_space), image_processor=_StubImageProcessor(channels))


@pytest.mark.parametrize("end_with_space", [False, True])
def test_training_example_supervises_exactly_actions_and_eos(end_with_space):
    proc = _stub_processor(end_with_space=end_with_space)
    at = ActionTokenizer(proc.tokenizer)
    action = np.array([0.01, -0.02, 0.0, 0.05, -0.05, 0.1, 1.0])
    ex = make_training_example(np.zeros((32, 32, 3), np.uint8), "Put the block on the plate", action, proc, at,
                               BRIDGE_LIKE)
    ids, labels = ex["input_ids"], ex["labels"]
    expected_actions = at.encode(normalize_with_stats(action, BRIDGE_LIKE)).tolist()
    supervised = labels != IGNORE_INDEX
    assert int(supervised.sum()) == 7 + 1
    assert labels[supervised].tolist() == expected_actions + [2]
    assert ids[-8:].tolist() == expected_actions + [2]
    assert ids[0].item() == 1 and ids[-9].item() == 29871
    assert int((ids == 29871).sum()) == 1            # never a doubled space token
    assert ex["pixel_values"].shape == (6, 8, 8)
    # the gripper (mask False) passes through un-normalized: 1.0 -> the +1 token
    assert expected_actions[6] == V - 256


def test_collator_pads_right_and_builds_mask():
    proc = _stub_processor(channels=6)
    at = ActionTokenizer(proc.tokenizer)
    short = make_training_example(np.zeros((32, 32, 3), np.uint8), "put it", np.zeros(7), proc, at, BRIDGE_LIKE)
    long = make_training_example(np.zeros((32, 32, 3), np.uint8), "put the red block on the plate", np.zeros(7),
                                 proc, at, BRIDGE_LIKE)
    batch = ActionCollator(pad_token_id=32000)([short, long])
    n0, n1 = len(short["input_ids"]), len(long["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, n1)
    assert batch["input_ids"][0, n0:].eq(32000).all() and batch["labels"][0, n0:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert batch["attention_mask"][0, :n0].all() and not batch["attention_mask"][0, n0:].any()
    assert torch.equal(batch["input_ids"][1], long["input_ids"])
    assert batch["pixel_values"].shape == (2, 6, 8, 8)
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) == 8).all()
    with pytest.raises(ValueError):
        ActionCollator(pad_token_id=0, padding_side="left")([short])


# ----------------------------------------------------------------------------------------------------------------------
# Training metrics
# ----------------------------------------------------------------------------------------------------------------------
def _perfect_logits(labels, input_ids, num_patches, vocab_rows):
    """Logits whose argmax at every position is the next token (teacher forcing done right)."""
    b, t = input_ids.shape
    logits = torch.zeros(b, t + num_patches, vocab_rows)
    for j in range(1, t):  # text token j is predicted at sequence position num_patches + j - 1
        logits[torch.arange(b), num_patches + j - 1, input_ids[:, j]] = 10.0
    return logits


def test_action_metrics_alignment_and_values():
    proc = _stub_processor(channels=3)
    at = ActionTokenizer(proc.tokenizer)
    acts = [np.array([0.01, -0.02, 0.0, 0.05, -0.05, 0.1, 1.0]), np.array([-0.01, 0.02, 0.01, 0.0, 0.0, 0.0, 0.0])]
    exs = [make_training_example(np.zeros((32, 32, 3), np.uint8), txt, a, proc, at, BRIDGE_LIKE)
           for txt, a in zip(["put it", "put the red block on the plate"], acts)]
    batch = ActionCollator(pad_token_id=32000)(exs)
    P = 16
    logits = _perfect_logits(batch["labels"], batch["input_ids"], P, 32064)
    m = action_metrics(logits, batch["labels"], P, at, BRIDGE_LIKE)
    assert m["n_action_tokens"] == 14 and m["action_accuracy"] == 1.0 and m["l1"] == 0.0 and m["l1_denorm"] == 0.0

    # Move one predicted action token of example 1 by one bin: accuracy 13/14, l1 = (2/255)/14 (normalized space).
    n1 = int(batch["attention_mask"][1].sum())
    j = n1 - 8                                   # first action token of example 1
    pos = P + j - 1
    wrong = int(batch["input_ids"][1, j]) - 1    # neighbouring bin
    logits[1, pos] = 0.0
    logits[1, pos, wrong] = 10.0
    m = action_metrics(logits, batch["labels"], P, at, BRIDGE_LIKE)
    assert m["action_accuracy"] == pytest.approx(13 / 14)
    assert m["l1"] == pytest.approx((2 / 255) / 14)
    q = BRIDGE_LIKE["action"]
    assert m["l1_denorm"] == pytest.approx((2 / 255) * 0.5 * (q["q99"][0] - q["q01"][0]) / 14)


def test_num_image_patches_through_wrappers():
    core = SimpleNamespace(vision_backbone=SimpleNamespace(featurizer=SimpleNamespace(
        patch_embed=SimpleNamespace(num_patches=256))))
    assert num_image_patches(core) == 256

    class DDPLike(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_backbone = torch.nn.Module()
            self.vision_backbone.featurizer = torch.nn.Module()
            self.vision_backbone.featurizer.patch_embed = SimpleNamespace(num_patches=64)

    assert num_image_patches(DDPLike(Inner())) == 64
