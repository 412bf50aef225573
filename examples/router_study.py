"""Which router wins at what compute: stage 3 from one upcycled start for every router and DARE ablation, over
seeds, and a trained DARE model dialled across Avg K with `hf_dare.calibrate`.

    python examples/router_study.py                           # the full study -> docs/router_study/
    python examples/router_study.py --out runs/study_quick --quick   # a few steps, 1 seed, 2 routers (CI)

1. data: the shapes VQA task (examples/shapes_vqa_data.py: colours, shapes, counts, positions and relations,
   seven question types of graded difficulty), or `--task digits` (examples/digits_vqa_data.py);
2. one dense starting point for everything: a tiny LLaVA built and trained through stages 1-2 with
   examples/digits_vqa.py's pipeline (`build_starting_point`, `train_stage`);
3. for every variant and seed: `hf_dare.conversion.upcycle` (router seeded by the seed) and stage 3 (data order
   seeded by the seed). Variants: every router of `ROUTERS` (top_k, dare, ltdr, top_p, remoe, dynmoe, moepp;
   those the installed hf_dare lacks are skipped with a note), Top-1, the MoE-LLaVA-exact Top-2 (DeepSpeed's
   top2gating: Gumbel second expert, capacity, top-1 l_aux, layers summed), Top-p calibrated after training to
   DARE's Avg K 1.4 (Top-K's compute is an integer: Top-1 and Top-2 bracket DARE's), ReMoE with the original's
   controller (no gate offset below lambda's floor: `remoe_original`), and DARE's ablations:
   L_diff reaching the backbone (0.1's default), weights p instead of renormalised ones, DARE on layer 2 only
   (the paper's layer range), difficulty
   proxy (random, router entropy; `nll` is `dare` itself), per-batch thresholds (vs the EMA), Pi uniform and
   inverse (vs long-tailed);
4. evaluation on the test split: accuracy overall and per question type, Avg K (all / text / vision, per layer),
   activated parameters N_A and GFLOPs per token (`hf_dare.evaluation.flops`), batched greedy tokens/s, shares of tokens
   using 0..E experts; the Avg K the Trainer logged over stage 3 (`avg_k_curve` of each run in results.json);
5. the compute dial: the first seed's DARE model calibrated (`hf_dare.calibrate`, on training samples) to Avg K
   1.0 .. 2.0 and evaluated at each;
6. `results.json`, `results.md` (per run, and mean ± std over the seeds that ran), `frontier.png` (accuracy vs
   Avg K, one point per variant with error bars, and the dial curve) and `avg_k_by_layer.png`.
"""

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import hf_dare
from hf_dare.conversion import ConversionError, upcycle
from hf_dare.evaluation import evaluate_vqa, generation_throughput
from hf_dare.evaluation.flops import flops_per_token_at
from hf_dare.modeling.configuration_moe import MoEConfigBase
from hf_dare.modeling.routing import ROUTERS, router_settings
from hf_dare.training import LlavaDataCollator, load_llava_dataset
from hf_dare.training.metrics import values_by_layer

sys.path.insert(0, str(Path(__file__).parent))
from digits_vqa import STAGES, TARGET_DISTRIBUTION, RunSize, build_starting_point, train_stage  # noqa: E402
from digits_vqa_data import make_digits_vqa, word_level_tokenizer  # noqa: E402
from shapes_vqa_data import make_shapes_vqa, shapes_tokenizer  # noqa: E402
from study_report import stats  # noqa: E402

NUM_EXPERTS = 4
LONG_TAILED = TARGET_DISTRIBUTION  # 0.7 / 0.2 / 0.08 / 0.02: Avg K 1.42
TASKS = {"shapes": (make_shapes_vqa, shapes_tokenizer), "digits": (make_digits_vqa, word_level_tokenizer)}


@dataclass(frozen=True)
class Variant:
    """One stage-3 configuration: `router` with the MoE config `settings`; `needs` names a config field the
    installed hf_dare must have (an ablation of a newer option); `calibrated_avg_k`: the trained model is then
    dialled to this Avg K (a router whose trained compute is not DARE's, measured at DARE's)."""

    name: str
    router: str
    group: str  # "router" or "ablation"
    settings: dict = field(default_factory=dict)
    needs: str | None = None
    label: str = ""
    calibrated_avg_k: float | None = None  # after training, `hf_dare.calibrate` to this Avg K (training samples)


# DeepSpeed's top2gating as the original MoE-LLaVA trains with it (docs/routers.md); the layers' losses summed.
MOELLAVA_EXACT = {
    "second_expert_sampling": True,
    "capacity_factor": 1.5,
    "eval_capacity_factor": 2.0,
    "aux_loss_fraction": "top1",
    "router_aux_loss_reduction": "sum",
}
DARE_AVG_K = 1.4  # what DARE's Pi (LONG_TAILED) gives: the compute of the rows "at DARE's compute"

ROUTER_VARIANTS = (
    Variant("top_k", "top_k", "router", label="Top-2 (MoE-LLaVA)"),
    Variant("top1", "top_k", "router", {"top_k": 1}, label="Top-1"),
    Variant("top_k_exact", "top_k", "router", MOELLAVA_EXACT, label="Top-2, MoE-LLaVA-exact (top2gating)"),
    Variant("dare", "dare", "router", {"target_distribution": LONG_TAILED}, label="DARE"),
    Variant("ltdr", "ltdr", "router", label="LTDR"),
    Variant("top_p", "top_p", "router", label="Top-p (p 0.9999)"),
    Variant(
        "top_p_at_dare",
        "top_p",
        "router",
        label=f"Top-p, trained at p 0.9999, p calibrated to Avg K {DARE_AVG_K}",
        calibrated_avg_k=DARE_AVG_K,
    ),
    Variant("remoe", "remoe", "router", label="ReMoE"),
    Variant(
        "remoe_original",
        "remoe",
        "router",
        {"remoe_gate_offset_step": 0.0},
        "remoe_gate_offset_step",
        "ReMoE, the original controller (no gate offset below lambda's floor)",
    ),
    Variant("dynmoe", "dynmoe", "router", label="DynMoE"),
    Variant("moepp", "moepp", "router", label="MoE++"),
)
ABLATIONS = (
    Variant(
        "dare_attached",
        "dare",
        "ablation",
        {"target_distribution": LONG_TAILED, "difficulty_detach_input": False},
        label="DARE, L_diff reaches the backbone (hf-dare 0.1's default)",
    ),
    Variant(
        "dare_unnormalised",
        "dare",
        "ablation",
        {"target_distribution": LONG_TAILED, "norm_topk_prob": False},
        label="DARE, weights p (not renormalised: one-expert tokens train the router)",
    ),
    Variant(
        "dare_layer_2",
        "dare",
        "ablation",
        {"target_distribution": LONG_TAILED, "router_layers": [2]},
        label="DARE on MoE layer 2 only, layer 0 Top-2 (the paper's layer range)",
    ),
    Variant(
        "dare_proxy_random",
        "dare",
        "ablation",
        {"target_distribution": LONG_TAILED, "difficulty_proxy": "random"},
        "difficulty_proxy",
        "DARE, random proxy",
    ),
    Variant(
        "dare_proxy_router_entropy",
        "dare",
        "ablation",
        {"target_distribution": LONG_TAILED, "difficulty_proxy": "router_entropy"},
        "difficulty_proxy",
        "DARE, router-entropy proxy",
    ),
    Variant(
        "dare_per_batch",
        "dare",
        "ablation",
        {"target_distribution": LONG_TAILED, "threshold_update": "per_batch"},
        "threshold_update",
        "DARE, per-batch thresholds",
    ),
    Variant("dare_pi_uniform", "dare", "ablation", {"target_distribution": (0.25,) * 4}, label="DARE, Pi uniform"),
    Variant(
        "dare_pi_inverse",
        "dare",
        "ablation",
        {"target_distribution": tuple(reversed(LONG_TAILED))},
        label="DARE, Pi inverse",
    ),
)

# Sizes: `study_seconds` in the README / the final report are measured with these.
FULL = RunSize(train_samples=6000, test_samples=500, steps=(200, 2000, 600), batch_size=16)
QUICK = RunSize(train_samples=48, test_samples=12, steps=(2, 3, 3), batch_size=4)
FULL_DIAL = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
QUICK_DIAL = (1.0, 2.0)
CALIBRATION_SAMPLES = 256


def available(variants) -> tuple[list[Variant], dict[str, str]]:
    """The variants the installed hf_dare can run, and a note for each one it cannot."""
    runnable, skipped = [], {}
    for variant in variants:
        if variant.router not in ROUTERS:
            skipped[variant.name] = f"router {variant.router!r} not in this hf_dare's ROUTERS {list(ROUTERS)}"
        elif variant.needs and variant.needs not in {*router_settings(), *MoEConfigBase.__annotations__}:
            skipped[variant.name] = f"config field {variant.needs!r} not in this hf_dare"
        else:
            runnable.append(variant)
    return runnable, skipped


def question_type(sample_id: str) -> str:
    """`test_12_count_color` -> `count_color` (both tasks' ids end with the question type)."""
    return sample_id.split("_", 2)[2]


def mean_context(processor, dataset, batch_size: int = 64) -> float:
    """Mean over the samples of (real tokens + 1) / 2: the causal context of the FLOPs' attention term."""
    collator = LlavaDataCollator(processor)
    lengths = []
    for start in range(0, len(dataset), batch_size):
        samples = dataset.select(range(start, min(start + batch_size, len(dataset)))).to_list()
        lengths += collator(samples)["attention_mask"].sum(-1).tolist()
    return sum((n + 1) / 2 for n in lengths) / len(lengths)


def evaluate(model, processor, test, context: float, throughput: bool = True) -> dict:
    """The study's metrics of one model on the test split."""
    evaluation = evaluate_vqa(model, processor, test, batch_size=32)
    routing = evaluation.routing
    by_layer = values_by_layer(routing, "routing/avg_k_layer_")
    flops = flops_per_token_at(model, list(by_layer.values()), context)
    by_type: dict[str, list[bool]] = {}
    for sample_id, correct in zip(evaluation.ids, evaluation.correct, strict=True):
        by_type.setdefault(question_type(sample_id), []).append(correct)
    return {
        "accuracy": evaluation.accuracy,
        "accuracy_by_type": {kind: sum(v) / len(v) for kind, v in sorted(by_type.items())},
        "avg_k": routing.get("routing/avg_k"),
        "avg_k_text": routing.get("routing/avg_k_text"),
        "avg_k_vision": routing.get("routing/avg_k_vision"),
        "avg_k_per_layer": {str(layer): value for layer, value in by_layer.items()},
        "activated_parameters": flops["activated_parameters"]["activated_params"],
        "gflops_per_token": flops["gflops_per_token"],
        "expert_shares": [routing.get(f"routing/frac_{n}_experts", 0.0) for n in range(NUM_EXPERTS + 1)],
        "tokens_per_second": generation_throughput(model, processor, test, batch_size=16) if throughput else None,
    }


def run_variant(
    variant: Variant, seed: int, dense: Path, paths: dict, size: RunSize, out: Path, context: float, threads: int = 1
) -> dict:
    """Upcycle `dense` for `variant` (seed `seed`), train stage 3 on the data at `paths`, evaluate (tokens/s
    apart: `add_throughput`); the upcycled copy is removed. Runs in a worker process with `--jobs`."""
    torch.set_num_threads(threads)
    data = {split: load_llava_dataset(paths[split], paths["images"]) for split in ("train", "test")}
    run_dir = out / "runs" / f"{variant.name}_seed{seed}"
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in variant.settings.items()}
    moe = upcycle(dense, run_dir / "upcycled", num_experts=NUM_EXPERTS, router=variant.router, seed=seed,
                  overwrite=True, **settings)  # fmt: skip
    started = time.perf_counter()
    final = train_stage(moe, run_dir / "stage3", STAGES[2], data, size, size.steps[2], seed)
    train_seconds = time.perf_counter() - started
    shutil.rmtree(moe, ignore_errors=True)
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    calibration = None
    if variant.calibrated_avg_k is not None:
        calibration = hf_dare.calibrate(model, calibration_batches(processor, data), avg_k=variant.calibrated_avg_k,
                                        data_description="training samples")  # fmt: skip
        final = run_dir / "calibrated"
        model.save_pretrained(final)
        processor.save_pretrained(final)
    metrics = evaluate(model, processor, data["test"], context, throughput=False)
    metrics["train_seconds"] = train_seconds
    logs = json.loads((run_dir / "stage3" / "trainer_state.json").read_text())["log_history"]
    avg_k_curve = [[log["step"], log["routing/avg_k"]] for log in logs if "routing/avg_k" in log]
    if calibration is not None:
        metrics["calibration_avg_k"] = calibration["achieved_avg_k"]
    return {"variant": variant.name, "seed": seed, "model": str(final), "metrics": metrics, "avg_k_curve": avg_k_curve}


def run_all(runnable, seeds, dense, paths, size, out, context, jobs: int, threads: int) -> tuple[list, dict]:
    """Every (variant, seed) run, in order, `jobs` at a time (worker processes); a variant whose upcycling fails
    (a router this hf_dare cannot upcycle into yet) is skipped with the reason."""
    tasks = [(variant, seed) for variant in runnable for seed in seeds]
    failed: dict[str, str] = {}
    results: dict[tuple[str, int], dict] = {}

    def collect(variant, seed, result_or_error):
        if isinstance(result_or_error, ConversionError):
            failed[variant.name] = f"upcycle failed: {' '.join(str(result_or_error).split())}"
            print(f"skipping {variant.name}: {failed[variant.name]}", flush=True)
        else:
            results[(variant.name, seed)] = result_or_error

    arguments = [(v, s, dense, paths, size, out, context, threads) for v, s in tasks]
    if jobs <= 1:
        for (variant, seed), args in zip(tasks, arguments, strict=True):
            if variant.name in failed:
                continue
            print(f"{variant.name}, seed {seed}", flush=True)
            try:
                collect(variant, seed, run_variant(*args))
            except ConversionError as error:
                collect(variant, seed, error)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_variant, *args): task for task, args in zip(tasks, arguments, strict=True)}
            for future, (variant, seed) in futures.items():
                try:
                    collect(variant, seed, future.result())
                    print(f"done: {variant.name}, seed {seed}", flush=True)
                except ConversionError as error:
                    collect(variant, seed, error)
    runs = [results[(v.name, s)] for v, s in tasks if (v.name, s) in results and v.name not in failed]
    return runs, failed


def add_throughput(runs: list[dict], test) -> None:
    """Batched greedy tokens/s of every run's model, measured one after another in this process once all training
    is done, so that every router is timed under the same conditions."""
    for run in runs:
        model = AutoModelForImageTextToText.from_pretrained(run["model"]).eval()
        processor = AutoProcessor.from_pretrained(run["model"])
        run["metrics"]["tokens_per_second"] = generation_throughput(model, processor, test, batch_size=16)


def calibration_batches(processor, data: dict) -> list[dict]:
    """The first `CALIBRATION_SAMPLES` training samples, collated in batches of 32, for `hf_dare.calibrate`."""
    collator = LlavaDataCollator(processor)
    samples = data["train"].select(range(min(CALIBRATION_SAMPLES, len(data["train"])))).to_list()
    return [collator(samples[i : i + 32]) for i in range(0, len(samples), 32)]


def dial_curve(model_dir: Path, data: dict, points, context: float) -> list[dict]:
    """The trained DARE model at `model_dir` calibrated to each Avg K of `points` on training samples, evaluated."""
    processor = AutoProcessor.from_pretrained(model_dir)
    batches = calibration_batches(processor, data)
    samples = min(CALIBRATION_SAMPLES, len(data["train"]))
    curve = []
    for target in points:
        model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
        record = hf_dare.calibrate(model, batches, avg_k=target, data_description=f"{samples} training samples")
        metrics = evaluate(model, processor, data["test"], context, throughput=False)
        curve.append({"target_avg_k": target, "calibration_avg_k": record["achieved_avg_k"], **metrics})
        print(f"  dial Avg K {target:.2f}: test Avg K {metrics['avg_k']:.3f}, accuracy {metrics['accuracy']:.3f}")
    return curve


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Per variant, mean ± std over its seeds of every metric (nested ones key by key)."""
    summary: dict[str, dict] = {}
    for name in dict.fromkeys(run["variant"] for run in runs):
        metrics = [run["metrics"] for run in runs if run["variant"] == name]
        entry = {"seeds": [run["seed"] for run in runs if run["variant"] == name]}
        for key, value in metrics[0].items():
            if isinstance(value, dict):
                entry[key] = {k: stats([m[key].get(k) for m in metrics]) for k in value}
            elif isinstance(value, list):
                entry[key] = [stats([m[key][i] for m in metrics]) for i in range(len(value))]
            else:
                entry[key] = stats([m[key] for m in metrics])
        summary[name] = entry
    if "top_k" in summary:
        for name, entry in summary.items():
            entry["accuracy_vs_top_k"] = stats(paired_differences(runs, name, "top_k", "accuracy"))
    return summary


def paired_differences(runs: list[dict], name: str, baseline: str, metric: str) -> list[float]:
    """`metric` of `name` minus that of `baseline` with the same seed (same router seed and data order), for the
    seeds both ran: what the seeds have in common cancels, unlike in the difference of two means."""
    by_seed = {run["seed"]: run["metrics"][metric] for run in runs if run["variant"] == baseline}
    return [
        run["metrics"][metric] - by_seed[run["seed"]]
        for run in runs
        if run["variant"] == name and run["seed"] in by_seed
    ]


def _pm(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def _mega(stat: dict) -> dict:
    """GFLOPs statistics -> MFLOPs (the tiny models' numbers read better)."""
    return {**stat, **{k: stat[k] * 1e3 for k in ("mean", "std") if stat[k] is not None}}


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict) -> str:
    """results.md: the variant tables (mean ± std over seeds), the dial curve, every run, what was skipped."""
    summary, variants = results["summary"], results["variants"]
    types = sorted({t for s in summary.values() for t in s["accuracy_by_type"]})
    lines = [
        "# Router study",
        "",
        f"Task `{results['task']}` ({results['size']['train_samples']} train / {results['size']['test_samples']} test"
        f" samples), stage-3 steps {results['size']['steps'][2]}, batch {results['size']['batch_size']}, seeds "
        f"{results['seeds']}; values are mean ± std (sample std over the seeds that ran, n in the table); "
        "Δ vs top_k: accuracy minus Top-2's with the same seed (paired: same router seed and data order), mean ± "
        f"std; one accuracy on {results['size']['test_samples']} test questions has a binomial standard error of "
        f"about {math.sqrt(0.25 / results['size']['test_samples']):.3f} or less; "
        "FLOPs per token from `hf_dare.evaluation.flops` (2 N_A + attention over the mean causal context). "
        f"Tokens/s: batched greedy generation (16 prompts x 16 new tokens), every model timed after all training, "
        f"one after another. Runtime {results['seconds'] / 60:.1f} min ({results['jobs']} training job(s) at once). "
        f"Command: `{results['command']}`.",
    ]
    for group, title in (("router", "Routers"), ("ablation", "DARE ablations (baseline: `dare`)")):
        names = [n for n in summary if variants[n]["group"] == group]
        if not names:
            continue
        if group == "ablation" and "dare" in summary:
            names = ["dare", *names]
        header = ["variant", "n", "accuracy", "Δ vs top_k", *types, "Avg K", "text", "vision", "N_A", "MFLOPs/token",
                  "tokens/s"]  # fmt: skip
        header += [f"{k} exp." for k in range(NUM_EXPERTS + 1)]
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for name in names:
            s = summary[name]
            row = [f"`{name}`", str(len(s["seeds"])), _pm(s["accuracy"])]
            row += [_pm(s["accuracy_vs_top_k"], 3) if "accuracy_vs_top_k" in s else "-"]
            row += [_pm(s["accuracy_by_type"][t], 2) if t in s["accuracy_by_type"] else "-" for t in types]
            row += [_pm(s["avg_k"], 2), _pm(s["avg_k_text"], 2), _pm(s["avg_k_vision"], 2)]
            row += [f"{s['activated_parameters']['mean']:,.0f}", _pm(_mega(s["gflops_per_token"]), 3)]
            row += [_pm(s["tokens_per_second"], 0)] + [_pm(x, 2) for x in s["expert_shares"]]
            lines.append("| " + " | ".join(row) + " |")
    if results.get("dial"):
        dial = results["dial"]
        lines += [
            "",
            f"## Compute dial: `{dial['variant']}` seed {dial['seed']} calibrated with `hf_dare.calibrate`",
            "",
            f"Thresholds set on {dial['calibration_samples']} training samples for each target Avg K, then evaluated "
            "on the test split (no training).",
            "",
            "| target Avg K | Avg K on calibration data | Avg K test | text | vision | accuracy | "
            + " | ".join(types)
            + " | N_A | MFLOPs/token |",
            "|" + " --- |" * (8 + len(types)),
        ]
        for p in dial["points"]:
            row = [f"{p['target_avg_k']:.2f}", _num(p["calibration_avg_k"]), _num(p["avg_k"]), _num(p["avg_k_text"])]
            row += [_num(p["avg_k_vision"]), _num(p["accuracy"])]
            row += [_num(p["accuracy_by_type"].get(t), 2) for t in types]
            row += [f"{p['activated_parameters']:,.0f}", _num(p["gflops_per_token"] * 1e3, 3)]
            lines.append("| " + " | ".join(row) + " |")
    header = ["variant", "seed", "accuracy", "Avg K", "text", "vision", "N_A", "MFLOPs/token", "tokens/s", "train s"]
    lines += ["", "## Every run", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for run in results["runs"]:
        m = run["metrics"]
        row = [f"`{run['variant']}`", str(run["seed"]), _num(m["accuracy"]), _num(m["avg_k"], 2)]
        row += [_num(m["avg_k_text"], 2), _num(m["avg_k_vision"], 2), f"{m['activated_parameters']:,.0f}"]
        row += [_num(m["gflops_per_token"] * 1e3, 3), _num(m["tokens_per_second"], 0), _num(m["train_seconds"], 0)]
        lines.append("| " + " | ".join(row) + " |")
    curves = [run for run in results["runs"] if run.get("avg_k_curve")]
    if curves:
        steps = [step for step, _ in curves[0]["avg_k_curve"]]
        header = ["variant", "seed", *(str(step) for step in steps)]
        lines += ["", "## Avg K during stage 3 (the Trainer's logs, by step)", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for run in curves:
            values = dict(run["avg_k_curve"])
            row = [f"`{run['variant']}`", str(run["seed"]), *(_num(values.get(step), 2) for step in steps)]
            lines.append("| " + " | ".join(row) + " |")
    if results["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- `{name}`: {why}" for name, why in results["skipped"].items()]
    lines += ["", "![accuracy vs Avg K](frontier.png)", "", "![Avg K by layer](avg_k_by_layer.png)", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(results: dict, path: Path) -> Path:
    """Accuracy vs Avg K: one point per variant (error bars: std over seeds), and the DARE dial curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 5))
    palettes = {"router": plt.get_cmap("tab10").colors, "ablation": plt.get_cmap("Dark2").colors}
    seen = {"router": 0, "ablation": 0}
    for name, s in results["summary"].items():
        group = results["variants"][name]["group"]
        ablation = group == "ablation"
        color = palettes[group][seen[group] % len(palettes[group])]
        seen[group] += 1
        ax.errorbar(
            s["avg_k"]["mean"],
            s["accuracy"]["mean"],
            xerr=s["avg_k"]["std"],
            yerr=s["accuracy"]["std"],
            fmt="^" if ablation else "o",
            color=color,
            markersize=8,
            capsize=3,
            label=results["variants"][name]["label"] or name,
            markerfacecolor="none" if ablation else None,
        )
    if results.get("dial"):
        points = results["dial"]["points"]
        ax.plot(
            [p["avg_k"] for p in points],
            [p["accuracy"] for p in points],
            "k--x",
            label=f"DARE dialled by calibrate (seed {results['dial']['seed']})",
        )
    ax.set(xlabel="Avg K on the test split (experts per token)", ylabel="accuracy (test)")
    ax.set_title(f"Accuracy vs compute, {results['task']} task (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the points spread everywhere
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_avg_k_by_layer(results: dict, path: Path) -> Path:
    """Per variant, Avg K of each MoE layer (bars: mean over seeds, error bars: std)."""
    plt = _pyplot()
    summary = results["summary"]
    names = list(summary)
    layers = sorted({layer for s in summary.values() for layer in s["avg_k_per_layer"]}, key=int)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4))
    width = 0.8 / max(len(layers), 1)
    for j, layer in enumerate(layers):
        stats = [summary[n]["avg_k_per_layer"].get(layer, {"mean": 0.0, "std": 0.0}) for n in names]
        positions = [i + (j - (len(layers) - 1) / 2) * width for i in range(len(names))]
        ax.bar(positions, [s["mean"] or 0.0 for s in stats], width, yerr=[s["std"] or 0.0 for s in stats],
               capsize=2, label=f"layer {layer}")  # fmt: skip
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="Avg K (experts per token)", title="Avg K by MoE layer (test split)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(results: dict, report_dir: Path) -> list[Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "results.json").write_text(json.dumps(results, indent=1))
    (report_dir / "results.md").write_text(markdown(results))
    written = [report_dir / "results.json", report_dir / "results.md"]
    if results["summary"]:
        written += [plot_frontier(results, report_dir / "frontier.png")]
        written += [plot_avg_k_by_layer(results, report_dir / "avg_k_by_layer.png")]
    return written


def run_study(
    out: Path,
    size: RunSize,
    variants,
    seeds,
    dial_points,
    report_dir: Path,
    task: str = "shapes",
    command: str = "",
    jobs: int = 1,
) -> dict:
    """The whole study (see the module docstring); returns what `results.json` holds."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    make_data, make_tokenizer = TASKS[task]
    paths = make_data(out / "data", n_train=size.train_samples, n_test=size.test_samples, seed=0)
    data = {split: load_llava_dataset(paths[split], paths["images"]) for split in ("train", "test")}
    runnable, skipped = available(variants)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)

    stage1, stage2, _ = STAGES
    dense = build_starting_point(out, 0, make_tokenizer())
    dense = train_stage(dense, out / "stage1", stage1, data, size, size.steps[0], 0)
    dense = train_stage(dense, out / "stage2", stage2, data, size, size.steps[1], 0)
    context = mean_context(AutoProcessor.from_pretrained(dense), data["test"])

    runs, failed = run_all(runnable, seeds, dense, paths, size, out, context, jobs, torch.get_num_threads())
    skipped.update(failed)
    add_throughput(runs, data["test"])
    dial = None
    dare_runs = [run for run in runs if run["variant"] == "dare"]
    if dial_points and dare_runs:
        print(f"compute dial on dare seed {dare_runs[0]['seed']}", flush=True)
        dial = {
            "variant": "dare",
            "seed": dare_runs[0]["seed"],
            "calibration_samples": min(CALIBRATION_SAMPLES, len(data["train"])),
            "points": dial_curve(Path(dare_runs[0]["model"]), data, dial_points, context),
        }
    ran = {run["variant"] for run in runs}
    results = {
        "task": task,
        "size": asdict(size),
        "seeds": list(seeds),
        "command": command,
        "variants": {v.name: {**asdict(v), "settings": dict(v.settings)} for v in runnable if v.name in ran},
        "skipped": skipped,
        "runs": runs,
        "summary": summarise(runs),
        "dial": dial,
        "context": context,
        "jobs": jobs,
    }
    results["seconds"] = time.perf_counter() - started
    write_results(results, report_dir)
    print(markdown(results))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/router_study"), help="working folder (models, data)")
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="where results.json / .md and the plots go (default docs/router_study; --quick: OUT/report)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a few steps, 1 seed, top_k and dare, no ablations (CI)")
    parser.add_argument("--task", choices=sorted(TASKS), default="shapes")
    parser.add_argument("--routers", default=None, help="comma-separated routers (default: all; --quick: top_k,dare)")
    parser.add_argument("--ablations", default=None,
                        help="comma-separated DARE ablations, 'none' or 'all' (default: all; --quick: none)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--dial", type=float, nargs="*", default=None,
                        help="Avg K targets of the dial curve (default 1.0 .. 2.0 by 0.2; --quick: 1.0 2.0)")  # fmt: skip
    parser.add_argument("--steps", type=int, nargs=3, default=None, help="stage 1, 2, 3 steps (override)")
    parser.add_argument("--samples", type=int, nargs=2, default=None, help="train and test samples (override)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run best on one)")
    parser.add_argument("--jobs", type=int, default=1, help="stage-3 runs trained at once, in worker processes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    size = QUICK if args.quick else FULL
    if args.steps:
        size = replace(size, steps=tuple(args.steps))
    if args.samples:
        size = replace(size, train_samples=args.samples[0], test_samples=args.samples[1])
    routers = args.routers.split(",") if args.routers else (["top_k", "dare"] if args.quick else None)
    variants = [v for v in ROUTER_VARIANTS if routers is None or v.name in routers]
    variants += [Variant(r, r, "router") for r in routers or [] if r not in {v.name for v in ROUTER_VARIANTS}]
    ablations = args.ablations or ("none" if args.quick else "all")
    if ablations != "none":
        variants += [v for v in ABLATIONS if ablations == "all" or v.name in ablations.split(",")]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    dial = args.dial if args.dial is not None else (QUICK_DIAL if args.quick else FULL_DIAL)
    report_dir = args.report_dir or (args.out / "report" if args.quick else Path("docs/router_study"))
    command = "python examples/router_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run_study(args.out, size, variants, seeds, dial, report_dir, args.task, command.strip(), args.jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
