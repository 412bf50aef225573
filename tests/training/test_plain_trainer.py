"""The standard `Trainer` plus hf-dare's callbacks trains right: the model's own loss counts the routing terms
once per optimizer step whatever the gradient accumulation, and the routing metrics reach `log_history` and
tensorboard."""

import pytest
import torch
from transformers import Trainer
from transformers.integrations import TensorBoardCallback

import hf_dare
from hf_dare.training import DareCallback, MoETrainer, RoutingCallback, RoutingMetricsCallback
from tests.tiny_models import moe_config
from tests.training.helpers import as_dataset, digits_tensors, sgd_step_args, training_args


def dare_model(**overrides) -> hf_dare.MoEForCausalLM:
    torch.manual_seed(0)
    return hf_dare.MoEForCausalLM(moe_config(router="dare", difficulty_predictor_dropout=0.0, **overrides))


def one_sgd_step(tmp_path, trainer_class, batch_size: int, accumulation: int, **overrides) -> dict:
    """The weights after one SGD step over the same 8 sequences, cut into `accumulation` micro-batches."""
    model = dare_model(**overrides)
    args = sgd_step_args(tmp_path / f"{trainer_class.__name__}-{accumulation}", batch_size, accumulation)
    callbacks = [RoutingCallback()] if trainer_class is Trainer else None
    trainer_class(model=model, args=args, train_dataset=as_dataset(digits_tensors(8)), callbacks=callbacks).train()
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def max_gap(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_plain_trainer_accumulation_gives_the_weights_of_one_batch(tmp_path):
    """Without the balancing loss (a product of batch statistics, not additive over micro-batches), 1 x 8 and
    4 x 2 give the same weights: CE and L_diff are each a sum over tokens divided by the step's token count."""
    whole = one_sgd_step(tmp_path, Trainer, 8, 1, router_aux_loss_coef=0.0)
    accumulated = one_sgd_step(tmp_path, Trainer, 2, 4, router_aux_loss_coef=0.0)
    predictor = "model.language_model.layers.0.mlp.gate.difficulty_predictor.down.bias"
    assert not torch.allclose(whole[predictor], dare_model().state_dict()[predictor])  # L_diff trained it
    for name, param in whole.items():
        torch.testing.assert_close(accumulated[name], param, atol=1e-5, rtol=0, msg=name)


def test_plain_trainer_with_balancing_is_no_further_off_than_moe_trainer(tmp_path):
    gaps = {}
    initial = dict(dare_model().named_parameters())
    for trainer_class in (Trainer, MoETrainer):
        whole = one_sgd_step(tmp_path, trainer_class, 8, 1, router_aux_loss_coef=0.5)
        accumulated = one_sgd_step(tmp_path, trainer_class, 2, 4, router_aux_loss_coef=0.5)
        gaps[trainer_class] = max_gap(whole, accumulated)
    assert gaps[Trainer] <= gaps[MoETrainer] + 1e-7
    # Only the balancing loss differs (its statistics are per micro-batch): 0.05-0.17% of the step's largest
    # weight change from init seeds 0-7.
    assert gaps[Trainer] < 0.01 * max_gap(whole, initial)


def test_plain_trainer_with_the_one_callback_logs_routing_metrics(tmp_path):
    model = dare_model()
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=as_dataset(digits_tensors(8)),
        eval_dataset=as_dataset(digits_tensors(4, start=50)),
        callbacks=[RoutingCallback()],
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        # The logged loss is what was optimised: CE + alpha * L_diff + beta * L_lb, once per step.
        assert log["loss"] == pytest.approx(log["loss/ce"] + log["loss/difficulty"] + 0.01 * log["loss/aux"], rel=1e-4)
        fractions = [log[f"routing/frac_{n}_experts"] for n in range(1, 5)]
        assert sum(fractions) == pytest.approx(1.0)
        assert log["routing/avg_k"] == pytest.approx(sum(n * f for n, f in enumerate(fractions, start=1)))
        for layer_idx in model.config.moe_layers:
            assert 1.0 <= log[f"routing/avg_k_layer_{layer_idx}"] <= 4.0
            taus = [log[f"routing/threshold_layer_{layer_idx}_{j}"] for j in (1, 2, 3)]
            assert taus == sorted(taus) and taus != [0.0, 1.0, 2.0]
    metrics = trainer.evaluate()
    assert 1.0 <= metrics["eval_routing/avg_k"] <= 4.0
    assert trainer.state.log_history[-1]["eval_routing/avg_k"] == metrics["eval_routing/avg_k"]


def tensorboard_scalars(folder) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(folder.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("added", ["given", "add_callback", "old_pair"])
def test_routing_metrics_reach_tensorboard_from_report_to(tmp_path, added):
    """`report_to=["tensorboard"]` puts the integration ahead of the callbacks the Trainer is given; the routing
    metrics reach its event files all the same, whether the callback is given, added later, or given as the
    earlier releases' pair (then logged once, by `RoutingMetricsCallback`)."""
    model = dare_model()
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=4, report_to=["tensorboard"])
    callbacks = {
        "given": [RoutingCallback()],
        "add_callback": [],
        "old_pair": [DareCallback(), RoutingMetricsCallback()],
    }
    trainer = Trainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(12)), callbacks=callbacks[added])
    if added == "add_callback":
        trainer.add_callback(RoutingCallback())
    assert any(isinstance(cb, TensorBoardCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    scalars = tensorboard_scalars(tmp_path)
    assert {
        "train/routing/avg_k",
        "train/loss/difficulty",
        "train/loss/aux",
        "train/routing/threshold_layer_0_1",
    } <= set(scalars)
    assert {f"train/routing/avg_k_layer_{i}" for i in model.config.moe_layers} <= set(scalars)
    logged = [log["routing/avg_k"] for log in trainer.state.log_history if "routing/avg_k" in log]
    assert len(logged) == 3
    assert scalars["train/routing/avg_k"] == pytest.approx(logged)
    recorders = [
        cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RoutingMetricsCallback) and cb.records
    ]
    assert len(recorders) == 1
