"""Parallel plans: every pattern names modules the models have, and `tp_plan="auto"` shards a saved MoE causal
LM over 2 CPU processes (gloo) with the unsharded logits."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_dare import MoEForCausalLM, MoELlavaForConditionalGeneration
from tests.tiny_models import llava_config, moe_config

WORKER = Path(__file__).with_name("tp_worker.py")


@pytest.mark.parametrize("router", ["top_k", "dare"])
def test_every_plan_pattern_names_existing_modules(router):
    for model in (
        MoEForCausalLM(moe_config(router=router)),
        MoELlavaForConditionalGeneration(llava_config(router=router)),
    ):
        names = [name for name, _ in model.named_modules()] + [name for name, _ in model.named_parameters()]
        for plan in (model.tp_plan, model.ep_plan):
            for pattern in plan:
                regex = re.compile(pattern.replace(".", r"\.").replace("*", r"\d+") + "$")
                if "mlp.gate_proj" in pattern or "mlp.up_proj" in pattern or "mlp.down_proj" in pattern:
                    continue  # the backbone's dense FFNs: only in the layers that are not MoE layers
                assert any(regex.match(name) for name in names), pattern
        moe_layers = {block.layer_idx for block in model.moe_blocks}
        sharded = {n for n in names if n.endswith("mlp.experts.gate_up_proj")}
        assert len(sharded) == len(moe_layers)


@pytest.mark.slow
def test_tensor_parallel_auto_plan_gives_the_unsharded_logits(tmp_path):
    torch.manual_seed(0)
    model = MoEForCausalLM(moe_config(router="dare")).eval()
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        reference = model(input_ids=torch.arange(2, 14).view(2, 6)).logits
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(tmp_path / "model"), str(tmp_path)]  # fmt: skip
    # Outside the repo, without hf_dare: the checkpoint's own code is sharded.
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"logits{rank}.pt"), reference, atol=1e-5, rtol=1e-5)
        shape = json.loads((tmp_path / f"rank{rank}.json").read_text())["local_gate_up_shape"]
        assert shape[1] == model.config.moe_intermediate_size  # 2I split over 2 ranks: sharded
