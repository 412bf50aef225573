"""Importing original MoE-LLaVA checkpoints (PKU-YuanGroup/MoE-LLaVA, DeepSpeed MoE layers) into hf-dare's
MoE-LLaVA with the `top_k` router, so released StableLM / Qwen models run without DeepSpeed.

The original layout: `model.layers.N.mlp.deepspeed_moe.gate.wg.weight` (E, H) is the router and
`...deepspeed_moe.experts.deepspeed_experts.K.{gate_proj,up_proj,down_proj}.weight` the experts (Qwen-1.8B,
built on the first Qwen, names its decoder `transformer.h.N` with `attn.c_attn` (fused qkv), `mlp.w1` (up),
`mlp.w2` (gate), `mlp.c_proj` (down)); the vision tower is `model.image_tower.image_tower.vision_model.*`
and the `mlp2x_gelu` projector `model.mm_projector[.image_spatial_proj].{0,2}.*`. The config carries a
`moe` dict (`moe_layers_idx`, `num_experts` per layer, `top_k_experts`, capacity factors...) and the LLaVA
fields `mm_image_tower`, `mm_hidden_size`, `mm_vision_select_layer`, `mm_vision_select_feature`,
`image_projector_type`, `image_aspect_ratio`.

Imported models train as the original did (DeepSpeed's `top2gating`, the `top_k` router's options set from the
original's `moe` dict): the 2nd expert sampled with Gumbel noise, slots over the expert capacity dropped
(`capacity_factor` in training, `eval_capacity_factor` in evaluation, `min_capacity`), f_i of the balancing loss
from the top-1 choices and the layers' balancing losses summed. Inference picks the 2nd expert
deterministically (the best of the rest), where DeepSpeed samples it there too.
"""

import re
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    PreTrainedConfig,
    Qwen2Config,
    StableLmConfig,
)

from ..modeling import MoELlavaConfig
from .checkpoint import (
    CheckpointReader,
    ConversionError,
    copy_side_files,
    read_config_dict,
    rename_by_rules,
    resolve_source,
)
from .plan import PlannedTensor, check_plan, copy_of, in_reading_order, padded_rows, rows_of, stacked, stacked_gate_up
from .sources import (
    add_image_token,
    has_cls_token,
    image_tokens_per_image,
    llava_processor,
    load_source_config,
    vision_config_of,
)
from .targets import expected_tensors, meta_model, save_config_and_code
from .writer import check_output_folder, command_line, staged_output, write_model_card, write_plan

# original model_type -> (transformers decoder model_type, decoder key prefix)
SUPPORTED = {
    "moe_llava_stablelm": ("stablelm", "model."),
    "moe_llava_qwen": ("qwen", "transformer."),
    "moe_llava_qwen1_5": ("qwen2", "model."),
    "moe_llava_llama": ("llama", "model."),
    "moe_llava_mistral": ("mistral", "model."),
}
UNSUPPORTED = {
    "moe_llava_phi": "Phi-2's experts are fc1 -> GELU -> fc2 (no gate), which hf-dare's gated experts "
    "(gate_up_proj / down_proj with a SiLU-gated product) cannot express",
    "moe_llava_minicpm": "MiniCPM scales embeddings and residuals, which the transformers decoders used here do not",
}
DETERMINISTIC_NOTE = (
    "Training continues as the original's DeepSpeed `top2gating` trains: the 2nd expert sampled with Gumbel "
    "noise (`second_expert_sampling`), expert slots over the capacity dropped (`capacity_factor`, "
    "`eval_capacity_factor`, `min_capacity`), f_i of the balancing loss from the top-1 choices "
    "(`aux_loss_fraction: top1`) and the layers' balancing losses summed (`router_aux_loss_reduction: sum`). "
    "At inference the 2nd expert is the best of the rest, deterministically (DeepSpeed samples it with Gumbel "
    "noise at inference too); slots over `eval_capacity_factor`'s capacity are dropped as in the original."
)
# Config fields of the original that are LLaVA / MoE / precision settings, not decoder settings.
NON_DECODER_FIELDS = re.compile(r"^(mm_|image_|video_|moe$|tune_|freeze_|use_mm|tokenizer_|bf16$|fp16$|fp32$)")
RENAMES = [
    (r"\.rotary_emb\.inv_freq$", None),
    (r"\.position_ids$", None),
    (r"^(model|transformer)\.(video_tower|mm_projector\.video_)", None),  # video branch: not imported
    (
        r"^(model|transformer)\.(image_tower|vision_tower)\.(image_tower|vision_tower)\.vision_model\.",
        "model.vision_tower.",
    ),
    (r"^(model|transformer)\.mm_projector\.(image_spatial_proj\.)?0\.", "model.multi_modal_projector.linear_1."),
    (r"^(model|transformer)\.mm_projector\.(image_spatial_proj\.)?2\.", "model.multi_modal_projector.linear_2."),
    # The first Qwen's names -> transformers' Qwen2 names.
    (r"^transformer\.wte\.", "model.language_model.embed_tokens."),
    (r"^transformer\.ln_f\.", "model.language_model.norm."),
    (r"^transformer\.h\.(\d+)\.", r"model.language_model.layers.\1."),
    (r"(layers\.\d+)\.ln_1\.", r"\1.input_layernorm."),
    (r"(layers\.\d+)\.ln_2\.", r"\1.post_attention_layernorm."),
    (r"(layers\.\d+)\.attn\.c_proj\.", r"\1.self_attn.o_proj."),
    (r"(layers\.\d+)\.attn\.c_attn\.", r"\1.self_attn.c_attn."),
    (r"\.w1\.weight$", ".up_proj.weight"),
    (r"\.w2\.weight$", ".gate_proj.weight"),
    (r"\.mlp\.c_proj\.weight$", ".mlp.down_proj.weight"),
    (r"(deepspeed_experts\.\d+)\.c_proj\.weight$", r"\1.down_proj.weight"),
    # Every other decoder tensor.
    (r"^model\.(?!language_model\.|vision_tower\.|multi_modal_projector\.)", "model.language_model."),
]
EXPERT = re.compile(
    r"^(.*layers\.(\d+)\.mlp\.)deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
GATE = re.compile(r"^(.*layers\.\d+\.mlp\.)deepspeed_moe\.gate\.wg\.weight$")
FUSED_QKV = re.compile(r"^(.*\.self_attn\.)c_attn\.(weight|bias)$")


def original_family(original: dict) -> tuple[str, str]:
    model_type = original.get("model_type", "")
    if model_type in UNSUPPORTED:
        raise ConversionError(f"unsupported architecture {model_type}: {UNSUPPORTED[model_type]}.")
    if model_type not in SUPPORTED:
        raise ConversionError(
            f"unsupported architecture {model_type!r}: not an original MoE-LLaVA checkpoint of a supported decoder "
            f"({', '.join(SUPPORTED)})."
        )
    return SUPPORTED[model_type]


def text_config_from_original(original: dict) -> PreTrainedConfig:
    """The transformers decoder config equivalent to the original's (StableLM-Epoch and the first Qwen are
    mapped field by field onto `StableLmConfig` / `Qwen2Config`)."""
    decoder, _ = original_family(original)
    fields = {k: v for k, v in original.items() if not NON_DECODER_FIELDS.match(k)}
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype"):
        fields.pop(key, None)
    if decoder == "stablelm":
        return StableLmConfig(
            vocab_size=fields["vocab_size"],
            hidden_size=fields["hidden_size"],
            intermediate_size=fields["intermediate_size"],
            num_hidden_layers=fields["num_hidden_layers"],
            num_attention_heads=fields["num_attention_heads"],
            num_key_value_heads=fields.get("num_key_value_heads", fields["num_attention_heads"]),
            hidden_act=fields.get("hidden_act", "silu"),
            partial_rotary_factor=fields.get("rope_pct", 0.25),
            rope_theta=fields.get("rope_theta", 10000.0),
            max_position_embeddings=fields.get("max_position_embeddings", 4096),
            layer_norm_eps=fields.get("norm_eps", 1e-5),
            use_qkv_bias=fields.get("use_qkv_bias", True),
            qk_layernorm=False,
            use_parallel_residual=False,
            tie_word_embeddings=fields.get("tie_word_embeddings", False),
            bos_token_id=fields.get("bos_token_id"),
            eos_token_id=fields.get("eos_token_id"),
        )
    if decoder == "qwen":
        heads, hidden = fields["num_attention_heads"], fields["hidden_size"]
        if fields.get("kv_channels", hidden // heads) * heads != hidden or fields.get("rotary_pct", 1.0) != 1.0:
            raise ConversionError(
                "unsupported architecture qwen: kv_channels * heads != hidden_size or rotary_pct != 1."
            )
        return Qwen2Config(
            vocab_size=fields["vocab_size"],
            hidden_size=hidden,
            intermediate_size=fields["intermediate_size"] // 2,  # the first Qwen's w1 / w2 are half as wide
            num_hidden_layers=fields["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=heads,
            rms_norm_eps=fields.get("layer_norm_epsilon", 1e-6),
            rope_theta=fields.get("rotary_emb_base", 10000.0),
            max_position_embeddings=fields.get("max_position_embeddings", fields.get("seq_length", 8192)),
            tie_word_embeddings=False,
            hidden_act="silu",
        )
    return AutoConfig.for_model(decoder, **fields)


def moe_settings_from_original(original: dict) -> dict:
    moe = original.get("moe")
    if not isinstance(moe, dict) or not moe.get("moe_layers_idx"):
        raise ConversionError("the config has no `moe` dict with `moe_layers_idx`: not an MoE-LLaVA checkpoint.")
    if moe.get("use_residual"):
        raise ConversionError("unsupported MoE layout: use_residual=True (residual MoE) has no hf-dare equivalent.")
    num_experts = moe.get("num_experts")
    counts = set(num_experts) if isinstance(num_experts, list) else {num_experts}
    if len(counts) != 1 or None in counts:
        raise ConversionError(
            f"unsupported MoE layout: num_experts={num_experts}; every MoE layer needs the same count."
        )
    return dict(
        num_experts=counts.pop(),
        moe_layers=list(moe["moe_layers_idx"]),
        num_experts_per_tok=moe.get("top_k_experts", 2),
        router="top_k",
        router_aux_loss_coef=moe.get("router_aux_loss_coef", 0.01),
        **deepspeed_gating_settings(moe),
    )


def deepspeed_gating_settings(moe: dict) -> dict:
    """The `top_k` router's options that make it train like the original's DeepSpeed gate (`moe` dict of its
    config; DeepSpeed's `MoE` defaults where a value is missing: capacity factors 1.0, min_capacity 4)."""
    return dict(
        second_expert_sampling=True,
        capacity_factor=float(moe.get("capacity_factor", 1.0)),
        eval_capacity_factor=float(moe.get("eval_capacity_factor", 1.0)),
        min_capacity=int(moe.get("min_capacity", 4)),
        aux_loss_fraction="top1",
        router_aux_loss_reduction="sum",
    )


def moellava_plan(reader: CheckpointReader, config: MoELlavaConfig, vocab_rows: int) -> list[PlannedTensor]:
    """The plan from the original's tensors (under `RENAMES`): routers copied, experts stacked, the first
    Qwen's fused qkv split, embeddings / LM head grown to `vocab_rows` when the image token is new."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q_rows, kv_rows = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    experts: dict[str, dict[int, dict[str, str]]] = {}
    plan = []
    for name in reader.names():
        if match := EXPERT.match(name):
            experts.setdefault(match.group(1), {}).setdefault(int(match.group(3)), {})[match.group(4)] = name
        elif match := GATE.match(name):
            plan.append(copy_of(reader, name, match.group(1) + "gate.weight"))
        elif match := FUSED_QKV.match(name):
            attn, kind = match.groups()
            bounds = {
                "q_proj": (0, q_rows),
                "k_proj": (q_rows, q_rows + kv_rows),
                "v_proj": (q_rows + kv_rows, q_rows + 2 * kv_rows),
            }
            plan += [rows_of(reader, name, f"{attn}{proj}.{kind}", *span) for proj, span in bounds.items()]
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")) and reader.shape(name)[0] < vocab_rows:
            plan.append(padded_rows(reader, name, name, vocab_rows))
        else:
            plan.append(copy_of(reader, name))
    for ffn, by_expert in experts.items():
        if sorted(by_expert) != list(range(config.num_experts)):
            raise ConversionError(
                f"missing tensor(s): {ffn}deepspeed_moe has experts {sorted(by_expert)}, expected 0..{config.num_experts - 1}."
            )
        for e, parts in sorted(by_expert.items()):
            missing = [p for p in ("gate_proj", "up_proj", "down_proj") if p not in parts]
            if missing:
                raise ConversionError(
                    f"missing tensor {ffn}deepspeed_moe.experts.deepspeed_experts.{e}.{missing[0]}.weight"
                )
        ordered = [by_expert[e] for e in range(config.num_experts)]
        plan.append(
            stacked_gate_up(reader, ffn + "experts.gate_up_proj", [(p["gate_proj"], p["up_proj"]) for p in ordered])
        )
        plan.append(stacked(reader, ffn + "experts.down_proj", [p["down_proj"] for p in ordered]))
    return plan


def vision_tower_plan(folder: Path, allow_pickle: bool) -> tuple[list[PlannedTensor], CheckpointReader]:
    """The vision tower's tensors from a CLIP / SigLIP checkpoint (full or vision-only), for originals that
    do not store them (MoE-LLaVA loads its tower from `mm_image_tower`)."""
    probe = CheckpointReader(folder, allow_pickle)
    full = any(n.startswith("vision_model.") for n in probe.names())
    rules = [(r"\.position_ids$", None)]
    rules += [(r"^(?!vision_model\.)", None), (r"^vision_model\.", "")] if full else []
    reader = CheckpointReader(folder, allow_pickle, rename_by_rules(rules))

    def external(name: str) -> PlannedTensor:
        return PlannedTensor(
            "model.vision_tower." + name, reader.shape(name), reader.dtype(name), (), lambda _: reader.get(name)
        )

    return [external(name) for name in reader.names()], reader


def check_projector(original: dict) -> None:
    projector = original.get("image_projector_type", original.get("mm_projector_type", "mlp2x_gelu"))
    if projector != "mlp2x_gelu":
        raise ConversionError(f"unsupported projector {projector!r}: only 'mlp2x_gelu' is supported.")


def vision_source(original: dict, vision: str | Path | None) -> str | Path:
    """Where the vision tower comes from: `vision` if given, else the original's `mm_image_tower`."""
    source = vision or original.get("mm_image_tower") or original.get("mm_vision_tower")
    if not source:
        raise ConversionError("no vision tower: the config has no mm_image_tower; pass --vision.")
    return source


def select_strategy(original: dict) -> str:
    """transformers' `vision_feature_select_strategy` for the original's `mm_vision_select_feature`."""
    select = original.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConversionError(f"unsupported mm_vision_select_feature {select!r}: allowed 'patch' or 'cls_patch'.")
    return "default" if select == "patch" else "full"


def load_tokenizer(folder: Path):
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - a tokenizer needing remote code, or none at all
        raise ConversionError(
            f"cannot load the tokenizer of {folder} without remote code ({type(error).__name__}); "
            "pass --tokenizer with a transformers-native tokenizer of the same vocabulary."
        ) from error


def moellava_config(
    original: dict, vision_config: PreTrainedConfig, image_token_id: int, strategy: str
) -> MoELlavaConfig:
    """hf-dare's config of the original: its decoder and MoE settings, the tower's config, and a vocabulary
    grown to hold `image_token_id`."""
    text_config = text_config_from_original(original)
    config = MoELlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=image_token_id,
        image_seq_length=image_tokens_per_image(vision_config, strategy),
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=bool(text_config.tie_word_embeddings),
        **moe_settings_from_original(original),
    )
    config.text_config.vocab_size = max(text_config.vocab_size, image_token_id + 1)
    if original.get("torch_dtype"):
        config.dtype = original["torch_dtype"]
    return config


def import_plan(
    src_dir: Path, vision_dir: Path, original: dict, config: MoELlavaConfig, allow_pickle: bool
) -> tuple[list[PlannedTensor], CheckpointReader, torch.nn.Module]:
    """The checked plan of the whole import (the tower from `vision_dir` when `src_dir` lacks it), the reader
    of `src_dir` and the target model on the meta device."""
    _, key_prefix = original_family(original)
    reader = CheckpointReader(src_dir, allow_pickle, rename_by_rules(RENAMES))
    if not any(n.startswith(key_prefix) or n.startswith("model.") for n in reader.names()):
        raise ConversionError(f"{src_dir}: no tensor under {key_prefix!r}; not an original MoE-LLaVA checkpoint.")
    plan = moellava_plan(reader, config, config.text_config.vocab_size)
    if not any(p.name.startswith("model.vision_tower.") for p in plan):
        vision_plan, _ = vision_tower_plan(vision_dir, allow_pickle)
        plan += vision_plan
    model = meta_model(config)
    expected, optional = expected_tensors(model)
    check_plan(plan, expected, f"MoELlavaForConditionalGeneration ({original['model_type']})", optional)
    return plan, reader, model


def import_notes(original: dict, config: MoELlavaConfig, vision_config: PreTrainedConfig) -> list[str]:
    """What the model card must say about an imported model: where it differs from the original's behaviour."""
    moe = original["moe"]
    notes = [
        DETERMINISTIC_NOTE,
        f"Original MoE settings: capacity_factor={moe.get('capacity_factor')}, "
        f"eval_capacity_factor={moe.get('eval_capacity_factor')}, min_capacity={moe.get('min_capacity')}, "
        f"router_aux_loss_coef={moe.get('router_aux_loss_coef')} (the same values in this config). Capacities "
        "count the real tokens of a batch; DeepSpeed counts padding tokens too (identical without padding).",
    ]
    if config.vision_feature_select_strategy == "default" and not has_cls_token(vision_config):
        notes.append(
            "As in the original (mm_vision_select_feature='patch'), the first token of the SigLIP tower's "
            f"output is dropped although SigLIP has no CLS token: {config.image_seq_length} image tokens "
            "per image, one patch fewer than the tower gives."
        )
    if original.get("image_aspect_ratio") == "pad":
        notes.append(
            "The original pads images to a square (mean colour) before the image processor "
            "(image_aspect_ratio='pad'); do the same for identical image features."
        )
    return notes


def import_moellava(
    src: str | Path,
    out: str | Path,
    vision: str | Path | None = None,
    tokenizer: str | Path | None = None,
    image_token: str = "<image>",
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Convert the original MoE-LLaVA checkpoint `src` into an hf-dare `MoELlavaConfig` checkpoint in `out`
    (`top_k` router, same experts and gates). `vision`: the CLIP / SigLIP folder or Hub id of the vision tower
    (default: the config's `mm_image_tower`), which gives the vision config and image processor, and the
    tower's weights when `src` lacks them. `tokenizer`: where to load the tokenizer from (default `src`).

    The `top_k` router trains as the original's DeepSpeed gate (Gumbel-sampled 2nd expert, capacities, top-1
    balancing loss summed over layers) and picks the 2nd expert deterministically at inference (see module doc)."""
    out = check_output_folder(out, overwrite)
    src_dir = resolve_source(src)
    original = read_config_dict(src_dir)
    original_family(original)
    check_projector(original)
    vision_dir = resolve_source(vision_source(original, vision))
    vision_config = vision_config_of(load_source_config(vision_dir), vision_dir)
    strategy = select_strategy(original)
    tok = load_tokenizer(resolve_source(tokenizer) if tokenizer else src_dir)
    image_token_id = add_image_token(tok, image_token)

    config = moellava_config(original, vision_config, image_token_id, strategy)
    plan, reader, model = import_plan(src_dir, vision_dir, original, config, allow_pickle)
    processor = llava_processor(
        AutoImageProcessor.from_pretrained(vision_dir), tok, vision_config, strategy, image_token
    )
    command = command_line("import-moellava", src, out) + (f" --vision {vision}" if vision else "")
    config.training_stages = [{"name": "import-moellava", "description": command}]
    with staged_output(out, overwrite) as staging:
        write_plan(in_reading_order(plan, reader), reader, staging, max_shard_size)
        save_config_and_code(config, model, staging)
        copy_side_files(src_dir, staging)
        processor.save_pretrained(staging)
        write_model_card(
            staging,
            config,
            made_from=f"{src} (original MoE-LLaVA, {original['model_type']})",
            how="import of the DeepSpeed MoE layers into hf-dare's MoE-LLaVA with the `top_k` router: the same "
            "experts and gates, decoder and vision tower renamed to transformers' layout",
            notes=import_notes(original, config, vision_config),
        )
    return out
