"""Evaluate an MoE-LLaVA model on LLaVA-format VQA data: accuracy (an `evaluate` metric), routing
statistics, true and predicted difficulty per sample, and generation throughput."""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import evaluate
import torch
from datasets import Dataset

from hf_dare.data import LlavaDataCollator, conversation_to_messages, load_image
from hf_dare.errors import InputError
from hf_dare.modeling.modeling_moe import next_token_labels, token_nll
from hf_dare.training.metrics import RoutingMetrics

from .vqa_accuracy import normalize_answer

VQA_ACCURACY = str(Path(__file__).with_name("vqa_accuracy.py"))


@dataclass
class VqaEvaluation:
    """Per-sample results (`ids`, `predictions`, `references`, `correct`, `true_difficulty` = mean answer
    NLL under the model, `predicted_difficulty` = DARE's mean prediction at the answer positions or None)
    and aggregates (`accuracy`, `routing` from `RoutingMetrics`, `expert_load` per layer and expert)."""

    accuracy: float
    ids: list[str]
    predictions: list[str]
    references: list[str]
    correct: list[bool]
    true_difficulty: list[float]
    predicted_difficulty: list[float] | None
    routing: dict[str, float] = field(default_factory=dict)
    expert_load: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _split_prompt_and_answer(sample: dict) -> tuple[list[dict], str]:
    messages = conversation_to_messages(sample["conversations"])
    if messages[-1]["role"] != "assistant":
        raise InputError(f"sample {sample['id']!r}: the last turn must be the reference answer (from 'gpt')")
    answer = "".join(part["text"] for part in messages[-1]["content"] if part["type"] == "text")
    return messages[:-1], answer


def prompt_batch(processor, samples: list[dict], device: torch.device | str = "cpu") -> dict:
    """Each sample's conversation up to its last question, with the generation prompt, left-padded."""
    conversations, images = [], []
    for sample in samples:
        conversations.append(_split_prompt_and_answer(sample)[0])
        images += [load_image(path) for path in sample["images"]]
    return messages_batch(processor, conversations, images, device)


def messages_batch(
    processor, conversations: list[list[dict]], images: list, device: torch.device | str = "cpu"
) -> dict:
    """Chat `conversations` (`{"type": "image"}` parts for the `images`, in order) rendered with the processor's
    chat template and the generation prompt, left-padded: what `evaluate_vqa` (and the lmms-eval model in
    `hf_dare.integrations.lmms_eval`) generate from."""
    prompts = [processor.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        # As the training collator does: the chat template already holds every special token.
        inputs = processor(
            images=images or None, text=prompts, padding=True, add_special_tokens=False, return_tensors="pt"
        )
        return inputs.to(device)
    finally:
        tokenizer.padding_side = padding_side


@torch.no_grad()
def generate_answers(model, processor, samples: list[dict], max_new_tokens: int = 4) -> list[str]:
    """Greedy answers to each sample's last question."""
    return generate_from_inputs(model, processor, prompt_batch(processor, samples, model.device), max_new_tokens)


@torch.no_grad()
def generate_from_inputs(model, processor, inputs: dict, max_new_tokens: int = 4) -> list[str]:
    """Greedy continuations of a left-padded batch from `prompt_batch` / `messages_batch`, decoded."""
    pad_token_id = processor.tokenizer.pad_token_id
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
    return processor.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def answer_difficulty(model, collator: LlavaDataCollator, samples: list[dict]) -> tuple[list, list | None, object]:
    """Teacher-forced forward on full conversations: per sample the mean NLL of the answer tokens and
    DARE's mean predicted difficulty at the positions that predict them; also returns the outputs."""
    batch = {k: v.to(model.device) for k, v in collator(samples).items()}
    outputs = model(**batch)
    labels = batch["labels"]
    targets = next_token_labels(labels)  # position t predicts token t+1
    answer = targets != -100
    nll = token_nll(outputs.logits, targets)
    count = answer.sum(1).clamp(min=1)
    true = ((nll * answer).sum(1) / count).tolist()
    predicted = None
    if getattr(outputs, "difficulty", None):
        mean_prediction = torch.stack(outputs.difficulty).float().mean(0)
        predicted = ((mean_prediction * answer).sum(1) / count).tolist()
    return true, predicted, (outputs, labels)


def evaluate_vqa(model, processor, dataset: Dataset, batch_size: int = 16, max_new_tokens: int = 4) -> VqaEvaluation:
    """Answer every sample of `dataset` (from `hf_dare.training.load_llava_dataset`) and score it."""
    model.eval()
    collator = LlavaDataCollator(processor)
    metrics = RoutingMetrics.for_model(model)
    result = {"ids": [], "predictions": [], "references": [], "true": [], "predicted": []}
    for start in range(0, len(dataset), batch_size):
        samples = dataset.select(range(start, min(start + batch_size, len(dataset)))).to_list()
        result["ids"] += [sample["id"] for sample in samples]
        result["references"] += [_split_prompt_and_answer(sample)[1] for sample in samples]
        result["predictions"] += [p.strip() for p in generate_answers(model, processor, samples, max_new_tokens)]
        true, predicted, (outputs, labels) = answer_difficulty(model, collator, samples)
        result["true"] += true
        result["predicted"] += predicted or []
        metrics.update(outputs, labels)
    expert_load = metrics.mean_expert_load().tolist()  # before `compute()`, which resets the sums
    accuracy = evaluate.load(VQA_ACCURACY).compute(predictions=result["predictions"], references=result["references"])
    correct = [
        normalize_answer(p) == normalize_answer(r)
        for p, r in zip(result["predictions"], result["references"], strict=True)
    ]
    return VqaEvaluation(
        accuracy=accuracy["accuracy"],
        ids=result["ids"],
        predictions=result["predictions"],
        references=result["references"],
        correct=correct,
        true_difficulty=result["true"],
        predicted_difficulty=result["predicted"] or None,
        routing=metrics.compute(),
        expert_load=expert_load,
    )


@torch.no_grad()
def generation_throughput(model, processor, dataset: Dataset, batch_size: int = 16, new_tokens: int = 16) -> float:
    """Greedy generation tokens/s on the first `batch_size` samples, exactly `new_tokens` per sample."""
    samples = dataset.select(range(min(batch_size, len(dataset)))).to_list()
    generate_answers(model, processor, samples[:2], max_new_tokens=2)  # warm-up
    inputs = prompt_batch(processor, samples, model.device)
    pad_token_id = processor.tokenizer.pad_token_id
    start = time.perf_counter()
    model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    return len(samples) * new_tokens / (time.perf_counter() - start)


__all__ = [
    "VQA_ACCURACY",
    "VqaEvaluation",
    "evaluate_vqa",
    "generate_answers",
    "generate_from_inputs",
    "generation_throughput",
    "messages_batch",
    "prompt_batch",
]
