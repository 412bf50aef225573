"""What the conversion commands read from their sources, in one place: a source's config and whether its decoder
can be upcycled, and a LLaVA's vision tower, image processor and tokenizer (`hf-dare upcycle`, `build` and
`import-moellava` share these instead of importing each other)."""

from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    LlavaProcessor,
    PreTrainedConfig,
)
from transformers.utils import logging

from .checkpoint import ConversionError, weight_files

VISION_TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
FFN_NAMES = ("gate_proj", "up_proj", "down_proj")


def check_gated_ffn_decoder(text_config: PreTrainedConfig) -> None:
    """Raise `ConversionError` unless the decoder's layers have `mlp.gate_proj / up_proj / down_proj`."""
    name = f"{text_config.model_type} ({', '.join(getattr(text_config, 'architectures', None) or []) or 'no architectures'})"
    try:
        with torch.device("meta"):
            backbone = AutoModel.from_config(text_config)
    except Exception as error:  # noqa: BLE001 - any failure means we cannot build it
        raise ConversionError(f"unsupported architecture {name}: transformers cannot build it ({error}).") from error
    layers = getattr(backbone, "layers", None)
    if layers is None or not all(
        all(hasattr(layer.mlp, n) for n in FFN_NAMES) for layer in layers if hasattr(layer, "mlp")
    ):
        raise ConversionError(
            f"unsupported architecture {name}: upcycling needs a decoder whose layers have "
            "mlp.gate_proj / up_proj / down_proj (Qwen2, Qwen3, StableLM, Llama, Mistral...)."
        )


def load_source_config(folder: Path) -> PreTrainedConfig:
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as error:
        raise ConversionError(f"unsupported architecture in {folder}: {error}".split("\n")[0]) from error


def vision_config_of(config: PreTrainedConfig, folder: Path) -> PreTrainedConfig:
    """The vision part of a CLIP / SigLIP config (a full model's `vision_config`, or a vision model's own)."""
    if config.model_type in VISION_TOWERS:
        return config.vision_config
    if config.model_type in VISION_TOWERS.values():
        return config
    raise ConversionError(
        f"unsupported vision architecture {config.model_type} in {folder}: expected a CLIP or SigLIP model "
        "(full or vision-only)."
    )


def load_vision_tower(folder: Path, vision_config: PreTrainedConfig, allow_pickle: bool) -> torch.nn.Module:
    """The vision model (`CLIPVisionModel` / `SiglipVisionModel`) of a full or vision-only checkpoint."""
    weight_files(folder, allow_pickle)  # refuses pickle unless allowed
    with torch.device("meta"):
        model_class = type(AutoModel.from_config(vision_config))
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a full CLIP / SigLIP checkpoint's text tower is expected to be left out
    try:
        return model_class.from_pretrained(folder, config=vision_config, use_safetensors=not allow_pickle or None)
    finally:
        logging.set_verbosity(verbosity)


def has_cls_token(vision_config: PreTrainedConfig) -> bool:
    """CLIP's vision tower prepends a CLS token to the patches; SigLIP's has none."""
    return vision_config.model_type == "clip_vision_model"


def default_select_strategy(vision_config: PreTrainedConfig) -> str:
    """`default` (drop the first token) for towers with a CLS token, `full` (keep every patch) for the others."""
    return "default" if has_cls_token(vision_config) else "full"


def image_tokens_per_image(vision_config: PreTrainedConfig, strategy: str) -> int:
    """Image tokens a `strategy` leaves of one image: the tower's tokens, less the first one for `default`."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + int(has_cls_token(vision_config)) - int(strategy == "default")


def llava_processor(
    image_processor, tokenizer, vision_config: PreTrainedConfig, strategy: str, image_token: str
) -> LlavaProcessor:
    """transformers' `LlavaProcessor` sized for `vision_config` (CLIP adds a CLS token, SigLIP does not)."""
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(has_cls_token(vision_config)),
        image_token=image_token,
        chat_template=getattr(tokenizer, "chat_template", None),
    )


def add_image_token(tokenizer, image_token: str) -> int:
    """Add `image_token` as a special token unless the tokenizer has it; returns its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    if getattr(tokenizer, "image_token", image_token) != image_token:
        tokenizer.image_token = image_token  # LlavaProcessor takes the tokenizer's own image token first
    return tokenizer.convert_tokens_to_ids(image_token)


def load_image_processor(vision_dir: Path):
    """The vision model's image processor (`preprocessor_config.json`)."""
    try:
        return AutoImageProcessor.from_pretrained(vision_dir)
    except (OSError, ValueError) as error:
        raise ConversionError(f"no image processor in {vision_dir} (preprocessor_config.json): {error}") from error
