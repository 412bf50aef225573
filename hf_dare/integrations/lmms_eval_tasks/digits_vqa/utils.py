"""lmms-eval hooks of the digits VQA task (any short-answer VQA written by
`python -m hf_dare.integrations.lmms_eval`): images from `data/`, the question as the text after them, the
reference answer, and hf-dare's VQA accuracy (exact match after `normalize_answer`: case, spaces, final
period), so the score is `hf_dare.evaluation.evaluate_vqa`'s."""

from pathlib import Path

from PIL import Image

from hf_dare.evaluation.vqa_accuracy import normalize_answer

DATA = Path(__file__).resolve().parent / "data"


def doc_to_visual(doc: dict) -> list:
    return [Image.open(DATA / path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"accuracy": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
