"""Upcycling streams: peak memory stays below two shards plus one tensor, far below the checkpoint size."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from .conftest import save_dense_lm

# Peak RSS from the kernel's high-water mark of this process (VmHWM, reset just before the conversion where
# the kernel allows it); ru_maxrss would also count the forking test process's memory.
MEASURE = """
import sys
from pathlib import Path
import hf_dare.conversion as conversion

def status_kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

# Warm-up on a tiny checkpoint of the same family: imports and one-off allocations are the baseline.
conversion.upcycle(sys.argv[4], sys.argv[5], num_experts=4, router="dare", measure_gap=False)
try:
    Path("/proc/self/clear_refs").write_text("5")
except OSError:
    pass
before = status_kib("VmRSS")
conversion.upcycle(sys.argv[1], sys.argv[2], num_experts=4, router="dare", max_shard_size=sys.argv[3],
                  measure_gap=False)
print(status_kib("VmHWM") - before)
"""


def test_peak_memory_of_upcycling_stays_near_one_shard(tmp_path):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    src = tmp_path / "dense"
    AutoModelForCausalLM.from_config(config).save_pretrained(src, max_shard_size="12MB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) == 4
    shard_size = max(p.stat().st_size for p in shards)
    out = tmp_path / "moe"
    tiny = tmp_path / "tiny"
    save_dense_lm(tiny, "qwen2")
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(src), str(out), "12MB", str(tiny), str(tmp_path / "tiny-moe")],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    peak = int(result.stdout.strip().splitlines()[-1])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    largest_tensor = 4 * 2 * 1024 * 384 * 4  # one layer's stacked gate_up_proj, float32
    bound = 2 * shard_size + largest_tensor
    assert index["metadata"]["total_size"] > bound  # holding the whole model could not stay under it
    print(f"peak RSS growth {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB")
    assert peak < bound, f"peak RSS grew by {peak / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB"
