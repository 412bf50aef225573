"""Greedy generation tokens/s of a small MoE causal LM (random weights): Top-2 vs DARE at Avg K ~1.2,
same weights, same prompt, same number of new tokens, timed side by side in one process.

    python benchmarks/generate.py            # Qwen2 backbone, hidden 1024, 8 layers, 4 experts every other layer
                                             # (FFN 5.5x hidden, 2 KV heads: Qwen2-1.5B's proportions, the DARE
                                             # paper's backbone, scaled to 375M parameters)
    python benchmarks/generate.py --quick    # 4 layers, 16 new tokens

A random-weights model has no meaningful difficulty, and thresholds calibrated on its predictions drift
(the decoded tokens change with the routing). So each DARE layer's predictor still runs (its cost counts), but
its output is replaced by a fixed schedule: an evenly spread fraction `avg_k - 1` of the tokens is "hard"
(2 experts), the rest "easy" (1 expert), which pins Avg K at `--avg-k`; the Avg K achieved while decoding in
the timed runs is printed. "decode tok/s" excludes the prompt: (N - 1) / (t(N tokens) - t(1 token)).
"""

import argparse
import time

import torch
from _common import DTYPES, keep_freed_memory, setup_threads, time_side_by_side
from transformers import Qwen2Config

from hf_dare import MoECausalLMConfig, MoEForCausalLM


def build_models(args, dtype) -> tuple[MoEForCausalLM, MoEForCausalLM]:
    text_config = Qwen2Config(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
    )
    common = dict(text_config=text_config, num_experts=args.experts)
    torch.manual_seed(0)
    top2 = MoEForCausalLM(MoECausalLMConfig(router="top_k", num_experts_per_tok=2, **common))
    dare = MoEForCausalLM(MoECausalLMConfig(router="dare", **common))
    missing = dare.load_state_dict(top2.state_dict(), strict=False).missing_keys
    assert all("difficulty_predictor" in key or "threshold_tracker" in key for key in missing), missing
    models = []
    for model in (top2, dare):
        model = model.to(dtype).eval()
        if args.impl:
            model.set_experts_implementation(args.impl)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        models.append(model)
    return models[0], models[1]


class DecodeRecorder:
    """Forward hooks on every MoE block: the inputs and the experts used per token on decoding steps
    (one token per sequence)."""

    def __init__(self, model: MoEForCausalLM):
        self.inputs = {block.layer_idx: [] for block in model.moe_blocks}
        self.counts = {block.layer_idx: [] for block in model.moe_blocks}
        self.handles = [block.register_forward_hook(self.hook) for block in model.moe_blocks]

    def hook(self, block, args, output):
        hidden_states = args[0]
        if hidden_states.shape[1] == 1:
            self.inputs[block.layer_idx].append(hidden_states.reshape(-1, hidden_states.shape[-1]))
            self.counts[block.layer_idx].append(block.routing.expert_counts)

    def avg_k(self) -> float:
        return torch.cat([torch.cat(c) for c in self.counts.values()]).float().mean().item()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ScheduledDifficulty(torch.nn.Module):
    """Runs DARE's real predictor, then replaces its output (T,) by a schedule: of the tokens seen so far, an
    evenly spread fraction `hard_fraction` gets difficulty 1, the others 0."""

    def __init__(self, predictor: torch.nn.Module, hard_fraction: float):
        super().__init__()
        self.predictor = predictor
        self.hard_fraction = hard_fraction
        self.seen = 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        predicted = self.predictor(hidden_states)
        index = torch.arange(self.seen, self.seen + predicted.shape[0], device=predicted.device)
        self.seen += predicted.shape[0]
        hard = torch.floor((index + 1) * self.hard_fraction) > torch.floor(index * self.hard_fraction)
        return hard.to(predicted.dtype) + predicted * 0


def schedule_dare(model: MoEForCausalLM, avg_k: float) -> None:
    """Pin DARE's Avg K at `avg_k` (in [1, 2]): tokens use 2 experts on a fixed schedule, 1 otherwise."""
    if not 1.0 <= avg_k <= 2.0:
        raise ValueError(f"avg_k must be in [1, 2] (tokens use 1 or 2 experts), got {avg_k}")
    for block in model.moe_blocks:
        router = block.router
        router.difficulty_predictor = ScheduledDifficulty(router.difficulty_predictor, avg_k - 1.0)
        taus = router.threshold_tracker.thresholds
        taus.copy_(torch.tensor([0.5] + [2.0 + j for j in range(taus.numel() - 1)], dtype=taus.dtype))


def generate(model: MoEForCausalLM, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(
        input_ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--avg-k", type=float, default=1.2, help="DARE's forced Avg K while decoding (1..2)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--impl", default=None, help="experts implementation (default: the model's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="4 layers, 16 new tokens, 2 repeats")
    args = parser.parse_args()
    keep_freed_memory()
    if args.quick:
        args.layers, args.new_tokens, args.repeats = 4, 16, 2

    started = time.perf_counter()
    print(f"# generation benchmark: {setup_threads(args.threads)}, {args.dtype}")
    top2, dare = build_models(args, DTYPES[args.dtype])
    total = sum(p.numel() for p in top2.parameters())
    print(
        f"Qwen2 backbone: hidden {args.hidden}, {args.layers} layers ({len(top2.moe_blocks)} MoE, {args.experts} "
        f"experts, intermediate {args.intermediate}), vocab {args.vocab}: {total / 1e6:.0f}M parameters; "
        f"experts implementation {top2.config._experts_implementation}; batch 1, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, repeats {args.repeats}"
    )
    input_ids = torch.randint(1, args.vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    schedule_dare(dare, args.avg_k)

    recorder = DecodeRecorder(dare)
    with torch.no_grad():
        lengths = {generate(model, input_ids, args.new_tokens).shape[1] for model in (top2, dare)}
    achieved = recorder.avg_k()
    recorder.remove()
    assert lengths == {args.prompt_len + args.new_tokens}, lengths

    def case(model, new_tokens):
        def run():
            with torch.no_grad():
                generate(model, input_ids, new_tokens)

        return run

    times = time_side_by_side(
        {
            "top2": case(top2, args.new_tokens),
            "dare": case(dare, args.new_tokens),
            "top2_first": case(top2, 1),
            "dare_first": case(dare, 1),
        },
        args.repeats,
        warmup=1,
    )
    decode = {name: (args.new_tokens - 1) / (times[name] - times[f"{name}_first"]) for name in ("top2", "dare")}
    overall = {name: args.new_tokens / times[name] for name in ("top2", "dare")}
    print(f"\n| {'router':<6} | {'Avg K (decode)':>14} | {'tok/s (incl. prompt)':>20} | {'decode tok/s':>12} |")
    print(f"|{'-' * 8}|{'-' * 16}|{'-' * 22}|{'-' * 14}|")
    for name, k in (("top2", 2.0), ("dare", achieved)):
        print(f"| {name:<6} | {k:>14.3f} | {overall[name]:>20.2f} | {decode[name]:>12.2f} |")
    print(
        f"\nDARE / Top-2 tokens/s: {overall['dare'] / overall['top2']:.3f} (incl. prompt), "
        f"{decode['dare'] / decode['top2']:.3f} (decode only); target >= 1.2"
    )
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
