"""`hf_dare.calibrate` and `hf-dare calibrate`: the inference-time compute dial on a trained tiny DARE model."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_dare
from hf_dare.calibration import calibration_batches, distribution_for_avg_k, thresholds_for_shares
from hf_dare.cli import main
from hf_dare.training import MoETrainer
from tests.modeling.test_remote_code import run_without_hf_dare
from tests.tiny_models import SPECIAL_TOKENS, WORDS, moe_config, tokenizer
from tests.training.helpers import as_dataset, expert_shares, sentence_tensors, training_args

M = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny DARE causal LM trained 40 steps on "the digit is N ." sentences (its predictors tell the hard
    token after "is" from the others), saved with its tokenizer, and calibration data: other sentences, as
    batches and as a text file."""
    folder = tmp_path_factory.mktemp("calibrate")
    torch.manual_seed(0)
    model = hf_dare.MoEForCausalLM(moe_config(router="dare", threshold_momentum=0.5))
    args = training_args(
        folder / "run",
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        predictor_learning_rate=3e-2,
        logging_steps=10,
    )
    MoETrainer(model=model, args=args, train_dataset=as_dataset(sentence_tensors(16, 8))).train()
    model.save_pretrained(folder / "model")
    tokenizer().save_pretrained(folder / "model")
    calibration = sentence_tensors(32, 16, seed=1)
    batches = [{key: value[i : i + 8] for key, value in calibration.items()} for i in range(0, 32, 8)]
    words = SPECIAL_TOKENS + WORDS
    lines = [" ".join(words[i] for i in row) for row in calibration["input_ids"].tolist()]
    (folder / "calibration.txt").write_text("\n".join(lines) + "\n")
    return folder, batches


def load(folder) -> hf_dare.MoEForCausalLM:
    return hf_dare.MoEForCausalLM.from_pretrained(folder / "model")


@torch.no_grad()
def routed(model, batches) -> list[torch.Tensor]:
    """Experts per token of each MoE layer over every batch, (tokens,) per layer (eval mode)."""
    model.eval()
    counts = [model(**batch).expert_counts for batch in batches]
    return [torch.cat([c[layer].flatten() for c in counts]) for layer in range(len(counts[0]))]


def test_distribution_for_avg_k_has_the_mean_and_stays_close_to_pi():
    pi = [0.6, 0.3, 0.09, 0.01]
    for target in (1.0, 1.05, 1.3, 1.51, 2.0, 3.5, 4.0):
        dist = distribution_for_avg_k(target, pi)
        assert sum(dist) == pytest.approx(1.0) and min(dist) >= 0
        assert sum(k * p for k, p in enumerate(dist, start=1)) == pytest.approx(target, abs=1e-9)
    assert distribution_for_avg_k(1.51, pi) == pytest.approx(pi, abs=1e-3)  # Pi's own mean: Pi itself
    # A uniform base gives the maximum-entropy distribution: uniform at the midpoint.
    assert distribution_for_avg_k(2.5, [0.25] * 4) == pytest.approx([0.25] * 4)
    # A base that cannot reach the mean (no mass on 3, 4 experts) falls back to the maximum-entropy one.
    assert sum(k * p for k, p in enumerate(distribution_for_avg_k(3.0, [0.5, 0.5, 0, 0]), 1)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="avg_k"):
        distribution_for_avg_k(4.5, pi)


def test_thresholds_split_ties_nowhere_and_stay_strictly_increasing():
    values = torch.tensor([0.5] * 50 + [1.0] * 10 + [2.0] * 40)
    taus = thresholds_for_shares(values, [0.54, 0.6, 0.85])
    assert (taus[1:] > taus[:-1]).all()
    below = [(values < tau).float().mean().item() for tau in taus]
    assert below == pytest.approx([0.5, 0.6, 1.0])  # the nearest achievable shares (a tie block cannot be cut)
    # Balancing the total: 0.54 -> 0.5 leaves 0.04 for the next level, 0.54 + 0.04 -> 0.6 (not 0.5).
    for balance_total, expected in ((False, [0.5, 0.5, 1.0]), (True, [0.5, 0.6, 1.0])):
        taus = thresholds_for_shares(values, [0.54, 0.54, 0.85], balance_total=balance_total)
        assert [(values < tau).float().mean().item() for tau in taus] == pytest.approx(expected)
    # All thresholds in one gap, below every value and above every value.
    for cumulative, expected in (([0.5, 0.5, 0.5], [0.5] * 3), ([0.0, 0.0, 0.0], [0.0] * 3), ([1, 1, 1], [1.0] * 3)):
        taus = thresholds_for_shares(values, cumulative)
        assert (taus[1:] > taus[:-1]).all()
        assert [(values < tau).float().mean().item() for tau in taus] == pytest.approx(expected)
    constant = thresholds_for_shares(torch.full((10,), 3.0), [0.3, 0.6, 0.9])
    assert (constant[1:] > constant[:-1]).all()
    # A share of 0 holds beyond the calibration data: no value reaches a threshold at level 1, every value one at
    # level 0 (Pi = 0.8 / 0.2 / 0 / 0: a token well above the calibration tokens still uses 2 experts, not 4).
    taus = thresholds_for_shares(values, [0.5, 1.0, 1.0])
    assert (taus[1:] > taus[:-1]).all() and torch.isfinite(taus).all()
    assert (1 + (torch.tensor([1e6, -1e6])[:, None] >= taus).sum(-1)).tolist() == [2, 1]
    taus = thresholds_for_shares(values, [0.0, 0.0, 0.5])
    assert (taus[1:] > taus[:-1]).all() and (torch.tensor(-1e6) >= taus[:2]).all()


@pytest.mark.parametrize("target", [1.0, 1.2, 1.5, 2.0, 3.0])
def test_calibrate_hits_the_requested_avg_k_per_layer(trained, target):
    folder, batches = trained
    model = load(folder)
    model.train()
    record = hf_dare.calibrate(model, batches, avg_k=target, data_description="sentences")
    assert model.training  # left in the mode it came in (calibrated in eval mode, dropout off)
    for counts in routed(model, batches):
        assert counts.double().mean().item() == pytest.approx(target, abs=0.02)
    assert record["achieved_avg_k"] == pytest.approx(target, abs=0.02)
    for block in model.moe_blocks:
        taus = block.gate.threshold_tracker.thresholds
        assert (taus[1:] > taus[:-1]).all(), taus
    # Recorded for the model card; DARE's Pi becomes the calibrated distribution.
    stage = model.config.training_stages[-1]
    assert stage["name"] == "calibrate" and stage["target"] == {"avg_k": target} and stage["data"] == "sentences"
    assert model.config.target_distribution == pytest.approx(record["distribution"])


def test_calibrate_hits_the_requested_shares(trained):
    folder, batches = trained
    model = load(folder)
    thresholds_before = [b.gate.threshold_tracker.thresholds.clone() for b in model.moe_blocks]
    target = [0.6, 0.3, 0.09, 0.01]
    hf_dare.calibrate(model, batches, target_distribution=target)
    for counts in routed(model, batches):
        assert expert_shares(counts, M) == pytest.approx(target, abs=0.02)
    thresholds = [b.gate.threshold_tracker.thresholds for b in model.moe_blocks]
    assert all((t[1:] > t[:-1]).all() for t in thresholds)
    # Each layer gets its own thresholds, from its own predictions.
    assert not torch.equal(thresholds[0], thresholds[1])
    assert not all(torch.equal(a, b) for a, b in zip(thresholds, thresholds_before, strict=True))
    model.save_pretrained(folder / "card")
    text = (folder / "card" / "README.md").read_text()
    assert "| calibrate |" in text and "Avg K" in text


def test_bad_targets_and_routers_without_a_dial_are_refused(trained):
    folder, batches = trained
    model = load(folder)
    for bad in (0.5, 4.5):
        with pytest.raises(ValueError, match=r"avg_k.*1\.\.4"):
            hf_dare.calibrate(model, batches, avg_k=bad)
    with pytest.raises(ValueError, match="target_distribution"):
        hf_dare.calibrate(model, batches, target_distribution=[0.5, 0.6, 0.0, 0.0])
    with pytest.raises(ValueError, match="max_experts"):
        hf_dare.calibrate(model, batches, target_distribution=[0.5, 0.5])
    with pytest.raises(ValueError, match="exactly one"):
        hf_dare.calibrate(model, batches)
    for router in ("ltdr", "remoe", "dynmoe", "moepp"):
        other = hf_dare.MoEForCausalLM(moe_config(router=router))
        with pytest.raises(ValueError, match=f"'{router}' router has no compute dial"):
            hf_dare.calibrate(other, batches, avg_k=1.5)


def test_top_k_dials_an_integer_k_and_top_p_its_p(trained):
    _, batches = trained
    torch.manual_seed(0)
    top_k = hf_dare.MoEForCausalLM(moe_config(router="top_k"))
    with pytest.raises(ValueError, match="integer"):
        hf_dare.calibrate(top_k, batches, avg_k=1.5)
    record = hf_dare.calibrate(top_k, batches, avg_k=3)
    assert top_k.config.num_experts_per_tok == 3 and record["achieved_avg_k"] == pytest.approx(3.0)
    assert all((counts == 3).all() for counts in routed(top_k, batches))

    top_p = hf_dare.MoEForCausalLM(moe_config(router="top_p"))
    with torch.no_grad():  # spread the router probabilities, as training would
        for block in top_p.moe_blocks:
            block.gate.weight.mul_(100)
    record = hf_dare.calibrate(top_p, batches, avg_k=1.8)
    assert 0 < top_p.config.top_p_threshold == record["top_p_threshold"] <= 1
    counts = torch.cat(routed(top_p, batches))
    assert counts.double().mean().item() == pytest.approx(1.8, abs=0.02)
    with pytest.raises(ValueError, match="top_p"):
        hf_dare.calibrate(top_p, batches, target_distribution=[0.25] * 4)


def test_cli_checkpoint_reloads_without_hf_dare_and_routes_the_same(trained, tmp_path):
    folder, batches = trained
    model = load(folder)
    hf_dare.calibrate(model, batches, avg_k=1.3)
    expected = routed(model, batches)

    out = tmp_path / "calibrated"
    status = main(["calibrate", str(folder / "model"), str(folder / "calibration.txt"), "--avg-k", "1.3", str(out)])
    assert status == 0
    assert {"model.safetensors", "config.json", "tokenizer.json", "routing.py", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "config.json").read_text())
    assert config["training_stages"][-1]["name"] == "calibrate"
    # The one routing record (hf_dare.modeling.statistics.statistics_record), load balance included, on the card.
    assert len(config["routing_statistics"]["load_cv"]) == len(config["moe_layers"])
    assert "| load_cv |" in (out / "README.md").read_text()
    assert config["training_stages"][-1]["achieved_avg_k"] == pytest.approx(1.3, abs=0.02)
    # The CLI's batches are the ones above (the text file holds the same tokens).
    cli_batches, _ = calibration_batches(out, model, folder / "calibration.txt")
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(cli_batches, batches, strict=True))
    tensors = {f"input_ids_{i}": b["input_ids"] for i, b in enumerate(batches)}
    tensors.update({f"expected_{layer}": counts for layer, counts in enumerate(expected)})
    save_file(tensors, tmp_path / "inputs.safetensors")

    run_without_hf_dare(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert "hf_dare" not in type(model).__module__
        saved = load_file({str(tmp_path / "inputs.safetensors")!r})
        batches = [saved[k] for k in sorted(k for k in saved if k.startswith("input_ids_"))]
        with torch.no_grad():
            counts = [model(input_ids=ids, attention_mask=torch.ones_like(ids)).expert_counts for ids in batches]
        for layer in range(len(counts[0])):
            got = torch.cat([c[layer].flatten() for c in counts])
            assert torch.equal(got, saved[f"expected_{{layer}}"]), layer
            assert abs(got.double().mean().item() - 1.3) <= 0.02
        """,
        cwd=tmp_path,
    )
    assert load_file(tmp_path / "inputs.safetensors")  # still readable after the subprocess


@pytest.mark.parametrize(
    "options",
    [["--target-distribution", "0.5,0.6,0,0"], ["--avg-k", "7"], ["--avg-k", "nan"]],
    ids=["shares-over-1", "avg-k-over-m", "nan"],
)
def test_failed_cli_calibrate_leaves_nothing_behind(trained, tmp_path, capsys, options):
    folder, _ = trained
    out = tmp_path / "out"
    status = main(["calibrate", str(folder / "model"), str(folder / "calibration.txt"), str(out), *options])
    assert status != 0
    assert not out.exists() and list(tmp_path.iterdir()) == []
    error = capsys.readouterr().err
    assert "error" in error and ("avg_k" in error or "target_distribution" in error), error
