"""The model code that ships inside every checkpoint (`trust_remote_code`): torch and transformers only."""

from .configuration_moe_llava import MoECausalLMConfig, MoEConfigBase, MoELlavaConfig
from .modeling_moe_llava import (
    MoEBlock,
    MoEExperts,
    MoEForCausalLM,
    MoELlavaForConditionalGeneration,
    MoELlavaModel,
    MoEModel,
    MoEOutputWithPast,
    MoEPreTrainedModel,
)
from .routing import (
    DareRouter,
    DifficultyPredictor,
    DynMoERouter,
    LtdrRouter,
    MoEPlusPlusRouter,
    ReMoERouter,
    Routing,
    ThresholdTracker,
    TopKRouter,
    TopPRouter,
)
from .statistics import avg_k, avg_k_per_layer, avg_k_sums, expert_load, load_cv, routing_statistics

__all__ = [
    "DareRouter",
    "DifficultyPredictor",
    "DynMoERouter",
    "LtdrRouter",
    "MoEBlock",
    "MoECausalLMConfig",
    "MoEConfigBase",
    "MoEExperts",
    "MoEForCausalLM",
    "MoELlavaConfig",
    "MoELlavaForConditionalGeneration",
    "MoELlavaModel",
    "MoEModel",
    "MoEOutputWithPast",
    "MoEPlusPlusRouter",
    "MoEPreTrainedModel",
    "ReMoERouter",
    "Routing",
    "ThresholdTracker",
    "TopKRouter",
    "TopPRouter",
    "avg_k",
    "avg_k_per_layer",
    "avg_k_sums",
    "expert_load",
    "load_cv",
    "routing_statistics",
]
