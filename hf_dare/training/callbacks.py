"""Trainer callbacks: `RoutingCallback`, the one hf-dare's models need under any `Trainer`, moves the routers'
per-step state once per optimizer step and puts the routing metrics into the logs; `RoutingMetricsCallback` does
the second alone; `AnswerReweightingCallback` reweights the CE over answer tokens (DQRoute, CCAR)."""

import sys

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, ExportableState

from hf_dare.modeling.routers import ThresholdTracker

from .metrics import RoutingMetrics, threshold_metrics
from .reweighting import AnswerReweighting, answer_reweighting, reweighted_loss


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
    "gate_offset": ..., "sparsity": ...}}) and DARE's part in `last_thresholds` ({layer_idx: thresholds}).
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


class AnswerReweightingCallback(TrainerCallback, ExportableState):
    """Long-tailed loss reweighting over answer tokens under any `Trainer`: `callbacks=[AnswerReweightingCallback(
    "dqroute")]` or `("ccar")`, with the method's options as keyword arguments (`DQRouteWeights`, `CCARWeights`).

    - A forward hook on the model (the unwrapped one, as `RoutingMetricsCallback`'s) replaces the loss of every
      training forward that has labels by `reweighted_loss`: the model's loss with its CE reweighted, sum_t w_t nll_t
      / num_items_in_batch, its routing terms (L_diff, L_lb...) kept; the forward's tokens are recorded. Evaluation
      forwards keep the plain loss and record nothing. `loss/ce` in the routing metrics stays the plain CE.
    - At the end of every optimizer step, on every rank, the statistics are updated from what all ranks recorded in
      the step (`AnswerReweighting.update`): identical on every rank, and the weights within a step are those of
      before it, so gradient accumulation and world size give the same update.
    - The statistics are saved in every checkpoint (`trainer_state.json`, as an `ExportableState` callback's state)
      and a resumed run continues them, whether or not `restore_callback_states_from_checkpoint` is set.

    Not `Trainer(compute_loss_func=...)`: the Trainer then withholds the labels from the model, whose own loss
    (CE and DARE's L_diff) is then not computed. The weights themselves: `callback.reweighting`.
    """

    def __init__(self, method: str = "dqroute", **options):
        self.method = method
        self.reweighting: AnswerReweighting = answer_reweighting(method, **options)
        self._model: nn.Module | None = None
        self.last_update: dict[str, float] = {}

    @property
    def statistics(self) -> dict:
        """The running statistics (JSON-able): what a checkpoint keeps."""
        return self.reweighting.state_dict()

    @statistics.setter
    def statistics(self, state: dict) -> None:
        self.reweighting.load_state_dict(state)

    def state(self) -> dict:
        return {
            "args": {"method": self.method, **self.reweighting.options()},
            "attributes": {"statistics": self.statistics},
        }

    def attach(self, model: nn.Module) -> None:
        """Reweight the training loss of `model` (any wrapper of it); one reweighting hook per model (a callback
        that the Trainer recreated from a checkpoint takes over from the one it replaced)."""
        model = unwrap_model(model)
        if model is self._model:
            return
        previous = getattr(model, "_answer_reweighting_hook", None)
        if previous is not None:
            previous.remove()
        model._answer_reweighting_hook = model.register_forward_hook(self._reweight, with_kwargs=True)
        self._model = model

    def detach(self) -> None:
        """Stop reweighting."""
        hook = getattr(self._model, "_answer_reweighting_hook", None)
        if hook is not None:
            hook.remove()
            self._model._answer_reweighting_hook = None
        self._model = None

    def _reweight(self, module: nn.Module, args, kwargs, outputs):
        labels = kwargs.get("labels")
        if not module.training or labels is None:
            return None
        if not isinstance(outputs, dict):
            raise TypeError("answer reweighting needs the model's output as a ModelOutput (return_dict=True)")
        loss, logits = outputs.get("loss"), outputs.get("logits")
        if loss is None or logits is None:
            return None
        outputs["loss"] = reweighted_loss(
            loss,
            logits,
            labels,
            self.reweighting,
            num_items_in_batch=kwargs.get("num_items_in_batch"),
            shift_labels=kwargs.get("shift_labels"),
        )
        return outputs

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)  # `model_init` may have made a new model
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict):  # resuming: continue the checkpoint's statistics
            self.statistics = saved["attributes"]["statistics"]

    def on_step_end(self, args, state, control, **kwargs):
        self.last_update = self.reweighting.update()


# The name of earlier releases, which moved DARE's thresholds only (the metrics needed `RoutingMetricsCallback`).
DareCallback = RoutingCallback
