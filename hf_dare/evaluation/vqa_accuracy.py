"""VQA accuracy as an `evaluate` metric: exact match of normalised answers (lower case, stripped, no
trailing period). Loaded by path, so it works offline: `evaluate.load(hf_dare.evaluation.VQA_ACCURACY)`."""

import datasets
import evaluate

_DESCRIPTION = "Exact-match accuracy of short VQA answers after normalisation (case, spaces, final period)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): reference answers.
Returns:
    accuracy (float): fraction of predictions equal to their reference after normalisation.
"""


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


class VqaAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict:
        matches = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True)]
        return {"accuracy": sum(matches) / max(len(matches), 1)}
