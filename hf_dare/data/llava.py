"""LLaVA-format conversation data: `load_llava_dataset` (JSON + image folder -> `datasets.Dataset`) and
`LlavaDataCollator` (chat template, image-token expansion by the processor, labels on assistant answers only).

LLaVA format: `[{"id": ..., "image": "rel/path.png" | ["a.png", "b.png"] | absent,
"conversations": [{"from": "human", "value": "<image>\\nWhat digit?"}, {"from": "gpt", "value": "3"}]}]`.
"""

import json
import os
from pathlib import Path

import torch
from datasets import Dataset, Features, List, Value

from hf_dare.errors import InputError

from .images import load_image

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IGNORE_INDEX = -100

FEATURES = Features(
    {
        "id": Value("string"),
        "images": List(Value("string")),
        "conversations": List({"from": Value("string"), "value": Value("string")}),
    }
)


def load_llava_dataset(json_path: str | os.PathLike, image_folder: str | os.PathLike | None = None) -> Dataset:
    """Read a LLaVA-format `.json` (a list) or `.jsonl` file into a `Dataset` with columns `id`, `images`
    (absolute paths, possibly empty) and `conversations`. Bad records and missing images raise at load time."""
    path = Path(json_path)
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()] if path.suffix == ".jsonl" else json.load(f)
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    rows = []
    for position, record in enumerate(records):
        sample_id = str(record.get("id", position))
        conversations = record.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise InputError(f"{path}: sample {sample_id!r} has no `conversations` list")
        for turn in conversations:
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise InputError(
                    f"{path}: sample {sample_id!r} has a turn {turn!r}; expected {{'from': one of {sorted(ROLES)}, "
                    "'value': str}"
                )
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        if images and image_folder is None:
            raise InputError(f"{path}: sample {sample_id!r} has images but no `image_folder` was given")
        paths = [str(Path(image_folder) / image) for image in images]
        for image_path in paths:
            if not os.path.isfile(image_path):
                raise FileNotFoundError(f"{path}: sample {sample_id!r}: image {image_path} not found")
        rows.append(
            {
                "id": sample_id,
                "images": paths,
                "conversations": [{"from": t["from"], "value": t["value"]} for t in conversations],
            }
        )
    return Dataset.from_list(rows, features=FEATURES)


def conversation_to_messages(conversations: list[dict], with_images: bool = True) -> list[dict]:
    """LLaVA turns -> chat messages. `<image>` placeholders become `{"type": "image"}` parts (the newline
    after one is dropped: chat templates put their own); `with_images=False` gives plain string contents."""
    messages = []
    for turn in conversations:
        role, value = ROLES[turn["from"]], turn["value"]
        if not with_images:
            messages.append({"role": role, "content": value})
            continue
        content = []
        for i, text in enumerate(value.split(IMAGE_PLACEHOLDER)):
            if i > 0:
                content.append({"type": "image"})
                text = text.removeprefix("\n")
            if text:
                content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


class LlavaDataCollator:
    """Batches LLaVA-format samples (from `load_llava_dataset`) for training.

    Each sample is rendered with the processor's chat template; the processor expands every `<image>` into
    the image tokens and returns `pixel_values` for all images of the batch (samples may have several
    images or none). `labels` are the input ids on the assistant answers (the template's text from after the
    generation prompt to the end of the turn) and -100 everywhere else: prompts, image tokens, padding.
    Padding is on the right. `processor` may also be a plain tokenizer (text-only samples).

    Returns `input_ids`, `attention_mask`, `labels` (B, L) and, when the batch has images, `pixel_values`
    (num_images, C, H, W).
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.has_images = hasattr(processor, "image_processor")
        self.image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The chat text and the character spans of the assistant answers in it."""
        template = self.processor.apply_chat_template
        text = template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            through = template(messages[: i + 1], tokenize=False)
            if not (through.startswith(prompt) and text.startswith(through)):
                raise InputError(
                    "The chat template does not render a conversation as the concatenation of its turns, so the "
                    "assistant answers cannot be located for the labels."
                )
            spans.append((len(prompt), len(through)))
        return text, spans

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        texts, spans, images = [], [], []
        for position, sample in enumerate(samples):
            sample_id = sample.get("id", position)
            sample_images = list(sample.get("images") or [])
            placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in sample["conversations"])
            if placeholders != len(sample_images):
                raise InputError(
                    f"Sample {sample_id!r} has {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but "
                    f"{len(sample_images)} image(s)."
                )
            if sample_images and not self.has_images:
                raise InputError(f"Sample {sample_id!r} has images but the collator was given a tokenizer only.")
            text, answer_spans = self.render(conversation_to_messages(sample["conversations"], self.has_images))
            texts.append(text)
            spans.append(answer_spans)
            images.append([load_image(image) for image in sample_images])

        kwargs = dict(padding=True, padding_side="right", return_offsets_mapping=True, add_special_tokens=False)
        if any(images):
            encoded = self.processor(text=texts, images=images, return_tensors="pt", **kwargs)
        else:
            encoded = self.tokenizer(texts, return_tensors="pt", **kwargs)
        batch = dict(encoded)
        offsets = batch.pop("offset_mapping")
        batch["labels"] = self._labels(batch["input_ids"], batch["attention_mask"], offsets, texts, spans, images)
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            batch = self._truncate(batch, samples)
        return batch

    def _labels(self, input_ids, attention_mask, offsets, texts, spans, images) -> torch.Tensor:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token) if self.has_images else None
        starts = offsets[..., 0]
        for row, (text, answer_spans, row_images) in enumerate(zip(texts, spans, images, strict=True)):
            # The processor replaced each `<image>` by n image tokens: map template offsets to expanded ones.
            placeholder_starts = _occurrences(text, self.image_token) if row_images else []
            extra = 0
            if placeholder_starts:
                n = int((input_ids[row] == image_token_id).sum()) // len(placeholder_starts)
                extra = (n - 1) * len(self.image_token)
            for start, end in answer_spans:
                shift = extra * sum(p < start for p in placeholder_starts)
                answer = (starts[row] >= start + shift) & (starts[row] < end + shift) & attention_mask[row].bool()
                labels[row, answer] = input_ids[row, answer]
        if image_token_id is not None:
            labels[input_ids == image_token_id] = IGNORE_INDEX
        return labels

    def _truncate(self, batch: dict, samples: list[dict]) -> dict:
        image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token) if self.has_images else None
        truncated = {k: v[:, : self.max_length] if k in ("input_ids", "attention_mask", "labels") else v
                     for k, v in batch.items()}  # fmt: skip
        if image_token_id is not None:
            kept = (truncated["input_ids"] == image_token_id).sum(1)
            total = (batch["input_ids"] == image_token_id).sum(1)
            for row in torch.nonzero(kept != total).flatten().tolist():
                raise InputError(
                    f"max_length={self.max_length} cuts into the image tokens of sample "
                    f"{samples[row].get('id', row)!r}; raise max_length."
                )
        return truncated


def _occurrences(text: str, token: str) -> list[int]:
    positions, start = [], text.find(token)
    while start != -1:
        positions.append(start)
        start = text.find(token, start + len(token))
    return positions
