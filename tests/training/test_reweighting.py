"""Long-tailed loss reweighting over answer tokens (DQRoute, CCAR): the weights are the papers' formulas (computed by
hand here), the weighted loss keeps the model's routing terms and its normalisation (gradient accumulation 1 x 8 and
4 x 2 give the same update), the statistics are identical on every rank and a resumed run continues them."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback

import hf_dare
from hf_dare.modeling.modeling_moe import next_token_labels
from hf_dare.training import (
    AnswerReweightingCallback,
    CCARWeights,
    DQRouteWeights,
    LlavaDataCollator,
    MoETrainer,
    MoETrainingArguments,
    RoutingCallback,
    load_llava_dataset,
    reweighted_loss,
)
from tests.tiny_models import SPECIAL_TOKENS, WORDS, llava_config, moe_config, processor
from tests.training.helpers import (
    as_dataset,
    digits_tensors,
    llava_records,
    sgd_step_args,
    training_args,
    write_llava_data,
)

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("reweighting_worker.py")
# Options that make the weights move visibly within a few steps of a tiny model.
OPTIONS = {"dqroute": {"sharpness": 1.0}, "ccar": {"max_weight": 50.0}}


def hand_softmax(row: list[float]) -> list[float]:
    exps = [math.exp(x) for x in row]
    return [e / sum(exps) for e in exps]


def hand_entropy(row: list[float]) -> float:
    return -sum(p * math.log(p) for p in hand_softmax(row))


def hand_correct(row: list[float], target: int) -> float:
    return float(row.index(max(row)) == target)


def observe_and_update(weights, rows: list[list[float]], targets: list[int]) -> None:
    """One optimizer step that saw the tokens `rows` (logits over 4 classes) with their `targets`."""
    weights.observe(torch.tensor([rows]), torch.tensor([targets]))
    weights.update()


def test_dqroute_weights_by_hand():
    momentum, lam, gamma, beta = 0.5, 0.7, 0.5, 0.5
    weights = DQRouteWeights(momentum=momentum, balance=lam, sharpness=gamma, frequency_exponent=beta, max_weight=None)
    step1 = [([2.0, 0.0, 0.0, 0.0], 0), ([0.0, 1.0, 0.0, 0.0], 0), ([0.0, 0.5, 0.2, 0.0], 1)]
    step2 = [
        ([0.0, 0.0, 3.0, 0.0], 1),
        ([0.0, 0.0, 1.0, 0.5], 2),
        ([1.0, 0.0, 0.0, 0.0], 2),
        ([0.3, 0.0, 0.1, 0.2], 2),
    ]
    for step in (step1, step2):
        observe_and_update(weights, [row for row, _ in step] + [[9.0, 0.0, 0.0, 0.0]], [t for _, t in step] + [-100])

    def means(step, c):
        rows = [row for row, t in step if t == c]
        return sum(map(hand_entropy, rows)) / len(rows), sum(hand_correct(r, c) for r in rows) / len(rows)

    def difficulty(H, A):  # d_c = H_c / H_max + lambda (1 - A_c / A_max)
        return {c: H[c] / max(H.values()) + lam * (1 - A[c] / max(A.values())) for c in H}

    # Step 1: classes 0 and 1 seen for the first time; w from uniform: softmax of gamma d.
    H, A = {}, {}
    for c in (0, 1):
        H[c], A[c] = means(step1, c)
    d = difficulty(H, A)
    total = sum(math.exp(gamma * d[c]) for c in d)
    w = {c: math.exp(gamma * d[c]) / total for c in d}
    # Step 2: class 1's statistics move by the EMA, class 2 appears (starting at the mean weight of 0 and 1).
    h, a = means(step2, 1)
    H[1], A[1] = momentum * H[1] + (1 - momentum) * h, momentum * A[1] + (1 - momentum) * a
    H[2], A[2] = means(step2, 2)
    w[2] = (w[0] + w[1]) / 2
    d = difficulty(H, A)
    total = sum(w[c] * math.exp(gamma * d[c]) for c in w)
    w = {c: w[c] * math.exp(gamma * d[c]) / total for c in w}
    counts = {0: 2, 1: 2, 2: 3}
    f = {c: n / 7 for c, n in counts.items()}
    normaliser = sum(f[c] * f[c] ** -beta * w[c] for c in w)
    expected = {c: f[c] ** -beta * w[c] / normaliser for c in w}

    torch.testing.assert_close(weights.stats["entropy"][:3], torch.tensor([H[0], H[1], H[2]], dtype=torch.float64))
    torch.testing.assert_close(weights.stats["accuracy"][:3], torch.tensor([A[0], A[1], A[2]], dtype=torch.float64))
    logits = torch.zeros(1, 5, 4)  # DQRoute's weights depend on the class only
    got = weights.token_weights(logits, torch.tensor([[0, 1, 2, 3, -100]]))
    # Class 3 was never seen (weight 1), the last position has no label (0).
    assert got.tolist()[0] == pytest.approx(
        [expected[0], expected[1], expected[2], 1.0, 0.0], rel=1e-6
    )  # float32 softmax
    assert sum(f[c] * expected[c] for c in f) == pytest.approx(1.0)  # mean 1 under the label frequencies
    assert weights.steps == 2


def test_ccar_weights_by_hand():
    weights = CCARWeights(pivot=0.75)
    observe_and_update(weights, [[0.0] * 4] * 8, [0, 0, 0, 0, 0, 0, 1, 1])  # f_0 = 0.75, f_1 = 0.25
    uniform = [0.0, 0.0, 0.0, 0.0]  # p_t = 0.25 for every class
    confident = [
        [math.log(0.9)] + [math.log(0.1 / 3)] * 3,
        [math.log(0.1 / 3), math.log(0.9)] + [math.log(0.1 / 3)] * 2,
    ]
    at_pivot = [math.log(0.25 / 3), math.log(0.75)] + [math.log(0.25 / 3)] * 2
    rows = [uniform, uniform, confident[0], confident[1], at_pivot, uniform, uniform]
    got = weights.token_weights(torch.tensor([rows]), torch.tensor([[1, 0, 0, 1, 1, 3, -100]]))[0].tolist()
    expected = [
        0.25**-0.5,  # rare, p_t = 0.25 < 0.75: f_1 ** (p_t - omega) = 2
        0.75**-0.5,  # head, p_t = 0.25: 1.155
        0.25**0.15,  # head, p_t = 0.9 >= 0.75: (1 - f_0) ** (p_t - omega) = 0.812
        0.75**0.15,  # rare, p_t = 0.9: 0.958
        1.0,  # at the pivot: 1 for every class
        1.0,  # class 3 never seen
        0.0,  # no label
    ]
    assert got == pytest.approx(expected, rel=1e-6)
    assert got[0] > got[1] > 1 > got[3] > got[2]  # lower confidence, rarer class: larger weight
    capped = CCARWeights(max_weight=1.5)
    capped.load_state_dict(weights.state_dict())
    assert capped.token_weights(torch.tensor([[uniform]]), torch.tensor([[1]])).item() == pytest.approx(1.5)


def test_statistics_round_trip_through_json():
    weights = DQRouteWeights(sharpness=0.3)
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        weights.observe(torch.randn(2, 6, 10, generator=generator), torch.randint(0, 5, (2, 6), generator=generator))
        weights.update()
    restored = DQRouteWeights(sharpness=0.3)
    restored.load_state_dict(json.loads(json.dumps(weights.state_dict())))
    for name, value in weights.stats.items():
        assert torch.equal(restored.stats[name], value), name
    with pytest.raises(ValueError, match="ccar"):
        CCARWeights().load_state_dict(weights.state_dict())


def dare_model(**overrides) -> hf_dare.MoEForCausalLM:
    torch.manual_seed(0)
    config = moe_config(
        **{"router": "dare", "difficulty_predictor_dropout": 0.0, "router_aux_loss_coef": 0.0, **overrides}
    )
    return hf_dare.MoEForCausalLM(config)


def warm_statistics(method: str) -> dict:
    """Statistics from one step over other sequences, as if training had run for a while."""
    callback = AnswerReweightingCallback(method, **OPTIONS[method])
    model = dare_model().eval()
    batch = digits_tensors(8, start=300)
    with torch.no_grad():
        logits = model(**batch).logits
    callback.reweighting.observe(logits, next_token_labels(batch["labels"]))
    callback.reweighting.update()
    return callback.statistics


@pytest.mark.parametrize("method", ["dqroute", "ccar"])
def test_reweighted_loss_is_weighted_ce_plus_the_routing_terms(method):
    """loss = sum_t w_t nll_t / num_items_in_batch + (the model's loss - its CE): L_diff and L_lb are kept."""
    model = dare_model(router_aux_loss_coef=0.5).train()
    reweighting = AnswerReweightingCallback(method, **OPTIONS[method]).reweighting
    reweighting.load_state_dict(warm_statistics(method))
    batch = digits_tensors(2)
    num_items = torch.tensor(3 * 63)  # as if this micro-batch were one of 3 in the step
    out = model(**batch, num_items_in_batch=num_items)
    assert out.difficulty_loss > 0 and out.aux_loss > 0
    loss = reweighted_loss(out.loss, out.logits, batch["labels"], reweighting, num_items, observe=False)
    targets = next_token_labels(batch["labels"])
    weights = reweighting.token_weights(out.logits.detach(), targets)
    nll = torch.nn.functional.cross_entropy(
        out.logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100
    )
    expected = (weights.flatten() * nll.double()).sum() / num_items + (out.loss - out.ce_loss).double()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not torch.allclose(weights[targets != -100], torch.ones(1, dtype=torch.float64))
    assert reweighting.step_sums == {}  # observe=False recorded nothing


def one_sgd_step(tmp_path, method: str | None, batch_size: int, accumulation: int, statistics=None):
    """Weights and reweighting statistics after one SGD step over the same 8 sequences, under a plain Trainer."""
    model = dare_model()
    args = sgd_step_args(tmp_path / f"{method}-{accumulation}", batch_size, accumulation)
    callbacks = [RoutingCallback()]
    if method is not None:
        callbacks.append(AnswerReweightingCallback(method, **OPTIONS[method]))
        callbacks[-1].statistics = statistics
    Trainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(8)), callbacks=callbacks).train()
    after = {name: param.detach().clone() for name, param in model.named_parameters()}
    return after, (callbacks[-1].reweighting.stats if method is not None else None)


@pytest.mark.parametrize("method", ["dqroute", "ccar"])
def test_accumulation_1x8_and_4x2_give_the_same_update(tmp_path, method):
    warm = warm_statistics(method)
    whole, whole_stats = one_sgd_step(tmp_path, method, 8, 1, warm)
    accumulated, accumulated_stats = one_sgd_step(tmp_path, method, 2, 4, warm)
    for name, param in whole.items():
        torch.testing.assert_close(accumulated[name], param, atol=1e-5, rtol=0, msg=name)
    # The step's tokens reached the statistics once, whatever the micro-batches.
    for name, value in whole_stats.items():
        torch.testing.assert_close(accumulated_stats[name], value, atol=1e-9, rtol=1e-5, msg=name)
    assert whole_stats["counts"].sum() == 2 * 8 * 63  # the warm-up's tokens and the step's
    # The reweighting changed the update (else the test would prove nothing).
    plain, _ = one_sgd_step(tmp_path, None, 8, 1)
    assert max((plain[name] - whole[name]).abs().max().item() for name in whole) > 1e-2


def test_moe_trainer_option_equals_the_callback_under_a_plain_trainer(tmp_path):
    args = sgd_step_args(tmp_path / "moe", 2, 2, answer_reweighting="ccar", answer_reweighting_options=OPTIONS["ccar"])
    model = dare_model()
    trainer = MoETrainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(4)))
    assert sum(isinstance(cb, AnswerReweightingCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    plain = dare_model()
    callbacks = [RoutingCallback(), AnswerReweightingCallback("ccar", **OPTIONS["ccar"])]
    Trainer(model=plain, args=sgd_step_args(tmp_path / "plain", 2, 2), train_dataset=as_dataset(digits_tensors(4)),
            callbacks=callbacks).train()  # fmt: skip
    for (name, param), other in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(param, other, msg=name)
    with pytest.raises(ValueError, match="answer_reweighting must be one of"):
        MoETrainer(model=plain, args=training_args(tmp_path, answer_reweighting="focal"))
    options = MoETrainingArguments(output_dir=str(tmp_path), answer_reweighting_options='{"pivot": 0.5}')
    assert options.answer_reweighting_options == {"pivot": 0.5}  # JSON on the command line


def test_moe_llava_classes_are_the_answer_tokens(tmp_path):
    folder = tmp_path / "data"
    data = load_llava_dataset(write_llava_data(folder, llava_records(8)), folder / "images")
    torch.manual_seed(0)
    model = hf_dare.MoELlavaForConditionalGeneration(llava_config(router="dare"))
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=4, answer_reweighting="dqroute")
    trainer = MoETrainer(model=model, args=args, train_dataset=data, data_collator=LlavaDataCollator(processor()))
    trainer.train()
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AnswerReweightingCallback))
    vocab = SPECIAL_TOKENS + WORDS
    classes = {vocab[c] for c in callback.statistics["classes"]}
    assert classes == {"0", "1", "2", "yes", "<|im_end|>"}  # the answers of llava_records and their end
    assert callback.statistics["steps"] == 2 and all(
        math.isfinite(log["loss"]) for log in trainer.state.log_history[:-1]
    )


class StatisticsRecorder(TrainerCallback):
    """The reweighting statistics after every optimizer step (read when the step is logged, after every callback's
    `on_step_end`), from whichever `AnswerReweightingCallback` the trainer holds then."""

    def __init__(self):
        self.trainer = None
        self.steps: dict[int, dict] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            callback = next(
                cb for cb in self.trainer.callback_handler.callbacks if isinstance(cb, AnswerReweightingCallback)
            )
            self.steps[state.global_step] = callback.statistics


def train_recording(output_dir, method: str, resume_from=None, restore: bool = False) -> tuple[dict, dict]:
    """Statistics after each step and the final weights of a 4-step run that saves checkpoints at steps 2 and 4."""
    model = dare_model()
    recorder = StatisticsRecorder()
    args = training_args(output_dir, max_steps=4, per_device_train_batch_size=2, save_strategy="steps",
                         save_steps=2, restore_callback_states_from_checkpoint=restore)  # fmt: skip
    callbacks = [RoutingCallback(), AnswerReweightingCallback(method, **OPTIONS[method]), recorder]
    trainer = Trainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(8)), callbacks=callbacks)
    recorder.trainer = trainer
    trainer.train(resume_from_checkpoint=resume_from)
    return recorder.steps, dict(model.named_parameters())


@pytest.mark.parametrize(("method", "restore"), [("dqroute", False), ("dqroute", True), ("ccar", False)])
def test_resume_continues_the_statistics(tmp_path, method, restore):
    """Resuming from checkpoint-2 of a 4-step run gives the uninterrupted run's statistics and weights, whether the
    Trainer recreates the callback from the checkpoint (`restore_callback_states_from_checkpoint`) or not."""
    full, full_params = train_recording(tmp_path / "full", method)
    saved = json.loads((tmp_path / "full" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["AnswerReweightingCallback"]["attributes"]["statistics"] == full[2]
    assert full[2]["steps"] == 2 and full[4] != full[2]

    resumed, resumed_params = train_recording(
        tmp_path / "resumed", method, resume_from=str(tmp_path / "full" / "checkpoint-2"), restore=restore
    )
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["steps"] == step and resumed[step]["classes"] == full[step]["classes"]
        for name in ("counts", "entropy", "accuracy", "log_weights"):
            if name in full[step]:
                assert resumed[step][name] == pytest.approx(full[step][name], rel=1e-6, abs=1e-9), (step, name)
    for name, param in full_params.items():
        torch.testing.assert_close(resumed_params[name], param, msg=name)


@pytest.mark.slow
def test_statistics_identical_on_two_processes(tmp_path):
    """DDP on 2 CPU processes (gloo): after every step both ranks hold the same statistics, gathered from both ranks'
    tokens (step 1 equals one process on the 4 sequences both ranks shared)."""
    torch.manual_seed(0)
    dare_model().save_pretrained(tmp_path / "model")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path / "model"), str(tmp_path), json.dumps(OPTIONS)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["inputs"] != ranks[1]["inputs"]  # each rank trained on its own data
    for method in ("dqroute", "ccar"):
        steps = [rank[method] for rank in ranks]
        assert len(steps[0]) == 3 and steps[0] == steps[1], method  # bit-identical after every step
        assert steps[0][0]["counts"] != steps[0][-1]["counts"]

        model = hf_dare.MoEForCausalLM.from_pretrained(tmp_path / "model")
        callback = AnswerReweightingCallback(method, **OPTIONS[method])
        args = sgd_step_args(tmp_path / f"single-{method}", 4, 1)
        Trainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(4)),
                callbacks=[RoutingCallback(), callback]).train()  # fmt: skip
        single = callback.statistics
        assert single["classes"] == steps[0][0]["classes"]
        for name in single:
            if name not in ("method", "num_classes", "steps", "classes"):
                assert steps[0][0][name] == pytest.approx(single[name], rel=1e-5, abs=1e-9), (method, name)
