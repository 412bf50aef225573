"""Tiny configs, tokenizers and processors for the tests: everything is built locally, nothing is downloaded."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    StableLmConfig,
)

from hf_dare import MoECausalLMConfig, MoELlavaConfig

TEXT_FAMILIES = ("qwen2", "qwen3", "stablelm")
VISION_TOWERS = ("clip", "siglip")
ROUTERS = ("top_k", "dare", "ltdr")

IMAGE_SIZE = 28
PATCH_SIZE = 14
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "what", "digit", "is", "shown", "even", "odd", "sum", "of", "the", "two",
         "digits", "yes", "no", "a", "picture", "?", "."] + [str(i) for i in range(19)]  # fmt: skip
VOCAB_SIZE = 96  # > len(SPECIAL_TOKENS) + len(WORDS); spare ids keep the embedding size round


def text_config(family: str = "qwen2", num_hidden_layers: int = 4, **overrides):
    """A tiny decoder config of `family` (hidden 32, 4 layers)."""
    config_class = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "stablelm": StableLmConfig}[family]
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    if family == "qwen3":
        kwargs["head_dim"] = 8
    kwargs.update(overrides)
    return config_class(**kwargs)


def vision_config(tower: str = "clip", **overrides):
    """A tiny vision tower config: 28x28 images, 14x14 patches (4 patches; CLIP adds a CLS token)."""
    config_class = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[tower]
    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    kwargs.update(overrides)
    return config_class(**kwargs)


def moe_config(family: str = "qwen2", router: str = "top_k", **overrides) -> MoECausalLMConfig:
    text_overrides = overrides.pop("text_overrides", {})
    return MoECausalLMConfig(text_config=text_config(family, **text_overrides), router=router, **overrides)


def llava_config(family: str = "qwen2", tower: str = "clip", router: str = "top_k", **overrides) -> MoELlavaConfig:
    text_overrides = overrides.pop("text_overrides", {})
    return MoELlavaConfig(
        text_config=text_config(family, **text_overrides),
        vision_config=vision_config(tower),
        image_token_id=SPECIAL_TOKENS.index(IMAGE_TOKEN),
        vision_feature_select_strategy="default" if tower == "clip" else "full",
        vision_feature_layer=-2 if tower == "clip" else -1,
        router=router,
        **overrides,
    )


def image_tokens_per_image(tower: str = "clip") -> int:
    return (IMAGE_SIZE // PATCH_SIZE) ** 2


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a tiny vocabulary, with `<image>` and a ChatML-style chat template."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    vocab.update({f"<extra_{i}>": i for i in range(len(vocab), VOCAB_SIZE)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def processor(tower: str = "clip") -> LlavaProcessor:
    """transformers' LlavaProcessor over the tiny tokenizer, sized for `vision_config(tower)`."""
    if tower == "clip":
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
    else:
        image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default" if tower == "clip" else "full",
        num_additional_image_tokens=1 if tower == "clip" else 0,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def digit_images(n: int = 4) -> list:
    """Real 8x8 digit images from scikit-learn, as RGB uint8 arrays (H, W, 3)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:n] / 16.0 * 255).astype("uint8")
    return [np.repeat(image[:, :, None], 3, axis=2) for image in images]


def random_batch(config, batch_size: int = 2, seq_len: int = 12, seed: int = 0) -> dict:
    """Random text ids (no special tokens) with labels, for a causal LM config."""
    generator = torch.Generator().manual_seed(seed)
    low = len(SPECIAL_TOKENS)
    input_ids = torch.randint(low, config.text_config.vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def randomise(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter of `module` drawn from N(0, scale^2) with its own generator (larger than the init:
    routers whose choices differ from token to token)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return module


def calibrate_thresholds(model, batch: dict) -> None:
    """One per-batch threshold update on `batch` (a training-mode forward observes the difficulties): DARE's
    thresholds at the quantiles of Pi on that batch; the model is left in eval mode."""
    from hf_dare.training.callbacks import set_threshold_update_mode

    set_threshold_update_mode(model, per_batch=True)
    model.train()
    with torch.no_grad():
        model(**batch)
    model.update_difficulty_thresholds()
    model.eval()


def save_tiny_processor(path: str | Path, tower: str = "clip") -> LlavaProcessor:
    proc = processor(tower)
    proc.save_pretrained(path)
    return proc
