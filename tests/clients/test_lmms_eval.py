"""lmms-eval (`python -m lmms_eval --model hf_dare`, found through hf-dare's `lmms_eval.models` entry point)
answers a local digits-VQA task exactly as `hf_dare.evaluation.evaluate_vqa` does: the same answer per
question and the same accuracy, on real digit images, through the task folder `write_task` makes from
LLaVA-format data. Skipped only where lmms-eval is not installed outside CI (`.ci/run` installs it)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_dare import MoELlavaForConditionalGeneration
from hf_dare.training import load_llava_dataset
from tests import tiny_models
from tests.test_digits_vqa import load_example

if importlib.util.find_spec("lmms_eval") is None and not os.environ.get("CI"):
    pytest.skip("lmms-eval is not installed (.ci/run installs it)", allow_module_level=True)

TASK = "digits_vqa"
N_QUESTIONS = 20
BATCH_SIZE = 4


def _digits_data(folder: Path) -> dict:
    """20 test questions of the digits VQA set (real scikit-learn digits and scikit-image photos)."""
    return load_example("digits_vqa_data").make_digits_vqa(folder, n_train=0, n_test=N_QUESTIONS, seed=3)


def _set_references(path: Path, answers: dict[str, str]) -> None:
    records = json.loads(path.read_text())
    for record in records:
        if record["id"] in answers:
            record["conversations"][-1]["value"] = answers[record["id"]]
    path.write_text(json.dumps(records))


def _run_lmms_eval(tmp_path: Path, model_dir: Path, tasks_dir: Path) -> tuple[dict, list[dict]]:
    out = tmp_path / "lmms_out"
    command = [sys.executable, "-m", "lmms_eval", "--model", "hf_dare", "--model_args", f"pretrained={model_dir}",
               "--tasks", TASK, "--include_path", str(tasks_dir), "--batch_size", str(BATCH_SIZE),
               "--device", "cpu", "--output_path", str(out), "--log_samples"]  # fmt: skip
    # Offline, and one thread as in this process (tests/conftest.py): tiny models gain nothing from more.
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    (results_file,) = out.rglob("*_results.json")
    (samples_file,) = out.rglob(f"*_samples_{TASK}.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    return json.loads(results_file.read_text()), sorted(samples, key=lambda sample: sample["doc_id"])


@pytest.mark.slow
def test_lmms_eval_answers_like_evaluate_vqa(tmp_path):
    from hf_dare.evaluation import evaluate_vqa
    from hf_dare.integrations.lmms_eval import write_task

    paths = _digits_data(tmp_path / "data")
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    MoELlavaForConditionalGeneration(tiny_models.llava_config(tower="clip", router="dare")).save_pretrained(model_dir)
    tiny_models.save_tiny_processor(model_dir, "clip")
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)

    # An untrained model gets (nearly) nothing right; so that the accuracy means something, every other
    # question's reference becomes the model's own answer (the other half keep the true answers).
    first = evaluate_vqa(model, processor, load_llava_dataset(paths["test"], paths["images"]), batch_size=BATCH_SIZE)
    _set_references(paths["test"], dict(zip(first.ids[::2], first.predictions[::2], strict=True)))
    dataset = load_llava_dataset(paths["test"], paths["images"])
    expected = evaluate_vqa(model, processor, dataset, batch_size=BATCH_SIZE)
    assert expected.predictions == first.predictions
    assert 0.5 <= expected.accuracy < 1.0

    write_task(paths["test"], tmp_path / "tasks" / TASK, paths["images"])
    results, samples = _run_lmms_eval(tmp_path, model_dir, tmp_path / "tasks")

    assert [sample["doc_id"] for sample in samples] == list(range(N_QUESTIONS))
    assert [sample["target"] for sample in samples] == expected.references
    predictions = [sample["filtered_resps"] for sample in samples]
    predictions = [p[0] if isinstance(p, list) else p for p in predictions]
    assert [p.strip() for p in predictions] == expected.predictions
    assert [sample["accuracy"] for sample in samples] == [float(c) for c in expected.correct]
    assert results["results"][TASK]["accuracy,none"] == pytest.approx(expected.accuracy, abs=1e-12)
    assert "hf_dare" in results["config"]["model_backend"] or results["config"]["model"] == "hf_dare"


def test_write_task_refuses_images_after_the_question(tmp_path):
    from hf_dare.integrations.lmms_eval import write_task

    image = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(tiny_models.digit_images(1)[0]).save(image)
    record = {"id": "late", "image": "digit.png",
              "conversations": [{"from": "human", "value": "what digit is shown ?\n<image>"}, {"from": "gpt", "value": "0"}]}  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps([record]))
    with pytest.raises(ValueError, match="before the question"):
        write_task(tmp_path / "data.json", tmp_path / "tasks" / TASK, tmp_path)
    record["conversations"][0]["value"] = "<image>\nwhat digit is shown ?"
    (tmp_path / "data.json").write_text(json.dumps([record]))
    folder = write_task(tmp_path / "data.json", tmp_path / "tasks" / "my_digits", tmp_path)
    assert "task: my_digits\n" in (folder / "my_digits.yaml").read_text()
    (row,) = [json.loads(line) for line in (folder / "data" / "test.jsonl").read_text().splitlines()]
    assert row == {"id": "late", "question": "what digit is shown ?", "answer": "0", "images": ["images/0_digit.png"]}
    assert (folder / "data" / row["images"][0]).is_file() and (folder / "utils.py").is_file()
