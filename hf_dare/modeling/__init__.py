"""The model code that ships inside every checkpoint (`trust_remote_code`): torch and transformers only."""

from .configuration_moe import MoECausalLMConfig, MoEConfigBase, MoEConfigError, MoELlavaConfig
from .modeling_moe import (
    MoEBlock,
    MoEExperts,
    MoEForCausalLM,
    MoELlavaForConditionalGeneration,
    MoELlavaModel,
    MoEModel,
    MoEOutputWithPast,
    MoEPreTrainedModel,
    model_class_for,
)
from .routers import (
    DareRouter,
    DifficultyPredictor,
    DynMoERouter,
    LtdrRouter,
    MoEPlusPlusRouter,
    ReMoERouter,
    ThresholdTracker,
    TopKRouter,
    TopPRouter,
)
from .routing import ROUTERS, Dial, Router, Routing, Setting
from .statistics import avg_k, avg_k_per_layer, avg_k_sums, expert_load, load_cv, routing_statistics

__all__ = [
    "ROUTERS",
    "DareRouter",
    "Dial",
    "DifficultyPredictor",
    "DynMoERouter",
    "LtdrRouter",
    "MoEBlock",
    "MoECausalLMConfig",
    "MoEConfigBase",
    "MoEConfigError",
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
    "Router",
    "Routing",
    "Setting",
    "ThresholdTracker",
    "TopKRouter",
    "TopPRouter",
    "avg_k",
    "avg_k_per_layer",
    "avg_k_sums",
    "expert_load",
    "load_cv",
    "model_class_for",
    "routing_statistics",
]
