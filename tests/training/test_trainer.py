"""MoETrainer + DareCallback on tiny models: threshold updates, convergence to the target distribution, the
difficulty predictor learning, routing metrics in the logs, loss scaling, optimizer groups, resuming."""

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

import hf_dare
from hf_dare.modeling.modeling_moe import token_nll
from hf_dare.training import (
    DareCallback,
    LlavaDataCollator,
    MoETrainer,
    difficulty_predictor_param_groups,
    load_llava_dataset,
    predictor_optimizer_cls_and_kwargs,
)
from tests.tiny_models import SPECIAL_TOKENS, WORDS, llava_config, moe_config, processor, random_batch
from tests.training.helpers import (
    as_dataset,
    digits_tensors,
    expert_shares,
    init_seeds,
    llava_records,
    sentence_tensors,
    sgd_step_args,
    training_args,
    write_llava_data,
)

PI = [0.6, 0.3, 0.09, 0.01]


def dare_model(seed: int = 0, **overrides) -> hf_dare.MoEForCausalLM:
    torch.manual_seed(seed)
    overrides.setdefault("difficulty_predictor_dropout", 0.0)
    return hf_dare.MoEForCausalLM(moe_config(router="dare", **overrides))


def thresholds_of(model) -> dict[int, torch.Tensor]:
    return {
        block.layer_idx: block.gate.threshold_tracker.thresholds.clone()
        for block in model.moe_blocks
        if hasattr(block.gate, "threshold_tracker")
    }


class DifficultyRecorder:
    """Forward hook keeping the predicted difficulties of real tokens of every training forward."""

    def __init__(self, model):
        self.seen: list[tuple[torch.Tensor, ...]] = []
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output):
        if module.training:
            self.seen.append(tuple(d[output.token_mask].detach() for d in output.difficulty))


@pytest.mark.parametrize("per_batch", [False, True])
def test_thresholds_move_to_quantiles_of_the_step(tmp_path, per_batch):
    model = dare_model(threshold_momentum=0.9)
    recorder = DifficultyRecorder(model)
    callback = DareCallback(per_batch=per_batch)
    before = thresholds_of(model)
    args = training_args(tmp_path, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    MoETrainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(4)), callbacks=[callback]).train()

    assert len(recorder.seen) == 2  # one update for both micro-batches
    levels = torch.tensor([0.6, 0.9, 0.99])
    for i, layer_idx in enumerate(before):
        observed = torch.cat([forward[i] for forward in recorder.seen]).float()
        target = torch.cummax(torch.quantile(observed, levels), 0).values
        expected = target if per_batch else 0.9 * before[layer_idx] + 0.1 * target
        torch.testing.assert_close(thresholds_of(model)[layer_idx], expected)
        assert callback.last_thresholds[layer_idx] == pytest.approx(expected.tolist())


@pytest.mark.parametrize("seed", init_seeds())
def test_expert_fractions_reach_target_distribution(tmp_path, seed):
    """The thresholds' rule, whatever the predictor: with the predictions held still (learning rate 0), the EMA
    (gamma 0.5) takes the thresholds to the quantiles of Pi over the batch, so the shares of tokens using 1..M
    experts on it, with the model in eval mode, are Pi (to a token of the 512: random ids, no tied predictions)."""
    model = dare_model(seed, threshold_momentum=0.5)
    data = random_batch(model.config, batch_size=8, seq_len=64, seed=seed)
    args = training_args(tmp_path, max_steps=40, per_device_train_batch_size=8, learning_rate=0.0, logging_steps=10)
    trainer = MoETrainer(model=model, args=args, train_dataset=as_dataset(data))
    trainer.train()

    model.eval()
    with torch.no_grad():
        out = model(**data)
    for counts in out.expert_counts:
        assert expert_shares(counts) == pytest.approx(PI, abs=2 / 512)
    # The last log reports the thresholds the model ends with.
    last = trainer.state.log_history[-2]
    for layer_idx, taus in thresholds_of(model).items():
        for j, tau in enumerate(taus.tolist(), start=1):
            assert last[f"routing/threshold_layer_{layer_idx}_{j}"] == pytest.approx(tau)


@pytest.mark.parametrize("seed", init_seeds())
def test_difficulty_loss_falls_and_predictor_learns(tmp_path, seed):
    """On "the digit is N ." sentences only the token after "is" is hard: L_diff falls and the predictors
    explain most of the per-token NLL (R^2 > 0.5) and rank "is" positions as the hardest, with DARE's defaults
    (L_diff kept from the backbone, `difficulty_detach_input=True`: the predictor's own learning)."""
    model = dare_model(seed)
    data = sentence_tensors(8, 8)
    args = training_args(
        tmp_path,
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        predictor_learning_rate=3e-2,
        logging_steps=5,
    )
    trainer = MoETrainer(model=model, args=args, train_dataset=as_dataset(data))
    trainer.train()
    l_diff = [log["loss/difficulty"] for log in trainer.state.log_history if "loss/difficulty" in log]
    assert l_diff[-1] < l_diff[0] / 4

    model.eval()
    with torch.no_grad():
        out = model(**data)
    nll = token_nll(out.logits[:, :-1], data["labels"][:, 1:])
    before_hard = data["input_ids"][:, :-1] == len(SPECIAL_TOKENS) + WORDS.index("is")
    r2 = []
    for difficulty in out.difficulty:
        predicted = difficulty[:, :-1]
        r2.append(1 - ((predicted - nll) ** 2).mean() / nll.var(unbiased=False))
        assert predicted[before_hard].mean() > predicted[~before_hard].mean() + 0.5
    assert sum(r2) / len(r2) > 0.5


@pytest.fixture(scope="module")
def llava_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    return load_llava_dataset(write_llava_data(folder, llava_records(8)), folder / "images")


@pytest.mark.parametrize("router", ["dare", "top_k"])
def test_log_history_has_routing_metrics(tmp_path, llava_data, router):
    torch.manual_seed(0)
    model = hf_dare.MoELlavaForConditionalGeneration(llava_config(router=router))
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = MoETrainer(
        model=model, args=args, train_dataset=llava_data, data_collator=LlavaDataCollator(processor())
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        # The logged loss is what was optimised: CE + alpha * L_diff + beta * L_lb, once per step.
        expected = log["loss/ce"] + log.get("loss/difficulty", 0.0) + 0.01 * log["loss/aux"]
        assert log["loss"] == pytest.approx(expected, rel=1e-3)
        fractions = [log[f"routing/frac_{n}_experts"] for n in range(1, 5 if router == "dare" else 3)]
        assert sum(fractions) == pytest.approx(1.0)
        assert log["routing/avg_k"] == pytest.approx(sum(n * f for n, f in enumerate(fractions, start=1)))
        for layer_idx in model.config.moe_layers:
            assert 1.0 <= log[f"routing/avg_k_layer_{layer_idx}"] <= 4.0
            assert log[f"routing/load_cv_layer_{layer_idx}"] >= 0.0
            # Per layer and modality: the layer's Avg K lies between its text and vision Avg K.
            text, vision = log[f"routing/avg_k_text_layer_{layer_idx}"], log[f"routing/avg_k_vision_layer_{layer_idx}"]
            assert min(text, vision) - 1e-6 <= log[f"routing/avg_k_layer_{layer_idx}"] <= max(text, vision) + 1e-6
        assert {"routing/avg_k_text", "routing/avg_k_vision"} <= log.keys()
        if router == "top_k":
            assert log["routing/avg_k"] == log["routing/avg_k_vision"] == log["routing/avg_k_text"] == 2.0
            assert not any(key.startswith("routing/threshold") for key in log)
        else:
            assert log["loss/difficulty"] > 0
            for layer_idx in model.config.moe_layers:
                taus = [log[f"routing/threshold_layer_{layer_idx}_{j}"] for j in (1, 2, 3)]
                assert taus == sorted(taus) and taus != [0.0, 1.0, 2.0]

    # Evaluation reports the routing of the evaluated data under `eval_`, and leaves the thresholds alone.
    before = thresholds_of(model) if router == "dare" else {}
    metrics = trainer.evaluate(llava_data)
    assert 1.0 <= metrics["eval_routing/avg_k"] <= 4.0 and metrics["eval_loss/ce"] > 0
    assert metrics["eval_loss"] == pytest.approx(
        metrics["eval_loss/ce"] + metrics.get("eval_loss/difficulty", 0.0) + 0.01 * metrics["eval_loss/aux"], rel=0.05
    )
    assert trainer.state.log_history[-1]["eval_routing/avg_k"] == metrics["eval_routing/avg_k"]
    assert all(torch.equal(t, thresholds_of(model)[i]) for i, t in before.items())


def test_gradient_accumulation_counts_routing_losses_once(tmp_path):
    """One SGD step on 4 sequences gives the same weights with 1 x 4 or 2 x 2 (accumulated) batches: the
    per-batch-mean L_diff is not counted twice when the CE is normalised by `num_items_in_batch`."""
    data = as_dataset(digits_tensors(4))
    weights = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = dare_model(router_aux_loss_coef=0.0)
        args = sgd_step_args(tmp_path / str(accumulation), batch_size, accumulation)
        MoETrainer(model=model, args=args, train_dataset=data).train()
        weights.append(dict(model.named_parameters()))
    initial = dict(dare_model(router_aux_loss_coef=0.0).named_parameters())
    name = "model.language_model.layers.0.mlp.gate.difficulty_predictor.down.bias"
    assert not torch.allclose(weights[0][name], initial[name])
    for name, param in weights[0].items():
        torch.testing.assert_close(weights[1][name], param, atol=1e-5, rtol=1e-4, msg=name)


def test_batch_without_text_labels_trains_without_nan(tmp_path, llava_data):
    unanswered = [
        {"id": f"q{i}", "images": sample["images"], "conversations": sample["conversations"][:1]}
        for i, sample in enumerate(llava_data)
    ]
    collator = LlavaDataCollator(processor())
    torch.manual_seed(0)
    model = hf_dare.MoELlavaForConditionalGeneration(llava_config(router="dare"))
    batch = collator(unanswered[:4])
    assert (batch["labels"] == -100).all()
    out = model(**batch)
    # No label: CE is 0, L_diff still learns from the questions' text positions (the default targets).
    assert out.ce_loss.item() == 0.0 and torch.isfinite(out.difficulty_loss) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()

    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=4)
    trainer = MoETrainer(model=model, args=args, train_dataset=unanswered, data_collator=collator)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    # L_diff is measured on the questions' text, but a step without labels carries no weight: the Trainer's
    # `num_items_in_batch` counts labels, and the routing terms are weighted by the batch's share of them.
    assert all(math.isfinite(log["loss/difficulty"]) and log["loss"] == 0.0 for log in logs)
    assert "loss/ce" not in logs[0]  # no text token: nothing to average
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert thresholds_of(model)[0].tolist() != [0.0, 1.0, 2.0]  # thresholds still follow all real tokens


def test_predictor_param_groups():
    model = dare_model()
    model.get_input_embeddings().weight.requires_grad_(False)
    groups = difficulty_predictor_param_groups(model, lr=2e-5, predictor_lr=1e-4, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for group in groups:
        in_group = [names[id(p)] for p in group["params"]]
        is_predictor = {"difficulty_predictor." in n for n in in_group}
        assert len(is_predictor) == 1
        assert group["lr"] == (1e-4 if is_predictor.pop() else 2e-5)
        if group["weight_decay"] > 0:
            assert not any(n.endswith("bias") or "norm" in n for n in in_group)


def test_predictor_learning_rate_in_trainer(tmp_path):
    data = as_dataset(digits_tensors(4))
    model = dare_model()
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=2, predictor_learning_rate=5e-4)
    trainer = MoETrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    predictor = {id(p) for n, p in model.named_parameters() if "difficulty_predictor." in n}
    lrs = {}
    for group in trainer.optimizer.param_groups:
        lrs.setdefault(any(id(p) in predictor for p in group["params"]), set()).add(group["lr"])
    (backbone_lr,), (predictor_lr,) = lrs[False], lrs[True]
    assert predictor_lr == pytest.approx(backbone_lr * 5e-4 / args.learning_rate)  # the schedule scales both

    # The plain Trainer, through `optimizer_cls_and_kwargs`.
    plain = Trainer(
        model=model,
        args=training_args(tmp_path / "plain"),
        train_dataset=data,
        optimizer_cls_and_kwargs=predictor_optimizer_cls_and_kwargs(model, args, predictor_lr=1e-3),
    )
    plain.create_optimizer()
    for group in plain.optimizer.param_groups:
        assert all(id(p) in predictor for p in group["params"]) == (group["lr"] == 1e-3)


def test_resume_from_checkpoint_restores_thresholds(tmp_path):
    data = as_dataset(digits_tensors(8))
    kwargs = dict(max_steps=6, per_device_train_batch_size=2, save_strategy="steps", save_steps=3)
    full = dare_model(difficulty_predictor_dropout=0.1)
    MoETrainer(model=full, args=training_args(tmp_path / "full", **kwargs), train_dataset=data).train()

    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = load_file(checkpoint / "model.safetensors")
    saved_thresholds = {k: v for k, v in saved.items() if k.endswith("threshold_tracker.thresholds")}
    assert len(saved_thresholds) == 2 and all(v.tolist() != [0.0, 1.0, 2.0] for v in saved_thresholds.values())

    resumed = dare_model(seed=1, difficulty_predictor_dropout=0.1)  # other weights: all must come from the checkpoint
    trainer = MoETrainer(model=resumed, args=training_args(tmp_path / "resumed", **kwargs), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    for layer_idx, taus in thresholds_of(full).items():
        torch.testing.assert_close(thresholds_of(resumed)[layer_idx], taus)
    for (name, param), resumed_param in zip(full.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(resumed_param, param, msg=name)
    # Same thresholds and weights: the same routing.
    full.eval(), resumed.eval()
    with torch.no_grad():
        probe = digits_tensors(4, start=100)
        for a, b in zip(full(**probe).expert_counts, resumed(**probe).expert_counts, strict=True):
            assert torch.equal(a, b)


def test_training_record_is_the_one_routing_record_with_load_balance(tmp_path):
    """`record_training_stage` keeps what training logged last in `config.routing_statistics`, built by the one
    record builder (`statistics_record`) that calibration uses too: Avg K, per layer, load CV, thresholds."""
    from hf_dare.training import record_training_stage

    model = dare_model()
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=4)
    trainer = MoETrainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(8)))
    trainer.train()
    record_training_stage(trainer, "stage3")
    stats = model.config.routing_statistics
    layers = model.config.moe_layers
    assert len(stats["avg_k_per_layer"]) == len(stats["load_cv"]) == len(layers)
    assert set(stats["thresholds"]) == {str(i) for i in layers} and 1.0 <= stats["avg_k"] <= 4.0
