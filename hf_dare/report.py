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


def write_report(evaluation: VqaEvaluation, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write `evaluation.json` and the PNG plots into `out_dir`; returns the files written."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "evaluation.json"]
    written[0].write_text(json.dumps(evaluation.to_dict(), indent=1))
    routing = evaluation.routing

    layers = list(values_by_layer(routing, "routing/avg_k_layer_"))
    if layers:
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
        fig.tight_layout()
        written.append(out_dir / "avg_k.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    if evaluation.expert_load:
        load = np.asarray(evaluation.expert_load)
        fig, ax = plt.subplots(figsize=(6, 0.6 * len(load) + 1.8))
        image = ax.imshow(load, cmap="Blues", vmin=0, vmax=max(load.max(), 1e-9) * 1.5, aspect="auto")
        ax.set(xlabel="expert", ylabel="MoE layer")
        ax.set_title(f"Expert load (share of routed slots)\n{title}", fontsize=10)
        ax.set_xticks(range(load.shape[1]))
        ax.set_yticks(range(len(load)), [str(i) for i in layers] if len(layers) == len(load) else None)
        for (row, col), value in np.ndenumerate(load):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", color="black", fontsize=8)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        written.append(out_dir / "expert_load.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    if evaluation.predicted_difficulty:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter(evaluation.true_difficulty, evaluation.predicted_difficulty, s=8, alpha=0.5)
        top = max(max(evaluation.true_difficulty), max(evaluation.predicted_difficulty))
        ax.plot([0, top], [0, top], "k--", linewidth=1)
        correlation = np.corrcoef(evaluation.true_difficulty, evaluation.predicted_difficulty)[0, 1]
        ax.set(
            xlabel="true difficulty (answer NLL)",
            ylabel="predicted difficulty (mean over layers)",
            title=f"Difficulty prediction, r = {correlation:.2f}",
        )
        fig.tight_layout()
        written.append(out_dir / "difficulty.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    centres, accuracies = accuracy_by_difficulty(evaluation)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.plot(centres, accuracies, "o-")
    ax.set(xlabel="true difficulty (answer NLL, bin mean)", ylabel="accuracy", ylim=(0, 1.05))
    ax.set_title(f"Accuracy by difficulty {title}".strip())
    fig.tight_layout()
    written.append(out_dir / "accuracy_by_difficulty.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
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

    from hf_dare.evaluation import evaluate_vqa
    from hf_dare.training import load_llava_dataset

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    dataset = load_llava_dataset(data, image_folder)
    evaluation = evaluate_vqa(model, processor, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens)
    router = getattr(model.config, "router", "dense")
    return write_report(evaluation, out_dir, title=f"({Path(model_dir).name}, {router})")
