"""What a training run leaves in the model's config, for the model card written by `save_pretrained`:
the stage (steps, what was trained, final losses) and the last routing statistics."""

from transformers import Trainer

from hf_dare.modeling.statistics import statistics_record

from .callbacks import unwrap_model
from .metrics import values_by_layer
from .stages import TrainingStage, get_stage


def _last_logged(log_history: list[dict], prefix: str) -> dict[str, float]:
    values = {}
    for entry in log_history:
        values.update({k.removeprefix(prefix): v for k, v in entry.items() if k.startswith(prefix)})
    return values


def _thresholds_by_layer(routing: dict[str, float]) -> dict[int, list[float]]:
    """`threshold_layer_{i}_{j}` entries -> {i: [tau_1, ..., tau_{M-1}]}, in numeric order."""
    by_layer: dict[int, dict[int, float]] = {}
    for key, value in routing.items():
        if key.startswith("threshold_layer_"):
            layer, j = (int(n) for n in key.removeprefix("threshold_layer_").split("_"))
            by_layer.setdefault(layer, {})[j] = value
    return {layer: [taus[j] for j in sorted(taus)] for layer, taus in sorted(by_layer.items())}


def record_training_stage(trainer: Trainer, stage: str | TrainingStage) -> dict:
    """Append this run to `model.config.training_stages` and store its last routing metrics as
    `model.config.routing_statistics`; call after `trainer.train()`, before saving. Returns the record."""
    stage = get_stage(stage)
    model = unwrap_model(trainer.model)
    history = trainer.state.log_history
    losses = _last_logged(history, "loss/")
    train_loss = [entry["loss"] for entry in history if "loss" in entry]
    if train_loss:
        losses = {"total": train_loss[-1], **losses}
    record = {
        "name": stage.name,
        "description": stage.description,
        "steps": trainer.state.global_step,
        "trained": [pattern.strip("^()|\\.") for pattern in stage.trainable],
        "losses": losses,
    }
    config = model.config
    config.training_stages = [*(getattr(config, "training_stages", None) or []), record]
    routing = _last_logged(history, "routing/")
    if routing:
        config.routing_statistics = statistics_record(
            routing.get("avg_k"),
            routing.get("avg_k_text"),
            routing.get("avg_k_vision"),
            list(values_by_layer(routing, "avg_k_layer_").values()),
            list(values_by_layer(routing, "load_cv_layer_").values()) or None,
            _thresholds_by_layer(routing),
        )
    return record
