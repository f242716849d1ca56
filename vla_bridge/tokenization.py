"""Actions <-> tokens, the prompt, training examples and batch collation: the ONE place for these formulas.

Both policies on the shared code path (OpenVLA-7B and the tiny VLA in ``vla_bridge.models.tiny_vla``) go through
this module, so the numbers the notebook reports mean the same thing for both. The conventions follow OpenVLA:

* **Normalization** ("BOUNDS_Q99", the scheme of OpenVLA's ``bridge_orig`` statistics): every action dimension whose
  ``mask`` entry is True is mapped affinely so that its 1st / 99th percentiles land on -1 / +1, then clipped to
  [-1, 1]. Dimensions whose mask is False (Bridge's gripper, already in [0, 1]) pass through unchanged.
* **Discretization**: [-1, 1] is cut by 256 evenly spaced edges (255 intervals). A value becomes
  ``vocab_size - np.digitize(value, edges)``, i.e. one of the **last 256 ids below ``tokenizer.vocab_size``**;
  OpenVLA overwrites the 256 rarest Llama tokens (31744..31999) this way. A token decodes to the centre of its
  interval, so the round-trip error of a value in [-1, 1] is at most half an interval (1/255).
* **Prompt**: ``"In: What action should the robot take to {instruction}?\\nOut:"`` (OpenVLA's PurePromptBuilder).
* **Training sequence**: ``<s>`` prompt ``▁`` a1..a7 ``</s>``, with the loss on a1..a7 and ``</s>`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .images import to_pil as to_pil_image  # the package's one image-conversion helper

# Hugging Face's "ignore this position" label value (CrossEntropyLoss ignore_index).
IGNORE_INDEX = -100

# OpenVLA's discretization: 256 bins over [-1, 1].
N_ACTION_BINS = 256

# The SentencePiece word-boundary marker. Llama-2's tokenizer has it as a standalone token, id 29871 ("▁"), which
# is what the tokenizer emits for the single space after "Out:" when the whole training string is tokenized.
SPACE_TOKEN = "\u2581"
LLAMA_SPACE_TOKEN_ID = 29871

# Inference prompt. Why there is no trailing space after "Out:":
#   Upstream training strings are "In: What action ...?\nOut: " + <7 action tokens> + "</s>". The Llama tokenizer
#   splits that as [..., "Out", ":", "▁" (29871), a1, ..., a7, "</s>"]: the space becomes its own token because the
#   action tokens (rare CJK-like pieces) do not merge with it. Tokenizing a prompt string that ends in a space is
#   NOT guaranteed to reproduce that split (a trailing space may be dropped or merged depending on the tokenizer),
#   so the prompt stops at "Out:" and the space token is appended *by id*: OpenVLA's `predict_action` appends 29871
#   when the prompt ids do not already end with it, and `make_training_example` below does the same at train time.
PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]


# ------------------------------------------------------------------------------------------------------------------
# Prompt
# ------------------------------------------------------------------------------------------------------------------
def build_prompt(instruction: str) -> str:
    """OpenVLA's inference/training prompt for one instruction.

    Upstream lower-cases the language instruction (RLDSBatchTransform) and strips the whole human turn
    (PurePromptBuilder.add_turn); stripping the instruction itself gives the same string for the usual case and also
    drops stray whitespace that some Bridge task strings carry before the "?".
    """
    return PROMPT_TEMPLATE.format(instruction=str(instruction).lower().strip())


# ------------------------------------------------------------------------------------------------------------------
# Normalization (BOUNDS_Q99)
# ------------------------------------------------------------------------------------------------------------------
def _stats_like(ref: ArrayLike, value: Any, dtype=None):
    """`value` as an array/tensor that broadcasts against `ref` (same library, device and, by default, dtype)."""
    if isinstance(ref, torch.Tensor):
        return torch.as_tensor(np.asarray(value), dtype=dtype or ref.dtype, device=ref.device)
    return np.asarray(value, dtype=dtype or np.asarray(ref).dtype)


def _mask_like(ref: ArrayLike, mask: Optional[ArrayLike], dim: int):
    if mask is None:  # upstream default: normalize every dimension
        mask = np.ones(dim, dtype=bool)
    if isinstance(ref, torch.Tensor):
        return torch.as_tensor(np.asarray(mask, dtype=bool), device=ref.device)
    return np.asarray(mask, dtype=bool)


def _as_float(x: ArrayLike):
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.float()
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def normalize_actions(actions: ArrayLike, q01: ArrayLike, q99: ArrayLike, mask: Optional[ArrayLike] = None):
    """Raw actions (..., D) -> [-1, 1] with OpenVLA's BOUNDS_Q99 rule; numpy in -> numpy out, torch in -> torch out.

    normalized = clip(2 * (a - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) where mask is True, a unchanged elsewhere.
    """
    a = _as_float(actions)
    lo, hi = _stats_like(a, q01), _stats_like(a, q99)
    m = _mask_like(a, mask, a.shape[-1])
    if isinstance(a, torch.Tensor):
        n = torch.clamp(2.0 * (a - lo) / (hi - lo + 1e-8) - 1.0, -1.0, 1.0)
        return torch.where(m, n, a)
    n = np.clip(2.0 * (a - lo) / (hi - lo + 1e-8) - 1.0, -1.0, 1.0)
    return np.where(m, n, a)


def unnormalize_actions(normalized: ArrayLike, q01: ArrayLike, q99: ArrayLike, mask: Optional[ArrayLike] = None):
    """Inverse of `normalize_actions` (inside [-1, 1]): 0.5 * (n + 1) * (q99 - q01) + q01 where mask, else n.

    This is exactly OpenVLA's `predict_action` de-normalization (without the 1e-8, as upstream).
    """
    n = _as_float(normalized)
    lo, hi = _stats_like(n, q01), _stats_like(n, q99)
    m = _mask_like(n, mask, n.shape[-1])
    a = 0.5 * (n + 1.0) * (hi - lo) + lo
    if isinstance(n, torch.Tensor):
        return torch.where(m, a, n)
    return np.where(m, a, n)


def action_stats(norm_stats_entry: Mapping[str, Any]) -> Mapping[str, Any]:
    """The action statistics of a norm_stats entry: accepts ``{"action": {...}}`` or the inner ``{...}`` itself."""
    if "action" in norm_stats_entry and isinstance(norm_stats_entry["action"], Mapping):
        return norm_stats_entry["action"]
    if "q01" in norm_stats_entry:
        return norm_stats_entry
    raise KeyError(f"not an action norm-stats entry (need 'action' -> q01/q99/mask): keys {sorted(norm_stats_entry)}")


def normalize_with_stats(actions: ArrayLike, norm_stats_entry: Mapping[str, Any]):
    """`normalize_actions` with q01 / q99 / mask taken from a norm_stats entry ``{"action": {...}}``."""
    s = action_stats(norm_stats_entry)
    return normalize_actions(actions, s["q01"], s["q99"], s.get("mask"))


def unnormalize_with_stats(normalized: ArrayLike, norm_stats_entry: Mapping[str, Any]):
    """`unnormalize_actions` with q01 / q99 / mask taken from a norm_stats entry ``{"action": {...}}``."""
    s = action_stats(norm_stats_entry)
    return unnormalize_actions(normalized, s["q01"], s["q99"], s.get("mask"))


# ------------------------------------------------------------------------------------------------------------------
# Discretization
# ------------------------------------------------------------------------------------------------------------------
class ActionTokenizer:
    """OpenVLA's action discretizer, working on token *ids* (no string round trip).

    ``ActionTokenizer(tokenizer)`` or ``ActionTokenizer(tokenizer.vocab_size)``. Note that ``vocab_size`` means the
    tokenizer's base vocabulary **without** added tokens (Llama: 32000, not 32001 with <PAD>, not the model's 32064
    padded embedding rows): the action ids are ``vocab_size - 256 .. vocab_size - 1``.

    Value -> id:  ``id = vocab_size - digitize(clip(x, -1, 1), edges)``, digitize in 1..256, so
                  x = -1 -> vocab_size - 1 and x = +1 -> vocab_size - 256.
    Id -> value:  ``bin_centers[clip(vocab_size - id - 1, 0, 254)]``; the clip (upstream's) sends the x = +1 token
                  to the last interval and any non-action id to one of the two extreme centres.
    """

    def __init__(self, tokenizer_or_vocab_size: Any, n_bins: int = N_ACTION_BINS, min_action: float = -1.0,
                 max_action: float = 1.0) -> None:
        if isinstance(tokenizer_or_vocab_size, (int, np.integer)):
            self.base_vocab_size = int(tokenizer_or_vocab_size)
        else:
            self.base_vocab_size = int(tokenizer_or_vocab_size.vocab_size)
        self.n_bins, self.min_action, self.max_action = int(n_bins), float(min_action), float(max_action)
        self.bins = np.linspace(self.min_action, self.max_action, self.n_bins)          # 256 edges
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0                       # 255 centres
        # Upstream contract: ids strictly above this are action tokens (used by the training metrics' mask).
        self.action_token_begin_idx = int(self.base_vocab_size - (self.n_bins + 1))

    @property
    def bin_width(self) -> float:
        return float(self.bins[1] - self.bins[0])

    @property
    def action_token_ids(self) -> range:
        """All ids an action can encode to: the last `n_bins` ids below the base vocabulary size."""
        return range(self.base_vocab_size - self.n_bins, self.base_vocab_size)

    def encode(self, normalized: ArrayLike):
        """Normalized actions (any shape) -> token ids (same shape). numpy -> int64 numpy, torch -> long tensor."""
        is_torch = isinstance(normalized, torch.Tensor)
        x = normalized.detach().cpu().double().numpy() if is_torch else np.asarray(normalized, dtype=np.float64)
        ids = self.base_vocab_size - np.digitize(np.clip(x, self.min_action, self.max_action), self.bins)
        ids = ids.astype(np.int64)
        return torch.from_numpy(ids).to(normalized.device) if is_torch else ids

    def decode(self, token_ids: ArrayLike):
        """Token ids (any shape) -> normalized actions (bin centres). numpy -> float64 numpy, torch -> float tensor."""
        is_torch = isinstance(token_ids, torch.Tensor)
        ids = token_ids.detach().cpu().numpy() if is_torch else np.asarray(token_ids)
        idx = np.clip(self.base_vocab_size - ids.astype(np.int64) - 1, 0, self.bin_centers.shape[0] - 1)
        values = self.bin_centers[idx]
        return torch.from_numpy(values).float().to(token_ids.device) if is_torch else values

    # Upstream's method name, for readers following OpenVLA's finetune.py.
    decode_token_ids_to_actions = decode

    def is_action_token(self, token_ids: ArrayLike):
        """Boolean mask: is each id one of the `n_bins` action tokens?"""
        if isinstance(token_ids, torch.Tensor):
            return (token_ids > self.action_token_begin_idx) & (token_ids < self.base_vocab_size)
        ids = np.asarray(token_ids)
        return (ids > self.action_token_begin_idx) & (ids < self.base_vocab_size)

    def __repr__(self) -> str:
        r = self.action_token_ids
        return (f"ActionTokenizer(vocab_size={self.base_vocab_size}, n_bins={self.n_bins}, "
                f"action ids {r.start}..{r.stop - 1})")


# ------------------------------------------------------------------------------------------------------------------
# Training examples and batches
# ------------------------------------------------------------------------------------------------------------------
def space_token_id(tokenizer) -> int:
    """Id of the standalone "▁" token (29871 for Llama-2 / OpenVLA)."""
    tid = tokenizer.convert_tokens_to_ids(SPACE_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no standalone {SPACE_TOKEN!r} token")
    return int(tid)



def image_to_pixel_values(image: Any, processor) -> torch.Tensor:
    """One image (PIL, or uint8 HxWx3 array) -> the processor's pixel_values for it, shape (C, H, W).

    OpenVLA's image processor only takes PIL images, so arrays are converted first. C is 6 for OpenVLA's fused
    DINOv2+SigLIP backbone and 3 for the tiny VLA.
    """
    image_processor = getattr(processor, "image_processor", processor)
    return image_processor(to_pil_image(image), return_tensors="pt")["pixel_values"][0]


def make_training_example(image: Any, instruction: str, action: ArrayLike, processor, action_tokenizer: ActionTokenizer,
                          norm_stats_entry: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """One (image, instruction, raw action) -> model inputs with labels, laid out exactly as OpenVLA trains.

    input_ids = tokenizer(prompt).input_ids (starts with BOS) + [▁] (unless already last) + 7 action ids + [EOS]
    labels    = IGNORE_INDEX everywhere except the action ids and the EOS (action_dim + 1 supervised positions),
                the same as RLDSBatchTransform's ``labels[: -(len(action) + 1)] = IGNORE_INDEX``.
    """
    tokenizer = processor.tokenizer
    action = action.detach().cpu().numpy() if isinstance(action, torch.Tensor) else np.asarray(action)
    action_ids = action_tokenizer.encode(normalize_with_stats(action.astype(np.float64), norm_stats_entry))
    action_ids = [int(i) for i in np.reshape(action_ids, -1)]

    prompt_ids = list(tokenizer(build_prompt(instruction), add_special_tokens=True).input_ids)
    space_id = space_token_id(tokenizer)
    if prompt_ids[-1] != space_id:
        prompt_ids.append(space_id)
    eos_id = int(tokenizer.eos_token_id)

    input_ids = torch.tensor(prompt_ids + action_ids + [eos_id], dtype=torch.long)
    labels = input_ids.clone()
    labels[: len(prompt_ids)] = IGNORE_INDEX
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids, dtype=torch.bool),
        pixel_values=image_to_pixel_values(image, processor),
        labels=labels,
    )


@dataclass
class ActionCollator:
    """Pads a list of `make_training_example` dicts into a batch (OpenVLA's PaddedCollatorForActionPrediction).

    input_ids are right-padded with `pad_token_id`, labels with IGNORE_INDEX; attention_mask is True on real tokens;
    pixel_values are stacked whatever their channel count. Other keys are stacked if they are equal-shape tensors,
    otherwise returned as lists.
    """

    pad_token_id: int
    padding_side: str = "right"
    model_max_length: Optional[int] = None
    pixel_values_dtype: torch.dtype = torch.float32

    def __call__(self, instances: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        if self.padding_side != "right":
            raise ValueError(f"only right padding is supported for training (got {self.padding_side!r})")
        input_ids = [torch.as_tensor(x["input_ids"], dtype=torch.long) for x in instances]
        labels = [torch.as_tensor(x["labels"], dtype=torch.long) for x in instances]
        lengths = torch.tensor([len(x) for x in input_ids])
        max_len = int(lengths.max())
        batch_ids = torch.full((len(instances), max_len), int(self.pad_token_id), dtype=torch.long)
        batch_labels = torch.full((len(instances), max_len), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(input_ids, labels)):
            batch_ids[i, : len(ids)] = ids
            batch_labels[i, : len(lab)] = lab
        attention_mask = torch.arange(max_len)[None, :] < lengths[:, None]
        if self.model_max_length is not None:
            batch_ids = batch_ids[:, : self.model_max_length]
            batch_labels = batch_labels[:, : self.model_max_length]
            attention_mask = attention_mask[:, : self.model_max_length]

        pixel_values = torch.stack([torch.as_tensor(x["pixel_values"]) for x in instances])
        out: Dict[str, Any] = dict(
            pixel_values=pixel_values.to(self.pixel_values_dtype),
            input_ids=batch_ids,
            attention_mask=attention_mask,
            labels=batch_labels,
        )
        for key in instances[0].keys():
            if key in out:
                continue
            values = [x.get(key) for x in instances]
            if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
                out[key] = torch.stack(values)
            else:
                out[key] = values
        return out


# ------------------------------------------------------------------------------------------------------------------
# Training metrics (shared by both models)
# ------------------------------------------------------------------------------------------------------------------
def _unwrap(model):
    """Strip DDP / torch.compile wrappers (a PEFT model forwards attribute lookups to its base model by itself)."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    return model


def num_image_patches(model) -> int:
    """Number of image-patch positions the model inserts after BOS (OpenVLA-7B: 256; tiny VLA: (size/patch)^2).

    Reads ``model.vision_backbone.featurizer.patch_embed.num_patches`` as upstream finetune.py does; works through
    DDP (``.module``) and PEFT wrappers (PeftModel -> LoraModel -> model forward unknown attributes).
    """
    base = _unwrap(model)
    for candidate in (base, getattr(base, "get_base_model", lambda: None)()):
        if candidate is None:
            continue
        try:
            return int(candidate.vision_backbone.featurizer.patch_embed.num_patches)
        except AttributeError:
            continue
    raise AttributeError("model has no vision_backbone.featurizer.patch_embed.num_patches")


@torch.no_grad()
def action_metrics(logits: torch.Tensor, labels: torch.Tensor, num_patches: int, action_tokenizer: ActionTokenizer,
                   norm_stats_entry: Optional[Mapping[str, Any]] = None) -> Dict[str, float]:
    """Token accuracy and L1 of the teacher-forced action predictions, computed as upstream finetune.py.

    logits: (B, text_len + num_patches, V) from the model's forward; labels: (B, text_len) as fed to it.
    Position p of the logits predicts the token after p. Position `num_patches` (the last patch) predicts text
    token 1, so ``logits[:, num_patches:-1]`` lines up with ``labels[:, 1:]``; only positions whose label is an action
    token (``> action_token_begin_idx``; EOS and IGNORE_INDEX are not) count.

    Returns
      action_accuracy: share of action tokens predicted exactly (argmax).
      l1:              upstream's "l1_loss": mean |decode(pred) - decode(gt)| over action tokens, in the
                       NORMALIZED [-1, 1] space (bin centres), i.e. what OpenVLA logs.
      l1_denorm:       (only with `norm_stats_entry`, and when every example has the same number of action
                       tokens) the same in raw action units after `unnormalize_with_stats` - an addition of ours,
                       not an upstream metric.
      n_action_tokens: how many positions were scored.
    """
    action_logits = logits[:, num_patches:-1]
    preds = action_logits.argmax(dim=-1)
    gt = labels[:, 1:].to(preds.device)
    if gt.shape[1] != preds.shape[1]:
        raise ValueError(f"logits/labels misaligned: {tuple(logits.shape)} with {num_patches} patches vs "
                         f"labels {tuple(labels.shape)}")
    mask = gt > action_tokenizer.action_token_begin_idx
    n = int(mask.sum())
    out: Dict[str, float] = {"n_action_tokens": float(n)}
    if n == 0:
        out.update(action_accuracy=float("nan"), l1=float("nan"))
        return out
    out["action_accuracy"] = float(((preds == gt) & mask).sum().float() / mask.sum().float())
    pred_cont = action_tokenizer.decode(preds[mask].cpu().numpy())
    gt_cont = action_tokenizer.decode(gt[mask].cpu().numpy())
    out["l1"] = float(np.mean(np.abs(pred_cont - gt_cont)))

    if norm_stats_entry is not None:
        per_example = mask.sum(dim=1)
        dim = len(action_stats(norm_stats_entry)["q01"])
        if bool((per_example == dim).all()):  # masked order is row-major, so rows of `dim` are whole actions
            pred_raw = unnormalize_with_stats(pred_cont.reshape(-1, dim), norm_stats_entry)
            gt_raw = unnormalize_with_stats(gt_cont.reshape(-1, dim), norm_stats_entry)
            out["l1_denorm"] = float(np.mean(np.abs(pred_raw - gt_raw)))
    return out


__all__ = [
    "IGNORE_INDEX", "N_ACTION_BINS", "SPACE_TOKEN", "LLAMA_SPACE_TOKEN_ID", "PROMPT_TEMPLATE",
    "build_prompt", "normalize_actions", "unnormalize_actions", "action_stats", "normalize_with_stats",
    "unnormalize_with_stats", "ActionTokenizer", "space_token_id", "to_pil_image", "image_to_pixel_values",
    "make_training_example", "ActionCollator", "num_image_patches", "action_metrics",
]
