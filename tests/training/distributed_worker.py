"""Run by `test_distributed.py` under `torchrun --nproc_per_node 2` on CPU (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_worker.py {ddp,fsdp} MODEL_DIR OUT_DIR

ddp:  the standard Trainer + DareCallback + RoutingMetricsCallback with DDP (4 SGD steps, each rank its own half of the data); rank 0 also saves the weights
      after the first step. fsdp: FSDP2 (`fully_shard` on every decoder layer) in a plain loop, checking
      after each step that the thresholds are the EMA toward the quantiles of all ranks' difficulties.
Each rank writes OUT_DIR/rank{r}.json: thresholds after every step, the first token ids it trained on, ...
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

import hf_dare
from hf_dare.training import DareCallback, RoutingMetricsCallback
from tests.training.helpers import as_dataset, dare_thresholds, digits_tensors, sgd_step_args


class Recorder(TrainerCallback):
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.thresholds = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.thresholds.append(dare_thresholds(model))
        if state.global_step == 1 and state.is_world_process_zero:
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, self.out_dir / "step1.pt")


def run_ddp(model_dir: Path, out_dir: Path, rank: int) -> dict:
    model = hf_dare.MoEForCausalLM.from_pretrained(model_dir)
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(None))
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"][:, 20:28].tolist()),
                                    with_kwargs=True)  # fmt: skip
    recorder = Recorder(out_dir)
    args = sgd_step_args(
        out_dir / "trainer", batch_size=2, steps=4, ddp_backend="gloo", ddp_find_unused_parameters=True
    )
    trainer = Trainer(  # the standard Trainer: the model's loss and the callbacks do the rest
        model=model,
        args=args,
        train_dataset=as_dataset(digits_tensors(4)),
        callbacks=[DareCallback(), RoutingMetricsCallback(), recorder],
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {
        "world_size": dist.get_world_size(),
        "thresholds": recorder.thresholds,
        "inputs": [x for x in seen if x is not None],
        "logs": logs,
    }


def run_fsdp(model_dir: Path, out_dir: Path, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    model = hf_dare.MoEForCausalLM.from_pretrained(model_dir)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.train()  # from_pretrained returns the model in eval mode
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gamma = model.config.threshold_momentum
    levels = torch.tensor([0.6, 0.9, 0.99])
    history, errors, inputs = [], [], []
    for step in range(4):
        batch = digits_tensors(2, start=100 * step + 2 * rank)  # every rank its own data
        inputs.append(batch["input_ids"][:, 20:28].tolist())
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        before = dare_thresholds(model)
        local = [d[out.token_mask].detach() for d in out.difficulty]
        everything = []
        for values in local:
            gathered = [torch.zeros_like(values) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, values)
            everything.append(torch.cat(gathered))
        model.update_difficulty_thresholds()
        after = dare_thresholds(model)
        for (layer, old), values in zip(before.items(), everything, strict=True):
            target = torch.cummax(torch.quantile(values, levels), 0).values
            expected = gamma * torch.tensor(old) + (1 - gamma) * target
            errors.append((torch.tensor(after[layer]) - expected).abs().max().item())
        history.append(after)
    model.eval()
    with torch.no_grad():
        probe = model(**digits_tensors(2, start=500))
    return {
        "world_size": dist.get_world_size(),
        "thresholds": history,
        "inputs": inputs,
        "max_error": max(errors),
        "probe_counts": [c.tolist() for c in probe.expert_counts],
    }


def main():
    mode, model_dir, out_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    rank = int(__import__("os").environ["RANK"])
    result = run_ddp(model_dir, out_dir, rank) if mode == "ddp" else run_fsdp(model_dir, out_dir, rank)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
