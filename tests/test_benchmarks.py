"""Smoke runs of the benchmark scripts (`--quick`): they run, and print the numbers they promise."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(script: str, *args: str, timeout: int = 300) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCHMARKS.parent,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def result_line(output: str) -> dict[str, float]:
    """The key=value pairs of the output's RESULT lines, merged."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output
    return {key: float(value) for line in lines for key, value in re.findall(r"(\w+)=(\S+)", line)}


@pytest.mark.slow
def test_generate_quick_reports_ratio_spread_avg_k_and_ideal():
    # The default: DARE on its real path (its predictor, thresholds calibrated on its own decoded tokens).
    output = run_benchmark("generate.py", "--quick", "--bookkeeping")
    result = result_line(output)
    keys = ("ratio", "ratio_min", "ratio_max", "ratio_q1", "ratio_q3", "avg_k", "ideal", "share", "cpu_ratio")
    for key in (*keys, "prefill_ratio", "prefill_ideal", "prompt_avg_k", "total_ratio", "total_ideal"):
        assert math.isfinite(result[key]), (key, output)
    assert result["ratio"] > 0 and result["prefill_ratio"] > 0 and result["total_ratio"] > 0
    assert result["ratio_min"] <= result["ratio_q1"] <= result["ratio"] <= result["ratio_q3"] <= result["ratio_max"]
    # Calibrated for Avg K 1.2 (shares 0.8 / 0.2 / 0 / 0) on the decoded tokens: what the hooks saw while decoding.
    assert "calibrated on its own greedy-decoded tokens" in output
    assert result["avg_k"] == pytest.approx(1.2, abs=0.1)
    assert result["ideal"] >= 1 and result["total_ideal"] >= 1
    assert 1 <= result["prompt_avg_k"] <= 4
    assert "median of 10 per-pair ratios" in output
    assert "Avg K realised while decoding (DARE)" in output
    assert "### the prompt's forward" in output
    # The plain Top-2 loop of the same experts decodes the same tokens; its time ratio is measured.
    assert result["same_tokens"] == 1
    assert result["bookkeeping_q1"] <= result["bookkeeping"] <= result["bookkeeping_q3"], output
    assert result["bookkeeping"] > 0 and math.isfinite(result["bookkeeping_cpu"])


@pytest.mark.slow
def test_generate_quick_breakdown_and_batch_sizes():
    # The pinned schedule (the predictor runs, its output replaced): Avg K 1.2 on every sequence.
    output = run_benchmark(
        "generate.py", "--quick", "--routing", "pinned", "--breakdown", "--batch-sizes", "1", "8", "--repeats", "2"
    )
    assert result_line(output)["avg_k"] == pytest.approx(1.2, abs=0.05)
    table = output[output.index("## decode tokens/s by batch size") :]
    rows = [line for line in table.splitlines() if re.match(r"\|\s+\d+ \|", line)]
    assert [int(row.split("|")[1]) for row in rows] == [1, 8]
    for row in rows:
        weights_ideal, flops_ideal = (float(cell) for cell in row.split("|")[7:9])
        assert weights_ideal >= 1 and flops_ideal >= 1, row

    breakdown = output[output.index("## where one decode step's time goes") :]
    for part in ("attention", "dense FFNs", "MoE experts", "router", "DARE difficulty predictor", "LM head"):
        assert part in breakdown
    assert "routing statistics / losses in the output" in breakdown
    assert "generate's own per-step work" in breakdown
    measured = re.search(r"\| step \(measured\)\s+\|\s+([\d.]+) \|\s+\|\s+([\d.]+) \|", breakdown)
    assert measured is not None, breakdown
    assert all(float(value) > 0 for value in measured.groups())
    assert "gap to the weights-read ideal" in breakdown
    assert "## where the prompt's forward goes" in breakdown
