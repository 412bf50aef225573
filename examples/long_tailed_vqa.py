"""Long-tailed answers: plain CE vs DQRoute vs CCAR answer reweighting on MoE-LLaVA (DARE), 3 seeds each.

    python examples/long_tailed_vqa.py                                # the measurement: docs/long_tailed/results.md
    python examples/long_tailed_vqa.py --quick --out runs/lt_quick    # a few steps, to check the pipeline

1. data: the digits VQA task (examples/digits_vqa_data.py) subsampled to long-tailed answer frequencies, CIFAR-100-LT's
   profile with imbalance ratio 100 over the 21 answers (0..18, yes, no); the test set is balanced over the answers;
2. per seed and method, the pipeline of examples/digits_vqa.py: a tiny Qwen3 decoder and a tiny CLIP tower from
   scratch joined into a dense LLaVA, stages 1 and 2, upcycled to 4 experts with DARE, stage 3; the method
   (`MoETrainingArguments(answer_reweighting=...)`, its defaults) in every stage, plain CE for `plain`;
3. accuracy on the head / medium / tail answers (thirds by train frequency) and overall, mean +- sd over the seeds;
   `results.json` and `results.md` (default docs/long_tailed/results.md; with --quick, under --out).
"""

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import hf_dare  # noqa: F401  (registers the MoE models with the Auto classes)
from hf_dare.conversion import upcycle
from hf_dare.evaluation import evaluate_vqa
from hf_dare.training import load_llava_dataset

sys.path.insert(0, str(Path(__file__).parent))
from digits_vqa import STAGES, TARGET_DISTRIBUTION, RunSize, build_starting_point, train_stage  # noqa: E402
from digits_vqa_data import make_long_tailed_digits_vqa  # noqa: E402
from study_report import machine  # noqa: E402

METHODS = ("plain", "dqroute", "ccar")
GROUPS = ("overall", "head", "medium", "tail")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "long_tailed" / "results.md"

# `train_samples` unused here (the long-tailed data sets its own size: n_max, test_per_answer below).
FULL = RunSize(train_samples=0, test_samples=0, steps=(200, 2000, 800), batch_size=16)
QUICK = RunSize(train_samples=0, test_samples=0, steps=(2, 3, 3), batch_size=4)
DATA = {"full": dict(n_max=1000, test_per_answer=20), "quick": dict(n_max=20, test_per_answer=2)}


def group_accuracy(evaluation, answers: dict) -> dict[str, float | None]:
    """Accuracy over all test samples and over those whose reference answer is in each group (None: no sample)."""
    scores = {group: [] for group in GROUPS}
    for reference, correct in zip(evaluation.references, evaluation.correct, strict=True):
        scores["overall"].append(correct)
        scores[answers[reference]["group"]].append(correct)
    return {group: (sum(values) / len(values) if values else None) for group, values in scores.items()}


def run_one(out: Path, paths: dict, size: RunSize, method: str, seed: int, threads: int = 1) -> dict:
    """The whole pipeline for one method and seed on the data at `paths`; returns the group accuracies. Runs in a
    worker process with `--jobs`."""
    torch.set_num_threads(threads)
    answers = json.loads(Path(paths["answers"]).read_text())
    data = {split: load_llava_dataset(paths[split], paths["images"]) for split in ("train", "test")}
    overrides = {} if method == "plain" else {"answer_reweighting": method}
    stage1, stage2, stage3 = STAGES
    started = time.perf_counter()
    dense = build_starting_point(out, seed)
    dense = train_stage(dense, out / "stage1", stage1, data, size, size.steps[0], seed, **overrides)
    dense = train_stage(dense, out / "stage2", stage2, data, size, size.steps[1], seed, **overrides)
    moe = upcycle(dense, out / "upcycled", num_experts=4, router="dare", target_distribution=TARGET_DISTRIBUTION,
                  seed=seed, overwrite=True)  # fmt: skip
    final = train_stage(moe, out / "stage3", stage3, data, size, size.steps[2], seed, **overrides)
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    evaluation = evaluate_vqa(model, AutoProcessor.from_pretrained(final), data["test"], batch_size=32)
    accuracy = group_accuracy(evaluation, answers)
    print(f"{method} seed {seed}: {accuracy} ({time.perf_counter() - started:.0f}s)", flush=True)
    return accuracy


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float] | None]]:
    """{method: {group: (mean, sd over seeds) or None}} (sd 0 for one seed)."""
    summary = {}
    for method, accuracies in runs.items():
        summary[method] = {}
        for group in GROUPS:
            values = [a[group] for a in accuracies if a[group] is not None]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[method][group] = (statistics.mean(values), sd) if values else None
    return summary


def paired_vs_plain(runs: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float] | None]]:
    """{method: {group: (mean, sd) of the method's accuracy minus plain CE's with the same seed}}."""
    differences = {}
    for method, accuracies in runs.items():
        if method == "plain" or "plain" not in runs:
            continue
        differences[method] = [
            {group: None if a[group] is None or p[group] is None else a[group] - p[group] for group in GROUPS}
            for a, p in zip(accuracies, runs["plain"], strict=True)
        ]
    return summarise(differences)


def results_markdown(
    summary: dict, runs: dict, answers: dict, seeds: list[int], size: RunSize, quick: bool, ran: str
) -> str:
    def cell(value, sign: str = ""):
        return "-" if value is None else f"{value[0]:{sign}.3f} ± {value[1]:.3f}"

    lines = [
        "# Long-tailed digits VQA: answer reweighting",
        "",
        "Written by `python examples/long_tailed_vqa.py"
        + (" --quick`: a pipeline check, not a measurement." if quick else "`."),
        "",
        "MoE-LLaVA (tiny Qwen3 decoder and CLIP tower from scratch, upcycled to 4 experts with DARE) trained through the "
        f"three stages ({'/'.join(map(str, size.steps))} steps, batch {size.batch_size}) on the digits VQA task "
        "subsampled to long-tailed answer frequencies (CIFAR-100-LT's profile, imbalance ratio 100; "
        "`examples/digits_vqa_data.py:make_long_tailed_digits_vqa`), with the method in every stage: `plain` the "
        "CE, `dqroute` / `ccar` `MoETrainingArguments(answer_reweighting=...)` with its defaults. Test set balanced over "
        f"the answers. Accuracy (exact answer), mean ± sd over seeds {seeds}; groups are thirds of the answers by "
        "train frequency.",
        "",
        "| method | " + " | ".join(GROUPS) + " |",
        "| --- | " + " | ".join("---" for _ in GROUPS) + " |",
    ]
    lines += [
        f"| {method} | " + " | ".join(cell(row[group]) for group in GROUPS) + " |" for method, row in summary.items()
    ]
    differences = paired_vs_plain(runs)
    if differences:
        lines += ["", "Paired by seed: the method's accuracy minus plain CE's, mean ± sd.", ""]
        lines += [
            "| method − plain | " + " | ".join(GROUPS) + " |",
            "| --- | " + " | ".join("---" for _ in GROUPS) + " |",
        ]
        lines += [
            f"| {method} | " + " | ".join(cell(row[group], "+") for group in GROUPS) + " |"
            for method, row in differences.items()
        ]
    lines += ["", "Per seed (overall / tail):", ""]
    lines += [
        f"- {method}: "
        + ", ".join(
            f"{a['overall']:.3f} / {a['tail']:.3f}" if a["tail"] is not None else f"{a['overall']:.3f} / -"
            for a in accuracies
        )
        for method, accuracies in runs.items()
    ]
    lines += ["", f"Run: {ran}."]
    lines += [
        "",
        "Answers (train / test samples, group):",
        "",
        "| answer | train | test | group |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {answer} | {a['train']} | {a['test']} | {a['group']} |" for answer, a in answers.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/long_tailed_vqa"))
    parser.add_argument("--quick", action="store_true", help="a few steps on a few samples (CI)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of plain,dqroute,ccar")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--results", type=Path, default=None, help=f"default {DOCS} (with --quick: OUT/results.md)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run best on one)")
    parser.add_argument("--jobs", type=int, default=1, help="runs (method, seed) at once, in worker processes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    seeds = [int(seed) for seed in args.seeds.split(",")]
    methods = args.methods.split(",")
    started = time.perf_counter()
    paths = {
        seed: make_long_tailed_digits_vqa(
            args.out / f"seed{seed}" / "data", seed=seed, **DATA["quick" if args.quick else "full"]
        )
        for seed in seeds
    }
    answers = json.loads(paths[seeds[-1]]["answers"].read_text())
    tasks = [(args.out / f"seed{seed}" / method, paths[seed], size, method, seed, args.threads)
             for seed in seeds for method in methods]  # fmt: skip
    if args.jobs <= 1:
        accuracies = [run_one(*task) for task in tasks]
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            accuracies = list(pool.map(run_one, *zip(*tasks, strict=True)))
    runs = {
        method: [a for (*_, m, _, _), a in zip(tasks, accuracies, strict=True) if m == method] for method in methods
    }
    summary = summarise(runs)
    minutes = (time.perf_counter() - started) / 60
    (args.out / "results.json").write_text(
        json.dumps({"runs": runs, "summary": summary, "answers": answers, "minutes": minutes}, indent=2)
    )
    results = args.results or (args.out / "results.md" if args.quick else DOCS)
    results.parent.mkdir(parents=True, exist_ok=True)
    command = "python examples/long_tailed_vqa.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results.write_text(
        results_markdown(
            summary,
            runs,
            answers,
            seeds,
            size,
            args.quick,
            f"`{command.strip()}`, {minutes:.1f} min, {machine()}, {args.jobs} run(s) at once",
        )
    )
    print("\n" + results.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
