"""Two CPU processes (gloo) under torchrun: DARE's thresholds stay identical on every rank, are computed from
all ranks' difficulties, and data parallelism trains like one process on the whole batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer

import hf_dare
from hf_dare.training import DareCallback
from tests.tiny_models import moe_config
from tests.training.helpers import as_dataset, digits_tensors, training_args

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_worker.py")


def run_workers(tmp_path: Path, mode: str) -> tuple[Path, list[dict]]:
    torch.manual_seed(0)
    # No dropout and no balancing loss: a 2-process step must equal a 1-process step (L_lb is not linear in the batch).
    config = moe_config(router="dare", difficulty_predictor_dropout=0.0, router_aux_loss_coef=0.0)
    hf_dare.MoEForCausalLM(config).save_pretrained(tmp_path / "model")
    out = tmp_path / mode
    out.mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), mode, str(tmp_path / "model"), str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def assert_thresholds_identical_and_moving(ranks: list[dict]):
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["inputs"] != ranks[1]["inputs"]  # each rank trained on its own data
    assert ranks[0]["thresholds"] == ranks[1]["thresholds"]  # bit-identical after every step
    steps = ranks[0]["thresholds"]
    assert len(steps) == 4 and steps[0] != steps[-1] and steps[0]["0"] != [0.0, 1.0, 2.0]


@pytest.mark.slow
def test_ddp_trainer_thresholds_identical_across_ranks(tmp_path):
    out, ranks = run_workers(tmp_path, "ddp")
    assert_thresholds_identical_and_moving(ranks)
    # Routing metrics are averaged over both ranks: every rank logs the same numbers.
    assert ranks[0]["logs"] == ranks[1]["logs"] and "routing/avg_k" in ranks[0]["logs"][0]

    # One process on the 4 sequences both ranks shared in step 1: same thresholds (gathered from both ranks)
    # and the same weights (CE over all tokens, routing losses counted once).
    model = hf_dare.MoEForCausalLM.from_pretrained(tmp_path / "model")
    args = training_args(tmp_path / "single", max_steps=1, per_device_train_batch_size=4, optim="sgd",
                         learning_rate=0.5, max_grad_norm=0.0)  # fmt: skip
    callback = DareCallback()
    Trainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(4)), callbacks=[callback]).train()
    for layer_idx, taus in callback.last_thresholds.items():
        assert ranks[0]["thresholds"][0][str(layer_idx)] == pytest.approx(taus, abs=1e-6)
    after_step1 = torch.load(out / "step1.pt")
    for name, param in model.named_parameters():
        torch.testing.assert_close(after_step1[name], param.detach(), atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_fsdp2_thresholds_identical_across_ranks(tmp_path):
    _, ranks = run_workers(tmp_path, "fsdp")
    assert_thresholds_identical_and_moving(ranks)
    assert max(r["max_error"] for r in ranks) < 1e-5  # EMA toward the quantiles of both ranks' predictions
    assert ranks[0]["probe_counts"] == ranks[1]["probe_counts"]  # same routing on both ranks
