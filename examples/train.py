"""Train a (MoE-)LLaVA model with the transformers Trainer, one of MoE-LLaVA's three stages at a time.

    # stage 1: projector only, on image-caption pairs: LLaVA-PT 558k (dense LLaVA)
    python examples/train.py --stage stage1 --model path/to/llava --data blip_558k.json --images images/ --output out/s1
    # stage 2: LLM + projector, on multimodal instruction data: SViT, LVIS, LRV, MIMIC-IT (dense LLaVA)
    python examples/train.py --stage stage2 --model out/s1 --data svit_lvis_lrv_mimicit.json --images images/ --output out/s2
    # upcycle to MoE (DARE routing), then stage 3: everything but the vision tower, on LLaVA-mix-665k
    hf-dare upcycle out/s2 out/s2-moe --router dare
    python examples/train.py --stage stage3 --model out/s2-moe --data llava_mix_665k.json --images images/ --output out/s3

Multi-GPU: `torchrun --nproc_per_node 8 examples/train.py ...` (or `accelerate launch`). Every value not given
on the command line is the stage's default (`hf_dare.training.STAGES`).
"""

import argparse

from transformers import AutoModelForImageTextToText, AutoProcessor

import hf_dare  # noqa: F401  (registers the MoE models with the Auto classes)
from hf_dare.training import (
    STAGES,
    LlavaDataCollator,
    MoETrainer,
    apply_stage,
    load_llava_dataset,
    record_training_stage,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(STAGES), required=True)
    parser.add_argument("--model", required=True, help="checkpoint folder (or Hub id) of the model to train")
    parser.add_argument("--processor", help="processor folder (default: --model)")
    parser.add_argument("--data", required=True, help="LLaVA-format conversations (.json list or .jsonl)")
    parser.add_argument("--images", help="folder the `image` paths in --data are relative to")
    parser.add_argument("--output", required=True, help="output folder: checkpoints, final model and processor")
    parser.add_argument("--learning-rate", type=float, help="default: the stage's")
    parser.add_argument("--predictor-learning-rate", type=float, help="DARE predictors (default: the stage's)")
    parser.add_argument("--per-batch-thresholds", action="store_true", help="ablation: no EMA on thresholds")
    parser.add_argument("--batch-size", type=int, default=4, help="per device")
    parser.add_argument("--gradient-accumulation-steps", type=int, help="default: reach the stage's global batch")
    parser.add_argument("--epochs", type=float, help="default: the stage's")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--save-steps", type=int, default=500)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--report-to", default="none", help="e.g. tensorboard, wandb")
    parser.add_argument("--resume", nargs="?", const=True, default=None, help="resume (from a checkpoint folder)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--use-cpu", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> MoETrainer:
    args = parse_args(argv)
    stage = STAGES[args.stage]
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    processor = AutoProcessor.from_pretrained(args.processor or args.model, trust_remote_code=args.trust_remote_code)
    trainable = apply_stage(model, stage)
    print(f"{stage.name}: {stage.description}; {len(trainable)} trainable tensors")

    overrides = dict(
        per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=args.use_cpu,
        seed=args.seed,
        per_batch_thresholds=True if args.per_batch_thresholds else None,
    )
    for name in ("learning_rate", "predictor_learning_rate", "gradient_accumulation_steps"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.epochs is not None:
        overrides["num_train_epochs"] = args.epochs
    training_args = stage.training_arguments(args.output, **overrides)
    if args.gradient_accumulation_steps is None:
        per_step = args.batch_size * training_args.world_size
        training_args.gradient_accumulation_steps = max(1, stage.global_batch_size // per_step)

    trainer = MoETrainer(
        model=model,
        args=training_args,
        train_dataset=load_llava_dataset(args.data, args.images),
        data_collator=LlavaDataCollator(processor, max_length=args.max_length),
        processing_class=processor,
    )
    trainer.train(resume_from_checkpoint=args.resume)
    record_training_stage(trainer, stage)  # the model card lists the stages and the routing statistics
    trainer.save_model(args.output)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output)
    return trainer


if __name__ == "__main__":
    main()
