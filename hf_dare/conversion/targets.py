"""What a converted checkpoint must look like: the target model's tensors (from the model built on the meta
device, so nothing is allocated), freshly initialised routers, and the config + modeling code files."""

from pathlib import Path

import torch
from transformers.dynamic_module_utils import custom_object_save

from ..modeling import MoECausalLMConfig, MoEConfigBase, MoEForCausalLM, MoELlavaForConditionalGeneration
from ..modeling.modeling_moe_llava import set_base_model_auto_map
from ..modeling.routing import ROUTER_CLASSES
from .checkpoint import ConversionError
from .plan import PlannedTensor, fresh, seeded

CODE_FILES = (
    "configuration_moe_llava.py",
    "modeling_moe_llava.py",
    "routing.py",
    "experts.py",
    "statistics.py",
    "model_card.py",
)


def model_class_for(config: MoEConfigBase) -> type:
    return MoEForCausalLM if isinstance(config, MoECausalLMConfig) else MoELlavaForConditionalGeneration


def meta_model(config: MoEConfigBase) -> torch.nn.Module:
    with torch.device("meta"):
        return model_class_for(config)(config)


def expected_tensors(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Names and shapes of the tensors the checkpoint of `model` holds, and those that may be absent
    (the LM head when tied to the input embeddings)."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = ["lm_head.weight"] if model.config.tie_word_embeddings else []
    return expected, optional


# Where the decoder's tensors live in the target checkpoints (both models: the base model's `language_model`).
TEXT_PREFIX = "model.language_model."


def router_plan(
    config: MoEConfigBase, layer_idx: int, dtype: torch.dtype, seed: int, anchor: str
) -> list[PlannedTensor]:
    """Freshly initialised router tensors of one MoE layer, as the model's own init does it: router and
    predictor weights normal(0, initializer_range), biases 0, the predictor's RMSNorm 1 (DARE with the `nll`
    proxy), DARE's thresholds at `config.initial_thresholds` (float32, like the buffer). The layer's router is
    `config.router_for(layer_idx)`; the baselines' routers (those with an `init_router_weights`: Top-p, ReMoE,
    DynMoE, MoE++) are initialised by that method (`baseline_router_plan`)."""
    text = config.text_config
    hidden = text.hidden_size
    std = getattr(text, "initializer_range", 0.02)
    p = f"{TEXT_PREFIX}layers.{layer_idx}.mlp.gate."
    router_class = ROUTER_CLASSES[config.router_for(layer_idx)]
    if hasattr(router_class, "init_router_weights"):
        return baseline_router_plan(router_class, config, p, dtype, seed, anchor, std)
    plan = [fresh(p + "weight", (config.num_experts, hidden), dtype, "normal", seed, anchor, std)]
    if config.router_for(layer_idx) == "dare":
        size = config.difficulty_predictor_size
        d = p + "difficulty_predictor."
        if config.difficulty_proxy == "nll":
            plan += [
                fresh(d + "norm.weight", (hidden,), dtype, "ones", seed, anchor),
                fresh(d + "up.weight", (size, hidden), dtype, "normal", seed, anchor, std),
                fresh(d + "up.bias", (size,), dtype, "zeros", seed, anchor),
                fresh(d + "down.weight", (1, size), dtype, "normal", seed, anchor, std),
                fresh(d + "down.bias", (1,), dtype, "zeros", seed, anchor),
            ]
        plan += [
            fresh(
                p + "threshold_tracker.thresholds",
                (len(config.initial_thresholds),),
                torch.float32,
                "values",
                seed,
                anchor,
                values=config.initial_thresholds,
            ),
        ]
    return plan


def baseline_router_plan(
    router_class: type, config: MoEConfigBase, prefix: str, dtype: torch.dtype, seed: int, anchor: str, std: float
) -> list[PlannedTensor]:
    """The tensors of a router initialised by its own `init_router_weights(std)` (small: experts x hidden at
    most), built once on the CPU with the global random stream seeded by (`seed`, `prefix`). Parameters take
    `dtype`; floating buffers (ReMoE's `l1_coef`) keep their own dtype, as in the model."""
    router = router_class(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeded(seed, prefix))
        router.init_router_weights(std)
    parameters = {name for name, _ in router.named_parameters()}
    plan = []
    for name, tensor in router.state_dict().items():
        tensor = tensor.detach().to(dtype) if name in parameters else tensor.detach().clone()
        plan.append(PlannedTensor(prefix + name, tuple(tensor.shape), tensor.dtype, (), _constant(tensor), anchor))
    return plan


def _constant(tensor: torch.Tensor):
    return lambda inputs: tensor


def save_config_and_code(config: MoEConfigBase, model: torch.nn.Module, folder: Path) -> None:
    """config.json with `auto_map`, and the modeling code files beside it (what `save_pretrained` writes
    besides the weights)."""
    config.architectures = [type(model).__name__]
    set_base_model_auto_map(model, config)  # auto_map["AutoModel"], as save_pretrained writes it
    custom_object_save(model, folder, config=config)
    config.save_pretrained(folder)
    missing = [name for name in CODE_FILES if not (folder / name).is_file()]
    if missing:
        raise ConversionError(f"the modeling code files {missing} were not written; is hf_dare imported?")
