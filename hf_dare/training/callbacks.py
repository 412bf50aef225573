"""Trainer callbacks: `RoutingCallback`, the one hf-dare's models need under any `Trainer`, moves the routers'
per-step state once per optimizer step and puts the routing metrics into the logs; `RoutingMetricsCallback` does
the second alone."""

import sys

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from hf_dare.modeling.routers import ThresholdTracker

from .metrics import RoutingMetrics, threshold_metrics


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


def calling_callback_handler() -> CallbackHandler | None:
    """The `CallbackHandler` whose event is running (the caller of the callback method that calls this)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler):
            return owner
        frame = frame.f_back
    return None


class RoutingMetricsCallback(TrainerCallback):
    """Puts the routing metrics of the forwards since the last log into the Trainer's logs.

    A forward hook on the model records every forward's losses and routing statistics (`RoutingMetrics`,
    kept on the device, summed across ranks when logged); each training log gets `loss/ce`,
    `loss/difficulty`, `loss/aux`, `loss/router`, `routing/*` (Avg K per layer and modality, shares of 1..M
    experts, expert load) and DARE's thresholds, and each evaluation log the same under its prefix
    (`eval_routing/*`).

    The metrics reach `trainer.state.log_history` and every `report_to` integration (tensorboard, wandb...):
    the Trainer puts the integrations ahead of the callbacks it is given, and they write a log as soon as they
    see it, so when the Trainer starts (and when training begins, for a callback added later) this callback
    moves itself to the front of the Trainer's callback list, where it adds its metrics before anyone reads.
    """

    def __init__(self):
        self.train_metrics: RoutingMetrics | None = None
        self.eval_metrics: RoutingMetrics | None = None
        self._model: nn.Module | None = None
        self._hook = None
        self.records = True

    def attach(self, model: nn.Module) -> None:
        """Record the forwards of `model` (any wrapper of it); done by the Trainer's events, once per model."""
        model = unwrap_model(model)
        if model is self._model or not self.records:
            return
        self.detach()
        self._model = model
        self.train_metrics = RoutingMetrics.for_model(model)
        self.eval_metrics = RoutingMetrics.for_model(model)
        self._hook = model.register_forward_hook(self._record, with_kwargs=True)

    def detach(self) -> None:
        """Stop recording (and logging)."""
        if self._hook is not None:
            self._hook.remove()
        self._model, self._hook = None, None

    def _record(self, module: nn.Module, args, kwargs, outputs) -> None:
        metrics = self.train_metrics if module.training else self.eval_metrics
        metrics.update(outputs, kwargs.get("labels"), kwargs.get("num_items_in_batch"))

    def _run_first(self) -> None:
        """Move this callback to the front of the calling Trainer's callback list (see the class docstring)."""
        handler = calling_callback_handler()
        if handler is not None and handler.callbacks[0] is not self:
            # `call_event` iterates the list by position: moving the running callback forward skips nobody.
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)
        self._run_first()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)  # `model_init` may have made a new model
        self._run_first()

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_metrics is not None:  # an evaluation that follows counts its own forwards only
            self.eval_metrics.reset(args.device)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._model is None or logs is None:
            return
        if "loss" in logs:  # a training-step log (the end-of-training summary has `train_loss`)
            routing = {**self.train_metrics.compute(args.device), **threshold_metrics(self._model)}
        else:
            prefix = next((k.removesuffix("_loss") for k in logs if k.endswith("_loss") and k != "train_loss"), None)
            if prefix is None:
                return
            routing = {f"{prefix}_{name}": value for name, value in self.eval_metrics.compute(args.device).items()}
        logs.update(routing)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(routing)


class RoutingCallback(RoutingMetricsCallback):
    """The one callback hf-dare's models need under any `Trainer` (TRL's included): `callbacks=[RoutingCallback()]`.

    - At the end of every optimizer step (after all micro-batches of a gradient-accumulation step), on every
      rank, it calls `model.update_routing_state()`: each router's per-step state moves (DARE's thresholds,
      ReMoE's L1 coefficient), from what all ranks observed, so it stays identical on every rank. A model
      without `update_routing_state` (code saved before it) gets `update_difficulty_thresholds()`.
    - It puts the routing metrics into the logs, `log_history` and every `report_to` integration alike
      (`RoutingMetricsCallback`); where the Trainer also has a `RoutingMetricsCallback`, that one logs them.

    `per_batch=True` / `False` overrides the trackers' `threshold_update` mode for this run (`None` keeps the
    config's). The last update is kept in `last_state` ({layer_idx: {"thresholds": ...} or {"l1_coef": ...,
    "sparsity": ...}}) and DARE's part in `last_thresholds` ({layer_idx: thresholds}).
    """

    def __init__(self, per_batch: bool | None = None):
        super().__init__()
        self.per_batch = per_batch
        self.last_thresholds: dict[int, list[float]] = {}
        self.last_state: dict[int, dict] = {}

    def _run_first(self) -> None:
        handler = calling_callback_handler()
        others = [cb for cb in (handler.callbacks if handler else []) if type(cb) is RoutingMetricsCallback]
        if others:  # metrics from that one only, not twice
            self.records = False
            self.detach()
        else:
            super()._run_first()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        if model is not None and self.per_batch is not None:
            set_threshold_update_mode(model, self.per_batch)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        model = unwrap_model(model) if model is not None else None
        if model is not None and hasattr(model, "update_routing_state"):
            self.last_state = model.update_routing_state()
            self.last_thresholds = {i: s["thresholds"] for i, s in self.last_state.items() if "thresholds" in s}
        elif model is not None and hasattr(model, "update_difficulty_thresholds"):
            self.last_thresholds = model.update_difficulty_thresholds()


# The name of earlier releases, which moved DARE's thresholds only (the metrics needed `RoutingMetricsCallback`).
DareCallback = RoutingCallback
