"""The model code that ships inside every checkpoint (`trust_remote_code`): torch and transformers only."""

from .configuration_moe_llava import MoECausalLMConfig, MoEConfigBase, MoELlavaConfig
from .modeling_moe_llava import (
    MoEBlock,
    MoEExperts,
    MoEForCausalLM,
    MoELlavaForConditionalGeneration,
    MoELlavaModel,
    MoEOutputWithPast,
    MoEPreTrainedModel,
)
from .routing import DareRouter, DifficultyPredictor, LtdrRouter, Routing, ThresholdTracker, TopKRouter
from .statistics import avg_k, avg_k_per_layer, avg_k_sums, expert_load, load_cv, routing_statistics

__all__ = [
    "DareRouter",
    "DifficultyPredictor",
    "LtdrRouter",
    "MoEBlock",
    "MoECausalLMConfig",
    "MoEConfigBase",
    "MoEExperts",
    "MoEForCausalLM",
    "MoELlavaConfig",
    "MoELlavaForConditionalGeneration",
    "MoELlavaModel",
    "MoEOutputWithPast",
    "MoEPreTrainedModel",
    "Routing",
    "ThresholdTracker",
    "TopKRouter",
    "avg_k",
    "avg_k_per_layer",
    "avg_k_sums",
    "expert_load",
    "load_cv",
    "routing_statistics",
]
