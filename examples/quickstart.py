"""Quickstart: build a tiny DARE MoE causal LM, train it a few steps with the transformers Trainer, save it,
load it back with `trust_remote_code=True`, generate, and print the experts used per token (Avg K) per layer.

    python examples/quickstart.py [--out runs/quickstart] [--steps 60]
"""

import argparse
import random
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, PreTrainedTokenizerFast, Qwen2Config

import hf_dare
from hf_dare.training import MoETrainer, MoETrainingArguments

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "log", "and", "then", "slept", "ate"]


def toy_corpus(n: int, seed: int = 0) -> list[str]:
    """Sentences whose next word is sometimes obvious ("sat on the") and sometimes not: easy and hard tokens."""
    rng = random.Random(seed)
    animals, verbs, places = ["cat", "dog"], ["sat", "ran"], ["mat", "log"]
    return [
        f"the {rng.choice(animals)} {rng.choice(verbs)} on the {rng.choice(places)} and then {rng.choice(['slept', 'ate'])}"
        for _ in range(n)
    ]


def toy_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_model(tokenizer: PreTrainedTokenizerFast):
    """A tiny Qwen2-layout decoder whose every other FFN is 4 experts, routed by DARE."""
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = hf_dare.MoECausalLMConfig(
        text_config=text_config, router="dare", num_experts=4, target_distribution=[0.6, 0.3, 0.09, 0.01]
    )
    return AutoModelForCausalLM.from_config(config)


def train(model, tokenizer: PreTrainedTokenizerFast, out: Path, steps: int) -> MoETrainer:
    """The standard Trainer's loop; MoETrainer adds DARE's threshold updates and the routing metrics."""
    dataset = Dataset.from_dict({"text": toy_corpus(512)}).map(
        lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"]
    )
    training_args = MoETrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        predictor_learning_rate=1e-2,
        logging_steps=max(steps // 3, 1),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = MoETrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    return trainer


def show_routing(model, tokenizer: PreTrainedTokenizerFast) -> None:
    """Generate, and print how many experts the tokens used in each MoE layer."""
    prompt = tokenizer(["the cat sat on"], return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    print("generated:", tokenizer.decode(generated[0], skip_special_tokens=True))
    with torch.no_grad():
        outputs = model(generated)
    stats = hf_dare.routing_statistics(outputs.expert_counts, outputs.expert_load)
    for layer, avg_k in zip(model.config.moe_layers, stats["avg_k_per_layer"], strict=True):
        print(f"MoE layer {layer}: Avg K = {avg_k:.2f} experts per token")
    print(f"overall Avg K = {stats['avg_k']:.2f} (Top-2 would use 2.00)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    tokenizer = toy_tokenizer()
    model = build_model(tokenizer)
    print(f"built {type(model).__name__}: MoE layers {model.config.moe_layers}, {model.num_parameters():,} parameters")

    trainer = train(model, tokenizer, args.out, args.steps)
    logged = trainer.state.log_history[-2]
    print(f"after {args.steps} steps: ce {logged['loss/ce']:.3f}, difficulty loss {logged['loss/difficulty']:.3f}")

    # Save (weights + the model code + auto_map), then load it back the way any user would.
    model_dir = args.out / "model"
    trainer.save_model(model_dir)
    tokenizer.save_pretrained(model_dir)
    show_routing(AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval(), tokenizer)


if __name__ == "__main__":
    main()
