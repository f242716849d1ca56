"""The tiny VLA model (Hugging Face layout: ``modeling_tiny_vla``): ``TinyVLAForActionPrediction`` and its parts.

OpenVLAForActionPrediction's interface and module names on a CPU-sized model: ``vision_backbone.featurizer`` (a
timm ViT, optionally with the :class:`ConvStem` patch embedding), ``projector.fc1 / fc2``, ``language_model`` (a
``transformers.LlamaForCausalLM``), ``predict_action``; and ``build_tiny_vla`` (a seeded model + its processor).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from transformers import LlamaForCausalLM, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from ...tokenization import IGNORE_INDEX, N_ACTION_BINS, SPACE_TOKEN, ActionTokenizer, unnormalize_actions
from .configuration_tiny_vla import PAD_TO_MULTIPLE_OF, TOKENIZER_VOCAB_SIZE, TinyVLAConfig
from .processing_tiny_vla import TinyVLAImageProcessor, TinyVLAProcessor, build_tokenizer

def _patch_features(featurizer: nn.Module, block_index: int, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch tokens (prefix tokens dropped) after block `block_index` of a timm VisionTransformer.

    Equals ``featurizer.get_intermediate_layers(x, n={block_index})[0]``, but stops after that block instead of
    running the remaining block(s) and discarding them (same output, less CPU time)."""
    x = featurizer.patch_embed(pixel_values)
    x = featurizer._pos_embed(x)
    x = featurizer.patch_drop(x)
    x = featurizer.norm_pre(x)
    for blk in featurizer.blocks[: block_index + 1]:
        x = blk(x)
    return x[:, featurizer.num_prefix_tokens:]


class ConvStem(nn.Module):
    """A convolutional patch embedding for the timm ViT (``embed_layer``): four stride-2 3x3 convolutions
    (3 -> 32 -> 64 -> 128 -> width, GroupNorm + GELU between them) turn a 128 px image into the same 8 x 8 grid of
    tokens a 16 px patch embedding gives - the "hybrid" ViT of the original ViT paper in miniature.

    Why not the plain linear patch embedding: trained from scratch on a CPU budget, the convolutions localise
    objects and the gripper within a patch far better (measured on the embedded world after 500 steps of dense
    supervision: 1.3 / 0.9 cm error of the patch-to-gripper offset at object patches vs 3.0 / 2.1 cm). OpenVLA's
    ViTs do not need this: they arrive pretrained. The convolutions keep PyTorch's default initialisation
    (``_keep_init``); LoRA's ``all-linear`` does not touch them (as it does not touch OpenVLA's patch embedding)."""

    def __init__(self, img_size: int = 128, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 192,
                 **_: Any) -> None:
        super().__init__()
        n_convs = int(round(np.log2(patch_size)))
        if 2 ** n_convs != patch_size or img_size % patch_size:
            raise ValueError(f"the conv stem needs a power-of-two patch_size dividing image_size, got {patch_size}")
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.dynamic_img_pad, self.flatten, self.output_fmt = False, True, "NLC"   # what timm's ViT reads
        widths = [in_chans] + [min(32 * 2 ** i, embed_dim) for i in range(n_convs - 1)] + [embed_dim]
        layers: List[nn.Module] = []
        for i in range(n_convs):
            conv = nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)
            conv._keep_init = True
            layers.append(conv)
            if i < n_convs - 1:
                layers += [nn.GroupNorm(8, widths[i + 1]), nn.GELU()]
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x).flatten(2).transpose(1, 2)


class TinyVisionBackbone(nn.Module):
    """`featurizer` = a timm VisionTransformer (random init) whose forward returns the patch features of the
    second-to-last block, as Prismatic patches its featurizers (``get_intermediate_layers(n={depth - 2})``).
    The last block stays in the module, unused, as in OpenVLA. ``config.vision_stem``: "conv" (default, a
    :class:`ConvStem` patch embedding) or "patch" (timm's linear 16 px patch embedding)."""

    def __init__(self, config: TinyVLAConfig) -> None:
        super().__init__()
        if config.vision_depth < 2:
            raise ValueError("vision_depth must be >= 2 (features come from the second-to-last block)")
        stem = {"embed_layer": ConvStem} if config.vision_stem == "conv" else {}
        self.featurizer = VisionTransformer(
            img_size=config.image_size, patch_size=config.patch_size, in_chans=3, num_classes=0,
            embed_dim=config.vision_width, depth=config.vision_depth, num_heads=config.vision_heads,
            mlp_ratio=config.vision_mlp_ratio, class_token=True, global_pool="token", **stem,
        )
        # Like upstream: featurizer(pixel_values) itself yields the second-to-last block's patch features.
        self.featurizer.forward = partial(_patch_features, self.featurizer, config.vision_depth - 2)
        self.embed_dim = config.vision_width
        self.use_fused_vision_backbone = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.featurizer(pixel_values)


class TinyProjector(nn.Module):
    """Prismatic's single-backbone "gelu-mlp" projector: fc1 -> GELU -> fc2."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, llm_dim, bias=True)
        self.fc2 = nn.Linear(llm_dim, llm_dim, bias=True)
        self.act_fn1 = nn.GELU()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(patches)))


@dataclass
class TinyVLACausalLMOutputWithPast(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: torch.FloatTensor = None
    past_key_values: Optional[Tuple] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[Tuple[torch.FloatTensor, ...]] = None
    projector_features: Optional[torch.FloatTensor] = None


class TinyVLAForActionPrediction(PreTrainedModel):
    """OpenVLAForActionPrediction's interface on a model small enough for a CPU."""

    config_class = TinyVLAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[List[str]] = ["TinyProjector"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True

    def __init__(self, config: TinyVLAConfig) -> None:
        super().__init__(config)
        self.vision_backbone = TinyVisionBackbone(config)
        self.projector = TinyProjector(self.vision_backbone.embed_dim, config.text_config.hidden_size)
        text_config = config.text_config
        text_config._attn_implementation = config.llm_attn_implementation
        self.language_model = LlamaForCausalLM(text_config)
        self.vocab_size = config.text_config.vocab_size      # embedding rows (padded)
        self.pad_token_id = config.pad_token_id
        self.post_init()
        # Output head: std 1/sqrt(width) instead of 0.02, so random-init logits have O(1) spread. With 0.02 and a
        # width of 128-256 the largest logit a unit-RMS hidden state can produce is ~2.5-5, which caps how
        # confident the model can get while the head is frozen (LoRA without lm_head). Llama-2-7B's head is
        # trained, so this only matters for the tiny VLA's from-scratch start. (Skipped work when loading weights.)
        with torch.no_grad():
            self.language_model.lm_head.weight.normal_(0.0, config.text_config.hidden_size ** -0.5)

    # ---- PreTrainedModel boilerplate (delegation to the LLM, as upstream) ----------------------------------------
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if getattr(module, "_keep_init", False):
            return
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def tie_weights(self) -> None:
        self.language_model.tie_weights()

    # ---- forward ---------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        past_key_values: Optional[Any] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_projector_features: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **_: Any,
    ) -> Union[Tuple, TinyVLACausalLMOutputWithPast]:
        """Same cases as PrismaticForConditionalGeneration.forward:
        cached generation step (one new token + past_key_values), text-only (no pixel_values), multimodal."""
        if inputs_embeds is not None:
            raise ValueError("TinyVLAForActionPrediction.forward takes input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        if use_cache is None:
            use_cache = self.config.text_config.use_cache
        use_cache = bool(use_cache) and not self.training     # as upstream: no cache while training
        projected = None
        lm_kwargs = dict(use_cache=use_cache, output_attentions=output_attentions,
                         output_hidden_states=output_hidden_states, return_dict=True)

        if past_key_values is not None and input_ids.shape[1] == 1:
            # Cached generation: the image is already in the KV cache; positions continue from the cache length.
            if labels is not None:
                raise ValueError("labels are not supported during cached generation")
            out = self.language_model(input_ids=input_ids, attention_mask=None, past_key_values=past_key_values,
                                      **lm_kwargs)
        elif pixel_values is None:
            if past_key_values is not None:
                raise ValueError("past_key_values given for a multi-token language-only forward")
            out = self.language_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **lm_kwargs)
        else:
            if past_key_values is not None:
                raise ValueError("past_key_values given for a multimodal forward")
            if input_ids.shape[0] != pixel_values.shape[0]:
                raise ValueError("Non-homogenous batch of (text, image) input: batch sizes differ")
            patches = self.vision_backbone(pixel_values.to(self.projector.fc1.weight.dtype))
            projected = self.projector(patches)
            n_patches = projected.shape[1]
            text_embeds = self.get_input_embeddings()(input_ids)
            # [BOS][patches][text after BOS] - Prismatic inserts the image right after <s>.
            embeds = torch.cat([text_embeds[:, :1], projected.to(text_embeds.dtype), text_embeds[:, 1:]], dim=1)
            mm_mask = None
            if attention_mask is not None:
                ones = torch.ones((attention_mask.shape[0], n_patches), dtype=attention_mask.dtype,
                                  device=attention_mask.device)
                mm_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
            mm_labels = None
            if labels is not None:
                ignore = torch.full((labels.shape[0], n_patches), IGNORE_INDEX, dtype=labels.dtype,
                                    device=labels.device)
                mm_labels = torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1)
            out = self.language_model(input_ids=None, inputs_embeds=embeds, attention_mask=mm_mask, labels=mm_labels,
                                      **lm_kwargs)

        if not return_dict:
            tup = tuple(v for v in (out.loss, out.logits, out.past_key_values, out.hidden_states, out.attentions)
                        if v is not None)
            if output_projector_features and projected is not None:
                tup = tup + (projected,)
            return tup
        return TinyVLACausalLMOutputWithPast(
            loss=out.loss, logits=out.logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states,
            attentions=out.attentions, projector_features=projected,
        )

    # ---- generation ------------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids: Optional[torch.Tensor] = None, past_key_values: Any = None,
                                      inputs_embeds: Optional[torch.Tensor] = None,
                                      pixel_values: Optional[torch.Tensor] = None,
                                      attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Dict[str, Any]:
        """As upstream: batch size 1; with a cache only the newest token is fed (the image lives in the cache)."""
        if (input_ids is not None and input_ids.shape[0] > 1) or (inputs_embeds is not None and
                                                                  inputs_embeds.shape[0] > 1):
            raise ValueError("Generation with batch size > 1 is not supported (as in OpenVLA)")
        if past_key_values is not None:
            input_ids = input_ids[:, -1:]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "past_key_values": past_key_values,
            "use_cache": kwargs.get("use_cache"),
        }

    def _reorder_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self.language_model._reorder_cache(*args, **kwargs)

    # ---- actions ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_unnorm_key(norm_stats: Optional[Dict[str, Any]], unnorm_key: Optional[str]) -> str:
        keys = sorted(norm_stats or {})
        if not keys:
            raise ValueError("this model has no norm_stats; build or load it with norm_stats={key: {'action': ...}}")
        if unnorm_key is None:
            if len(keys) != 1:
                raise ValueError(f"model has statistics for several datasets; pass unnorm_key, one of: {keys}")
            return keys[0]
        if unnorm_key not in norm_stats:
            raise ValueError(f"unnorm_key {unnorm_key!r} is not in the model's norm_stats; available keys: {keys}")
        return unnorm_key

    @property
    def norm_stats(self) -> Optional[Dict[str, Any]]:
        return self.config.norm_stats

    def get_action_dim(self, unnorm_key: Optional[str] = None) -> int:
        """Dimensionality of the action space (7 for Bridge)."""
        key = self._check_unnorm_key(self.config.norm_stats, unnorm_key)
        return len(self.config.norm_stats[key]["action"]["q01"])

    def get_action_stats(self, unnorm_key: Optional[str] = None) -> Dict[str, Any]:
        """The action statistics (q01, q99, mask, ...) used to de-normalize."""
        key = self._check_unnorm_key(self.config.norm_stats, unnorm_key)
        return self.config.norm_stats[key]["action"]

    @property
    def action_tokenizer(self) -> ActionTokenizer:
        return ActionTokenizer(self.config.tokenizer_vocab_size, n_bins=self.config.n_action_bins)

    @torch.no_grad()
    def predict_action(self, input_ids: Optional[torch.LongTensor] = None, pixel_values: Optional[torch.Tensor] = None,
                       unnorm_key: Optional[str] = None, do_sample: bool = False, **kwargs: Any) -> np.ndarray:
        """Generate the action tokens for one (prompt, image) and return the de-normalized action, shape (D,).

        Mirrors OpenVLAForActionPrediction.predict_action: append "▁" when the prompt ids do not end with it (the
        training sequences have it between "Out:" and the actions), generate D new tokens, keep the last D, decode
        with the ActionTokenizer and de-normalize with the unnorm_key's q01/q99/mask. Two deliberate differences:
        a passed attention_mask is extended together with the ids, and EOS is suppressed for the first D tokens
        (``min_new_tokens``) so a half-trained model cannot stop early and have prompt tokens decoded as actions.
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("predict_action needs input_ids and pixel_values (from the processor)")
        action_dim = self.get_action_dim(unnorm_key)
        stats = self.get_action_stats(unnorm_key)
        device = self.get_input_embeddings().weight.device
        input_ids = input_ids.to(device)
        attention_mask = kwargs.pop("attention_mask", None)
        space_id = self.config.space_token_id
        if space_id is None:
            raise ValueError("config.space_token_id is not set")
        if not torch.all(input_ids[:, -1] == space_id):
            input_ids = torch.cat([input_ids, torch.full_like(input_ids[:, :1], space_id)], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(device)
        kwargs.setdefault("min_new_tokens", action_dim)
        generated = self.generate(input_ids, pixel_values=pixel_values.to(device), max_new_tokens=action_dim,
                                  do_sample=do_sample, **kwargs)
        token_ids = generated[0, -action_dim:].cpu().numpy()
        normalized = self.action_tokenizer.decode(token_ids)
        mask = stats.get("mask", [True] * action_dim)
        return np.asarray(unnormalize_actions(normalized, stats["q01"], stats["q99"], mask))


# ======================================================================================================================
# Construction
# ======================================================================================================================
def _round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def build_tiny_vla(
    norm_stats: Optional[Dict[str, Any]] = None,
    image_size: int = 128,
    seed: int = 0,
    *,
    patch_size: int = 16,
    vision_width: int = 192,
    vision_depth: int = 4,
    vision_heads: int = 3,
    vision_stem: str = "conv",
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    tokenizer_vocab_size: int = TOKENIZER_VOCAB_SIZE,
    max_position_embeddings: int = 512,
    llm_attn_implementation: str = "sdpa",
) -> Tuple[TinyVLAForActionPrediction, TinyVLAProcessor]:
    """A randomly initialized tiny VLA and its processor; the same `seed` gives the same weights.

    norm_stats: ``{unnorm_key: {"action": {"q01": [...], "q99": [...], "mask": [...], ...}}}`` (OpenVLA's format),
    stored in ``model.config.norm_stats``; may be set later (``model.config.norm_stats = ...``).
    """
    tokenizer = build_tokenizer(vocab_size=tokenizer_vocab_size, model_max_length=max_position_embeddings)
    embed_rows = _round_up(len(tokenizer), PAD_TO_MULTIPLE_OF)
    text_config = dict(
        vocab_size=embed_rows, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = TinyVLAConfig(
        image_size=image_size, patch_size=patch_size, vision_width=vision_width, vision_depth=vision_depth,
        vision_heads=vision_heads, vision_stem=vision_stem, text_config=text_config,
        llm_attn_implementation=llm_attn_implementation,
        tokenizer_vocab_size=tokenizer.vocab_size, space_token_id=tokenizer.convert_tokens_to_ids(SPACE_TOKEN),
        pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=PAD_TO_MULTIPLE_OF, n_action_bins=N_ACTION_BINS,
        norm_stats=norm_stats, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = TinyVLAForActionPrediction(config)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    processor = TinyVLAProcessor(tokenizer, TinyVLAImageProcessor(image_size=image_size))
    return model, processor


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """Parameter counts per top-level part (vision_backbone / projector / language_model) and in total."""
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    parts["total"] = sum(p.numel() for p in model.parameters())
    return parts
