"""Training hf-dare's MoE models with the transformers `Trainer`: the routers' per-step state updates and the
routing metrics in the logs (`RoutingCallback`), a separate learning rate for the difficulty predictors, LLaVA-format data and the three stages."""

from .callbacks import (
    DareCallback,
    RoutingCallback,
    RoutingMetricsCallback,
    set_threshold_update_mode,
    unwrap_model,
)
from .data import LlavaDataCollator, conversation_to_messages, load_llava_dataset
from .metrics import RoutingMetrics, threshold_metrics
from .optim import create_optimizer, difficulty_predictor_param_groups, predictor_optimizer_cls_and_kwargs
from .provenance import record_training_stage
from .stages import STAGES, TrainingStage, apply_stage, get_stage
from .trainer import MoETrainer, MoETrainerMixin, MoETrainingArguments

__all__ = [
    "STAGES",
    "DareCallback",
    "LlavaDataCollator",
    "MoETrainer",
    "MoETrainerMixin",
    "MoETrainingArguments",
    "RoutingCallback",
    "RoutingMetrics",
    "RoutingMetricsCallback",
    "TrainingStage",
    "apply_stage",
    "conversation_to_messages",
    "create_optimizer",
    "difficulty_predictor_param_groups",
    "get_stage",
    "load_llava_dataset",
    "predictor_optimizer_cls_and_kwargs",
    "record_training_stage",
    "set_threshold_update_mode",
    "threshold_metrics",
    "unwrap_model",
]
