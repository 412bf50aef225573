"""Helpers shared by the benchmark scripts: timing, thread setup, and forcing DARE's Avg K."""

import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from hf_dare.modeling.routers import DareRouter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def keep_freed_memory() -> None:
    """Re-run this script with glibc malloc told to keep freed memory (as jemalloc / tcmalloc do): otherwise
    every large activation is a fresh mmap whose page faults (sys time) add noise to CPU timings."""
    if sys.platform == "linux" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = os.environ["MALLOC_TRIM_THRESHOLD_"] = str(1 << 34)
        os.execv(sys.executable, [sys.executable, *sys.argv])


def setup_threads(threads: int) -> str:
    """Pin torch's intra-/inter-op threads; returns a line describing the machine for the report."""
    torch.set_num_threads(threads)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}"


def time_side_by_side(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> list[dict[str, float]]:
    """Seconds per call of each case, one dict per round over `repeats` rounds. The cases are interleaved
    within each round (round robin) so a slow phase of a shared machine hits every case alike; compare cases
    within a round (`median_of`), never a favourable minimum."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    rounds = []
    for _ in range(repeats):
        times = {}
        for name, fn in cases.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name] = time.perf_counter() - start
        rounds.append(times)
    return rounds


def spread(values: list[float]) -> dict:
    """Median, min, max and quartiles (q1, q3) of `values`."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = median = q3 = ordered[0]
    return {"median": median, "min": ordered[0], "max": ordered[-1], "q1": q1, "q3": q3}


def median_of(rounds: list[dict[str, float]], value: Callable[[dict[str, float]], float]) -> float:
    """The median over rounds of `value(round)`: a case's seconds (`lambda t: t["a"]`) or a ratio of two cases
    timed in the same round (`lambda t: t["a"] / t["b"]`)."""
    return statistics.median(value(times) for times in rounds)


@torch.no_grad()
def force_dare_avg_k(router: DareRouter, hidden_states: torch.Tensor, avg_k: float) -> None:
    """Set a DARE router's thresholds so that, on `hidden_states` (T, H), a fraction `avg_k - 1` of the
    tokens (the most difficult by the predictor) uses 2 experts and the rest 1: Avg K = `avg_k`.

    Equivalent to thresholds at the quantiles of Pi = (2 - avg_k, avg_k - 1, 0, ...). A random-weights
    model has no meaningful difficulty, so this is how the benchmarks fix the Avg K to compare at.
    """
    if not 1.0 <= avg_k <= 2.0:
        raise ValueError(f"avg_k must be in [1, 2] (tokens use 1 or 2 experts), got {avg_k}")
    was_training = router.training
    router.eval()
    difficulty = router.difficulty_predictor(hidden_states).float()
    router.train(was_training)
    thresholds = router.threshold_tracker.thresholds
    tau_1 = torch.quantile(difficulty, 2.0 - avg_k) if avg_k > 1.0 else difficulty.max() + 1.0
    top = difficulty.max().item()
    new = [tau_1.item()] + [top + 1.0 + j for j in range(thresholds.numel() - 1)]
    thresholds.copy_(torch.tensor(new, dtype=thresholds.dtype))
