"""Plots of a VQA evaluation (what `hf-dare report` writes), after the DARE paper's figures:
Avg K per layer and per modality, expert load per layer (Figures 3-4), predicted vs true difficulty, and
accuracy against true-difficulty bins (Figure 2)."""

import json
from pathlib import Path

import numpy as np

from hf_dare.evaluation import VqaEvaluation
from hf_dare.training.metrics import values_by_layer


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_by_difficulty(evaluation: VqaEvaluation, bins: int = 5) -> tuple[list[float], list[float]]:
    """Accuracy within `bins` equal-count bins of true difficulty: (bin centres, accuracies)."""
    difficulty = np.asarray(evaluation.true_difficulty)
    correct = np.asarray(evaluation.correct, dtype=float)
    order = np.argsort(difficulty)
    centres, accuracies = [], []
    for chunk in np.array_split(order, min(bins, len(order))):
        if len(chunk):
            centres.append(float(difficulty[chunk].mean()))
            accuracies.append(float(correct[chunk].mean()))
    return centres, accuracies


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_avg_k(routing: dict[str, float], layers: list[int], title: str):
    """Avg K by MoE layer (all tokens, text, vision: the groups logged for every layer) and by modality."""
    plt = _pyplot()
    fig, (by_layer, by_modality) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    groups = [("all", "routing/avg_k_layer_{}", "#4c72b0"), ("text", "routing/avg_k_text_layer_{}", "#55a868")]
    groups.append(("vision", "routing/avg_k_vision_layer_{}", "#c44e52"))
    groups = [g for g in groups if all(g[1].format(i) in routing for i in layers)]
    width = 0.8 / len(groups)
    for n, (label, key, color) in enumerate(groups):
        positions = np.arange(len(layers)) + (n - (len(groups) - 1) / 2) * width
        by_layer.bar(positions, [routing[key.format(i)] for i in layers], width, label=label, color=color)
    by_layer.set_xticks(range(len(layers)), [str(i) for i in layers])
    by_layer.set(xlabel="MoE layer", ylabel="Avg K (experts per token)", title="Avg K per layer and modality")
    by_layer.legend(fontsize=8)
    modalities = [m for m in ("text", "vision") if f"routing/avg_k_{m}" in routing]
    by_modality.bar(modalities, [routing[f"routing/avg_k_{m}"] for m in modalities], color=["#55a868", "#c44e52"])
    by_modality.set(title="Avg K per modality")
    fig.suptitle(title)
    return fig


def plot_expert_load(expert_load: list[list[float]], layers: list[int], title: str):
    """Heat map of the share of routed slots per (MoE layer, expert), rows labelled by `layers` when they fit."""
    load = np.asarray(expert_load)
    fig, ax = _pyplot().subplots(figsize=(6, 0.6 * len(load) + 1.8))
    image = ax.imshow(load, cmap="Blues", vmin=0, vmax=max(load.max(), 1e-9) * 1.5, aspect="auto")
    ax.set(xlabel="expert", ylabel="MoE layer")
    ax.set_title(f"Expert load (share of routed slots)\n{title}", fontsize=10)
    ax.set_xticks(range(load.shape[1]))
    ax.set_yticks(range(len(load)), [str(i) for i in layers] if len(layers) == len(load) else None)
    for (row, col), value in np.ndenumerate(load):
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", color="black", fontsize=8)
    fig.colorbar(image, ax=ax)
    return fig


def plot_difficulty(true_difficulty: list[float], predicted_difficulty: list[float]):
    """Predicted against true difficulty per sample, with the diagonal and the correlation."""
    fig, ax = _pyplot().subplots(figsize=(4.5, 4))
    ax.scatter(true_difficulty, predicted_difficulty, s=8, alpha=0.5)
    top = max(max(true_difficulty), max(predicted_difficulty))
    ax.plot([0, top], [0, top], "k--", linewidth=1)
    correlation = np.corrcoef(true_difficulty, predicted_difficulty)[0, 1]
    ax.set(
        xlabel="true difficulty (answer NLL)",
        ylabel="predicted difficulty (mean over layers)",
        title=f"Difficulty prediction, r = {correlation:.2f}",
    )
    return fig


def plot_accuracy_by_difficulty(evaluation: VqaEvaluation, title: str):
    """Accuracy within equal-count bins of true difficulty (`accuracy_by_difficulty`)."""
    centres, accuracies = accuracy_by_difficulty(evaluation)
    fig, ax = _pyplot().subplots(figsize=(4.5, 3.5))
    ax.plot(centres, accuracies, "o-")
    ax.set(xlabel="true difficulty (answer NLL, bin mean)", ylabel="accuracy", ylim=(0, 1.05))
    ax.set_title(f"Accuracy by difficulty {title}".strip())
    return fig


def write_report(evaluation: VqaEvaluation, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write `evaluation.json` and the PNG plots into `out_dir` (those the evaluation has data for); returns the
    files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "evaluation.json"]
    written[0].write_text(json.dumps(evaluation.to_dict(), indent=1))
    layers = list(values_by_layer(evaluation.routing, "routing/avg_k_layer_"))
    if layers:
        written.append(_save(plot_avg_k(evaluation.routing, layers, title), out_dir / "avg_k.png"))
    if evaluation.expert_load:
        written.append(_save(plot_expert_load(evaluation.expert_load, layers, title), out_dir / "expert_load.png"))
    if evaluation.predicted_difficulty:
        figure = plot_difficulty(evaluation.true_difficulty, evaluation.predicted_difficulty)
        written.append(_save(figure, out_dir / "difficulty.png"))
    figure = plot_accuracy_by_difficulty(evaluation, title)
    written.append(_save(figure, out_dir / "accuracy_by_difficulty.png"))
    return written


def report(
    model_dir: str | Path,
    data: str | Path,
    image_folder: str | Path | None,
    out_dir: str | Path,
    batch_size: int = 16,
    max_new_tokens: int = 4,
) -> list[Path]:
    """Evaluate the saved MoE-LLaVA `model_dir` (with its processor) on LLaVA-format `data` and write the plots."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from hf_dare.errors import existing_model_folder
    from hf_dare.evaluation import evaluate_vqa
    from hf_dare.training import load_llava_dataset

    existing_model_folder(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    dataset = load_llava_dataset(data, image_folder)
    evaluation = evaluate_vqa(model, processor, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens)
    router = getattr(model.config, "router_description", None) or getattr(model.config, "router", None) or "dense"
    return write_report(evaluation, out_dir, title=f"({Path(model_dir).name}, {router})")
