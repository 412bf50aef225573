"""hf-dare: difficulty-aware sparse MoE vision-language models (MoE-LLaVA with DARE / LTDR / Top-K routing)
for Hugging Face transformers.

Importing `hf_dare` registers the models with transformers' Auto classes; saved checkpoints carry their
own code and load with `trust_remote_code=True` where hf_dare is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from . import _renamed
from .calibration import calibrate
from .conversion.legacy import register_legacy_model_types
from .modeling import (
    DareRouter,
    DifficultyPredictor,
    LtdrRouter,
    MoEBlock,
    MoECausalLMConfig,
    MoEExperts,
    MoEForCausalLM,
    MoELlavaConfig,
    MoELlavaForConditionalGeneration,
    MoELlavaModel,
    MoEModel,
    MoEOutputWithPast,
    Routing,
    ThresholdTracker,
    TopKRouter,
    routing_statistics,
)

__version__ = "0.1.0"

# Namespaced model types (`hf_dare_*`): no upstream model can collide with them, so no `exist_ok`.
AutoConfig.register(MoECausalLMConfig.model_type, MoECausalLMConfig)
AutoModelForCausalLM.register(MoECausalLMConfig, MoEForCausalLM)
AutoModel.register(MoECausalLMConfig, MoEModel)
AutoConfig.register(MoELlavaConfig.model_type, MoELlavaConfig)
AutoModel.register(MoELlavaConfig, MoELlavaModel)
AutoModelForImageTextToText.register(MoELlavaConfig, MoELlavaForConditionalGeneration)
register_legacy_model_types()  # folders written with the old model types `moe_causal_lm` / `moe_llava`
_renamed.install()  # the modules that moved in 0.2, under their old names for one more release

# `save_pretrained` then writes the modeling code and an `auto_map` beside the weights.
MoECausalLMConfig.register_for_auto_class()
MoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MoELlavaConfig.register_for_auto_class()
MoELlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "DareRouter",
    "DifficultyPredictor",
    "LtdrRouter",
    "MoEBlock",
    "MoECausalLMConfig",
    "MoEExperts",
    "MoEForCausalLM",
    "MoELlavaConfig",
    "MoELlavaForConditionalGeneration",
    "MoELlavaModel",
    "MoEModel",
    "MoEOutputWithPast",
    "Routing",
    "ThresholdTracker",
    "TopKRouter",
    "calibrate",
    "routing_statistics",
]
