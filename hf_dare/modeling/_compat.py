"""Every difference between the transformers (and torch) releases that hf-dare's model code meets, in one place.

This file travels with every checkpoint, whose code runs on every transformers 5.x (5.0.0 to the newest) and
must keep working on the releases to come. No other file of hf-dare tests the transformers version or probes
for something some releases lack: they use the names below. Each shim says which releases need it and why.
Where a feature can be probed exactly, it is probed rather than compared with a version number, so a
pre-release behaves as what it contains.

One difference cannot live here: transformers < 5.19 copies into its module cache only the files that the
auto_map's file (`configuration_moe.py`, `modeling_moe.py`) imports directly in the form `from .x import y`
(not `from . import x`), not what those import in turn. Both files therefore import every file of this package
they need in that form (checked by a test).
"""

import dataclasses
from contextvars import ContextVar

import torch
import torch.nn.functional as F
import transformers

TRANSFORMERS_VERSION = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
if TRANSFORMERS_VERSION[0] != 5:
    raise ImportError(f"This model's code needs transformers >= 5.0, < 6 (found {transformers.__version__}).")

from transformers import PreTrainedModel  # noqa: E402
from transformers.configuration_utils import PreTrainedConfig  # noqa: E402
from transformers.modeling_outputs import MoeCausalLMOutputWithPast  # noqa: E402
from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast  # noqa: E402

# --- Configurations ---------------------------------------------------------------------------------------------

# transformers < 5.20 has no `SubConfigSpec` / `sub_configs_defaults`: this stand-in carries the default model
# types, and `MoEConfigBase` builds the sub-configs itself and declares them in `sub_configs`.
NATIVE_SUB_CONFIG_SPECS = hasattr(PreTrainedConfig, "sub_configs_defaults")
try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.20

    @dataclasses.dataclass
    class SubConfigSpec:
        config_class: type
        model_type: str


# transformers < 5.4: configs are plain classes, not dataclasses; `MoEConfigBase` gets the `__init__` that the
# dataclass would generate.
DATACLASS_CONFIGS = dataclasses.is_dataclass(PreTrainedConfig)

# --- The routing context of a forward ---------------------------------------------------------------------------


def context_var(name: str):
    """A context variable that defaults to None: transformers' `CompileableContextVar` (>= 5.2), which
    `torch.compile` can trace, else the standard library's. 5.2 and 5.3's take the default as an argument,
    later releases' always default to None."""
    try:
        from transformers.utils.output_capturing import CompileableContextVar
    except ImportError:  # transformers < 5.2
        return ContextVar(name, default=None)
    try:
        return CompileableContextVar(name, default=None)
    except TypeError:  # transformers >= 5.4
        return CompileableContextVar(name)


# --- Vision towers ----------------------------------------------------------------------------------------------

# transformers < 5.6: CLIP / SigLIP vision towers hold their modules under a `vision_model` submodule, which
# 5.6 removed; checkpoints are written without that level.
VISION_TOWERS_HAVE_VISION_MODEL_LEVEL = TRANSFORMERS_VERSION < (5, 6)


def register_vision_model_level(model_type: str) -> None:
    """On transformers < 5.6: add the `vision_model.` level to the towers' weights when loading a `model_type`
    checkpoint (transformers reverses the mapping when saving). A no-op on later releases."""
    if not VISION_TOWERS_HAVE_VISION_MODEL_LEVEL:
        return
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    register_checkpoint_conversion_mapping(
        model_type,
        [
            # No escapes or lookarounds: transformers reverses these patterns as plain text when saving.
            WeightRenaming(
                r"^model.vision_tower.(embeddings|encoder|pre_layrnorm|post_layernorm|head).",
                r"model.vision_tower.vision_model.\1.",
            )
        ],
        overwrite=True,
    )


def image_features(outputs: LlavaModelOutputWithPast):
    """The projected image features of a `LlavaModel` forward, (image tokens, H), or None without images.

    transformers < 5.24 returns them as `image_hidden_states`; 5.24 made that a deprecated property (failing on
    forwards without images) and returns them, one tensor per image, as `image_outputs.pooler_output`."""
    if "image_outputs" not in LlavaModelOutputWithPast.__dataclass_fields__:  # transformers < 5.24
        return outputs.image_hidden_states
    if outputs.image_outputs is None:
        return None
    pooled = outputs.image_outputs.pooler_output
    return pooled if not isinstance(pooled, (list, tuple)) else torch.cat(pooled)


# --- The cache argument -----------------------------------------------------------------------------------------

# transformers 5.25 renamed the cache argument and output field `past_key_values` to `cache` (the old name warns
# and goes in 5.40). The models take the cache under the installed release's name, in `**kwargs`, and hand it
# on; their outputs carry it in the release's field.
CACHE_ARGUMENT = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(outputs):
    """The cache of a decoder's output, under the installed release's field name."""
    return getattr(outputs, CACHE_ARGUMENT)


# --- Models -----------------------------------------------------------------------------------------------------

# From 5.7 transformers checks an experts implementation's name against its experts interface, where hf-dare's
# kernels are registered; before, only against its own names (`eager`, `grouped_mm`, `batched_mm`).
EXPERTS_INTERFACE_NAMES_KERNELS = TRANSFORMERS_VERSION >= (5, 7)

# transformers < 5.23 has `gradient_checkpointing_enable` only (its Trainer calls that); 5.23 added
# `activation_checkpointing_enable` and made the other its alias.
ACTIVATION_CHECKPOINTING_ENABLE = (
    "activation_checkpointing_enable"
    if hasattr(PreTrainedModel, "activation_checkpointing_enable")
    else "gradient_checkpointing_enable"
)

# torch < 2.10 has no `grouped_mm` (hf-dare's `hf_dare_grouped_mm` kernel falls back to the sort-based loop).
grouped_mm = getattr(F, "grouped_mm", None)
