"""Batched action inference, the one predictor of the evaluation and the probes.

:class:`BatchedActionPredictor` decodes a batch of frames per call — greedy, exactly 7 action tokens — and gives the
token ids per-frame ``predict_action`` gives.

**Inputs.** OpenVLA's forward (and the tiny VLA's) inserts the image patches right after BOS and its generation path
passes no ``position_ids``, so a batch cannot be left-padded through ``model.generate`` (which refuses batches > 1
anyway). The predictor builds the multimodal sequence itself: ``[pads][BOS][patches][prompt][▁]``, pads masked out.

**The decode loop, and why it is exact.** Instead of ``language_model.generate()`` it runs the loop generate()'s
greedy search runs, through the model's own modules:

* positions come from the attention mask as Llama's ``prepare_inputs_for_generation`` derives them (cumsum - 1,
  pads at 1), so every real token keeps its per-frame position; the mask grows by one column per step, as in
  generate();
* each forward is LlamaModel.forward's body: its ``_update_causal_mask`` (None when nothing is masked, so SDPA takes
  its ``is_causal`` path as in the per-frame call), then every decoder layer computed as LlamaDecoderLayer.forward
  does (input norm, attention, residual, post-attention norm, MLP, residual). Linear layers are the model's, so an
  active PEFT adapter applies and ``with model.disable_adapter():`` gives the base model. Attention is the layer's
  own module (any implementation: SDPA, eager, FlashAttention-2), except where every layer is transformers'
  ``LlamaSdpaAttention`` (the tiny VLA; OpenVLA with SDPA): then :meth:`~BatchedActionPredictor._attend` runs that
  module's forward step by step with its q/k/v/o projections, so that the projections and RoPE cover a whole
  prefill pack or decode step at once instead of once per prompt length;
* the K/V cache is preallocated (:class:`_KVCache`): the values DynamicCache would hold, without its ``torch.cat``
  of every layer's whole cache at every step;
* the next token is the argmax of the last position's float32 lm_head logits with EOS at -inf — generate()'s
  ``MinNewTokensLengthLogitsProcessor`` (min_new_tokens = max_new_tokens = 7, so no row can finish early); the
  first step's logits, before that mask, are what :meth:`~BatchedActionPredictor.first_token_logits` returns.
  :func:`check_greedy_config` refuses a generation config under which generate() would process logits further.

Work whose output nothing reads is skipped: lm_head on every prompt position (transformers 4.40 computes all of
them), the last layer's MLP on every position but the last (the K/V it feeds are written before the MLP) and, on
the SDPA path, the last layer's queries, attention and o_proj on every position but the last (its keys and values
still go to the cache).

**Batching.** By default frames are grouped by prompt length (one instruction has one length, so evaluation batches
rarely mix). A call takes up to ``max_batch_size`` frames, possibly of several groups. The vision backbone runs in
chunks of ``chunk_size`` frames (16 on a CPU, where a chunk's activations stay in cache); the prefill runs in packs
of ``chunk_size`` frames that may span groups (a pack's norms, MLPs and projections once over all its positions,
attention per group, each group into its own cache); then the 6 one-token steps run over the whole call the same
way, so no row is padded.

**Exactness.** Token ids are identical to per-frame ``predict_action`` in fp32 (tests/test_inference.py, on a mixed
batch with a LoRA adapter on and off, also ``bench-eval`` on every run). The first-token logits agree to float
rounding, not bit for bit: a CPU matrix product's rounding depends on how many rows it multiplies at once, and
SDPA's on how many queries it gets, so a 16-frame pack rounds differently from one frame (measured on the test
model: at most 4e-6 on logits up to ~5, before the packs and with them; the test allows 1e-5). ``padding=True``
left-pads mixed lengths into one group instead: positions are right, and attention over masked pads rounds
differently again (~3e-6).

**A LoRA adapter is merged for the call** on a CPU in float32 (``merge=True``, the default;
``models.lora.merged_adapter``): W + s·BA computed once per call, one matrix product per layer instead of three,
~15-20 % less time per frame on the tiny VLA. The original weight tensors are put back afterwards (no rounding from
an unmerge), so ``disable_adapter()`` and training see exactly the weights they had. Merged and side-by-side
adapters give the same token ids (tests/test_inference.py) and first-token logits equal to float rounding; on a
GPU, or with bf16 / 4-bit weights, nothing is merged.

``python -m vla_bridge bench-eval`` times batched vs per-frame inference on the same frames.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from transformers import GenerationConfig
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, LlamaSdpaAttention, repeat_kv

from ..images import eval_transform, to_uint8_hwc
from ..models.lora import merged_adapter
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
CPU_CHUNK = 16   # frames per vision + prefill pass on a CPU: 16 x 86 tokens stay in cache (64 at once: ~25 % slower)
# GenerationConfig fields that would make generate() add a logits processor besides min_new_tokens' EOS mask
PROCESSOR_FIELDS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
                    "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length", "sequence_bias",
                    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
                    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
                    "forced_decoder_ids", "guidance_scale")


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


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Llama's ``prepare_inputs_for_generation``: a token's position is the number of real tokens before it
    (attention-mask cumsum - 1), pads at 1."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill_(mask == 0, 1)


def check_greedy_config(generation_config: Any) -> None:
    """The decode loop applies generate()'s one logits processor for our call (min_new_tokens' EOS mask): refuse a
    generation config under which ``predict_action``'s generate() would apply others (OpenVLA's and the tiny VLA's
    set none)."""
    if generation_config is None:
        return
    default = GenerationConfig()
    odd = {f: getattr(generation_config, f) for f in PROCESSOR_FIELDS
           if getattr(generation_config, f, None) != getattr(default, f)}
    if odd:
        raise ValueError(f"the model's generation config sets {odd}: generate() would process the logits, the "
                         "batched decode loop does not")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` for one of q / k, on (tokens, heads, head dim) with cos / sin
    (tokens, head dim), with the same floating-point operations and fewer passes over memory: x·cos +
    rotate_half(x)·sin is, per half, x1·cos1 + (-x2)·sin1 = x1·cos1 - x2·sin1 and x2·cos2 + x1·sin2 (negation is
    exact and a + (-b) is a - b), written into one output instead of building rotate_half(x) with a cat."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    lo, hi = out[..., :half], out[..., half:]
    torch.mul(x1, cos[..., :half], out=lo)
    lo.sub_(x2 * sin[..., :half])
    torch.mul(x2, cos[..., half:], out=hi)
    hi.add_(x1 * sin[..., half:])
    return out


def _mlp_block(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The second half of LlamaDecoderLayer.forward: residual + mlp(post_attention_layernorm(hidden))."""
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _fill(sizes: Sequence[int], capacity: int) -> list[list[tuple[int, slice]]]:
    """Groups of ``sizes`` items, taken in order, into bins of at most ``capacity`` items: each bin a list of
    (group, its slice), a bin holding the tail of one group and the head of the next. The decode calls
    (``max_batch_size`` frames) and their prefill packs (``chunk_size`` frames) are both cut this way."""
    bins: list[list[tuple[int, slice]]] = [[]]
    room = capacity
    for g, size in enumerate(sizes):
        s = 0
        while s < size:
            if room == 0:
                bins.append([])
                room = capacity
            take = min(room, size - s)
            bins[-1].append((g, slice(s, s + take)))
            s, room = s + take, room - take
    return bins


@dataclass
class _Piece:
    """Frames of one prompt length that attend together in one forward: their cache rows, 2D attention mask
    (covering the cached positions and this forward's) and whether its group is left-padded (then
    ``_update_causal_mask`` builds the mask; without pads SDPA gets none)."""
    cache: "_KVCache"
    mask: torch.Tensor
    padded: bool


def _sdpa_layers(body: torch.nn.Module) -> bool:
    """Whether every decoder layer's attention is transformers' own ``LlamaSdpaAttention`` with the plain rotary
    embedding, all layers' rotary frequencies equal: then :meth:`BatchedActionPredictor._attend` may compute what
    that module computes with its projections run once over the whole pack (see there)."""
    attns = [layer.self_attn for layer in body.layers]
    if not all(type(a) is LlamaSdpaAttention and type(a.rotary_emb) is LlamaRotaryEmbedding for a in attns):
        return False
    first = attns[0].rotary_emb.inv_freq
    return all(torch.equal(a.rotary_emb.inv_freq, first) for a in attns[1:])


class _KVCache(Cache):
    """The batch's K/V cache, allocated once for prompt + action tokens: ``(batch, kv heads, max_len, head dim)``
    per layer on its first write. ``update`` (all the attention modules call) copies the new positions in at
    ``start`` and returns views of the filled part; transformers 4.40's DynamicCache instead ``torch.cat``'s every
    layer's whole cache at every step (half of a decode step's time at 64 frames on a CPU). ``rows(part)``: the
    same buffers' rows ``part`` (a slice), to prefill the batch in chunks. ``start`` is set by the decode loop."""

    def __init__(self, batch: int, max_len: int, keys: list | None = None, values: list | None = None,
                 part: slice | None = None):
        self.batch, self.max_len = batch, max_len
        self.keys = [] if keys is None else keys
        self.values = [] if values is None else values
        self.part = slice(0, batch) if part is None else part
        self.start = 0

    def rows(self, part: slice) -> "_KVCache":
        return _KVCache(self.batch, self.max_len, self.keys, self.values, part)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            shape = (self.batch, key_states.shape[1], self.max_len, key_states.shape[-1])
            self.keys.append(key_states.new_empty(shape))
            self.values.append(value_states.new_empty(shape))
        end = self.start + key_states.shape[-2]
        keys, values = self.keys[layer_idx][self.part], self.values[layer_idx][self.part]
        keys[:, :, self.start:end] = key_states
        values[:, :, self.start:end] = value_states
        return keys[:, :, :end], values[:, :, :end]


EVAL_PROMPT_TOKENS = 64            # prompt tokens budgeted per frame when sizing the eval batch ("In: What ... Out: ▁")
EVAL_VRAM_SHARE = 0.7              # share of the free VRAM the eval batch may take (allocator slack, activations)


def eval_batch_size(free_bytes: float, *, num_layers: int, hidden_size: int, seq_len: int, dtype_bytes: int = 2,
                    num_heads: int | None = None, num_kv_heads: int | None = None, vocab_size: int = 0,
                    cap: int = DEFAULT_MAX_BATCH, share: float = EVAL_VRAM_SHARE) -> int:
    """Frames per decode call that fit in ``free_bytes``: ``share`` of it over the bytes one frame needs,
    at least 1 and at most ``cap``. One frame of ``seq_len`` tokens needs its KV cache,
    2 (K and V) x layers x KV width x dtype bytes per token (Llama-2-7B: 2 x 32 x 4096 x 2 B = 0.5 MiB), plus the
    prefill's logits as generate() computed them, for every position and upcast to fp32 (vocab x (dtype bytes + 4)
    per token). The decode loop computes the last position's only, so with ``vocab_size`` the figure is a
    conservative one (the slack covers the prefill's activations)."""
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
    """Actions for a batch of frames in one decode call (see the module docstring), identical to per-frame
    ``predict_action``.

    ``model``: the VLA (OpenVLA-7B or the tiny VLA), plain or PEFT-wrapped — the adapter is used when active, and
    ``with model.disable_adapter():`` around a call gives the base model. ``processor``: its processor.
    ``unnorm_key``: the norm_stats entry to de-normalize with. ``center_crop``: apply the evaluation crop
    (``images.eval_transform``: 90 % area center crop) — True when training used IMAGE_AUG.

    Images may be uint8 HxWx3 arrays, LeRobot's float CxHxW tensors or PIL images of any size: each is resized to
    the model's input size (as the training pipeline does), center-cropped if asked, then run through the
    processor — the same steps as the training examples minus the randomness.

    ``max_batch_size``: frames per decode call. ``padding``: False (default) groups frames by prompt length within
    a call (exact parity, no pads); True left-pads mixed lengths into one group. ``threads``: torch intra-op threads
    during the calls (None: unchanged). ``chunk_size``: frames per vision + prefill pass (None: 16 on a CPU, the
    whole call on a GPU). ``merge`` (default True) runs each call with an active LoRA adapter merged into the base
    weights where that is exact to restore and cheap (float32 on a CPU: ``models.lora.merged_adapter``, ~15-20 %
    faster per frame for the tiny VLA; the same tokens as the adapter on the side, logits equal to float rounding);
    False never merges (the adapter's matrices on the side, as in per-frame ``predict_action``).
    """

    def __init__(self, model: torch.nn.Module, processor: Any, unnorm_key: str, center_crop: bool,
                 max_batch_size: int | str | None = "auto", padding: bool = False, threads: int | None = None,
                 chunk_size: int | None = None, merge: bool = True):
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
        if chunk_size is None:   # a GPU runs the whole batch at once
            chunk_size = CPU_CHUNK if self.device.type == "cpu" else self.max_batch_size
        self.chunk_size = max(1, int(chunk_size))
        self.merge = bool(merge)   # where exact and cheap: models.lora.merged_adapter decides
        check_greedy_config(getattr(self.vla, "generation_config", None))
        self._ids: dict[str, list[int]] = {}
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self._sdpa = _sdpa_layers(self.vla.language_model.get_decoder())   # see _attend
        self.calls = 0          # batched decode calls made, one per batch (for the benchmark / tests)

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
    def _patches(self, images: Sequence[Any]) -> torch.Tensor:
        """The projected image patches (N, patches, H) of a call's frames, the vision backbone run in chunks of
        ``chunk_size`` frames whatever their prompts (the patches do not depend on the prompt)."""
        vla, step = self.vla, self.chunk_size
        return torch.cat([vla.projector(vla.vision_backbone(self.pixel_values(images[s:s + step])))
                          for s in range(0, len(images), step)])

    def _embed(self, rows: list[list[int]], patches: torch.Tensor,
               width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[pads][BOS][patches][prompt ids after BOS] embeddings, left-padded to ``width`` prompt ids, and their
        attention mask (0 on the pads)."""
        lengths = [len(r) for r in rows]
        B = len(rows)
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        text = self.vla.get_input_embeddings()(ids.to(self.device))
        patches = patches.to(text.dtype)
        n_patch = patches.shape[1]
        if all(n == width for n in lengths):  # the common case: no padding
            embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
            return embeds, mask
        seqs, masks = [], []
        for i, n in enumerate(lengths):
            k = width - n
            seqs.append(torch.cat([text[i, :k], text[i, k:k + 1], patches[i], text[i, k + 1:]], dim=0))
            masks.append(torch.cat([torch.zeros(k, dtype=torch.long), torch.ones(n + n_patch, dtype=torch.long)]))
        return torch.stack(seqs), torch.stack(masks).to(self.device)

    def _forward(self, hiddens: Sequence[torch.Tensor], pieces: Sequence[_Piece]) -> torch.Tensor:
        """The Llama decoder on a pack: ``hiddens[j]`` (b_j, n_j, H) are the frames of ``pieces[j]``, which attend
        separately (each its own cache rows and 2D mask). LlamaModel.forward's loop with our cache: its causal mask
        per piece, then each decoder layer computed as LlamaDecoderLayer.forward does on the pack's positions
        flattened to (tokens, H) — norms and MLP once for the pack, attention per piece (:meth:`_attend`). Stops
        before the last layer's MLP and returns every frame's LAST position (frames, 1, H), in order, for
        :meth:`_head`: no other position's output is read (their K/V are in the cache already)."""
        body = self.vla.language_model.get_decoder()
        H = hiddens[0].shape[-1]
        flat = hiddens[0].reshape(-1, H) if len(hiddens) == 1 else torch.cat([h.reshape(-1, H) for h in hiddens])
        shapes, attn_kw = [], []
        for h, p in zip(hiddens, pieces):
            b, n = h.shape[:2]
            start = p.mask.shape[1] - n        # the cache holds the positions before these n
            p.cache.start = start
            cache_position = torch.arange(start, start + n, device=h.device)
            if self._sdpa and not p.padded:    # what _update_causal_mask returns for SDPA, all ones, q = kv or 1
                causal = None
            else:
                causal = body._update_causal_mask(p.mask, h, cache_position, start)  # None: no pads
            attn_kw.append(dict(attention_mask=causal, position_ids=_positions(p.mask)[:, -n:],
                                past_key_value=p.cache, use_cache=True, cache_position=cache_position))
            shapes.append((b, n))
        rotary = None
        if self._sdpa:   # RoPE's cos/sin for the pack's positions, (tokens, head dim), as every layer's module has them
            positions = [kw["position_ids"].reshape(1, -1) for kw in attn_kw]
            cos, sin = body.layers[0].self_attn.rotary_emb(
                hiddens[0], positions[0] if len(positions) == 1 else torch.cat(positions, dim=1))
            rotary = cos[0], sin[0]
        rows = None     # each frame's last position in the pack; None when that is every position (a decode step)
        if any(n > 1 for _, n in shapes):
            ends = np.cumsum([b * n for b, n in shapes])
            rows = torch.cat([torch.arange(e - b * n + n - 1, e, n, device=flat.device)
                              for (b, n), e in zip(shapes, ends)])
        final = len(body.layers) - 1
        for i, layer in enumerate(body.layers):
            if i:
                flat = _mlp_block(body.layers[i - 1], flat)
            x = layer.input_layernorm(flat)
            if i == final and rotary is not None and rows is not None:   # only the last positions' output is read
                return (flat[rows] + self._attend(layer.self_attn, x, shapes, attn_kw, rotary, rows))[:, None]
            flat = flat + self._attend(layer.self_attn, x, shapes, attn_kw, rotary)
        return (flat if rows is None else flat[rows])[:, None]

    def _attend(self, attn: torch.nn.Module, x: torch.Tensor, shapes: Sequence[tuple[int, int]],
                attn_kw: Sequence[dict], rotary: tuple[torch.Tensor, torch.Tensor] | None,
                last: torch.Tensor | None = None) -> torch.Tensor:
        """One layer's attention output for a pack's normed positions ``x`` (tokens, H), each piece attending to
        its own cache. Without ``rotary``: the layer's attention module called once per piece (any attention
        implementation). With it — the pack's (cos, sin) per token, (tokens, head dim), when every layer is
        ``LlamaSdpaAttention`` — the module's forward, step for step: q/k/v/o projections and RoPE once over the
        pack's tokens instead of once per piece, the rotary cos/sin once per forward instead of once per layer;
        cache update, ``repeat_kv`` and ``scaled_dot_product_attention`` per piece with the module's arguments.
        ``last`` (the last layer of a forward): the rows of each frame's last position — the keys and values of
        every position still go to the cache, but queries, attention and o_proj are computed for those rows only
        (frames, H), the last query attending to every key as the causal row does."""
        H = x.shape[-1]
        if rotary is None:
            out, offset = [], 0
            for (b, n), kw in zip(shapes, attn_kw):
                out.append(attn(hidden_states=x[offset:offset + b * n].view(b, n, H), **kw)[0].reshape(b * n, -1))
                offset += b * n
            return out[0] if len(out) == 1 else torch.cat(out)
        cos, sin = rotary      # RoPE on the pack's tokens at once: the same products, element by element
        heads, kv_heads, dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
        k_all = _rope(attn.k_proj(x).view(-1, kv_heads, dim), cos, sin)
        v_all = attn.v_proj(x).view(-1, kv_heads, dim)
        if last is None:
            q_all = _rope(attn.q_proj(x).view(-1, heads, dim), cos, sin)
        else:
            q_all = _rope(attn.q_proj(x[last]).view(-1, heads, dim), cos[last], sin[last])
        out, offset, frames = [], 0, 0
        for (b, n), kw in zip(shapes, attn_kw):
            rows = slice(offset, offset + b * n)
            offset += b * n
            k = k_all[rows].view(b, n, kv_heads, dim).transpose(1, 2)
            v = v_all[rows].view(b, n, kv_heads, dim).transpose(1, 2)
            if last is None:
                q = q_all[rows].view(b, n, heads, dim).transpose(1, 2)
            else:
                q = q_all[frames:frames + b].view(b, 1, heads, dim).transpose(1, 2)
            frames += b
            k, v = kw["past_key_value"].update(k, v, attn.layer_idx, {"cache_position": kw["cache_position"]})
            k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
            mask = kw["attention_mask"]
            if mask is not None:
                mask = mask[:, :, :, :k.shape[-2]] if last is None else mask[:, :, -1:, :k.shape[-2]]
                if q.device.type == "cuda":   # as the module does (torch issue 112577)
                    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                                                 is_causal=mask is None and q.shape[-2] > 1)
            out.append(o.transpose(1, 2).reshape(-1, attn.hidden_size))
        return attn.o_proj(out[0] if len(out) == 1 else torch.cat(out))

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`_forward`'s output (B, 1, H) through the last layer's MLP, the final norm and LlamaForCausalLM's
        lm_head: the next-token logits (B, V) in float32, as generate() returns them."""
        lm = self.vla.language_model
        body = lm.get_decoder()
        hidden = body.norm(_mlp_block(body.layers[-1], hidden))
        return lm.get_output_embeddings()(hidden)[:, -1].float()

    def _next_token(self, logits: torch.Tensor) -> torch.Tensor:
        """generate()'s greedy step while fewer than min_new_tokens = 7 are out: EOS at -inf
        (MinNewTokensLengthLogitsProcessor), then argmax."""
        eos = torch.arange(logits.shape[-1], device=logits.device) == self.eos_id
        return torch.argmax(torch.where(eos, -math.inf, logits), dim=-1)

    @torch.no_grad()
    def _decode(self, groups: list[list[int]], images: Sequence[Any], instructions: Sequence[str],
                want_logits: bool) -> tuple[np.ndarray, torch.Tensor | None]:
        """The 7 greedy action tokens of one batch (rows: the ``groups``' frame indices in order; each group one
        prompt length, or left-padded to its longest) and the first token's raw logits. The vision backbone runs
        in chunks of ``chunk_size`` frames; the prefill in packs of ``chunk_size`` frames that may span groups, each
        group's frames into its own preallocated cache; the 6 one-token steps then run over the whole batch."""
        d = self.action_dim
        order = [i for idx in groups for i in idx]
        patches = self._patches([images[i] for i in order])
        rows = [[self.prompt_ids(instructions[i]) for i in idx] for idx in groups]
        widths = [max(len(r) for r in rs) for rs in rows]
        padded = [any(len(r) < w for r in rs) for rs, w in zip(rows, widths)]
        first = np.cumsum([0] + [len(idx) for idx in groups])     # each group's first row in the batch
        caches = [_KVCache(len(idx), w + patches.shape[1] + d - 1) for idx, w in zip(groups, widths)]
        masks: list[list[torch.Tensor]] = [[] for _ in groups]
        last = []
        for pack in _fill([len(idx) for idx in groups], self.chunk_size):   # the prefill packs
            hiddens, pieces = [], []
            for g, part in pack:
                at = slice(first[g] + part.start, first[g] + part.stop)
                embeds, mask = self._embed(rows[g][part], patches[at], widths[g])
                hiddens.append(embeds)
                pieces.append(_Piece(caches[g].rows(part), mask, padded[g]))
                masks[g].append(mask)
            last.append(self._forward(hiddens, pieces))
        logits = self._head(torch.cat(last))     # one lm_head call for the batch
        tokens = [self._next_token(logits)]
        state = [torch.cat(m) for m in masks]
        embed = self.vla.language_model.get_input_embeddings()
        for _ in range(d - 1):   # generate()'s cached steps: each mask grows by one, positions follow from it
            state = [torch.cat([m, m.new_ones((len(m), 1))], dim=1) for m in state]
            hidden = embed(tokens[-1][:, None])
            hiddens = [hidden[first[g]:first[g + 1]] for g in range(len(groups))]
            pieces = [_Piece(c, m, pad) for c, m, pad in zip(caches, state, padded)]
            tokens.append(self._next_token(self._head(self._forward(hiddens, pieces))))
        self.calls += 1
        out = torch.stack(tokens, dim=1).cpu().numpy().astype(np.int64)
        return out, (logits.cpu() if want_logits else None)

    def _batches(self, instructions: Sequence[str]) -> list[list[list[int]]]:
        """The decode calls: each a list of groups (frame-index lists) of at most ``max_batch_size`` frames in all.
        Bucketed (default): a group per prompt length, the buckets packed in order into batches; padding: a batch
        is one left-padded group."""
        n, size = len(instructions), self.max_batch_size
        if self.padding:
            return [[list(range(i, min(n, i + size)))] for i in range(0, n, size)]
        buckets: dict[int, list[int]] = OrderedDict()
        for i, ins in enumerate(instructions):
            buckets.setdefault(len(self.prompt_ids(ins)), []).append(i)
        groups = list(buckets.values())
        return [[groups[g][part] for g, part in batch] for batch in _fill([len(idx) for idx in groups], size)]

    def _run(self, images: Sequence[Any], instructions: Sequence[str], want_logits: bool,
             progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, torch.Tensor | None]:
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        n = len(images)
        tokens = np.zeros((n, self.action_dim), dtype=np.int64)
        logits = None
        if n == 0:
            return tokens, None
        merging = merged_adapter(self.model) if self.merge else contextlib.nullcontext()
        with _threads(self.threads), _eval_mode(self.model), merging:
            for groups in self._batches(instructions):
                idx = [i for g in groups for i in g]
                tok, lg = self._decode(groups, images, instructions, want_logits)
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
        """(actions (B, 7), first-action-token logits) from the same decode calls."""
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
