"""Optimizer parameter groups giving DARE's difficulty predictors their own learning rate (paper: 1e-4 for the
predictors vs 2e-5 for the backbone)."""

from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import get_parameter_names

PREDICTOR_PATTERN = "difficulty_predictor."
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def is_predictor_parameter(name: str) -> bool:
    return PREDICTOR_PATTERN in name


def difficulty_predictor_param_groups(
    model: nn.Module, lr: float, predictor_lr: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Trainable parameters in up to four groups: {backbone, predictor} x {decay, no decay} (no decay for
    biases and norms, as the Trainer does), each group with its own `lr`. Empty groups are left out."""
    decay = set(get_parameter_names(model, [nn.LayerNorm, nn.RMSNorm], NO_DECAY_PATTERNS))
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((is_predictor_parameter(name), name in decay), []).append(param)
    return [
        {
            "params": params,
            "lr": predictor_lr if predictor else lr,
            "weight_decay": weight_decay if with_decay else 0.0,
        }
        for (predictor, with_decay), params in sorted(groups.items())
    ]


def predictor_optimizer_cls_and_kwargs(
    model: nn.Module, args: TrainingArguments, predictor_lr: float
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """`(optimizer_cls, kwargs)` for `Trainer(optimizer_cls_and_kwargs=...)`: the optimizer `args.optim`
    names, over `difficulty_predictor_param_groups` (passed as `kwargs["params"]`, which the Trainer uses)."""
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    groups = difficulty_predictor_param_groups(model, args.learning_rate, predictor_lr, args.weight_decay)
    return optimizer_cls, {**kwargs, "params": groups}


def create_optimizer(model: nn.Module, args: TrainingArguments, predictor_lr: float) -> torch.optim.Optimizer:
    """The optimizer `args.optim` names over `difficulty_predictor_param_groups`, e.g. for
    `Trainer(optimizers=(optimizer, None))` or a custom training loop."""
    optimizer_cls, kwargs = predictor_optimizer_cls_and_kwargs(model, args, predictor_lr)
    return optimizer_cls(kwargs.pop("params"), **kwargs)
