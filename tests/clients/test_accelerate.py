"""`accelerate launch` with the FSDP and DeepSpeed ZeRO-2 / ZeRO-3 configs of examples/accelerate, 2 CPU processes
(gloo), through the plain transformers `Trainer` with `DareCallback`: DARE's thresholds and the trained weights
agree on both ranks, a rank whose tokens skip experts does not hang ZeRO-3 (each MoE block is a ZeRO-3 leaf
module) or FSDP, and the saved folder reloads with `trust_remote_code`. accelerate enables FSDP only on GPU-class
devices; on CPU the worker sets its state to FSDP before training (`accelerate_worker.fsdp_on_cpu`), and the rest
is accelerate's FSDP2 path as on GPUs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_dare import MoEForCausalLM
from tests.clients.accelerate_worker import STEPS, fingerprint
from tests.tiny_models import moe_config

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "accelerate"
WORKER = Path(__file__).with_name("accelerate_worker.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("accelerate") / "model"
    MoEForCausalLM(moe_config("qwen3", router="dare", difficulty_predictor_dropout=0.0)).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: str, model_dir: Path, out: Path) -> list[dict]:
    out.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
               str(WORKER), str(model_dir), str(out)]  # fmt: skip
    # cwd: the configs name their DeepSpeed JSON relative to the repository root.
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, distributed_type, stage",
    [("zero2.yaml", "DEEPSPEED", 2), ("zero3.yaml", "DEEPSPEED", 3), ("fsdp.yaml", "FSDP", None)],
)
def test_accelerate_trains_dare_identically_on_both_ranks_and_saves(
    model_dir, tmp_path, config, distributed_type, stage
):
    ranks = launch(config, model_dir, tmp_path / "run")
    first, second = ranks
    assert [(r["world_size"], r["distributed_type"], r["zero_stage"]) for r in ranks] == [
        (2, f"DistributedType.{distributed_type}", stage)
    ] * 2
    if distributed_type == "FSDP":  # every parameter is sharded (a DTensor) by the config's FSDP2 wrapping
        assert first["sharded_parameters"] == len(list(MoEForCausalLM.from_pretrained(model_dir).parameters()))
    # Rank 1's repeated token sends every token to the same experts: the others get nothing there.
    assert min(first["first_forward_expert_tokens"]) > 0 and 0 in second["first_forward_expert_tokens"]
    if stage == 3:
        assert first["leaf_blocks"] == second["leaf_blocks"] == [True, True]  # both MoE blocks are ZeRO-3 leaves

    initial = MoEForCausalLM.from_pretrained(model_dir)
    assert len(first["thresholds"]) == STEPS and first["thresholds"] == second["thresholds"]
    assert all(taus != initial.config.initial_thresholds for taus in first["thresholds"][-1].values())
    assert first["weights"] == second["weights"]  # gathered full weights, bit for bit
    assert first["weights"] != fingerprint(initial.named_parameters())
    assert all(loss == loss and loss < 100 for loss in first["losses"])  # finite

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "saved", trust_remote_code=True)
    assert fingerprint(saved.named_parameters()) == first["weights"]
    for block in saved.moe_blocks:
        assert block.gate.threshold_tracker.thresholds.tolist() == first["thresholds"][-1][str(block.layer_idx)]


def test_fsdp_config_shards_each_decoder_layer(monkeypatch):
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    # What `accelerate launch --config_file fsdp.yaml` hands each process, and the plugin the Trainer builds from it.
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "train.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    for name, value in env.items():
        if name.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
    model = MoEForCausalLM(moe_config("qwen3", router="dare"))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [name for name, module in model.named_modules() if policy(module)] == [
        f"model.language_model.layers.{i}" for i in range(model.config.num_hidden_layers)
    ]
