"""A tiny, OpenVLA-shaped vision-language-action model that runs (and learns) on a laptop CPU, fully offline.

It exists so that the notebook's shared code path - processor, forward with labels, LoRA via PEFT, metrics,
``predict_action``, save / reload - can be executed end to end without a GPU or the Hugging Face hub, and so that
a CPU run is a real test of the code that drives OpenVLA-7B. Everything that code touches mirrors OpenVLA's HF
interface (``prismatic/extern/hf`` in the OpenVLA repository):

* **Layout**: [BOS embedding][projected image patches][rest of the text embeddings]; ``forward`` returns logits
  over all those positions (text_len + num_patches) and labels are padded with IGNORE_INDEX over the patches, so
  the shifted next-token loss and ``logits[:, num_patches:-1]`` mean what they mean for OpenVLA.
* **Modules**: ``vision_backbone.featurizer`` (a timm ViT; patch features without prefix tokens from the
  second-to-last block), ``projector.fc1 / fc2`` (Linear-GELU-Linear), ``language_model`` (a
  ``transformers.LlamaForCausalLM``: ``language_model.model.layers.*``, ``language_model.lm_head``). PEFT's
  ``target_modules="all-linear"`` therefore selects the same kinds of modules on both models.
* **Tokenizer**: a byte-fallback BPE built offline with ``tokenizers`` in Llama's style (<unk>=0, <s>=1, </s>=2,
  byte tokens <0x00>..<0xFF>, a standalone "▁"), whose last 256 base ids are the action tokens, with <PAD> added
  just above the base vocabulary and the embedding matrix padded to a multiple of 64 (OpenVLA: 32000 base ids,
  <PAD>=32000, 32064 rows).
* **Inference**: ``predict_action(input_ids=, pixel_values=, unnorm_key=, do_sample=False)`` appends "▁" if needed,
  greedily generates the action tokens (KV cache supported) and decodes them with ``vla_bridge.tokenization``.

Usage::

    model, processor = build_tiny_vla(norm_stats={"demo_world": {"action": {"q01": [...], "q99": [...], ...}}})
    inputs = processor(build_prompt("put the red block on the plate"), image)   # image: 128x128 RGB
    action = model.predict_action(**inputs, unnorm_key="demo_world", do_sample=False)   # np.ndarray, (7,)

After ``import vla_bridge.models.tiny_vla``, ``AutoModelForVision2Seq.from_pretrained(dir)`` and
``AutoProcessor.from_pretrained(dir)`` also load a saved tiny VLA.

Layout (Hugging Face's / LeRobot's): ``configuration_tiny_vla`` (``TinyVLAConfig``), ``processing_tiny_vla``
(tokenizer, image processor, processor), ``modeling_tiny_vla`` (the model, ``build_tiny_vla``); this ``__init__``
re-exports them and registers the Auto classes.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForVision2Seq, AutoProcessor

from .configuration_tiny_vla import PAD_TO_MULTIPLE_OF, TOKENIZER_VOCAB_SIZE, VISION_STEMS, TinyVLAConfig
from .modeling_tiny_vla import (
    ConvStem,
    TinyVLACausalLMOutputWithPast,
    TinyVLAForActionPrediction,
    build_tiny_vla,
    count_parameters,
)
from .processing_tiny_vla import TinyVLAImageProcessor, TinyVLAProcessor, build_tokenizer


# ---- Auto-class registration (so AutoModelForVision2Seq / AutoProcessor load a saved tiny VLA directory) -----------
def _register_auto_classes() -> None:
    try:
        AutoConfig.register(TinyVLAConfig.model_type, TinyVLAConfig)
    except ValueError:  # already registered (module reloaded)
        pass
    for auto_cls, obj in ((AutoModelForVision2Seq, TinyVLAForActionPrediction), (AutoProcessor, TinyVLAProcessor)):
        try:
            auto_cls.register(TinyVLAConfig, obj)
        except ValueError:
            pass


_register_auto_classes()


__all__ = [
    "VISION_STEMS", "ConvStem",
    "TOKENIZER_VOCAB_SIZE", "PAD_TO_MULTIPLE_OF", "build_tokenizer", "TinyVLAImageProcessor", "TinyVLAProcessor",
    "TinyVLAConfig", "TinyVLAForActionPrediction", "TinyVLACausalLMOutputWithPast", "build_tiny_vla",
    "count_parameters",
]
