"""Batched action inference, the one predictor of the evaluation and the probes.

:class:`BatchedActionPredictor`: one ``generate()`` per batch — greedy, KV cache, exactly 7 new tokens. OpenVLA's
forward (and the tiny VLA's) inserts the image patches right after BOS and its generation path passes no
``position_ids``, so a batch cannot simply be left-padded through ``model.generate`` (it also refuses batches > 1).
The predictor therefore builds the multimodal sequence itself — ``[pads][BOS][patches][prompt][▁]`` with the pads
masked out — and calls the language model's ``generate(inputs_embeds=..., attention_mask=...)``, whose Llama
``prepare_inputs_for_generation`` derives ``position_ids`` from the attention mask, so every real token keeps the
position it has in the per-frame call. By default frames are bucketed by prompt length (the same instruction gives
the same length, so evaluation batches need no padding at all) and the tokens are identical to per-frame
``predict_action`` in fp32 (tests/test_evaluation.py checks it on a mixed batch); ``padding=True`` left-pads mixed
lengths into one call instead (correct positions; tokens identical up to float rounding of the padded rows'
matmuls).

``python -m vla_bridge bench-eval`` times batched vs per-frame inference on the same frames.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..images import eval_transform, to_uint8_hwc
from ..models.openvla import (action_inputs, base_model, check_unnorm_key, model_device, model_dtype,
                              model_image_size)
from ..tokenization import (
    ActionTokenizer,
    action_stats as _action_stats,
    build_prompt,
    num_image_patches,
    space_token_id,
    unnormalize_actions,
)

DEFAULT_MAX_BATCH = 64


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        if was:
            model.train()


@contextlib.contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


EVAL_PROMPT_TOKENS = 64            # prompt tokens budgeted per frame when sizing the eval batch ("In: What ... Out: ▁")
EVAL_VRAM_SHARE = 0.7              # share of the free VRAM the eval batch may take (allocator slack, activations)


def eval_batch_size(free_bytes: float, *, num_layers: int, hidden_size: int, seq_len: int, dtype_bytes: int = 2,
                    num_heads: int | None = None, num_kv_heads: int | None = None, vocab_size: int = 0,
                    cap: int = DEFAULT_MAX_BATCH, share: float = EVAL_VRAM_SHARE) -> int:
    """Frames per ``generate()`` call that fit in ``free_bytes``: ``share`` of it over the bytes one frame needs,
    at least 1 and at most ``cap``. One frame of ``seq_len`` tokens needs its KV cache,
    2 (K and V) x layers x KV width x dtype bytes per token (Llama-2-7B: 2 x 32 x 4096 x 2 B = 0.5 MiB), plus the
    prefill's logits, which transformers 4.40 computes for every position and upcasts to fp32
    (vocab x (dtype bytes + 4) per token)."""
    kv_width = hidden_size * num_kv_heads / num_heads if num_heads and num_kv_heads else hidden_size
    per_token = 2 * num_layers * kv_width * dtype_bytes + vocab_size * (dtype_bytes + 4)
    per_frame = max(1.0, seq_len * per_token)
    return int(max(1, min(int(cap), int(share * max(0.0, float(free_bytes)) // per_frame))))


def auto_eval_batch_size(model: torch.nn.Module, seq_len: int, cap: int = DEFAULT_MAX_BATCH) -> tuple[int, str]:
    """(batch size, reason): sized from the free VRAM on CUDA (:func:`eval_batch_size` with the language model's
    config); ``cap`` on a CPU, where the tiny VLA's cache is a few MB."""
    device = model_device(model)
    if device.type != "cuda":
        return int(cap), f"{cap} (no CUDA device: not sized from VRAM)"
    cfg = getattr(base_model(model).config, "text_config", None) or base_model(model).config
    free, _ = torch.cuda.mem_get_info(device)
    dtype = model_dtype(model)
    dtype_bytes = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    n = eval_batch_size(free, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, seq_len=seq_len,
                        dtype_bytes=dtype_bytes, num_heads=getattr(cfg, "num_attention_heads", None),
                        num_kv_heads=getattr(cfg, "num_key_value_heads", None),
                        vocab_size=getattr(cfg, "vocab_size", 0), cap=cap)
    return n, f"{n} (sized from {free / 1024**3:.1f} GiB free VRAM for {seq_len}-token sequences, cap {cap})"


class BatchedActionPredictor:
    """Actions for a batch of frames in one ``generate()`` call, identical to per-frame ``predict_action``.

    ``model``: the VLA (OpenVLA-7B or the tiny VLA), plain or PEFT-wrapped — the adapter is used when active, and
    ``with model.disable_adapter():`` around a call gives the base model. ``processor``: its processor.
    ``unnorm_key``: the norm_stats entry to de-normalize with. ``center_crop``: apply the evaluation crop
    (``images.eval_transform``: 90 % area center crop) — True when training used IMAGE_AUG.

    Images may be uint8 HxWx3 arrays, LeRobot's float CxHxW tensors or PIL images of any size: each is resized to
    the model's input size (as the training pipeline does), center-cropped if asked, then run through the
    processor — the same steps as the training examples minus the randomness.

    ``max_batch_size``: frames per ``generate()`` call. ``padding``: False (default) buckets frames by prompt
    length (exact parity, one call per distinct length and chunk); True left-pads mixed lengths into one call.
    ``threads``: torch intra-op threads during the calls (None: unchanged).
    """

    def __init__(self, model: torch.nn.Module, processor: Any, unnorm_key: str, center_crop: bool,
                 max_batch_size: int | str | None = "auto", padding: bool = False, threads: int | None = None):
        self.model = model
        self.vla = base_model(model)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.unnorm_key = check_unnorm_key(model, unnorm_key)
        self.stats = _action_stats(self.vla.config.norm_stats[self.unnorm_key])
        self.action_dim = len(self.stats["q01"])
        self.mask = self.stats.get("mask", [True] * self.action_dim)
        self.action_tokenizer = ActionTokenizer(self.tokenizer)
        self.space_id = space_token_id(self.tokenizer)
        self.center_crop = bool(center_crop)
        self.image_size = model_image_size(processor)
        self.device = model_device(model)
        self.dtype = model_dtype(model)
        if max_batch_size in (None, "auto"):   # sized from free VRAM: [BOS][patches][prompt][▁] + the action tokens
            seq_len = num_image_patches(model) + EVAL_PROMPT_TOKENS + self.action_dim
            max_batch_size, self.batch_reason = auto_eval_batch_size(model, seq_len)
        else:
            self.batch_reason = f"{int(max_batch_size)} (given)"
        self.max_batch_size = max(1, int(max_batch_size))
        self.padding = bool(padding)
        self.threads = threads
        self._ids: dict[str, list[int]] = {}
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.calls = 0          # generate() calls made (for the benchmark / tests)

    # ---- inputs
    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids of ``build_prompt(instruction)`` with "▁" appended (as ``openvla.action_inputs`` does)."""
        ids = self._ids.get(instruction)
        if ids is None:
            ids = list(self.tokenizer(build_prompt(instruction), add_special_tokens=True).input_ids)
            if ids[-1] != self.space_id:
                ids.append(self.space_id)
            self._ids[instruction] = ids
        return ids

    def preprocess(self, image: Any):
        """One image → the PIL image the processor gets (resized to the model size, then the eval crop if asked)."""
        return eval_transform(to_uint8_hwc(image, self.image_size), self.center_crop)

    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        ip = getattr(self.processor, "image_processor", self.processor)
        pv = ip([self.preprocess(im) for im in images], return_tensors="pt")["pixel_values"]
        return pv.to(self.device, dtype=self.dtype)

    # ---- the batched call
    def _embed(self, rows: list[list[int]], pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[pads][BOS][patches][prompt ids after BOS] embeddings and their attention mask (0 on the pads)."""
        vla = self.vla
        lengths = [len(r) for r in rows]
        L, B = max(lengths), len(rows)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, L - len(r):] = torch.tensor(r, dtype=torch.long)
        text = vla.get_input_embeddings()(ids.to(self.device))
        patches = vla.projector(vla.vision_backbone(pixel_values)).to(text.dtype)
        n_patch = patches.shape[1]
        if len(set(lengths)) == 1:  # the common case: no padding
            embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
            return embeds, mask
        seqs, masks = [], []
        for i, n in enumerate(lengths):
            k = L - n
            seqs.append(torch.cat([text[i, :k], text[i, k:k + 1], patches[i], text[i, k + 1:]], dim=0))
            masks.append(torch.cat([torch.zeros(k, dtype=torch.long), torch.ones(n + n_patch, dtype=torch.long)]))
        return torch.stack(seqs), torch.stack(masks).to(self.device)

    @torch.no_grad()
    def _generate(self, rows: list[list[int]], pixel_values: torch.Tensor,
                  want_logits: bool) -> tuple[np.ndarray, torch.Tensor | None]:
        embeds, mask = self._embed(rows, pixel_values)
        d = self.action_dim
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generation-config chatter (temperature set with do_sample=False, ...)
            out = self.vla.language_model.generate(
                inputs_embeds=embeds, attention_mask=mask, max_new_tokens=d, min_new_tokens=d, do_sample=False,
                num_beams=1, use_cache=True, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                output_logits=want_logits, return_dict_in_generate=True)
        self.calls += 1
        tokens = out.sequences[:, -d:].cpu().numpy().astype(np.int64)
        logits = out.logits[0].float().cpu() if want_logits else None
        return tokens, logits

    def _batches(self, instructions: Sequence[str]) -> list[list[int]]:
        """Index lists, one per generate() call: by prompt length (unless padding), then chunks of max_batch_size."""
        if self.padding:
            idx = list(range(len(instructions)))
            return [idx[i:i + self.max_batch_size] for i in range(0, len(idx), self.max_batch_size)]
        buckets: dict[int, list[int]] = OrderedDict()
        for i, ins in enumerate(instructions):
            buckets.setdefault(len(self.prompt_ids(ins)), []).append(i)
        out = []
        for idx in buckets.values():
            out += [idx[i:i + self.max_batch_size] for i in range(0, len(idx), self.max_batch_size)]
        return out

    def _run(self, images: Sequence[Any], instructions: Sequence[str], want_logits: bool,
             progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, torch.Tensor | None]:
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        n = len(images)
        tokens = np.zeros((n, self.action_dim), dtype=np.int64)
        logits = None
        if n == 0:
            return tokens, None
        with _threads(self.threads), _eval_mode(self.model):
            for idx in self._batches(instructions):
                pv = self.pixel_values([images[i] for i in idx])
                tok, lg = self._generate([self.prompt_ids(instructions[i]) for i in idx], pv, want_logits)
                tokens[idx] = tok
                if lg is not None:
                    if logits is None:
                        logits = torch.zeros((n, lg.shape[-1]), dtype=torch.float32)
                    logits[idx] = lg
                if progress is not None:
                    progress(len(idx))
        return tokens, logits

    # ---- public API
    def predict_token_ids(self, images: Sequence[Any], instructions: Sequence[str],
                          progress: Callable[[int], None] | None = None) -> np.ndarray:
        """The 7 generated action-token ids per frame: (B, 7) int64."""
        return self._run(images, instructions, False, progress)[0]

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids (B, 7) → de-normalized actions (B, 7), exactly as ``predict_action`` decodes them."""
        normalized = self.action_tokenizer.decode(np.asarray(token_ids))
        return np.asarray(unnormalize_actions(normalized, self.stats["q01"], self.stats["q99"], self.mask))

    def predict(self, images: Sequence[Any], instructions: Sequence[str],
                progress: Callable[[int], None] | None = None) -> np.ndarray:
        """De-normalized actions (B, 7) for frames ``images`` with instructions ``instructions``."""
        return self.decode(self.predict_token_ids(images, instructions, progress))

    def predict_with_logits(self, images: Sequence[Any], instructions: Sequence[str],
                            action_only: bool = True) -> tuple[np.ndarray, torch.Tensor]:
        """(actions (B, 7), first-action-token logits) from the same generate() calls."""
        tokens, logits = self._run(images, instructions, True)
        return self.decode(tokens), self._select_logits(logits, action_only)

    def first_token_logits(self, images: Sequence[Any], instructions: Sequence[str],
                           action_only: bool = True) -> torch.Tensor:
        """Logits of the next-token distribution at the FIRST action position (the last prompt position, "▁"),
        before any logits processor. ``action_only``: (B, 256) over the action-token ids in ascending id order
        (``ActionTokenizer.action_token_ids``; softmax over them for a distribution, e.g. for a KL); else (B, V) over
        the model's whole (padded) vocabulary."""
        return self._select_logits(self._run(images, instructions, True)[1], action_only)

    def _select_logits(self, logits: torch.Tensor | None, action_only: bool) -> torch.Tensor:
        if logits is None:
            return torch.zeros((0, self.action_tokenizer.n_bins if action_only else 0))
        if not action_only:
            return logits
        r = self.action_tokenizer.action_token_ids
        return logits[:, r.start:r.stop]

    def __repr__(self) -> str:
        return (f"BatchedActionPredictor(unnorm_key={self.unnorm_key!r}, center_crop={self.center_crop}, "
                f"image_size={self.image_size}, max_batch_size={self.batch_reason}, padding={self.padding})")


def per_frame_predict(model: torch.nn.Module, processor: Any, images: Sequence[Any], instructions: Sequence[str],
                      unnorm_key: str, center_crop: bool) -> np.ndarray:
    """The reference: ``model.predict_action`` one frame at a time (the same preprocessing as the predictor)."""
    pre = BatchedActionPredictor(model, processor, unnorm_key, center_crop)
    vla = base_model(model)
    out = []
    with _eval_mode(model):
        for im, ins in zip(images, instructions):
            inputs = action_inputs(processor, ins, pre.preprocess(im), model=model)
            out.append(np.asarray(vla.predict_action(**inputs, unnorm_key=pre.unnorm_key, do_sample=False)))
    return np.stack(out) if out else np.zeros((0, pre.action_dim))


__all__ = ["DEFAULT_MAX_BATCH", "EVAL_PROMPT_TOKENS", "EVAL_VRAM_SHARE", "eval_batch_size", "auto_eval_batch_size",
           "BatchedActionPredictor", "per_frame_predict"]
