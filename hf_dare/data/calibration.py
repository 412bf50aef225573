"""Calibration data for `hf-dare calibrate`: LLaVA-format conversations for an MoE-LLaVA, plain text (a line per
sample, or JSON lines with a `text` field) for a causal LM, rendered as the batches the model takes."""

import json
from pathlib import Path

from torch import nn

from hf_dare.errors import InputError
from hf_dare.modeling import MoELlavaConfig

from .llava import LlavaDataCollator, load_llava_dataset


def _text_samples(path: Path) -> list[str]:
    """A text file (one sample per non-empty line) or JSON lines / a JSON list of {"text": ...} records."""
    if path.suffix in (".jsonl", ".json"):
        raw = path.read_text(encoding="utf-8")
        records = json.loads(raw) if path.suffix == ".json" else [json.loads(x) for x in raw.splitlines() if x.strip()]
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in records):
            raise InputError(f"{path}: every record must be an object with a 'text' string")
        return [r["text"] for r in records]
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _load_side(auto, model_dir, what: str):
    try:
        return auto.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise InputError(f"{model_dir}: no {what} to render the calibration data with ({error})") from error


def calibration_batches(
    model_dir: str | Path,
    model: nn.Module,
    data: str | Path,
    images: str | Path | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    max_length: int = 512,
) -> tuple[list[dict], str]:
    """The batches `hf-dare calibrate` feeds `calibrate`, and their description. MoE-LLaVA: LLaVA-format JSON /
    JSONL (`load_llava_dataset`, images relative to `images`) rendered by `LlavaDataCollator` with the processor
    saved in `model_dir` (whole conversations: prompts, images and answers). Causal LM: a text file (one sample
    per line) or JSON lines with a `text` field, tokenised with the tokenizer in `model_dir` (at most
    `max_length` tokens per sample)."""
    path = Path(data)
    if not path.is_file():
        raise InputError(f"calibration data {path}: no such file")
    if isinstance(model.config, MoELlavaConfig):
        from transformers import AutoProcessor

        dataset = load_llava_dataset(path, images)
        if max_samples is not None:
            dataset = dataset.select(range(min(max_samples, len(dataset))))
        collate = LlavaDataCollator(_load_side(AutoProcessor, model_dir, "processor"))
        samples = dataset.to_list()
        batches = [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    else:
        from transformers import AutoTokenizer

        tokenizer = _load_side(AutoTokenizer, model_dir, "tokenizer")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        samples = _text_samples(path)[:max_samples]
        batches = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            encoded = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    if not batches:
        raise InputError(f"calibration data {path}: no sample")
    return batches, f"{path.name} ({len(samples)} samples)"
