"""Launched by `test_accelerate.py` on 2 CPU processes (FSDP on CPU: see `fsdp_on_cpu`):

    accelerate launch --config_file examples/accelerate/{fsdp,zero2,zero3}.yaml accelerate_worker.py MODEL_DIR OUT_DIR

Trains a tiny DARE MoE causal LM for a few steps with the plain transformers `Trainer` and `DareCallback`, then
saves it with `trainer.save_model`. Rank 0 trains on scikit-learn's digits; rank 1 on sequences of one repeated
token, whose tokens all take the same experts, so some experts get no token on rank 1. Each rank writes
OUT_DIR/rank{r}.json: its thresholds after every step, a fingerprint of the full (gathered) weights after
training, the tokens each expert got in its first forward, and what the launcher set up.
"""

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_dare.training import DareCallback
from tests.training.helpers import DIGIT_BASE, as_dataset, dare_thresholds, digits_tensors

STEPS = 3


def fingerprint(named_tensors) -> dict[str, list[float]]:
    """Per tensor: its sum and a position-weighted sum, in float64 (equal fingerprints: equal tensors, in practice)."""
    out = {}
    for name, tensor in named_tensors:
        flat = tensor.detach().double().reshape(-1)
        out[name] = [flat.sum().item(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum().item()]
    return out


def full_parameters(model) -> dict[str, list[float]]:
    """The fingerprint of the full parameters, whatever shards them (ZeRO-3, FSDP2) or not (ZeRO-2)."""
    params = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):  # ZeRO-3: gather the partitions
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return fingerprint(params)
    return fingerprint((name, p.full_tensor() if hasattr(p, "full_tensor") else p) for name, p in params)


class Recorder(TrainerCallback):
    def __init__(self):
        self.thresholds = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.thresholds.append(dare_thresholds(model))


def rank_dataset(rank: int, num_samples: int = 8):
    tensors = digits_tensors(num_samples)
    if rank == 1:  # one repeated token: identical hidden states at the first MoE layer, so identical routing
        tensors = {key: torch.full_like(value, DIGIT_BASE + 5) for key, value in tensors.items()}
        tensors["attention_mask"] = torch.ones_like(tensors["input_ids"])
    return as_dataset(tensors)


def skip_deepspeed_op_builds() -> None:
    """DeepSpeed's CPU backend compiles its shared-memory communication op (and probes every op's compiler
    support) on first use: minutes on 2 cores. Marking no op compatible makes it use gloo as it is, which
    the `torch_adam` optimizer of the configs needs nothing more than."""
    try:
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__ = defaultdict(bool)


def fsdp_on_cpu(trainer: Trainer) -> None:
    """accelerate turns FSDP on for GPU-class devices only: on CPU its state leaves `ACCELERATE_USE_FSDP`
    processes as MULTI_CPU (plain DDP). Set the Trainer's accelerator state as accelerate sets it on GPUs
    (distributed type FSDP, the plugin built from the launcher's `FSDP_*` variables) before training; the rest is
    accelerate's own FSDP2 path, unchanged: `fully_shard` by the config's wrap policy, sharded optimizer, full
    state dict on `save_model`."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or torch.cuda.is_available():
        return
    from accelerate import FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, FullyShardedDataParallelPlugin()
    PartialState().distributed_type = DistributedType.FSDP  # as AcceleratorState's init mirrors it
    trainer.is_fsdp_enabled = True


def main():
    skip_deepspeed_op_builds()
    model_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    # The arguments first: under ZeRO-3, `from_pretrained` then builds the model partitioned (zero.Init).
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        ddp_backend="gloo",
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    loads = []
    first_block = model.moe_blocks[0]
    first_block.experts.register_forward_hook(
        lambda module, inputs, output: loads.append(
            torch.bincount(inputs[1].reshape(-1), minlength=module.num_experts + 1)[: module.num_experts].tolist()
        )
    )
    recorder = Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=rank_dataset(rank), callbacks=[DareCallback(), recorder])
    fsdp_on_cpu(trainer)
    trainer.train()
    trained = full_parameters(trainer.model)
    trainer.save_model(str(out_dir / "saved"))
    leaf_blocks = None
    if hasattr(next(model.parameters()), "ds_id"):
        from deepspeed.utils import z3_leaf_module

        leaf_blocks = [z3_leaf_module(block) for block in model.moe_blocks]
    result = {
        "world_size": dist.get_world_size(),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage
        if trainer.accelerator.state.deepspeed_plugin is not None
        else None,
        "thresholds": recorder.thresholds,
        "weights": trained,
        "first_forward_expert_tokens": loads[0],
        "leaf_blocks": leaf_blocks,
        "sharded_parameters": sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
