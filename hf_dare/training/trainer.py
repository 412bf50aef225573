"""`MoETrainer`: the transformers `Trainer` for MoE models, with DARE's threshold updates, routing metrics in the
logs, a separate learning rate for the difficulty predictors and routing losses scaled right under gradient
accumulation and data parallelism."""

import inspect
from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from .callbacks import DareCallback, unwrap_model
from .metrics import RoutingMetrics, threshold_metrics
from .optim import predictor_optimizer_cls_and_kwargs

# `MoEOutputWithPast` fields that are statistics, not predictions: left out of what evaluation gathers.
NON_PREDICTION_OUTPUT_KEYS = [
    "ce_loss",
    "difficulty_loss",
    "aux_loss",
    "expert_counts",
    "expert_load",
    "difficulty",
    "token_mask",
    "vision_mask",
    "image_hidden_states",
    "past_key_values",
]


@dataclass
class MoETrainingArguments(TrainingArguments):
    """`TrainingArguments` plus DARE's options (also parsable with `HfArgumentParser`)."""

    predictor_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of DARE's difficulty predictors (paper: 1e-4); None: `learning_rate`."},
    )
    per_batch_thresholds: bool | None = field(
        default=None,
        metadata={
            "help": "Set DARE's thresholds to each step's quantiles (ablation) instead of the EMA; None: config."
        },
    )


class MoETrainerMixin:
    """Mix into any `Trainer` subclass (e.g. `class MoESFTTrainer(MoETrainerMixin, SFTTrainer)`).

    - adds a `DareCallback` (thresholds move once per optimizer step) unless one is given;
    - records every forward's losses and routing statistics and merges their averages into the training
      logs (`loss/ce`, `loss/difficulty`, `loss/aux`, `routing/*`, see `RoutingMetrics`) and the
      evaluation metrics (`eval_routing/*`), so they reach `state.log_history` and every `report_to`;
    - with `args.predictor_learning_rate`, the difficulty predictors get their own learning rate;
    - when the model normalises its CE by `num_items_in_batch` (the Trainer's default for models taking
      loss kwargs), the Trainer neither divides the loss by the gradient-accumulation steps nor keeps it
      from being multiplied by the number of processes; the routing losses (alpha * L_diff + beta * L_lb,
      per-batch means) are rescaled here so they count once per optimizer step, as on one device.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        core = unwrap_model(self.model)
        has_dare_callback = any(isinstance(cb, DareCallback) for cb in self.callback_handler.callbacks)
        if hasattr(core, "update_difficulty_thresholds") and not has_dare_callback:
            self.add_callback(DareCallback(per_batch=getattr(self.args, "per_batch_thresholds", None)))
        self.train_routing_metrics = RoutingMetrics.for_model(core)
        self.eval_routing_metrics = RoutingMetrics.for_model(core)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        normalised = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss = self._rescale_routing_losses(loss, outputs, normalised, training=model.training)
        metrics = self.train_routing_metrics if model.training else self.eval_routing_metrics
        metrics.update(outputs, labels, num_items_in_batch if normalised else None)
        return (loss, outputs) if return_outputs else loss

    def _rescale_routing_losses(self, loss, outputs, normalised: bool, training: bool):
        config = getattr(unwrap_model(self.model), "config", None)
        if not normalised or getattr(outputs, "ce_loss", None) is None or config is None:
            return loss
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return loss  # the loss is not the model's
        # The model's loss is CE + alpha * L_diff + beta * L_lb; the Trainer multiplied all of it by `scale`.
        regulariser = 0.0
        if getattr(outputs, "difficulty_loss", None) is not None:
            regulariser = regulariser + config.difficulty_loss_coef * outputs.difficulty_loss
        if getattr(outputs, "aux_loss", None) is not None:
            regulariser = regulariser + config.router_aux_loss_coef * outputs.aux_loss
        scale = 1
        if self.args.average_tokens_across_devices:
            scale = self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return loss - regulariser * (scale - 1.0 / (accumulation if training else 1))

    def create_optimizer(self, *args, **kwargs):
        predictor_lr = getattr(self.args, "predictor_learning_rate", None)
        if predictor_lr is None or self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            return super().create_optimizer(*args, **kwargs)
        model = args[0] if args else kwargs.get("model")
        self.optimizer_cls_and_kwargs = predictor_optimizer_cls_and_kwargs(
            self.model if model is None else model, self.args, predictor_lr
        )
        try:
            return super().create_optimizer(*args, **kwargs)
        finally:
            self.optimizer_cls_and_kwargs = None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training-step log (the end-of-training summary has `train_loss`)
            logs.update(self.train_routing_metrics.compute(self.args.device))
            logs.update(threshold_metrics(unwrap_model(self.model)))
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        self.eval_routing_metrics.reset(self.args.device)
        output = super().evaluation_loop(*args, **kwargs)
        bound = inspect.signature(super().evaluation_loop).bind(*args, **kwargs)
        prefix = bound.arguments.get("metric_key_prefix", "eval")
        metrics = self.eval_routing_metrics.compute(self.args.device)
        output.metrics.update({f"{prefix}_{name}": value for name, value in metrics.items()})
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if ignore_keys is None:
            config = getattr(unwrap_model(self.model), "config", None)
            ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", [])) + NON_PREDICTION_OUTPUT_KEYS
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


class MoETrainer(MoETrainerMixin, Trainer):
    """`transformers.Trainer` for hf-dare's MoE models (works for dense models too), see `MoETrainerMixin`."""
