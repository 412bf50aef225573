"""Shared pieces of the training tests: a digits-as-tokens task, LLaVA-format data on disk, Trainer arguments."""

import json
import os
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from PIL import Image

from hf_dare.training import MoETrainingArguments
from tests.tiny_models import SPECIAL_TOKENS, WORDS, digit_images

# Token id of the word "0"; the words "0".."16" follow it, so pixel value v (0..16) is token DIGIT_BASE + v.
DIGIT_BASE = len(SPECIAL_TOKENS) + WORDS.index("0")


def digits_tensors(num_samples: int = 32, start: int = 0) -> dict[str, torch.Tensor]:
    """scikit-learn's 8x8 digits as 64-token sequences of pixel values (0..16): border pixels are almost
    always 0 (easy to predict), central ones are not (hard). Labels = input ids."""
    from sklearn.datasets import load_digits

    images = load_digits().images[start : start + num_samples].astype(np.int64)
    input_ids = torch.from_numpy(DIGIT_BASE + images.reshape(num_samples, -1))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def digits_dataset(num_samples: int = 32, start: int = 0) -> Dataset:
    """`digits_tensors` as a `datasets.Dataset` for the Trainer."""
    tensors = digits_tensors(num_samples, start)
    return Dataset.from_dict({key: value.tolist() for key, value in tensors.items()}).with_format("torch")


def sentence_tensors(num_samples: int = 16, num_sentences: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A repetitive corpus "the digit is N . the digit is N . ..." with N random in 0..9: every next token is
    determined by the current one except after "is" (uniform over 10 digits: NLL >= log 10). So the
    difficulty of a token is learnable from the token itself. Labels = input ids, (num_samples, 5 * num_sentences)."""
    vocab = {word: len(SPECIAL_TOKENS) + i for i, word in enumerate(WORDS)}
    generator = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, 10, (num_samples, num_sentences), generator=generator)
    template = torch.tensor([vocab["the"], vocab["digit"], vocab["is"], 0, vocab["."]])
    input_ids = template.repeat(num_samples, num_sentences).view(num_samples, num_sentences, 5)
    input_ids[:, :, 3] = DIGIT_BASE + digits
    input_ids = input_ids.view(num_samples, -1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def as_dataset(tensors: dict[str, torch.Tensor]) -> Dataset:
    """Tensors (N, L) as a `datasets.Dataset` for the Trainer."""
    return Dataset.from_dict({key: value.tolist() for key, value in tensors.items()}).with_format("torch")


def training_args(output_dir, **overrides) -> MoETrainingArguments:
    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
    )
    kwargs.update(overrides)
    return MoETrainingArguments(**kwargs)


def sgd_step_args(
    output_dir, batch_size: int, accumulation: int = 1, steps: int = 1, **overrides
) -> MoETrainingArguments:
    """Plain SGD steps (lr 0.5, no clipping) over `batch_size` x `accumulation` samples each: the weights after
    them compare gradient-accumulation settings and world sizes."""
    return training_args(
        output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.5,
        max_grad_norm=0.0,
        **overrides,
    )


def init_seeds() -> list[int]:
    """The initialisation seeds the training-behaviour tests run from: 0, or those `HF_DARE_INIT_SEEDS` names
    ("0-7" or "0,3,5"), to check that a test asserts its rule whatever the initial draw."""
    spec = os.environ.get("HF_DARE_INIT_SEEDS", "0")
    if "-" in spec:
        first, last = spec.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(seed) for seed in spec.split(",")]


def expert_shares(counts: torch.Tensor, num_experts: int = 4) -> list[float]:
    """(B, L) experts used per token -> the shares of tokens using 1..`num_experts` experts."""
    return (torch.bincount(counts.flatten(), minlength=num_experts + 1)[1:].double() / counts.numel()).tolist()


def dare_thresholds(model) -> dict[str, list[float]]:
    """{MoE layer: DARE's thresholds} of every DARE layer of `model`."""
    return {
        str(block.layer_idx): block.gate.threshold_tracker.thresholds.tolist()
        for block in model.moe_blocks
        if hasattr(block.gate, "threshold_tracker")
    }


def write_llava_data(folder: Path, records: list[dict], num_images: int = 3) -> Path:
    """Save `num_images` real digit images as PNG under `folder/images` and `records` as `folder/data.json`."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(digit_images(num_images)):
        Image.fromarray(array).save(folder / "images" / f"{i}.png")
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def llava_records(num_samples: int = 8) -> list[dict]:
    """Digit questions with one image, two images or none, and a multi-turn sample."""
    records = []
    for i in range(num_samples):
        kind = i % 4
        if kind == 0:
            records.append(
                {
                    "id": f"s{i}",
                    "image": f"{i % 3}.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nwhat digit is shown ?"},
                        {"from": "gpt", "value": str(i % 3)},
                    ],
                }
            )
        elif kind == 1:
            records.append(
                {
                    "id": f"s{i}",
                    "image": ["0.png", "1.png"],
                    "conversations": [
                        {"from": "human", "value": "<image>\n<image>\nwhat is the sum of the two digits ?"},
                        {"from": "gpt", "value": "1"},
                    ],
                }
            )
        elif kind == 2:
            records.append(
                {
                    "id": f"s{i}",
                    "conversations": [{"from": "human", "value": "is 4 even ?"}, {"from": "gpt", "value": "yes"}],
                }
            )
        else:
            records.append(
                {
                    "id": f"s{i}",
                    "image": "2.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nwhat digit is shown ?"},
                        {"from": "gpt", "value": "2"},
                        {"from": "human", "value": "is the digit even ?"},
                        {"from": "gpt", "value": "yes"},
                    ],
                }
            )
    return records  # fmt: skip
