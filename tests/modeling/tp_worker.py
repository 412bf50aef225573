"""Run by `test_parallel_plans.py` under `torchrun --nproc_per_node 2` on CPU (gloo): load MODEL_DIR with
`tp_plan="auto"` (remote code) and write this rank's logits and local expert shard shape to OUT_DIR."""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig


def main():
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    config = DistributedConfig(tp_plan="auto")
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, distributed_config=config)
    input_ids = torch.arange(2, 14).view(2, 6)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    rank = int(os.environ["RANK"])
    experts = model.get_decoder().layers[0].mlp.experts.gate_up_proj
    local = experts.to_local() if hasattr(experts, "to_local") else experts
    torch.save(logits, f"{out_dir}/logits{rank}.pt")
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"local_gate_up_shape": list(local.shape)}, f)


if __name__ == "__main__":
    main()
