"""What a converted checkpoint must look like: the target model's tensors (from the model built on the meta
device, so nothing is allocated), freshly initialised routers, and the config + modeling code files."""

from pathlib import Path

import torch
from transformers.dynamic_module_utils import custom_object_save

from ..modeling import MoEConfigBase, model_class_for
from ..modeling.modeling_moe import set_base_model_auto_map
from ..modeling.routing import ROUTERS
from .checkpoint import ConversionError
from .plan import PlannedTensor, seeded

CODE_FILES = (
    "configuration_moe.py",
    "modeling_moe.py",
    "routing.py",
    "routers.py",
    "experts.py",
    "statistics.py",
    "model_card.py",
    "_compat.py",
)


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
    """The freshly initialised tensors of MoE layer `layer_idx`'s router (`config.router_for(layer_idx)`): the
    router is built (small: experts x hidden, and DARE's predictor) and initialised by its own `init_upcycled`
    (a new model's init, or one closer to the dense function), with the global random stream seeded by (`seed`,
    the layer's prefix). Parameters
    take `dtype`; floating buffers (DARE's thresholds, ReMoE's `l1_coef`) keep their own dtype, as in the model."""
    prefix = f"{TEXT_PREFIX}layers.{layer_idx}.mlp.gate."
    router = ROUTERS[config.router_for(layer_idx)](config, layer_idx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeded(seed, prefix))
        router.init_upcycled(getattr(config.text_config, "initializer_range", 0.02))
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
