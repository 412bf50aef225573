"""Run by `test_baseline_routers.py` under `torchrun --nproc_per_node 2` on CPU (gloo): ReMoE trained with the
standard Trainer + DareCallback under DDP, each rank on its own half of the data.

    python -m torch.distributed.run --standalone --nproc_per_node 2 remoe_worker.py MODEL_DIR OUT_DIR

Each rank writes OUT_DIR/rank{r}.json: [lambda, gate offset] of every ReMoE layer before training and after every
step, and the [active gates, gates] its own training forwards saw in each step (per layer).
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import Trainer, TrainerCallback

import hf_dare
from hf_dare.training import DareCallback
from tests.training.helpers import as_dataset, digits_tensors, training_args


def lambdas(model) -> dict[str, list[float]]:
    return {str(block.layer_idx): list(block.gate.controller_state()) for block in model.moe_blocks}


class Recorder(TrainerCallback):
    """[lambda, gate offset] after each step (this callback runs after DareCallback) and this rank's gate counts per step."""

    def __init__(self, model):
        self.lambdas = [lambdas(model)]
        self.counts: list[dict[str, list[int]]] = [{}]
        model.register_forward_hook(self.record)

    def record(self, module, args, outputs):
        if not module.training:
            return
        step = self.counts[-1]
        for block, counts in zip(module.moe_blocks, outputs.expert_counts, strict=True):
            active, gates = step.get(str(block.layer_idx), [0, 0])
            step[str(block.layer_idx)] = [active + int(counts.sum()), gates + counts.numel() * 4]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.lambdas.append(lambdas(model))
        self.counts.append({})


def main():
    model_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    model = hf_dare.MoEForCausalLM.from_pretrained(model_dir)
    recorder = Recorder(model)
    args = training_args(
        out_dir / "trainer",
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
    )
    data = as_dataset(digits_tensors(32))
    Trainer(model=model, args=args, train_dataset=data, callbacks=[DareCallback(), recorder]).train()
    result = {"world_size": dist.get_world_size(), "lambdas": recorder.lambdas, "counts": recorder.counts[:-1]}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
