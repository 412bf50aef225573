"""`MoETrainer`: the transformers `Trainer` with hf-dare's callbacks (DARE's threshold updates, routing metrics in
the logs, answer reweighting) added and a separate learning rate for the difficulty predictors."""

from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from .callbacks import AnswerReweightingCallback, RoutingCallback, RoutingMetricsCallback, unwrap_model
from .optim import predictor_optimizer_cls_and_kwargs

# `MoEOutputWithPast` fields that are statistics, not predictions: left out of what evaluation gathers.
NON_PREDICTION_OUTPUT_KEYS = [
    "ce_loss",
    "difficulty_loss",
    "aux_loss",
    "router_loss",
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
    """`TrainingArguments` plus DARE's options and the answer reweighting (also parsable with `HfArgumentParser`)."""

    # `answer_reweighting_options` also takes a JSON string on the command line.
    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "answer_reweighting_options"]

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
    answer_reweighting: str | None = field(
        default=None,
        metadata={
            "help": "Long-tailed loss reweighting over answer tokens: `dqroute` (class weights from each answer "
            "token's prediction entropy and accuracy) or `ccar` (a weight from each token's class frequency and "
            "the model's confidence in it); None: the plain CE."
        },
    )
    answer_reweighting_options: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the reweighting (`DQRouteWeights` / `CCARWeights`), a dict or a JSON "
            'string, e.g. \'{"pivot": 0.75, "max_weight": 20}\' for ccar.'
        },
    )


class MoETrainerMixin:
    """Mix into any `Trainer` subclass (e.g. `class MoESFTTrainer(MoETrainerMixin, SFTTrainer)`): a convenience,
    not a requirement (a plain `Trainer` with `callbacks=[RoutingCallback()]` trains the same).

    - adds a `RoutingCallback` (the routers' state moves once per optimizer step; routing metrics in the logs)
      unless one is given;
    - with `args.predictor_learning_rate`, the difficulty predictors get their own learning rate;
    - with `args.answer_reweighting` (`dqroute` or `ccar`), adds an `AnswerReweightingCallback` (the CE over answer
      tokens reweighted, statistics once per optimizer step, kept in checkpoints) unless one is given.

    The loss needs nothing from the trainer: the model weights its routing terms by the micro-batch's share of
    `num_items_in_batch`, so any gradient accumulation and world size give the configured alpha and beta.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        callbacks = self.callback_handler.callbacks
        if not any(isinstance(cb, RoutingCallback) for cb in callbacks):
            callback = RoutingCallback(per_batch=getattr(self.args, "per_batch_thresholds", None))
            if any(type(cb) is RoutingMetricsCallback for cb in callbacks):
                callback.records = False
            callback.attach(self.model)
            callbacks.insert(0, callback)  # before the integrations, which log what it adds
        method = getattr(self.args, "answer_reweighting", None)
        options = getattr(self.args, "answer_reweighting_options", None)
        if method is None and options:
            raise ValueError("answer_reweighting_options is set but answer_reweighting is not")
        if method is not None and not any(isinstance(cb, AnswerReweightingCallback) for cb in callbacks):
            reweighting = AnswerReweightingCallback(method, **(options or {}))  # validates the method and options
            reweighting.attach(self.model)
            callbacks.append(reweighting)

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

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if ignore_keys is None:
            config = getattr(unwrap_model(self.model), "config", None)
            ignore_keys = list(getattr(config, "keys_to_ignore_at_inference", [])) + NON_PREDICTION_OUTPUT_KEYS
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


class MoETrainer(MoETrainerMixin, Trainer):
    """`transformers.Trainer` for hf-dare's MoE models (works for dense models too), see `MoETrainerMixin`."""
