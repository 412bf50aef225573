"""The end-to-end example, cut down to a few steps (examples/digits_vqa.py --quick), and its parts."""

import importlib.util
import json
import sys
from pathlib import Path

import evaluate
import pytest
from transformers import AutoProcessor

from hf_dare.evaluation import VQA_ACCURACY, VqaEvaluation
from hf_dare.evaluation.report import accuracy_by_difficulty, write_report

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vqa_accuracy_metric_loads_offline_and_normalises_answers():
    metric = evaluate.load(VQA_ACCURACY)
    result = metric.compute(predictions=["3", " Yes.", "no", "12"], references=["3", "yes", "yes", "13"])
    assert result["accuracy"] == pytest.approx(0.5)


def test_digits_vqa_data_is_llava_format_with_disjoint_images(tmp_path):
    data = load_example("digits_vqa_data")
    paths = data.make_digits_vqa(tmp_path, n_train=200, n_test=50, seed=1)
    train, test = (json.loads(paths[split].read_text()) for split in ("train", "test"))
    assert len(train) == 200 and len(test) == 50
    for record in train + test:
        images = [record["image"]] if isinstance(record["image"], str) else record["image"]
        human, answer = record["conversations"]
        assert human["from"] == "human" and answer["from"] == "gpt"
        assert human["value"].count("<image>") == len(images)
        assert all((paths["images"] / image).is_file() for image in images)
        if "sum of the two" in human["value"]:
            assert len(images) == 2 and 0 <= int(answer["value"]) <= 18
    digit_images = {split: set() for split in ("train", "test")}
    for split, records in (("train", train), ("test", test)):
        for record in records:
            images = [record["image"]] if isinstance(record["image"], str) else record["image"]
            digit_images[split] |= {image for image in images if image.startswith("digit_")}
    assert not digit_images["train"] & digit_images["test"]
    tokenizer = data.word_level_tokenizer()
    for record in train:
        ids = tokenizer(record["conversations"][0]["value"] + " " + record["conversations"][1]["value"])["input_ids"]
        assert tokenizer.unk_token_id not in ids


def test_accuracy_by_difficulty_bins_and_plots(tmp_path):
    evaluation = VqaEvaluation(
        accuracy=0.5,
        ids=[str(i) for i in range(10)],
        predictions=["1"] * 10,
        references=["1"] * 5 + ["2"] * 5,
        correct=[True] * 5 + [False] * 5,
        true_difficulty=[0.1, 0.2, 0.3, 0.4, 0.5, 1.1, 1.2, 1.3, 1.4, 1.5],
        predicted_difficulty=[0.2, 0.2, 0.3, 0.5, 0.4, 1.0, 1.3, 1.2, 1.6, 1.4],
        routing={
            "routing/avg_k_layer_0": 1.2,
            "routing/avg_k_layer_2": 1.4,
            "routing/avg_k_text_layer_0": 1.1,
            "routing/avg_k_text_layer_2": 1.3,
            "routing/avg_k_text": 1.3,
        },
        expert_load=[[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]],
    )
    centres, accuracies = accuracy_by_difficulty(evaluation, bins=2)
    assert centres == pytest.approx([0.3, 1.3]) and accuracies == [1.0, 0.0]
    written = write_report(evaluation, tmp_path)
    names = {path.name for path in written}
    assert names == {"evaluation.json", "avg_k.png", "expert_load.png", "difficulty.png", "accuracy_by_difficulty.png"}
    assert all(path.stat().st_size > 0 for path in written)
    assert json.loads((tmp_path / "evaluation.json").read_text())["accuracy"] == 0.5


@pytest.mark.slow
def test_quick_pipeline_runs_every_stage_and_router(tmp_path):
    pipeline = load_example("digits_vqa")
    results = pipeline.run(tmp_path, pipeline.QUICK, routers=("top_k", "dare", "ltdr"))
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["top_k"]["avg_k"] == pytest.approx(2.0)
    assert 1.0 <= results["dare"]["avg_k"] <= 4.0
    assert results["ltdr"]["avg_k_text"] == pytest.approx(2.0) and results["ltdr"]["avg_k_vision"] >= 2.0
    for router, result in results.items():
        assert 0.0 <= result["accuracy"] <= 1.0 and result["tokens_per_second"] > 0
        assert 0 < result["activated_parameters"] < result["total_parameters"]
        model_dir = Path(result["model"])
        assert (model_dir / "report" / "expert_load.png").is_file()
        card = (model_dir / "README.md").read_text()
        assert "| stage3 |" in card and "## Routing statistics" in card, router
    assert (Path(results["dare"]["model"]) / "report" / "difficulty.png").is_file()
    # The word-level tokenizer survives every save / load of the pipeline (build, stages, upcycle).
    tokenizer = AutoProcessor.from_pretrained(results["dare"]["model"]).tokenizer
    ids = tokenizer("is the digit even ? yes")["input_ids"]
    assert len(ids) == 6 and tokenizer.unk_token_id not in ids


def test_report_command_evaluates_a_saved_model_and_writes_the_plots(tmp_path):
    import torch

    from hf_dare import MoELlavaForConditionalGeneration
    from hf_dare.cli import main
    from tests.tiny_models import llava_config, save_tiny_processor

    data = load_example("digits_vqa_data")
    paths = data.make_digits_vqa(tmp_path / "data", n_train=4, n_test=6, seed=2)
    # The tiny test processor will do: words it does not know become <unk>, images are resized.
    torch.manual_seed(0)
    model = MoELlavaForConditionalGeneration(llava_config(tower="clip", router="dare"))
    model.save_pretrained(tmp_path / "model")
    save_tiny_processor(tmp_path / "model", "clip")
    status = main(["report", str(tmp_path / "model"), str(paths["test"]), "--images", str(paths["images"])])
    assert status == 0
    report = tmp_path / "model" / "report"
    evaluation = json.loads((report / "evaluation.json").read_text())
    assert len(evaluation["predictions"]) == 6 and len(evaluation["predicted_difficulty"]) == 6
    assert 0.0 <= evaluation["accuracy"] <= 1.0
    assert {"avg_k.png", "expert_load.png", "difficulty.png", "accuracy_by_difficulty.png"} <= {
        p.name for p in report.iterdir()
    }


def test_long_tailed_digits_vqa_follows_the_cifar_lt_profile(tmp_path):
    data = load_example("digits_vqa_data")
    paths = data.make_long_tailed_digits_vqa(tmp_path, n_max=200, imbalance_ratio=100, test_per_answer=3, seed=0)
    answers = json.loads(paths["answers"].read_text())
    train, test = (json.loads(paths[split].read_text()) for split in ("train", "test"))
    counts = [a["train"] for a in answers.values()]  # most frequent first
    assert len(answers) == 21 and counts == sorted(counts, reverse=True)
    assert counts == [max(1, int(counts[0] * 0.01 ** (rank / 20))) for rank in range(21)]  # n_max * 100^(-i/20)
    assert counts[0] / counts[-1] == 100  # the imbalance ratio
    assert {a: sum(data.answer_of(r) == a for r in train) for a in answers} == {
        a: v["train"] for a, v in answers.items()
    }
    assert all(v["test"] == 3 for v in answers.values()) and len(test) == 63  # balanced test set
    groups = [a["group"] for a in answers.values()]
    assert groups == ["head"] * 7 + ["medium"] * 7 + ["tail"] * 7
    assert {"yes", "no"} <= {a for a, v in answers.items() if v["group"] == "head"}
    train_images = {r["image"] if isinstance(r["image"], str) else r["image"][0] for r in train}
    test_images = {r["image"] if isinstance(r["image"], str) else r["image"][0] for r in test}
    assert not {i for i in train_images & test_images if i.startswith("digit_")}


@pytest.mark.slow
def test_long_tailed_quick_pipeline_writes_the_results(tmp_path):
    example = load_example("long_tailed_vqa")
    assert example.main(["--quick", "--out", str(tmp_path), "--seeds", "0"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]) == {"plain", "dqroute", "ccar"}
    for summary in results["summary"].values():
        assert set(summary) == {"overall", "head", "medium", "tail"}
        assert all(0.0 <= mean <= 1.0 for mean, _ in summary.values())
    table = (tmp_path / "results.md").read_text()
    assert "| dqroute |" in table and "| ccar |" in table and "a pipeline check" in table
    assert "| method − plain |" in table  # paired by seed
