"""Training hf-dare's MoE models with the transformers `Trainer`: the routers' per-step state updates and the
routing metrics in the logs (`RoutingCallback`), a separate learning rate for the difficulty predictors, long-tailed
loss reweighting over answer tokens (`AnswerReweightingCallback`: DQRoute, CCAR), LLaVA-format data and the three
stages."""

from hf_dare.data import LlavaDataCollator, conversation_to_messages, load_llava_dataset

from .callbacks import (
    AnswerReweightingCallback,
    DareCallback,
    RoutingCallback,
    RoutingMetricsCallback,
    set_threshold_update_mode,
    unwrap_model,
)
from .metrics import RoutingMetrics, threshold_metrics
from .optim import create_optimizer, difficulty_predictor_param_groups, predictor_optimizer_cls_and_kwargs
from .provenance import record_training_stage
from .reweighting import AnswerReweighting, CCARWeights, DQRouteWeights, answer_reweighting, reweighted_loss
from .stages import STAGES, TrainingStage, apply_stage, get_stage
from .trainer import MoETrainer, MoETrainerMixin, MoETrainingArguments

__all__ = [
    "STAGES",
    "AnswerReweighting",
    "AnswerReweightingCallback",
    "CCARWeights",
    "DQRouteWeights",
    "DareCallback",
    "LlavaDataCollator",
    "MoETrainer",
    "MoETrainerMixin",
    "MoETrainingArguments",
    "RoutingCallback",
    "RoutingMetrics",
    "RoutingMetricsCallback",
    "TrainingStage",
    "answer_reweighting",
    "apply_stage",
    "conversation_to_messages",
    "create_optimizer",
    "difficulty_predictor_param_groups",
    "get_stage",
    "load_llava_dataset",
    "predictor_optimizer_cls_and_kwargs",
    "record_training_stage",
    "reweighted_loss",
    "set_threshold_update_mode",
    "threshold_metrics",
    "unwrap_model",
]
