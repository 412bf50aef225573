"""End to end on real images: MoE-LLaVA's three stages on a small VQA task, Top-2 vs DARE vs LTDR.

    python examples/digits_vqa.py --out runs/digits_vqa            # the full run (< 20 min on 2 CPU cores)
    python examples/digits_vqa.py --out runs/digits_quick --quick  # a few steps, to check the pipeline

1. data: scikit-learn digits + scikit-image photos as LLaVA conversations (examples/digits_vqa_data.py);
2. a tiny decoder (Qwen3 layout) and a tiny CLIP vision tower, both from scratch, joined into a dense
   transformers LLaVA with `hf_dare.conversion.build_llava` (what `hf-dare build` runs);
3. stage 1 (projector), stage 2 (projector + LLM; here the vision tower too, as it starts untrained);
4. `hf_dare.conversion.upcycle` (what `hf-dare upcycle` runs) into 4 experts on every other layer, once per
   router, then stage 3 for each router;
5. evaluation on the test split: accuracy (an `evaluate` metric), Avg K, activated parameters, tokens/s;
   a table, `results.json`, and the plots of `hf-dare report` for each model.
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import hf_dare  # noqa: F401  (registers the MoE models with the Auto classes)
from hf_dare.conversion import build_llava, upcycle
from hf_dare.evaluation import evaluate_vqa, generation_throughput
from hf_dare.evaluation.flops import activated_parameters_at
from hf_dare.evaluation.report import write_report
from hf_dare.training import (
    LlavaDataCollator,
    MoETrainer,
    TrainingStage,
    apply_stage,
    load_llava_dataset,
    record_training_stage,
)
from hf_dare.training.metrics import values_by_layer
from hf_dare.training.stages import LANGUAGE_MODEL, LM_HEAD, PROJECTOR

sys.path.insert(0, str(Path(__file__).parent))
from digits_vqa_data import IMAGE_SIZE, make_digits_vqa, word_level_tokenizer  # noqa: E402

VISION_TOWER = r"(^|\.)vision_tower\."
# DARE's Pi over 1..4 experts: expected Avg K = 0.7 + 0.4 + 0.24 + 0.08 = 1.42.
TARGET_DISTRIBUTION = (0.7, 0.2, 0.08, 0.02)
ROUTERS = ("top_k", "dare", "ltdr")


@dataclass
class RunSize:
    train_samples: int
    test_samples: int
    steps: tuple[int, int, int]  # stage 1, 2, 3
    batch_size: int


FULL = RunSize(train_samples=6000, test_samples=500, steps=(200, 2000, 800), batch_size=16)
QUICK = RunSize(train_samples=64, test_samples=16, steps=(2, 3, 3), batch_size=4)

# Tiny from-scratch models: the learning rates are larger than the paper's fine-tuning ones.
STAGES = (
    TrainingStage("stage1", "projector only", (PROJECTOR,), learning_rate=2e-3),
    TrainingStage(
        "stage2",
        "projector + LLM + vision tower (it starts untrained here)",
        (PROJECTOR, LANGUAGE_MODEL, LM_HEAD, VISION_TOWER),
        learning_rate=1e-3,
    ),
    TrainingStage(
        "stage3",
        "MoE: all but the vision tower",
        (PROJECTOR, LANGUAGE_MODEL, LM_HEAD),
        5e-4,
        predictor_learning_rate=2e-3,
    ),
)


def build_starting_point(out: Path, seed: int, tokenizer=None) -> Path:
    """A dense LLaVA from a tiny decoder and a tiny CLIP vision tower, both randomly initialised; `tokenizer`:
    the task's word-level tokenizer (default: the digits task's)."""
    torch.manual_seed(seed)
    tokenizer = tokenizer if tokenizer is not None else word_level_tokenizer()
    # Qwen3 layout: transformers 5 re-reads a tokenizer saved beside a `qwen2` config as Qwen2's own BPE
    # tokenizer (its AutoTokenizer forces the class for that model type), which breaks our word-level one.
    text_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    llm = Qwen3ForCausalLM(text_config)
    llm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    vision_config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    CLIPVisionModel(vision_config).save_pretrained(out / "vision")
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(out / "vision")
    return build_llava(out / "llm", out / "vision", out / "dense", vision_feature_layer=-1, seed=seed, overwrite=True)


def train_stage(
    model_dir: Path, out: Path, stage: TrainingStage, data: dict, size: RunSize, steps: int, seed: int, **overrides
):
    """Train `stage` from `model_dir` into `out`; `overrides`: further `MoETrainingArguments` (e.g.
    `answer_reweighting`)."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    apply_stage(model, stage)
    args = stage.training_arguments(
        str(out / "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=size.batch_size,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        logging_steps=max(steps // 10, 1),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        **overrides,
    )
    trainer = MoETrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        data_collator=LlavaDataCollator(processor),
    )
    started = time.perf_counter()
    trainer.train()
    print(f"  {stage.name} on {model_dir.name}: {steps} steps in {time.perf_counter() - started:.0f}s", flush=True)
    record_training_stage(trainer, stage)
    trainer.save_model(out)
    processor.save_pretrained(out)
    trainer.state.save_to_json(str(out / "trainer_state.json"))  # the logs: losses and routing metrics per step
    return out


def run(out: Path, size: RunSize, routers: tuple[str, ...], seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = make_digits_vqa(out / "data", n_train=size.train_samples, n_test=size.test_samples, seed=seed)
    data = {split: load_llava_dataset(paths[split], paths["images"]) for split in ("train", "test")}
    stage1, stage2, stage3 = STAGES
    dense = build_starting_point(out, seed)
    dense = train_stage(dense, out / "stage1", stage1, data, size, size.steps[0], seed)
    dense = train_stage(dense, out / "stage2", stage2, data, size, size.steps[1], seed)

    results = {}
    for router in routers:
        moe = upcycle(
            dense,
            out / f"upcycled_{router}",
            num_experts=4,
            router=router,
            target_distribution=TARGET_DISTRIBUTION if router == "dare" else None,
            seed=seed,
            overwrite=True,
        )
        final = train_stage(moe, out / f"stage3_{router}", stage3, data, size, size.steps[2], seed)
        model = AutoModelForImageTextToText.from_pretrained(final).eval()
        processor = AutoProcessor.from_pretrained(final)
        evaluation = evaluate_vqa(model, processor, data["test"], batch_size=32)
        tokens_per_second = generation_throughput(model, processor, data["test"], batch_size=16)
        n_active = activated_parameters_at(
            model, list(values_by_layer(evaluation.routing, "routing/avg_k_layer_").values())
        )
        write_report(evaluation, final / "report", title=f"digits VQA, {router} router")
        results[router] = {
            "accuracy": evaluation.accuracy,
            "avg_k": evaluation.routing.get("routing/avg_k"),
            "avg_k_text": evaluation.routing.get("routing/avg_k_text"),
            "avg_k_vision": evaluation.routing.get("routing/avg_k_vision"),
            "activated_parameters": round(n_active["activated_params"]),
            "total_parameters": n_active["total_params"],
            "tokens_per_second": tokens_per_second,
            "model": str(final),
        }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    return results


def print_table(results: dict) -> None:
    print(
        f"\n{'router':<8} {'accuracy':>9} {'Avg K':>6} {'K text':>7} {'K vision':>9} {'active params':>14} {'tokens/s':>9}"
    )
    for router, r in results.items():
        k_vision = f"{r['avg_k_vision']:.2f}" if r["avg_k_vision"] is not None else "-"
        print(
            f"{router:<8} {r['accuracy']:>9.3f} {r['avg_k']:>6.2f} {r['avg_k_text']:>7.2f} {k_vision:>9} "
            f"{r['activated_parameters']:>14,} {r['tokens_per_second']:>9.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/digits_vqa"))
    parser.add_argument("--quick", action="store_true", help="a few steps on a few samples (CI)")
    parser.add_argument("--routers", default=",".join(ROUTERS), help="comma-separated subset of top_k,dare,ltdr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run best on one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args.out, QUICK if args.quick else FULL, tuple(args.routers.split(",")), args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
