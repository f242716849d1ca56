"""The tiny VLA's configuration (Hugging Face layout: ``configuration_tiny_vla``): ``TinyVLAConfig``.

An OpenVLAConfig look-alike (``model_type = "tiny_vla"``; norm_stats, n_action_bins, pad_token_id,
pad_to_multiple_of, image_sizes, text_config), plus the vocabulary sizes the tokenizer and the embedding share.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

from transformers import LlamaConfig, PretrainedConfig

from ...tokenization import N_ACTION_BINS

TOKENIZER_VOCAB_SIZE = 1024        # base vocabulary (OpenVLA / Llama-2: 32000)
PAD_TO_MULTIPLE_OF = 64            # embedding rows = len(tokenizer) rounded up (OpenVLA: 32001 -> 32064)

VISION_STEMS = ("conv", "patch")   # the tiny ViT's patch embedding: a conv stem (default) or linear patches
_DEFAULT_TEXT_CONFIG: Dict[str, Any] = dict(
    vocab_size=1088, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=TOKENIZER_VOCAB_SIZE,
)


class TinyVLAConfig(PretrainedConfig):
    """Configuration of the tiny VLA (an OpenVLAConfig look-alike: norm_stats, n_action_bins, pad_token_id,
    pad_to_multiple_of, image_sizes, text_config)."""

    model_type = "tiny_vla"

    def __init__(
        self,
        image_size: int = 128,
        patch_size: int = 16,
        vision_width: int = 192,
        vision_depth: int = 4,
        vision_heads: int = 3,
        vision_mlp_ratio: float = 4.0,
        vision_stem: str = "patch",     # a saved config without the field predates the conv stem
        text_config: Optional[Union[Dict[str, Any], LlamaConfig]] = None,
        llm_attn_implementation: str = "sdpa",
        tokenizer_vocab_size: int = TOKENIZER_VOCAB_SIZE,
        space_token_id: Optional[int] = None,
        pad_token_id: int = TOKENIZER_VOCAB_SIZE,
        pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF,
        n_action_bins: int = N_ACTION_BINS,
        norm_stats: Optional[Dict[str, Dict[str, Any]]] = None,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        self.image_size, self.patch_size = int(image_size), int(patch_size)
        self.image_sizes = [self.image_size]            # OpenVLA's config field (a list: one per backbone)
        self.use_fused_vision_backbone = False
        self.vision_width, self.vision_depth = int(vision_width), int(vision_depth)
        self.vision_heads, self.vision_mlp_ratio = int(vision_heads), float(vision_mlp_ratio)
        if vision_stem not in VISION_STEMS:
            raise ValueError(f"vision_stem={vision_stem!r}: expected one of {', '.join(VISION_STEMS)}")
        self.vision_stem = vision_stem
        if isinstance(text_config, LlamaConfig):
            text_config = text_config.to_dict()
        if text_config is None:  # a tiny Llama, not LlamaConfig()'s 7B defaults
            text_config = dict(_DEFAULT_TEXT_CONFIG)
        self.text_config = LlamaConfig(**text_config)
        self.llm_attn_implementation = llm_attn_implementation
        self.tokenizer_vocab_size = int(tokenizer_vocab_size)
        self.space_token_id = space_token_id
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.n_action_bins = int(n_action_bins)
        self.norm_stats = norm_stats
        self.initializer_range = float(initializer_range)
        kwargs.pop("image_sizes", None)
        kwargs.pop("use_fused_vision_backbone", None)
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2
