"""Run by `test_reweighting.py` under `torchrun --nproc_per_node 2` on CPU (gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 reweighting_worker.py MODEL_DIR OUT_DIR OPTIONS

For each method (dqroute, ccar): the standard Trainer with DDP, `RoutingCallback` and `AnswerReweightingCallback`,
3 SGD steps, each rank its own half of the data. Each rank writes OUT_DIR/rank{r}.json: the statistics after every
step and the first token ids it trained on.
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import Trainer, TrainerCallback

import hf_dare
from hf_dare.training import AnswerReweightingCallback, RoutingCallback
from tests.training.helpers import as_dataset, digits_tensors, sgd_step_args


class Recorder(TrainerCallback):
    """The reweighting statistics after every step (on_log: after every callback's on_step_end)."""

    def __init__(self, reweighting: AnswerReweightingCallback):
        self.reweighting = reweighting
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            self.steps.append(self.reweighting.statistics)


def run(method: str, options: dict, model_dir: Path, out_dir: Path) -> tuple[list[dict], list]:
    model = hf_dare.MoEForCausalLM.from_pretrained(model_dir)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"][:, 20:28].tolist()),
                                    with_kwargs=True)  # fmt: skip
    reweighting = AnswerReweightingCallback(method, **options)
    recorder = Recorder(reweighting)
    args = sgd_step_args(
        out_dir / f"trainer-{method}", batch_size=2, steps=3, ddp_backend="gloo", ddp_find_unused_parameters=True
    )
    trainer = Trainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(4)),
                      callbacks=[RoutingCallback(), reweighting, recorder])  # fmt: skip
    trainer.train()
    return recorder.steps, seen


def main():
    model_dir, out_dir, options = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    rank = int(os.environ["RANK"])
    result = {}
    for method in ("dqroute", "ccar"):
        result[method], result["inputs"] = run(method, options[method], model_dir, out_dir)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
