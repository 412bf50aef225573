"""The difficulty benchmark (examples/difficulty_benchmark.py): its task, its oracle router, and a --quick run."""

import json
import math

import pytest
import torch

from hf_dare.modeling.routing import ROUTERS
from tests.test_digits_vqa import load_example


@pytest.fixture(autouse=True)
def _unregister_oracle():
    """The benchmark's oracle router is registered for its tests only: other tests iterate over ROUTERS."""
    yield
    ROUTERS.pop("oracle", None)
    ROUTERS.pop("oracle_key", None)


def test_task_sequences_are_quadruples_that_follow_the_table():
    task_module = load_example("difficulty_task")
    task = task_module.LookupTask(keys=8, values=5, seq_len=16)
    ids = task.sample(64, torch.Generator().manual_seed(0))
    assert ids.shape == (64, 16) and ids.max() < task.vocab_size
    a, b, value, sep = ids[:, 0::4], ids[:, 1::4] - task.keys, ids[:, 2::4] - 2 * task.keys, ids[:, 3::4]
    assert (a < task.keys).all() and ((b >= 0) & (b < task.keys)).all()
    assert torch.equal(value, task.table[a, b]) and (sep == task.sep).all()
    assert torch.equal(task.table, task_module.LookupTask(keys=8, values=5).table)  # fixed by table_seed
    classes = [task_module.CLASSES[i] for i in task_module.position_classes(8)]
    assert classes == ["irreducible", "hard", "easy", "irreducible"] * 2
    assert torch.equal(task_module.token_classes(2 * 16), task_module.position_classes(16).repeat(2))
    assert task.best_nll()["irreducible"] == pytest.approx(math.log(8))


def test_oracle_router_gives_the_extra_experts_to_hard_tokens_only():
    bench = load_example("difficulty_benchmark")
    bench.register_oracle_router()
    bench.register_oracle_router()  # idempotent
    task = bench.LookupTask(keys=8, seq_len=16)
    oracle = next(v for v in bench.BENCHMARK_VARIANTS if v.name == "oracle")
    model = bench.build_model(oracle, task, bench.QUICK, seed=0)
    for block in model.moe_blocks:  # the thresholds as training would leave them for the oracle's Pi
        block.gate.threshold_tracker.thresholds.copy_(torch.tensor([2.2, 2.4, 3.5]))
    metrics = bench.evaluate(model, task, bench.QUICK)
    by_class = metrics["avg_k_by_class"]
    assert by_class["easy"] == by_class["irreducible"] == 1.0 and by_class["hard"] > 2.0
    assert metrics["extra_expert_share"]["hard"] == 1.0


def test_key_oracle_gives_the_extra_experts_to_the_key_positions_only():
    """Scores 2 + u at the key a (which predicts the noise b: an irreducible position), 1 + u at b, u elsewhere:
    with tau_1 = 2 every key position, and only those, uses 2 experts."""
    bench = load_example("difficulty_benchmark")
    bench.register_oracle_router()
    task = bench.LookupTask(keys=8, seq_len=16)
    model = bench.build_model(bench.ORACLE_KEY_2, task, bench.QUICK, seed=0)
    for block in model.moe_blocks:
        block.gate.threshold_tracker.thresholds.copy_(torch.tensor([2.0, 3.5, 4.0]))
    metrics = bench.evaluate(model, task, bench.QUICK)
    by_class = metrics["avg_k_by_class"]
    assert by_class["easy"] == by_class["hard"] == 1.0
    assert by_class["irreducible"] == pytest.approx(1 + 4 / 7)  # 4 keys of the 7 labelled irreducible positions
    assert metrics["extra_expert_share"]["irreducible"] == 1.0


@pytest.mark.slow
def test_quick_run_writes_the_tables_and_the_frontier(tmp_path):
    bench = load_example("difficulty_benchmark")
    bench.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert {r["variant"] for r in results["runs"]} == set(bench.QUICK_VARIANTS)
    for run in results["runs"]:
        metrics = run["metrics"]
        assert set(metrics["accuracy"]) == set(metrics["nll"]) == set(metrics["avg_k_by_class"]) == {
            "easy", "hard", "irreducible"
        }  # fmt: skip
        assert metrics["tokens"] == bench.QUICK.eval_sequences * (bench.QUICK.seq_len - 1)
        assert run["dial"] or run["variant"] not in bench.DIALLED
    dare = next(r for r in results["runs"] if r["variant"] == "dare")
    assert len(dare["metrics"]["spearman_difficulty_nll"]) == 2
    assert [p["target_avg_k"] for p in dare["dial"]] == list(bench.QUICK_DIAL)
    text = (tmp_path / "benchmark.md").read_text()
    assert "Δ vs Top-1" in text and "Δ vs Top-2" in text and "Compute dial" in text
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_paired_differences_match_seeds_and_table_sizes():
    bench = load_example("difficulty_benchmark")
    runs = [
        {"variant": v, "keys": n, "seed": s, "metrics": {"accuracy": {"hard": acc}}}
        for v, n, s, acc in (
            ("a", 64, 0, 0.5),
            ("a", 64, 1, 0.7),
            ("b", 64, 0, 0.9),
            ("b", 64, 1, 0.8),
            ("b", 96, 0, 0.1),
        )
    ]
    assert bench.paired(runs, "b", "a", "accuracy.hard") == pytest.approx([0.4, 0.1])
    assert bench.stats([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}


@pytest.mark.slow
def test_dare_with_its_defaults_learns_the_hard_class_that_top1_learns():
    """From scratch on a 16 x 16 table: Top-1 learns the lookup, and so does DARE with its defaults (L_diff does
    not reach the backbone: `difficulty_detach_input=True`, chosen from the difficulty benchmark)."""
    bench = load_example("difficulty_benchmark")
    size = bench.replace(bench.QUICK, steps=400, batch_size=16, seq_len=32, eval_sequences=128, trace_every=400)
    task = bench.LookupTask(keys=16, seq_len=size.seq_len)
    variants = {
        "top1": bench.Variant("top1", "top_k", {"num_experts_per_tok": 1}),
        "dare": bench.Variant("dare", "dare", {"target_distribution": bench.PAPER_PI}),
    }
    accuracy = {}
    for name, variant in variants.items():
        model, _ = bench.train(variant, task, size, seed=0)
        accuracy[name] = bench.evaluate(model, task, size)["accuracy"]
    assert accuracy["top1"]["hard"] > 0.9, accuracy
    assert accuracy["dare"]["hard"] > 0.9, accuracy
    assert accuracy["dare"]["easy"] == 1.0


def test_upcycled_variants_start_from_the_dense_model_they_trained():
    """An upcycled variant trains a dense model for half the steps, upcycles it (Drop-Upcycling ratio r) and
    trains the MoE for the other half; the card's stages say so."""
    bench = load_example("difficulty_benchmark")
    size = bench.replace(bench.QUICK, steps=6, trace_every=1)
    task = bench.LookupTask(keys=8, seq_len=size.seq_len)
    variant = next(v for v in bench.BENCHMARK_VARIANTS if v.name == "dare_upcycled_drop")
    model, trace = bench.train(variant, task, size, seed=0)
    assert model.config.router == "dare" and model.config.num_experts == 4
    upcycled = [stage for stage in model.config.training_stages if "--drop-upcycling 0.5" in stage["description"]]
    assert upcycled, model.config.training_stages
    assert trace["curve"][-1]["step"] == 3  # the MoE phase: the other half of the steps
