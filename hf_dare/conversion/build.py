"""Building a dense transformers LLaVA (the stage-1 starting point of MoE-LLaVA) from a causal LM and a
CLIP / SigLIP vision model: vision tower and decoder taken as they are, a new 2-layer GELU projector, the
`<image>` token added to the tokenizer, and a `LlavaProcessor` saved beside the model."""

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
)

from .checkpoint import ConversionError, resolve_source, weight_files
from .sources import (
    add_image_token,
    check_gated_ffn_decoder,
    default_select_strategy,
    image_tokens_per_image,
    llava_processor,
    load_image_processor,
    load_source_config,
    load_vision_tower,
    vision_config_of,
)
from .writer import check_output_folder, command_line, staged_output, write_model_card


def llava_config(
    text_config: PreTrainedConfig,
    vision_config: PreTrainedConfig,
    image_token_id: int,
    vision_feature_layer: int,
    vision_feature_select_strategy: str,
) -> LlavaConfig:
    """The dense LLaVA config around the decoder and the tower: a 2-layer GELU projector with biases."""
    return LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        image_seq_length=image_tokens_per_image(vision_config, vision_feature_select_strategy),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def assemble_llava(
    config: LlavaConfig, language_model: torch.nn.Module, vision_tower: torch.nn.Module, seed: int
) -> LlavaForConditionalGeneration:
    """`LlavaForConditionalGeneration` with the given decoder (a causal LM) and tower and a new projector,
    initialised from `seed`; the embeddings grow to hold `config.image_token_id` when it has no row."""
    with torch.random.fork_rng():  # seed the new projector without touching the caller's random state
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)  # the projector keeps this fresh, seeded initialisation
    model.model.language_model = language_model.model
    model.lm_head = language_model.lm_head
    model.model.vision_tower = vision_tower
    if config.image_token_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(config.image_token_id + 1)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(language_model.dtype)


def save_llava(
    folder: Path, model: LlavaForConditionalGeneration, processor: LlavaProcessor, llm_dir: Path, max_shard_size
) -> None:
    """The model, its processor and the decoder's `generation_config.json` (when it has one) in `folder`."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    processor.save_pretrained(folder)
    generation_config = llm_dir / "generation_config.json"
    if generation_config.is_file():
        (folder / "generation_config.json").write_bytes(generation_config.read_bytes())


def build_llava(
    llm: str | Path,
    vision: str | Path,
    out: str | Path,
    image_token: str = "<image>",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_shard_size: int | str = "2GB",
) -> Path:
    """A dense `LlavaForConditionalGeneration` checkpoint in `out` from the causal LM `llm` and the CLIP /
    SigLIP model `vision` (folders or Hub ids), with a new projector (seeded) and a `LlavaProcessor`.

    `vision_feature_select_strategy` None picks the tower's own: `default` (drop the CLS token) for CLIP,
    `full` for SigLIP, which has no CLS token. The decoder's embeddings grow by one row when `image_token` is
    new and has no spare row. Returns `out`."""
    if vision_feature_select_strategy not in (None, "default", "full"):
        raise ConversionError(
            f"vision_feature_select_strategy {vision_feature_select_strategy!r}: allowed 'default' or 'full'."
        )
    out = check_output_folder(out, overwrite)
    llm_dir, vision_dir = resolve_source(llm), resolve_source(vision)
    text_config = load_source_config(llm_dir)
    check_gated_ffn_decoder(text_config)
    vision_config = vision_config_of(load_source_config(vision_dir), vision_dir)
    strategy = vision_feature_select_strategy or default_select_strategy(vision_config)
    weight_files(llm_dir, allow_pickle)

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    image_token_id = add_image_token(tokenizer, image_token)
    processor = llava_processor(load_image_processor(vision_dir), tokenizer, vision_config, strategy, image_token)
    config = llava_config(text_config, vision_config, image_token_id, vision_feature_layer, strategy)
    language_model = AutoModelForCausalLM.from_pretrained(llm_dir, use_safetensors=not allow_pickle or None)
    model = assemble_llava(config, language_model, load_vision_tower(vision_dir, vision_config, allow_pickle), seed)

    command = command_line("build", "--llm", llm, "--vision", vision, out, "--image-token", image_token)
    command += (
        f" --vision-feature-layer {vision_feature_layer} --vision-feature-select-strategy {strategy} --seed {seed}"
    )
    model.config.training_stages = [{"name": "build", "description": command}]  # provenance, for model cards
    with staged_output(out, overwrite) as staging:
        save_llava(staging, model, processor, llm_dir, max_shard_size)
        write_model_card(
            staging,
            model.config,
            made_from=f"{llm} (decoder) and {vision} (vision tower)",
            how="a dense transformers LLaVA, the stage-1 starting point of MoE-LLaVA: decoder and vision tower "
            f"copied, the 2-layer GELU projector newly initialised (seed {seed})",
            notes=[
                f"Image token {image_token!r} = id {image_token_id}; {config.image_seq_length} image tokens per image.",
                "Train the projector (stage 1), then upcycle it into MoE-LLaVA with `hf-dare upcycle`.",
            ],
        )
    return out
