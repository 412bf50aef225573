"""The router study (examples/router_study.py) cut down to a few steps, its shapes task and its aggregation."""

import json
import random
import statistics

import pytest

from hf_dare.modeling.configuration_moe import ROUTERS
from tests.test_digits_vqa import load_example

METRICS = (
    "accuracy",
    "accuracy_by_type",
    "avg_k",
    "avg_k_text",
    "avg_k_vision",
    "avg_k_per_layer",
    "activated_parameters",
    "gflops_per_token",
    "tokens_per_second",
    "expert_shares",
)


def test_shapes_data_is_llava_format_with_every_question_type(tmp_path):
    data = load_example("shapes_vqa_data")
    paths = data.make_shapes_vqa(tmp_path, n_train=300, n_test=40, seed=3)
    train, test = (json.loads(paths[split].read_text()) for split in ("train", "test"))
    assert len(train) == 300 and len(test) == 40
    assert {record["id"].split("_", 2)[2] for record in train} == set(data.QUESTION_TYPES)
    tokenizer = data.shapes_tokenizer()
    for record in train + test:
        human, answer = record["conversations"]
        assert human["value"].startswith("<image>\n") and (paths["images"] / record["image"]).is_file()
        ids = tokenizer(human["value"].split("\n", 1)[1] + " " + answer["value"])["input_ids"]
        assert tokenizer.unk_token_id not in ids
    # The answers follow from the scene.
    rng = random.Random(0)
    for kind in data.QUESTION_TYPES:
        for _ in range(20):
            objects, question, answer = data.make_question(kind, rng)
            if kind == "count":
                assert answer == str(len(objects))
            elif kind == "count_color":
                color = question.split()[2]
                assert answer == str(sum(c == color for c, _, _ in objects))
            elif kind == "where":
                color, shape = question.split()[3:5]
                assert (color, shape, answer) in objects


def test_summary_is_mean_and_sample_std_over_the_seeds_that_ran():
    study = load_example("router_study")
    runs = [
        {"variant": "a", "seed": s, "metrics": {"accuracy": acc, "by": {"x": acc}, "shares": [acc, 1 - acc]}}
        for s, acc in ((0, 0.5), (1, 0.7), (2, 0.9))
    ] + [{"variant": "b", "seed": 0, "metrics": {"accuracy": 0.4, "by": {"x": 0.4}, "shares": [0.4, 0.6]}}]
    summary = study.summarise(runs)
    assert summary["a"]["seeds"] == [0, 1, 2] and summary["b"]["seeds"] == [0]
    assert summary["a"]["accuracy"]["mean"] == pytest.approx(0.7)
    assert summary["a"]["accuracy"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))
    assert summary["a"]["by"]["x"]["n"] == 3 and summary["a"]["shares"][1]["mean"] == pytest.approx(0.3)
    assert summary["b"]["accuracy"] == {"mean": 0.4, "std": 0.0, "n": 1}
    assert "accuracy_vs_top_k" not in summary["a"]  # no Top-2 runs to pair with


def test_paired_difference_with_top2_uses_the_same_seed():
    study = load_example("router_study")
    runs = [{"variant": "top_k", "seed": s, "metrics": {"accuracy": acc}} for s, acc in ((0, 0.5), (1, 0.8))]
    runs += [{"variant": "dare", "seed": s, "metrics": {"accuracy": acc}} for s, acc in ((1, 0.9), (0, 0.6), (2, 0.1))]
    summary = study.summarise(runs)
    assert summary["dare"]["accuracy_vs_top_k"]["mean"] == pytest.approx(0.1)  # seeds 0 and 1; seed 2 has no pair
    assert summary["dare"]["accuracy_vs_top_k"]["n"] == 2 and summary["dare"]["accuracy_vs_top_k"][
        "std"
    ] == pytest.approx(0)
    assert summary["top_k"]["accuracy_vs_top_k"]["mean"] == 0


@pytest.mark.slow
def test_quick_study_writes_tables_json_and_plots(tmp_path):
    study = load_example("router_study")
    report = tmp_path / "report"
    routers = ",".join(ROUTERS)
    argv = ["--quick", "--routers", routers, "--ablations", "all", "--out", str(tmp_path / "work")]
    assert study.main([*argv, "--report-dir", str(report)]) == 0
    assert {"results.json", "results.md", "frontier.png", "avg_k_by_layer.png"} <= {p.name for p in report.iterdir()}
    results = json.loads((report / "results.json").read_text())
    ran = {run["variant"] for run in results["runs"]}
    every = set(ROUTERS) | {variant.name for variant in study.ABLATIONS}  # every router upcycles: none skipped
    assert ran == every == set(results["summary"]) == set(results["variants"]) and not results["skipped"]
    for run in results["runs"]:
        assert set(METRICS) <= set(run["metrics"]), run["variant"]
        metrics = run["metrics"]
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["tokens_per_second"] > 0
        assert set(metrics["accuracy_by_type"]) <= set(load_example("shapes_vqa_data").QUESTION_TYPES)
        assert sum(metrics["expert_shares"]) == pytest.approx(1.0)
        assert metrics["gflops_per_token"] > 0 and metrics["activated_parameters"] > 0
    for name, entry in results["summary"].items():
        runs = [run for run in results["runs"] if run["variant"] == name]
        assert entry["seeds"] == [run["seed"] for run in runs] == results["seeds"]
        for metric in ("accuracy", "avg_k", "gflops_per_token", "tokens_per_second"):
            values = [run["metrics"][metric] for run in runs]
            assert entry[metric]["mean"] == pytest.approx(sum(values) / len(values))
            assert entry[metric]["n"] == len(values)
    assert results["summary"]["top_k"]["avg_k"]["mean"] == pytest.approx(2.0)
    dial = results["dial"]["points"]
    assert [p["target_avg_k"] for p in dial] == [1.0, 2.0]
    for point in dial:
        assert point["calibration_avg_k"] == pytest.approx(point["target_avg_k"], abs=0.02)
    # On the test questions: a held-out token may predict above every calibration token, and use a second expert.
    assert dial[0]["avg_k"] == pytest.approx(1.0, abs=0.02)
    markdown = (report / "results.md").read_text()
    assert "| `dare` |" in markdown and "| `moepp` |" in markdown and "| `dare_pi_inverse` |" in markdown
    assert "Compute dial" in markdown and "frontier.png" in markdown and "Δ vs top_k" in markdown
