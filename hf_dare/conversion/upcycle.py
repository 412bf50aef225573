"""Upcycling: a dense decoder (or a dense transformers LLaVA built on one) becomes an MoE checkpoint whose
experts are exact copies of each MoE layer's dense FFN and whose routers are new.

With identical experts and routing weights that sum to 1 per token, the upcycled model computes what the
dense model did, whatever the router (MoE-LLaVA's sparse upcycling).
"""

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedConfig

from ..modeling import MoECausalLMConfig, MoEConfigBase, MoELlavaConfig
from ..modeling.routing import ROUTERS, router_settings
from .checkpoint import CheckpointReader, ConversionError, copy_side_files, rename_by_rules, resolve_source
from .plan import (
    PlannedTensor,
    check_plan,
    copy_of,
    in_reading_order,
    seeded,
    stacked,
    stacked_gate_up,
    with_redrawn_channels,
)
from .sources import (
    FFN_NAMES,
    check_gated_ffn_decoder,
    load_source_config,
)
from .targets import TEXT_PREFIX, expected_tensors, meta_model, router_plan, save_config_and_code
from .writer import check_output_folder, command_line, staged_output, write_model_card, write_plan

# Buffers some older checkpoints carry and no model loads.
DROPPED_KEYS = [(r"\.rotary_emb\.inv_freq$", None), (r"\.embeddings\.position_ids$", None)]
# transformers' legacy LLaVA layout (what `LlavaForConditionalGeneration.save_pretrained` still writes) ->
# the runtime layout our MoE-LLaVA uses.
LLAVA_RENAMES = DROPPED_KEYS + [
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^model\.vision_tower\.vision_model\.", "model.vision_tower."),
]
# A dense causal LM's decoder (`model.*`) -> the MoE causal LM's, in its base model's `language_model`.
CAUSAL_LM_RENAMES = DROPPED_KEYS + [(r"^model\.", TEXT_PREFIX)]


def moe_config_for(source_config: PreTrainedConfig, **moe_settings) -> MoEConfigBase:
    """The MoE config of an upcycled `source_config` (a causal LM's config or a transformers `LlavaConfig`)."""
    model_type = source_config.model_type
    if model_type in (MoECausalLMConfig.model_type, MoELlavaConfig.model_type):
        raise ConversionError(f"the source is already an MoE checkpoint ({model_type}); upcycle a dense one.")
    if model_type == "llava":
        check_gated_ffn_decoder(source_config.text_config)
        config = MoELlavaConfig(
            text_config=source_config.text_config,
            vision_config=source_config.vision_config,
            image_token_id=source_config.image_token_id,
            image_seq_length=source_config.image_seq_length,
            projector_hidden_act=source_config.projector_hidden_act,
            multimodal_projector_bias=source_config.multimodal_projector_bias,
            vision_feature_select_strategy=source_config.vision_feature_select_strategy,
            vision_feature_layer=source_config.vision_feature_layer,
            tie_word_embeddings=bool(getattr(source_config, "tie_word_embeddings", False)),
            **moe_settings,
        )
    else:
        check_gated_ffn_decoder(source_config)
        config = MoECausalLMConfig(text_config=source_config, **moe_settings)
    dtype = getattr(source_config, "dtype", None)
    if dtype is not None:
        config.dtype = dtype
    return config


def drop_upcycling_channels(intermediate: int, num_experts: int, ratio: float, seed: int, layer_idx: int) -> list:
    """The intermediate channels each expert of MoE layer `layer_idx` redraws under Drop-Upcycling: a random
    subset of round(ratio * intermediate) channels per expert (its own subset), seeded by (`seed`, layer, expert)."""
    count = round(ratio * intermediate)
    chosen = []
    for e in range(num_experts):
        generator = torch.Generator().manual_seed(seeded(seed, f"drop-upcycling.layer{layer_idx}.expert{e}"))
        chosen.append(torch.randperm(intermediate, generator=generator)[:count].sort().values)
    return chosen


def upcycle_plan(
    reader: CheckpointReader, config: MoEConfigBase, seed: int = 0, drop_upcycling: float = 0.0
) -> list[PlannedTensor]:
    """Every input tensor copied, except the FFNs of `config.moe_layers`, which become E stacked experts and a
    new router. With `drop_upcycling` r > 0, each expert redraws a random fraction r of its intermediate channels
    (Drop-Upcycling, `with_redrawn_channels`). Raises `ConversionError` naming a missing FFN tensor or one that
    fits nowhere."""
    moe_ffn = re.compile(rf"^{re.escape(TEXT_PREFIX)}layers\.(\d+)\.mlp\.({'|'.join(FFN_NAMES)})\.weight$")
    moe_layers = set(config.moe_layers)
    plan = []
    for name in reader.names():
        match = moe_ffn.match(name)
        if not (match and int(match.group(1)) in moe_layers):
            plan.append(copy_of(reader, name))
    for layer_idx in config.moe_layers:
        ffn = f"{TEXT_PREFIX}layers.{layer_idx}.mlp."
        gate, up, down = (ffn + n + ".weight" for n in FFN_NAMES)
        for source in (gate, up, down):
            if source not in reader:
                raise ConversionError(
                    f"missing tensor {source} in {reader.folder} (the dense FFN of MoE layer {layer_idx})."
                )
        experts = config.num_experts
        gate_up_proj = stacked_gate_up(reader, ffn + "experts.gate_up_proj", [(gate, up)] * experts)
        down_proj = stacked(reader, ffn + "experts.down_proj", [down] * experts)
        if drop_upcycling > 0:
            channels = drop_upcycling_channels(reader.shape(gate)[0], experts, drop_upcycling, seed, layer_idx)
            gate_up_proj = with_redrawn_channels(gate_up_proj, channels, axis=0, parts=2, seed=seed)
            down_proj = with_redrawn_channels(down_proj, channels, axis=1, parts=1, seed=seed)
        plan += [gate_up_proj, down_proj]
        plan += router_plan(config, layer_idx, reader.dtype(gate), seed, anchor=down)
    return plan


def layer_routers(
    moe_layers: Sequence[int], router: str, router_layers: Sequence[int | range], other_router: str = "top_k"
) -> dict[int, str]:
    """{MoE layer: router}: `router` on the MoE layers in `router_layers`, `other_router` on the others.

    `router_layers` holds layer indices, each an MoE layer, and ranges, each selecting the MoE layers within it
    (`range(2, 27)`, the CLI's `2-26`: the DARE paper's layers 2-26 of an every-other-layer MoE model)."""
    chosen = set()
    for item in router_layers:
        if isinstance(item, range):
            inside = [i for i in moe_layers if i in item]
            if not inside:
                raise ConversionError(
                    f"router_layers: {item.start}-{item.stop - 1} holds no MoE layer (moe_layers={list(moe_layers)})."
                )
            chosen.update(inside)
        elif item not in moe_layers:
            raise ConversionError(f"router_layers: layer {item} is not an MoE layer (moe_layers={list(moe_layers)}).")
        else:
            chosen.add(item)
    return {i: router if i in chosen else other_router for i in moe_layers}


def _router_arguments(config: MoEConfigBase) -> list:
    """`--router` (and `--router-layers` / `--other-router` for a router per layer) of `config`."""
    by_name: dict[str, list[int]] = {}
    for layer_idx, name in config.routers.items():
        by_name.setdefault(name, []).append(layer_idx)
    if len(by_name) == 1:
        return ["--router", next(iter(by_name))]
    if len(by_name) == 2:
        other = "top_k" if "top_k" in by_name else config.router_for(config.moe_layers[0])
        (router, layers), *_ = [(name, layers) for name, layers in by_name.items() if name != other]
        return ["--router", router, "--router-layers", ",".join(map(str, layers)), "--other-router", other]
    # More than two routers: one per layer.
    return ["--router", ",".join(f"{i}:{name}" for i, name in config.routers.items())]


# MoE config fields that `hf-dare upcycle --set FIELD=VALUE` gives: all but those the source checkpoint and the
# command's own options decide, and those hf-dare records itself.
_DECIDED = ("text_config", "tie_word_embeddings", "num_experts", "moe_layers", "router", "num_experts_per_tok",
            "target_distribution", "difficulty_proxy")  # fmt: skip
_RECORDED = ("training_stages", "routing_statistics", "moe_config_version")


def settable_fields() -> tuple[str, ...]:
    """The MoE config fields `--set` gives: the generic ones and every registered router's settings."""
    fields = [*MoEConfigBase.__annotations__, *router_settings()]
    return tuple(name for name in fields if name not in _DECIDED + _RECORDED)


def upcycle_command(src: str | Path, out: Path, config: MoEConfigBase, seed: int, drop_upcycling: float = 0.0) -> str:
    """The `hf-dare upcycle` command that gives `config` (recorded in its `training_stages`)."""
    experts, top_k = config.num_experts, config.num_experts_per_tok
    command = command_line("upcycle", src, out, "--experts", experts, *_router_arguments(config), "--top-k", top_k)
    command += f" --moe-layers {','.join(map(str, config.moe_layers))} --seed {seed}"
    if drop_upcycling:
        command += f" --drop-upcycling {drop_upcycling}"
    if config.uses_router("dare"):
        command += f" --target-distribution {','.join(map(str, config.target_distribution))}"
        if config.difficulty_proxy != "nll":
            command += f" --difficulty-proxy {config.difficulty_proxy}"
    # `--set` for every other field that differs from what the options above alone give (derived fields included).
    plain = type(config)(**{name: getattr(config, name) for name in _DECIDED})
    for field in settable_fields():
        value = getattr(config, field)
        if value != getattr(plain, field):
            command += f" --set {field}={json.dumps(value, separators=(',', ':'))}"
    return command


def upcycle(
    src: str | Path,
    out: str | Path,
    num_experts: int = 4,
    router: str | dict[int, str] = "dare",
    moe_layers: Sequence[int] | None = None,
    target_distribution: Sequence[float] | None = None,
    top_k: int = 2,
    seed: int = 0,
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_shard_size: int | str = "2GB",
    router_layers: Sequence[int | range] | None = None,
    other_router: str = "top_k",
    measure_gap: bool | None = None,
    drop_upcycling: float = 0.0,
    **moe_settings,
) -> Path:
    """Upcycle the dense checkpoint `src` (folder or Hub id; a causal LM, or a transformers LLaVA) into an
    MoE checkpoint in `out`: an `MoECausalLMConfig` / `MoELlavaConfig` checkpoint whose MoE layers' experts
    are copies of the dense FFN and whose routers are initialised from `seed`. Streams tensor by tensor.

    `router`: one router for every MoE layer, or a dict {MoE layer: router}. With `router_layers` (MoE layer
    indices and ranges, see `layer_routers`) only those MoE layers use `router`, the others `other_router`.
    Extra keyword arguments are further MoE config fields (e.g. `initial_thresholds`). `measure_gap`: compare the
    upcycled model's logits with the dense model's on a probe and state the gap in the model card (`dense_gap`;
    default: for models up to `GAP_PROBE_MAX_PARAMETERS`). `drop_upcycling` (0 <= r < 1, default 0: the experts
    are exact copies): each expert redraws a random fraction r of its intermediate channels from the dense
    weights' statistics (Drop-Upcycling, Nakamura et al. 2025), so the experts start apart. Returns `out`."""
    if not (isinstance(drop_upcycling, (int, float)) and 0.0 <= drop_upcycling < 1.0):
        raise ConversionError(f"drop_upcycling: got {drop_upcycling!r}; allowed: 0 <= r < 1.")
    out = check_output_folder(out, overwrite)
    src_dir = resolve_source(src)
    source_config = load_source_config(src_dir)
    settings = dict(
        num_experts=num_experts,
        router=router,
        moe_layers=list(moe_layers) if moe_layers is not None else None,
        num_experts_per_tok=top_k,
        **moe_settings,
    )
    if target_distribution is not None:
        settings["target_distribution"] = list(target_distribution)
    if router_layers is not None:
        if not isinstance(router, str):
            raise ConversionError("router_layers needs `router` to be one router name, not a dict.")
        layout = moe_config_for(source_config, num_experts=num_experts, moe_layers=settings["moe_layers"])
        settings["router"] = layer_routers(layout.moe_layers, router, router_layers, other_router)
    config = moe_config_for(source_config, **settings)
    is_llava = isinstance(config, MoELlavaConfig)
    reader = CheckpointReader(src_dir, allow_pickle, rename_by_rules(LLAVA_RENAMES if is_llava else CAUSAL_LM_RENAMES))
    plan = upcycle_plan(reader, config, seed, drop_upcycling)
    model = meta_model(config)
    expected, optional = expected_tensors(model)
    check_plan(plan, expected, type(model).__name__ + f" ({config.decoder_model_type})", optional)

    previous_stages = getattr(source_config, "training_stages", None) or []
    config.training_stages = [
        *previous_stages,
        {"name": "upcycle", "description": upcycle_command(src, out, config, seed, drop_upcycling)},
    ]
    with staged_output(out, overwrite) as staging:
        write_plan(in_reading_order(plan, reader), reader, staging, max_shard_size)
        save_config_and_code(config, model, staging)
        copy_side_files(src_dir, staging)
        notes = [
            f"Until the routers are trained, `{name}` (layers {', '.join(map(str, layers))}): "
            f"{ROUTERS[name].upcycling_note(config)}."
            for name, layers in config.layers_by_router.items()
        ]
        if drop_upcycling:
            notes.insert(
                0,
                f"Drop-Upcycling: each expert redrew a random {drop_upcycling:g} of its intermediate channels from "
                "the dense weights' statistics, so the experts are not copies and the model does not compute what "
                "the dense one did.",
            )
        if measure_gap is None:
            measure_gap = reader.num_elements() <= GAP_PROBE_MAX_PARAMETERS
        if measure_gap:
            gap = dense_gap(src_dir, staging, config)
            notes.append(
                f"Measured after upcycling, on {GAP_PROBE_SHAPE[0]} x {GAP_PROBE_SHAPE[1]} random text tokens: largest "
                f"|logit difference| to the dense model {gap['max_abs']:.3g}, relative RMS difference "
                f"{gap['relative_rms']:.3g}."
            )
        else:
            notes.append(
                "The upcycled model's difference to the dense one was not measured (`measure_gap=True` does)."
            )
        write_model_card(
            staging,
            config,
            made_from=str(src),
            how=f"sparse upcycling: each MoE layer's {num_experts} experts are copies of the dense FFN, "
            f"the routers ({config.router_description}) are newly initialised (seed {seed}); every other tensor is "
            "copied unchanged",
            notes=notes,
        )
    return out


# The probe `upcycle` runs by default on models up to this size: it holds both models in memory (the conversion
# itself holds about one shard), one forward each.
GAP_PROBE_MAX_PARAMETERS = 20_000_000
GAP_PROBE_SHAPE = (2, 32)


@torch.no_grad()
def dense_gap(dense_dir: Path, moe_dir: Path, config: MoEConfigBase) -> dict[str, float]:
    """How far the upcycled model in `moe_dir` is from the dense model in `dense_dir` before any training: the
    largest absolute and the relative RMS difference of their logits on `GAP_PROBE_SHAPE` random text tokens
    (seeded; no images), both in float32 and eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from ..modeling import MoELlavaConfig as _LlavaConfig  # noqa: N814

    auto = AutoModelForImageTextToText if isinstance(config, _LlavaConfig) else AutoModelForCausalLM
    dense = auto.from_pretrained(dense_dir, dtype=torch.float32).eval()
    moe = auto.from_pretrained(moe_dir, dtype=torch.float32).eval()
    text = config.text_config
    low = max(getattr(text, "bos_token_id", None) or 0, getattr(config, "image_token_id", -1) or 0) + 1
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(low, text.vocab_size, GAP_PROBE_SHAPE, generator=generator)
    reference, upcycled = dense(input_ids=input_ids).logits, moe(input_ids=input_ids).logits
    difference = upcycled - reference
    return {
        "max_abs": difference.abs().max().item(),
        "relative_rms": (difference.pow(2).mean() / reference.pow(2).mean().clamp(min=1e-12)).sqrt().item(),
    }
