"""The LoRA target list on a model with OpenVLA-7B's vision layers, which the tiny checkpoints do not have.

OpenVLA's fused backbone is DINOv2 (ViT-L/14 with 4 register tokens and LayerScale) + SigLIP (So400m with an
attention-pool head: ``attn_pool.q``, ``attn_pool.kv``, ``attn_pool.proj``, ``attn_pool.mlp``), created by timm with
``num_classes=0`` and read through ``get_intermediate_layers`` (second-to-last block); the projector is
fc1 -> fc2 -> fc3; the LLM is Llama-2. Upstream finetune.py uses ``target_modules="all-linear"`` (and on the 4-bit
path ``prepare_model_for_kbit_training`` first, which turns gradient checkpointing on). This builds that layout
small and random from timm 0.9.10 and transformers, and checks what ``vla_bridge.models.lora`` selects on it.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from timm.models.vision_transformer import LayerScale, VisionTransformer
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

from vla_bridge.models import openvla as ov
from vla_bridge.models.lora import lora_modules_by_part, lora_target_modules

torch.set_num_threads(1)
SIZE, WIDTH, DEPTH = 32, 32, 3


class _FusedConfig(PretrainedConfig):
    model_type = "fused_prismatic_test"


class _FusedPrismatic(PreTrainedModel):
    """Prismatic's dinosiglip layout, small: two timm ViTs side by side, a 3-layer projector, a Llama."""

    config_class = _FusedConfig
    supports_gradient_checkpointing = True

    def __init__(self, config: _FusedConfig) -> None:
        super().__init__(config)
        common = dict(img_size=SIZE, patch_size=16, embed_dim=WIDTH, depth=DEPTH, num_heads=2, num_classes=0)
        self.vision_backbone = nn.Module()
        # DINOv2-reg: LayerScale on every block (init_values), 4 register tokens, no pos-embed on the prefix tokens
        self.vision_backbone.featurizer = VisionTransformer(init_values=1e-5, reg_tokens=4, no_embed_class=True,
                                                            **common)
        # SigLIP: no class token, the "map" attention-pool head (q, kv, proj, mlp)
        self.vision_backbone.fused_featurizer = VisionTransformer(global_pool="map", class_token=False, **common)
        for vit in (self.vision_backbone.featurizer, self.vision_backbone.fused_featurizer):
            vit.forward = partial(lambda v, x: v.get_intermediate_layers(x, n={DEPTH - 2})[0], vit)
        self.projector = nn.Module()
        self.projector.fc1 = nn.Linear(2 * WIDTH, 8 * WIDTH)
        self.projector.fc2 = nn.Linear(8 * WIDTH, 64)
        self.projector.fc3 = nn.Linear(64, 64)
        self.language_model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                           num_hidden_layers=2, num_attention_heads=2,
                                                           num_key_value_heads=2))

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def forward(self, input_ids, pixel_values, labels=None, **_):
        vb, pj = self.vision_backbone, self.projector
        patches = torch.cat([vb.featurizer(pixel_values), vb.fused_featurizer(pixel_values)], dim=2)
        projected = pj.fc3(nn.functional.gelu(pj.fc2(nn.functional.gelu(pj.fc1(patches)))))
        text = self.get_input_embeddings()(input_ids)
        embeds = torch.cat([text[:, :1], projected, text[:, 1:]], dim=1)
        if labels is not None:
            labels = torch.cat([labels[:, :1], torch.full(projected.shape[:2], -100), labels[:, 1:]], dim=1)
        return self.language_model(inputs_embeds=embeds, labels=labels)


def _model() -> _FusedPrismatic:
    torch.manual_seed(0)
    return _FusedPrismatic(_FusedConfig())


def _wrapped(model) -> set[str]:
    return {n.replace("base_model.model.", "") for n, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)}


def _step(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 6), generator=g)
    out = model(input_ids=ids, pixel_values=torch.randn(2, 3, SIZE, SIZE, generator=g), labels=ids)
    out.loss.backward()
    return out.loss


def test_the_layout_has_the_layers_the_tiny_checkpoints_lack():
    names = {n for n, _ in _model().named_modules()}
    assert {"vision_backbone.fused_featurizer.attn_pool.q", "vision_backbone.fused_featurizer.attn_pool.kv",
            "vision_backbone.featurizer.blocks.0.ls1", "projector.fc3", "language_model.lm_head"} <= names
    assert isinstance(_model().vision_backbone.featurizer.blocks[0].ls1, LayerScale)


def test_target_list_is_all_linear_without_the_head():
    model = _model()
    upstream = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), model).target_modules
    ours = lora_target_modules(model)
    assert "lm_head" in upstream                  # peft 0.13.2 misses the nested head (see models/lora.py)
    assert set(ours) == set(upstream) - {"lm_head"}
    # the wider list: SigLIP's attention pool (q, kv), the fused projector's fc3, beside the ViT and Llama layers
    assert {"q", "kv", "qkv", "proj", "fc1", "fc2", "fc3", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
            "up_proj", "down_proj"} == set(ours)


def test_lora_wraps_what_all_linear_wraps_except_the_head():
    ours = get_peft_model(_model(), ov.lora_config(4, 8, model=_model()))
    theirs = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights="gaussian"))
    w_ours, w_theirs = _wrapped(ours), _wrapped(theirs)
    assert w_ours == {n for n in w_theirs if not n.endswith("lm_head")} and "language_model.lm_head" in w_theirs
    pool = "vision_backbone.fused_featurizer.attn_pool"
    assert {f"{pool}.q", f"{pool}.kv", f"{pool}.proj", f"{pool}.mlp.fc1", "projector.fc3"} <= w_ours
    # LayerScale is not a linear layer: never wrapped, and its scale stays frozen
    assert not any(".ls1" in n or ".ls2" in n for n in w_ours)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".ls1." in n or ".ls2." in n)
    # suffix matching: "proj" also names the ViTs' patch embedding, a Conv2d - all-linear adapts it too, and so do we
    assert "vision_backbone.featurizer.patch_embed.proj" in w_ours & w_theirs
    assert lora_modules_by_part(ours).keys() == {"vision_backbone", "projector", "language_model"}


def test_the_4bit_recipe_trains_through_gradient_checkpointing():
    """prepare_model_for_kbit_training (what load_openvla's 4-bit path calls), with what it adds on a quantized
    model - gradient checkpointing (reentrant, peft 0.13.2's default) and input embeddings that require grad; on
    this unquantized stand-in peft only freezes the weights, so those two are switched on as it would - and then
    our LoRA: a finite loss, gradients in the LLM's adapters through the checkpointed layers and in the vision
    adapters; the attention pool, which get_intermediate_layers never runs, gets none (as upstream, which wraps
    the model in DDP with find_unused_parameters=True)."""
    model = prepare_model_for_kbit_training(_model())
    assert not any(p.requires_grad for p in model.parameters())
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    assert model.language_model.model.gradient_checkpointing and model.is_gradient_checkpointing
    pm = ov.attach_lora(model, 4, 8, seed=0)
    pm.train()
    loss = _step(pm)
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    nonzero = {n for n, g in grads.items() if g is not None and float(g.abs().sum()) > 0}
    assert any("language_model.model.layers.0.self_attn.q_proj.lora_B" in n for n in nonzero)
    assert any("featurizer.blocks.0.attn.qkv.lora_B" in n for n in nonzero)
    assert any("projector.fc3.lora_B" in n for n in nonzero)
    assert all(grads[n] is None for n in grads if ".attn_pool." in n) and any(".attn_pool." in n for n in grads)
    # an optimizer step over every trainable parameter copes with the unused ones
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    torch.nn.utils.clip_grad_norm_([p for p in pm.parameters() if p.requires_grad], 1.0)
    opt.step()
    assert torch.isfinite(_step(pm, seed=1))
