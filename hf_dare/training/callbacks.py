"""`DareCallback`: moves DARE's thresholds once per optimizer step."""

from torch import nn
from transformers import TrainerCallback

from hf_dare.modeling.routing import ThresholdTracker


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under DDP / DataParallel / DeepSpeed (`.module`), `torch.compile` (`._orig_mod`) and PEFT
    (`.get_base_model()`) wrappers. FSDP2 (`fully_shard`) keeps the model object itself."""
    while True:
        if isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and model.get_base_model() is not model:
            model = model.get_base_model()
        else:
            return model


def set_threshold_update_mode(model: nn.Module, per_batch: bool) -> None:
    """Switch every DARE layer to per-batch thresholds (the paper's ablation) or back to the EMA; the config
    says so too, so a saved model and its card record what was trained."""
    model = unwrap_model(model)
    mode = "per_batch" if per_batch else "ema"
    for module in model.modules():
        if isinstance(module, ThresholdTracker):
            module.mode = mode
    if hasattr(getattr(model, "config", None), "threshold_update"):
        model.config.threshold_update = mode


class DareCallback(TrainerCallback):
    """Calls `model.update_difficulty_thresholds()` at the end of every optimizer step, i.e. after all
    micro-batches of a gradient-accumulation step, on every rank (the update gathers the predicted
    difficulties of all ranks, so thresholds stay identical).

    `per_batch=True` / `False` overrides the trackers' `threshold_update` mode for this run (`None` keeps the
    config's). The last update is kept in `last_thresholds` ({layer_idx: thresholds}).
    """

    def __init__(self, per_batch: bool | None = None):
        self.per_batch = per_batch
        self.last_thresholds: dict[int, list[float]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self.per_batch is not None:
            set_threshold_update_mode(model, self.per_batch)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = unwrap_model(model) if model is not None else None
        if model is not None and hasattr(model, "update_difficulty_thresholds"):
            self.last_thresholds = model.update_difficulty_thresholds()
