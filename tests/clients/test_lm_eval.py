"""lm-evaluation-harness (`--model hf`, `trust_remote_code=True`) scores an upcycled, not yet trained MoE
checkpoint exactly like the dense model it came from, on a local multiple-choice task, in a Python where
hf_dare cannot be imported (the checkpoint's own code runs)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_dare.conversion import upcycle
from tests import tiny_models
from tests.modeling.test_remote_code import run_without_hf_dare

pytest.importorskip("lm_eval")

TASK = "tiny_sums"
PAIRS = [(1, 2), (3, 4), (5, 5), (2, 7), (6, 1), (8, 0), (4, 4), (9, 3)]
DOCS = [{"question": f"what is the sum of {a} and {b} ?", "choices": [str(a + b), str(a), str(b), "0"], "answer": 0}
        for a, b in PAIRS]  # fmt: skip


def write_task(folder) -> None:
    """A multiple-choice task over a local JSONL file, for `--include_path folder`."""
    folder.mkdir()
    (folder / "sums.jsonl").write_text("\n".join(json.dumps(doc) for doc in DOCS) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'sums.jsonl'}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )


def direct_loglikelihoods(model, tokenizer) -> list[list[float]]:
    """log P(" choice" | question) per document and choice, computed here from the model's logits."""
    scores = []
    for doc in DOCS:
        context = tokenizer(doc["question"]).input_ids
        row = []
        for choice in doc["choices"]:
            ids = tokenizer(f"{doc['question']} {choice}").input_ids
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
            row.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
        scores.append(row)
    return scores


@pytest.mark.slow
def test_upcycled_checkpoint_scores_like_its_dense_model(tmp_path):
    torch.manual_seed(0)
    # The Qwen3 layout: transformers 5 would reload a word-level tokenizer saved beside a `qwen2` config as
    # Qwen2's BPE tokenizer (the upcycled `moe_causal_lm` folder is not affected). A wide init spreads the
    # choices' log-likelihoods, so equal scores mean something.
    dense = AutoModelForCausalLM.from_config(tiny_models.text_config("qwen3", initializer_range=0.2)).eval()
    tokenizer = tiny_models.tokenizer()
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, router="dare", seed=0)
    write_task(tmp_path / "tasks")

    run_without_hf_dare(
        f"""
        import json, os
        os.environ["HF_DATASETS_CACHE"] = {str(tmp_path / "datasets_cache")!r}
        import lm_eval
        from lm_eval.tasks import TaskManager
        tasks = TaskManager(include_path={str(tmp_path / "tasks")!r}, include_defaults=False)
        results = {{}}
        for name in ("dense", "moe"):
            out = lm_eval.simple_evaluate(
                model="hf",
                model_args="pretrained={tmp_path}/" + name + ",trust_remote_code=True,dtype=float32",
                tasks=[{TASK!r}], task_manager=tasks, device="cpu", batch_size=4, log_samples=True,
            )
            samples = sorted(out["samples"][{TASK!r}], key=lambda s: s["doc_id"])
            results[name] = {{
                "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
                "acc": out["results"][{TASK!r}]["acc,none"],
            }}
        with open({str(tmp_path / "results.json")!r}, "w") as f:
            json.dump(results, f)
        """,
        cwd=tmp_path,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    dense_scores, moe_scores = (torch.tensor(results[name]["loglikelihoods"]) for name in ("dense", "moe"))
    assert moe_scores.shape == (len(DOCS), 4)
    torch.testing.assert_close(moe_scores, dense_scores, atol=1e-3, rtol=0)
    assert results["moe"]["acc"] == results["dense"]["acc"]
    # lm-eval scored what the model computes with the tiny tokenizer (not a reinterpreted one), and the
    # choices are told apart.
    torch.testing.assert_close(dense_scores, torch.tensor(direct_loglikelihoods(dense, tokenizer)), atol=1e-4, rtol=0)
    assert (dense_scores.max(1).values - dense_scores.min(1).values).mean() > 0.5
