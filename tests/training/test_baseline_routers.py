"""The DARE paper's baseline routers in training: ReMoE's lambda moves once per optimizer step (x1.2 or /1.2
toward the target sparsity), identically on 2 ranks, and comes back on resume; each router trained a few dozen
steps reaches the sparsity it is meant to (a behaviour test, not a timing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import hf_dare
from hf_dare.modeling import ReMoERouter
from hf_dare.training import DareCallback, MoETrainer
from tests.tiny_models import moe_config
from tests.training.helpers import as_dataset, digits_tensors, init_seeds, training_args

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("remoe_worker.py")


def model_for(router: str, seed: int = 0, **overrides) -> hf_dare.MoEForCausalLM:
    torch.manual_seed(seed)
    return hf_dare.MoEForCausalLM(moe_config(router=router, **overrides))


def lambdas_of(model) -> list[torch.Tensor]:
    return [block.gate.l1_coef.clone() for block in model.moe_blocks]


def expected_lambda(before: torch.Tensor, sparsities: list[float], target: float) -> torch.Tensor:
    """What ReMoE's update does to the one lambda of all layers (the original's rule, in float64, stored float32):
    lambda * 1.2 when the layers' mean sparsity is below the target, / 1.2 otherwise (a tie divides)."""
    sparsity = sum(sparsities) / len(sparsities)
    value = before.item() * 1.2 if sparsity < target else before.item() / 1.2
    return torch.tensor(value, dtype=torch.float32)


class GateCounts:
    """Forward hook: [active experts, gates] per MoE layer of every training forward, summed per optimizer step
    (`new_step` starts the next)."""

    def __init__(self, model):
        self.steps: list[list[list[int]]] = [[[0, 0] for _ in model.moe_blocks]]
        model.register_forward_hook(self)

    def __call__(self, module, args, outputs):
        if module.training:
            for totals, counts in zip(self.steps[-1], outputs.expert_counts, strict=True):
                totals[0] += int(counts.sum())
                totals[1] += counts.numel() * module.config.num_experts

    def new_step(self):
        self.steps.append([[0, 0] for _ in self.steps[-1]])


class LambdaRecorder(DareCallback):
    """DareCallback that also keeps lambda after each of its updates."""

    def __init__(self, model, counts: GateCounts):
        super().__init__()
        self.history = [lambdas_of(model)]
        self.counts = counts

    def on_step_end(self, args, state, control, model=None, **kwargs):
        super().on_step_end(args, state, control, model=model, **kwargs)
        self.history.append(lambdas_of(model))
        self.counts.new_step()


def test_remoe_lambda_moves_once_per_optimizer_step_toward_the_target(tmp_path):
    model = model_for("remoe", num_experts_per_tok=1, remoe_initial_l1_coef=1e-3)  # target sparsity 0.75
    counts = GateCounts(model)
    callback = LambdaRecorder(model, counts)
    args = training_args(tmp_path, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         learning_rate=3e-3)  # fmt: skip
    trainer = MoETrainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(16)), callbacks=[callback])
    trainer.train()

    assert len(callback.history) == 5  # one update per optimizer step, after both micro-batches
    for step, (before, after) in enumerate(zip(callback.history, callback.history[1:], strict=False)):
        sparsities = []
        for active, gates in counts.steps[step]:
            assert gates == 2 * 2 * 64 * 4  # 2 micro-batches of 2 sequences of 64 tokens, 4 gates each
            sparsities.append(1 - active / gates)
        expected = expected_lambda(before[0], sparsities, 0.75)
        for layer, new in enumerate(after):  # one lambda for every layer, x1.2 or /1.2 as the mean sparsity asked
            assert torch.equal(new, expected), (step, layer)
    state = callback.last_state[0]
    assert state["l1_coef"] == callback.history[-1][0].item() and 0.0 <= state["sparsity"] <= 1.0
    # The logs carry lambda, the router loss and the share of tokens with no expert.
    log = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    for block, value in zip(model.moe_blocks, callback.history[-1], strict=True):
        assert log[f"routing/l1_coef_layer_{block.layer_idx}"] == pytest.approx(value.item())
    assert log["loss/router"] > 0 and 0.0 <= log["routing/frac_0_experts"] <= 1.0
    assert log["loss"] == pytest.approx(log["loss/ce"] + 0.01 * log["loss/aux"] + log["loss/router"], rel=1e-3)


def test_remoe_lambda_is_saved_and_restored_on_resume(tmp_path):
    data = as_dataset(digits_tensors(8))
    kwargs = dict(max_steps=6, per_device_train_batch_size=2, save_strategy="steps", save_steps=3)
    full = model_for("remoe", num_experts_per_tok=1)
    MoETrainer(model=full, args=training_args(tmp_path / "full", **kwargs), train_dataset=data).train()
    saved = load_file(tmp_path / "full" / "checkpoint-3" / "model.safetensors")
    saved_lambdas = [v for k, v in saved.items() if k.endswith("gate.l1_coef")]
    assert len(saved_lambdas) == 2 and all(v.item() != pytest.approx(1e-8) for v in saved_lambdas)

    resumed = model_for("remoe", seed=1, num_experts_per_tok=1)
    trainer = MoETrainer(model=resumed, args=training_args(tmp_path / "resumed", **kwargs), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for a, b in zip(lambdas_of(full), lambdas_of(resumed), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("target, moves", [(0.75, "lambda"), (0.2, "gate offset")])
def test_remoe_lambda_identical_on_two_ranks_from_both_ranks_gates(tmp_path, target, moves):
    """Target 0.75 (k=1 of 4): the model starts denser and lambda grows; target 0.2: it starts sparser with lambda at
    its floor, and the gate offset grows. Either way one step of the rule from both ranks' gates, bit-identical."""
    torch.manual_seed(0)
    config = moe_config(
        router="remoe", num_experts_per_tok=1, remoe_initial_l1_coef=1e-3, remoe_target_sparsity=target
    )
    hf_dare.MoEForCausalLM(config).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path / "model"), str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]

    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["lambdas"] == ranks[1]["lambdas"]  # bit-identical after every step
    assert ranks[0]["counts"] != ranks[1]["counts"]  # each rank saw its own gates
    history = ranks[0]["lambdas"]
    assert len(history) == 5
    router = ReMoERouter(config)
    for step, (before, after) in enumerate(zip(history, history[1:], strict=False)):
        sparsities = []
        for layer in before:
            active = sum(r["counts"][step][layer][0] for r in ranks)
            gates = sum(r["counts"][step][layer][1] for r in ranks)
            sparsities.append(1 - active / gates)
        l1_coef, offset = next(iter(before.values()))
        if moves == "lambda":
            expected = expected_lambda(torch.tensor(l1_coef, dtype=torch.float32), sparsities, target).item()
            assert all(value == [expected, 0.0] for value in after.values()), step
        else:  # at the floor and sparser than the target: lambda stays, the offset takes a step
            assert sum(sparsities) / len(sparsities) > target
            expected = torch.tensor(offset + 0.01, dtype=torch.float32).item()
            assert all(value == [l1_coef, expected] for value in after.values()), step
        expected_state = router.stepped(l1_coef, offset, sum(sparsities) / len(sparsities))
        expected_state = [torch.tensor(v, dtype=torch.float32).item() for v in expected_state]
        assert all(value == expected_state for value in after.values()), step
    if moves == "gate offset":
        assert next(iter(history[-1].values()))[1] == pytest.approx(0.04)


def train(router: str, steps: int, tmp_path, callbacks=None, **overrides) -> tuple[MoETrainer, dict]:
    """`steps` AdamW steps on 16 digit sequences (batch 8); returns the trainer and the training logs' Avg K by
    step."""
    model = model_for(router, **overrides)
    args = training_args(tmp_path, max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=5)
    trainer = MoETrainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(16)), callbacks=callbacks)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "routing/avg_k" in entry]
    return trainer, {entry["step"]: entry["routing/avg_k"] for entry in logs}


def eval_avg_k(trainer) -> float:
    model = trainer.model.eval()
    with torch.no_grad():
        out = model(**digits_tensors(16))
    return torch.stack(out.expert_counts).float().mean().item()


@pytest.mark.parametrize("seed", init_seeds())
def test_top_p_dynamic_loss_lowers_avg_k_from_the_p_of_an_untrained_router(tmp_path, seed):
    """Near-uniform P at the start: p = 0.6 of 4 experts needs 3; the dynamic loss sharpens P until every token
    reaches p with 1 expert (by step 50 from each of seeds 0-7), while the same 60 steps without it leave Avg K
    near where p puts it (2.7-3.0)."""
    _, plain = train("top_p", 60, tmp_path / "plain", top_p_threshold=0.6, seed=seed)
    trainer, sharpened = train(
        "top_p", 60, tmp_path / "dyn", top_p_threshold=0.6, top_p_dynamic_loss_coef=0.1, seed=seed
    )
    assert all(2.6 < k <= 3.0 + 1e-6 for k in plain.values())
    assert sharpened[5] > 2.3 and sharpened[60] < 1.25
    assert plain[60] - sharpened[60] > 1.4
    assert 1.0 <= eval_avg_k(trainer) < 1.25


class ForcedLambda(TrainerCallback):
    """Sets every ReMoE layer's lambda to `value` when training begins."""

    def __init__(self, value: float):
        self.value = value

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for block in model.moe_blocks:
            block.gate.l1_coef.fill_(self.value)


@pytest.mark.parametrize("seed", init_seeds())
def test_remoe_lambda_grows_back_from_1e_45_and_reaches_the_target_sparsity(tmp_path, seed):
    """Lambda forced to 1e-45 (float32's subnormals, where x1.2 rounded back to the same value and lambda could
    never grow again) is back at its floor (the initial lambda) after one step and grows; from a dense start
    (Avg K >= 1.4 at step 10) the sparsity reaches the target 0.75 (k=1 of 4: Avg K 1) within 40 steps (from each of
    init seeds 0-7, by step 20-30). Pushing back toward density is the gate offset's part (next test)."""
    model = model_for("remoe", seed=seed, num_experts_per_tok=1, remoe_initial_l1_coef=1e-4)
    counts = GateCounts(model)
    callback = LambdaRecorder(model, counts)
    args = training_args(tmp_path, max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=5)
    trainer = MoETrainer(
        model=model, args=args, train_dataset=as_dataset(digits_tensors(16)), callbacks=[ForcedLambda(1e-45), callback]
    )
    trainer.train()
    lambdas = [history[0].item() for history in callback.history[1:]]
    assert lambdas[0] == pytest.approx(1e-4) and max(lambdas) > 1e-4  # at the floor, then growing
    avg_k = {e["step"]: e["routing/avg_k"] for e in trainer.state.log_history if "routing/avg_k" in e}
    assert avg_k[5] >= 1.4 or avg_k[10] >= 1.4  # a dense start
    assert min(avg_k.values()) <= 1.1  # the target sparsity reached


@pytest.mark.parametrize("seed", init_seeds())
def test_remoe_gate_offset_revives_the_gates_an_overshooting_lambda_killed(tmp_path, seed):
    """Lambda forced to 0.1 (an overshoot) kills every gate: Avg K 0 (target 2 of 4). An L1 penalty cannot revive
    a gate ReLU holds at 0, so with the original controller (`remoe_gate_offset_step=0`) the model stays far
    sparser than the target after lambda is back at its floor (step 26); the gate offset that takes over there
    brings Avg K back to the target (checked for each of init seeds 0-7: original below 0.8 at steps 80-100, offset
    within 1.7-2.3 there)."""
    avg_k, gates = {}, {}
    for step in (0.0, 0.01):
        trainer, avg_k[step] = train("remoe", 100, tmp_path / str(step), seed=seed, remoe_initial_l1_coef=1e-3,
                                     remoe_gate_offset_step=step, callbacks=[ForcedLambda(0.1)])  # fmt: skip
        gates[step] = trainer.model.moe_blocks[0].gate
    for curve in avg_k.values():
        assert max(curve[s] for s in (10, 15, 20)) < 0.1  # collapsed
    assert all(avg_k[0.0][s] < 0.8 for s in range(80, 101, 5))
    assert all(1.7 < avg_k[0.01][s] < 2.3 for s in range(80, 101, 5))
    assert gates[0.0].gate_offset is None and gates[0.01].gate_offset.item() > 0.1
    assert gates[0.01].l1_coef.item() == gates[0.0].l1_coef.item() == pytest.approx(1e-3)  # lambda at its floor


@pytest.mark.parametrize("seed", init_seeds())
def test_dynmoe_efficiency_pressure_lowers_avg_k_and_inference_never_below_one(tmp_path, seed):
    """The DARE paper reports DynMoE at Avg K 1.00: its efficiency loss lowers the active experts. Paired with the
    same 60 steps without it, the Avg K at inference is lower (by 0.16-1.2 from init seeds 0-7); and at inference a
    token with no active expert takes its best one, so none uses fewer than one (in training it uses none, as the
    original: test_router_fidelity.py)."""
    eval_counts = {}
    for coef in (0.0, 0.01):
        trainer, _ = train("dynmoe", 60, tmp_path / str(coef), seed=seed, dynmoe_efficiency_coef=coef)
        model = trainer.model.eval()
        with torch.no_grad():
            eval_counts[coef] = torch.stack(model(**digits_tensors(16)).expert_counts)
    assert eval_counts[0.01].min() >= 1 and eval_counts[0.0].min() >= 1
    assert eval_counts[0.01].float().mean() < eval_counts[0.0].float().mean() - 0.1


@pytest.mark.parametrize("seed", init_seeds())
def test_moepp_sends_part_of_the_tokens_to_zero_computation_experts(tmp_path, seed):
    """Top-2 over 4 FFN + 4 zero-computation experts: some tokens take a zero, copy or constant expert, so Avg K
    (FFN experts only) stays below 2 and some tokens use no FFN expert at all."""
    trainer, avg_k = train("moepp", 30, tmp_path, seed=seed)
    assert all(0.3 < k < 2.0 for k in avg_k.values())
    assert 0.3 < eval_avg_k(trainer) < 2.0
    assert any(entry.get("routing/frac_0_experts", 0) > 0 for entry in trainer.state.log_history)
