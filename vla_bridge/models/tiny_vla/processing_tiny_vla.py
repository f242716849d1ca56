"""The tiny VLA's tokenizer, image processor and processor (Hugging Face layout: ``processing_tiny_vla``).

``build_tokenizer`` (an offline, deterministic Llama-style byte-fallback BPE whose last 256 base ids are the
action tokens), ``TinyVLAImageProcessor`` (OpenVLA's "letterbox" preprocessing for one backbone) and
``TinyVLAProcessor`` (OpenVLA's ``processor(prompt, image)`` call; saved as ``processor_config.json`` + tokenizer
files).
"""

from __future__ import annotations

import itertools
import json
import os
import string
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.feature_extraction_utils import BatchFeature

from ...tokenization import N_ACTION_BINS, SPACE_TOKEN, to_pil_image
from .configuration_tiny_vla import TOKENIZER_VOCAB_SIZE

# ======================================================================================================================
# Tokenizer
# ======================================================================================================================
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<PAD>"

# Words the tokenizer should know as whole pieces: the prompt template, Bridge-style task vocabulary (verbs,
# colours, objects, receptacles, places) and common English glue words. Anything else still tokenizes, through
# smaller pieces, single characters or raw bytes.
_TEMPLATE_WORDS = "In What action should the robot take to Out".split()
_VERBS = ("put place move pick push pull open close stack lift slide wipe sweep fold unfold flip turn grab drop set "
          "bring rotate knock reach hang insert pour transfer take get leave position drag lay relocate go "
          "upright").split()
_COLORS = "red green blue yellow orange purple pink white black brown gray grey silver gold cyan".split()
_OBJECTS = ("block carrot cup cloth spoon banana plate pot towel table corn eggplant mushroom knife fork bowl pan "
            "lid sponge drawer sink can bottle toy cube ball marker pepper apple lemon strawberry sushi cucumber "
            "napkin rag basket tray stove microwave cabinet bread cheese grape potato tomato egg duck object item "
            "thing piece brush mug kettle box container rack towel shelf door").split()
_PLACES = ("side left right front back top bottom middle center centre corner edge near far next behind under "
           "over inside outside between burner counter surface area spot").split()
_GLUE = ("the a an of on in into onto from to at with and then it its up down off out over by for is are this "
         "that these those there here other another which what where should can will would please now some all "
         "one two three first second third small large big little tiny long short round square empty full "
         "open closed new old").split()
_TARGETS = ["on the plate", "in the pot", "on the towel", "to the left side of the table",
            "to the right side of the table", "into the bowl", "on top of the cloth", "in the sink",
            "to the front of the table", "near the stove"]


def _tokenizer_corpus() -> List[str]:
    """A small deterministic English corpus biased to robot-task instructions (used to learn BPE merges)."""
    lines: List[str] = []
    # Prompts with Bridge-like instructions (a deterministic sweep through verb x colour x object x target).
    combos = itertools.product(_VERBS[:12], _COLORS[:10], _OBJECTS[:24], _TARGETS)
    for i, (verb, color, obj, target) in enumerate(combos):
        if i % 7:
            continue
        lines.append(f"In: What action should the robot take to {verb} the {color} {obj} {target}?\nOut:")
    # Every listed word on its own, several times, so each one earns its merges.
    words = _TEMPLATE_WORDS + _VERBS + _COLORS + _OBJECTS + _PLACES + _GLUE
    for word in words:
        lines.extend([word, word.capitalize()] * 3)
    lines.append(" ".join(string.digits) + " " + string.digits)
    return lines


def _action_token(bin_index: int) -> str:
    # The token for digitize index d (1..256) is named <act_{d-1}>: <act_0> is -1 (id vocab_size - 1),
    # <act_255> is +1 (id vocab_size - 256).
    return f"<act_{bin_index}>"


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE, n_action_bins: int = N_ACTION_BINS,
                    model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Build the tiny VLA's tokenizer offline (deterministic; no downloads).

    Base vocabulary (ids 0 .. vocab_size - 1), Llama-like:
      0 <unk>, 1 <s>, 2 </s> | 3..258 byte tokens <0x00>..<0xFF> (byte fallback: ANY text tokenizes) |
      BPE pieces learned from `_tokenizer_corpus()` (incl. every printable ASCII character and "▁") |
      <unused_k> fillers | the last `n_action_bins` ids: action tokens.
    Added above it: <PAD> = vocab_size, so len(tokenizer) == vocab_size + 1 (OpenVLA: 32000 / 32001).
    Pre-tokenization mirrors SentencePiece-Llama: spaces become "▁" attached to the next word, "▁" is prepended to
    the text, punctuation / newlines / digits are split off; the post-processor prepends <s>.
    """
    specials = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    n_fixed = len(specials) + len(byte_tokens)
    learned_budget = vocab_size - n_fixed - n_action_bins
    if learned_budget < 128:
        raise ValueError(f"vocab_size={vocab_size} too small for {n_action_bins} action bins")

    def pre_tokenizer():
        return pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement=SPACE_TOKEN, prepend_scheme="first", split=True),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ])

    # 1) Learn BPE merges on the corpus.
    alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation) | {SPACE_TOKEN, "\n"})
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizer()
    learner.train_from_iterator(
        _tokenizer_corpus(),
        trainers.BpeTrainer(vocab_size=learned_budget, initial_alphabet=alphabet, limit_alphabet=len(alphabet) + 16,
                            show_progress=False, special_tokens=[]),
    )
    learned = json.loads(learner.to_str())["model"]
    learned_tokens = [tok for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    reserved = set(specials) | set(byte_tokens)
    learned_tokens = [t for t in learned_tokens if t not in reserved][:learned_budget]
    if SPACE_TOKEN not in learned_tokens:
        raise RuntimeError("BPE alphabet lost the space marker")

    # 2) Assemble the final vocabulary with the action tokens at the very end.
    fillers = [f"<unused_{i}>" for i in range(learned_budget - len(learned_tokens))]
    actions = [_action_token(k) for k in reversed(range(n_action_bins))]  # id vocab_size-256 -> <act_255>
    ordered = specials + byte_tokens + learned_tokens + fillers + actions
    assert len(ordered) == vocab_size and len(set(ordered)) == vocab_size
    vocab = {tok: i for i, tok in enumerate(ordered)}
    known = set(learned_tokens)
    merges = [m for m in merges if m[0] in known and m[1] in known and (m[0] + m[1]) in known]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE_TOKEN, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN,
        padding_side="right", model_max_length=model_max_length, clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],  # like Llama's tokenizer: no token_type_ids
    )
    hf_tok.add_special_tokens({"pad_token": PAD_TOKEN})
    assert hf_tok.vocab_size == vocab_size and hf_tok.pad_token_id == vocab_size and len(hf_tok) == vocab_size + 1
    return hf_tok


# ======================================================================================================================
# Image preprocessing and processor
# ======================================================================================================================
class TinyVLAImageProcessor:
    """PIL / uint8 array -> normalized float tensor (3, S, S): letterbox to square, resize, scale to [0,1], normalize.

    The same steps as OpenVLA's PrismaticImageProcessor with its default "letterbox" strategy (pad to a square with
    the mean colour, resize, to tensor, normalize), for one backbone instead of the fused pair.
    """

    model_input_names: ClassVar[List[str]] = ["pixel_values"]

    def __init__(self, image_size: int = 128, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), image_resize_strategy: str = "letterbox") -> None:
        if image_resize_strategy not in ("letterbox", "resize-naive"):
            raise ValueError(f"unsupported image_resize_strategy {image_resize_strategy!r}")
        self.image_size, self.image_resize_strategy = int(image_size), image_resize_strategy
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def to_dict(self) -> Dict[str, Any]:
        return dict(image_size=self.image_size, mean=self.mean, std=self.std,
                    image_resize_strategy=self.image_resize_strategy)

    def apply_transform(self, image: Any) -> torch.Tensor:
        img = to_pil_image(image)
        w, h = img.size
        if self.image_resize_strategy == "letterbox" and w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in self.mean))
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            img = canvas
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: Any, return_tensors: Optional[str] = "pt", **_: Any) -> BatchFeature:
        if not isinstance(images, (list, tuple)):
            images = [images]
        pixel_values = torch.stack([self.apply_transform(img) for img in images])
        if return_tensors in ("pt", None) or str(return_tensors).endswith("PYTORCH"):
            return BatchFeature(data={"pixel_values": pixel_values})
        return BatchFeature(data={"pixel_values": pixel_values.numpy()}, tensor_type=return_tensors)

    preprocess = __call__


class TinyVLAProcessor:
    """Tokenizer + image processor with OpenVLA's processor call: ``processor(prompt, image)`` -> BatchFeature with
    input_ids, attention_mask, pixel_values (torch tensors by default)."""

    config_name: ClassVar[str] = "processor_config.json"

    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_processor: TinyVLAImageProcessor) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def __call__(self, text: Union[str, List[str]], images: Any = None, padding: Union[bool, str] = False,
                 truncation: Optional[bool] = None, max_length: Optional[int] = None,
                 return_tensors: Optional[str] = "pt") -> BatchFeature:
        if images is None:
            raise ValueError("TinyVLAProcessor needs an image for every prompt")
        pixel_values = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        text_inputs = self.tokenizer(text, return_tensors=return_tensors, padding=padding, truncation=truncation,
                                     max_length=max_length)
        if pixel_values.shape[0] != text_inputs["input_ids"].shape[0]:
            raise ValueError("Batch is malformed; expected the same number of images and prompts")
        return BatchFeature(data={**text_inputs, "pixel_values": pixel_values})

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> List[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> List[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **_: Any) -> List[str]:
        os.makedirs(save_directory, exist_ok=True)
        files = list(self.tokenizer.save_pretrained(save_directory))
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"processor_class": type(self).__name__, "image_processor": self.image_processor.to_dict()},
                      f, indent=2, sort_keys=True)
        return files + [path]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **_: Any) -> "TinyVLAProcessor":
        directory = os.fspath(pretrained_model_name_or_path)
        with open(os.path.join(directory, cls.config_name), encoding="utf-8") as f:
            cfg = json.load(f)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
        return cls(tokenizer, TinyVLAImageProcessor(**cfg["image_processor"]))

    def __repr__(self) -> str:
        return (f"TinyVLAProcessor(image_size={self.image_processor.image_size}, vocab_size="
                f"{self.tokenizer.vocab_size}, len(tokenizer)={len(self.tokenizer)})")
