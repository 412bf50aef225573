"""One MoE layer timed side by side: our block with Top-2, with DARE at Avg K ~1.2, the same DARE routing
without the predictor, a dense FFN of the same size, and transformers' Qwen3-MoE sparse block (same weights,
top-2), for each experts implementation (`eager`, `batched_mm`, `grouped_mm`); then the DARE paper's baseline
routers (Top-p, ReMoE, DynMoE, MoE++: same experts, fresh routers, whatever Avg K they give on random inputs),
each against the ideal Avg K x dense FFN (`--no-baselines` leaves them out).

    python benchmarks/moe_layer.py            # hidden 1024, intermediate 2816, 4 experts, 4096 tokens
    python benchmarks/moe_layer.py --quick    # 512 tokens, 2 repeats: a smoke run

"fwd" is an inference forward (no grad). "train" is forward + backward of the layer with gradients for the
input and every weight; for DARE it is the whole DARE training step of the layer: the difficulty loss, the
threshold tracker's `observe` and `update` (then the thresholds are put back so Avg K stays fixed); for the
baselines it adds their router loss, and for ReMoE lambda's `observe` and update (lambda put back likewise).
`batched_mm` gathers one weight matrix per (token, expert) slot, so it runs on `--batched-mm-tokens` tokens.
"""

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from _common import (
    DTYPES,
    force_dare_avg_k,
    keep_freed_memory,
    median_of,
    setup_threads,
    spread,
    time_side_by_side,
)
from torch import nn
from transformers import Qwen2Config, Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP, Qwen3MoeSparseMoeBlock

from hf_dare import MoECausalLMConfig
from hf_dare.modeling.modeling_moe import MoEBlock
from hf_dare.modeling.routers import TopKRouter
from hf_dare.modeling.routing import (
    Routing,
    RoutingContext,
    load_balancing_loss,
    route_top_n,
    routing_context,
    softmax_router,
)

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
BASELINES = {"top_p": "ours, Top-p (p=0.9999)", "remoe": "ours, ReMoE", "dynmoe": "ours, DynMoE",
             "moepp": "ours, MoE++ (4 FFN + 4 zero-comp.)"}  # fmt: skip


class FixedCountsRouter(TopKRouter):
    """Top-k routing with a given number of experts per token (DARE's routing without its predictor and
    thresholds): the baseline that isolates DARE's bookkeeping cost at equal Avg K."""

    def __init__(self, config, expert_counts: torch.Tensor):
        super().__init__(config)
        self.register_buffer("fixed_counts", expert_counts)
        self.width = config.max_experts

    def forward(self, hidden_states, token_mask=None, vision_mask=None) -> Routing:
        router_logits, router_probs = softmax_router(self.weight, hidden_states)
        indices, weights = route_top_n(router_probs, self.fixed_counts, self.width)
        return Routing(
            router_logits=router_logits,
            router_probs=router_probs,
            expert_indices=indices,
            expert_weights=weights.to(hidden_states.dtype),
            expert_counts=self.fixed_counts,
            aux_loss=load_balancing_loss(router_probs, indices, token_mask),
        )


class FusedGatedMLP(nn.Module):
    """A dense gated-SiLU FFN with gate and up fused in one matmul, as one expert of `MoEExperts`."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden_states):
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def build_modules(args, dtype) -> dict[str, nn.Module]:
    text_config = Qwen2Config(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=128,
    )
    common = dict(text_config=text_config, num_experts=args.experts, moe_layers=[0], difficulty_predictor_dropout=0.1)
    top2_config = MoECausalLMConfig(router="top_k", num_experts_per_tok=2, **common)
    dare_config = MoECausalLMConfig(router="dare", **common)
    torch.manual_seed(0)
    top2 = MoEBlock(top2_config, 0)
    for param in top2.parameters():
        nn.init.normal_(param, std=0.02)
    dare = MoEBlock(dare_config, 0)
    dare.load_state_dict(top2.state_dict(), strict=False)
    fixed = MoEBlock(dare_config, 0)
    fixed.gate = FixedCountsRouter(dare_config, torch.ones(1, dtype=torch.long))
    fixed.load_state_dict(top2.state_dict(), strict=False)

    qwen3_config = Qwen3MoeConfig(
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        intermediate_size=args.intermediate,
        num_experts=args.experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        hidden_act="silu",
    )
    transformers_block = Qwen3MoeSparseMoeBlock(qwen3_config)
    transformers_block.gate.weight.data.copy_(top2.gate.weight.data)
    transformers_block.experts.gate_up_proj.data.copy_(top2.experts.gate_up_proj.data)
    transformers_block.experts.down_proj.data.copy_(top2.experts.down_proj.data)

    dense_fused = FusedGatedMLP(args.hidden, args.intermediate)
    dense_fused.gate_up_proj.weight.data.copy_(top2.experts.gate_up_proj.data[0])
    dense_fused.down_proj.weight.data.copy_(top2.experts.down_proj.data[0])
    dense_qwen = Qwen3MoeMLP(qwen3_config, intermediate_size=args.intermediate)
    gate, up = top2.experts.gate_up_proj.data[0].chunk(2)
    dense_qwen.gate_proj.weight.data.copy_(gate)
    dense_qwen.up_proj.weight.data.copy_(up)
    dense_qwen.down_proj.weight.data.copy_(top2.experts.down_proj.data[0])
    modules = {
        "top2": top2,
        "dare": dare,
        "fixed": fixed,
        "dense": dense_fused,
        "dense_qwen": dense_qwen,
        "transformers": transformers_block,
    }
    if args.baselines:
        for router in BASELINES:
            block = MoEBlock(MoECausalLMConfig(router=router, **common), 0)
            block.experts.load_state_dict(top2.experts.state_dict())
            block.gate.init_weights(0.02)
            modules[router] = block
    return {name: module.to(dtype) for name, module in modules.items()}


def set_implementation(modules: dict[str, nn.Module], implementation: str) -> None:
    for name in ("top2", "dare", "fixed", *(name for name in BASELINES if name in modules)):
        modules[name].experts.config._experts_implementation = implementation
    modules["transformers"].experts.config._experts_implementation = implementation


def forward_case(module: nn.Module, hidden_states: torch.Tensor):
    def run():
        with torch.no_grad():
            return module(hidden_states)

    return run


def train_case(module: nn.Module, hidden_states: torch.Tensor, grad_output: torch.Tensor):
    """Forward + backward; for an MoE block also its router's losses (DARE's difficulty loss against a random
    target, the balancing loss, the baselines' router losses) and its per-step state update (DARE's thresholds,
    ReMoE's lambda), the state put back after each run."""
    inputs = hidden_states.detach().requires_grad_(True)
    params = list(module.parameters())
    is_block = isinstance(module, MoEBlock)
    target = torch.rand(hidden_states.shape[:-1]).reshape(-1) * 4
    saved = {name: buffer.clone() for name, buffer in module.gate.named_buffers()} if is_block else {}

    def run():
        for param in params:
            param.grad = None
        inputs.grad = None
        with routing_context(RoutingContext(with_aux_loss=is_block, observe=is_block)) as context:
            out = module(inputs)
        loss = (out * grad_output).sum()
        if is_block:
            gate, routing = context.routers[-1], context.routings[-1]
            loss = loss + 0.01 * routing.aux_loss
            if gate.uses_token_nll:
                loss = loss + gate.token_nll_loss(routing, target, torch.ones_like(target))
            if routing.router_loss is not None:
                loss = loss + routing.router_loss
        loss.backward()
        if is_block:
            context.hand_over()
            gate.update_state()
            for name, buffer in gate.named_buffers():
                buffer.copy_(saved[name])

    return run


def routing_of(block: MoEBlock, hidden_states: torch.Tensor) -> Routing:
    """The routing `block` makes for `hidden_states` (B, L, H), without gradients."""
    with torch.no_grad(), routing_context(RoutingContext()) as context:
        block(hidden_states)
    return context.routings[-1]


def avg_k_of(block: MoEBlock, hidden_states: torch.Tensor, training: bool) -> float:
    block.train(training)
    torch.manual_seed(1)
    return routing_of(block, hidden_states).expert_counts.float().mean().item()


def run_implementation(args, modules, implementation: str, num_tokens: int, dtype) -> dict:
    torch.manual_seed(2)
    hidden_states = torch.randn(1, num_tokens, args.hidden, dtype=dtype)
    grad_output = torch.randn_like(hidden_states)
    set_implementation(modules, implementation)
    flat = hidden_states.reshape(-1, args.hidden)
    dare, fixed = modules["dare"], modules["fixed"]
    force_dare_avg_k(dare.gate, flat, args.avg_k)
    dare.eval()
    fixed.gate.fixed_counts = routing_of(dare, hidden_states).expert_counts.clone()

    with torch.no_grad():
        reference = modules["top2"](hidden_states)
        transformers_out = modules["transformers"](hidden_states)
    max_diff = (reference - transformers_out).abs().max().item()

    baselines = tuple(name for name in BASELINES if name in modules)
    names = ("top2", "dare", "fixed", "dense", "dense_qwen", "transformers", *baselines)
    avg_k = {
        "top2": 2.0,
        "dense": 1.0,
        "dense_qwen": 1.0,
        "transformers": 2.0,
        "fixed": fixed.gate.fixed_counts.float().mean().item(),
    }
    for name in baselines:
        modules[name].eval()
        avg_k[name] = routing_of(modules[name], hidden_states).expert_counts.float().mean().item()
    avg_k_eval = avg_k_of(dare, hidden_states, training=False)
    avg_k_train = avg_k_of(dare, hidden_states, training=True)
    for module in modules.values():
        module.eval()
    forward = time_side_by_side(
        {name: forward_case(modules[name], hidden_states) for name in names}, args.repeats, args.warmup
    )
    backward = {}
    if not args.no_backward:
        for module in modules.values():
            module.train()
        backward = time_side_by_side(
            {name: train_case(modules[name], hidden_states, grad_output) for name in names}, args.repeats, args.warmup
        )
        for module in modules.values():
            module.eval()
    return {
        "tokens": num_tokens,
        "forward": forward,
        "train": backward,
        "avg_k": avg_k | {"dare": avg_k_eval},
        "avg_k_train": avg_k_train,
        "max_diff": max_diff,
    }


def print_results(implementation: str, result: dict) -> None:
    """Times and ratios: medians over the interleaved rounds, each ratio taken within a round."""
    forward, train, avg_k = result["forward"], result["train"], result["avg_k"]
    labels = {
        "top2": "ours, Top-2",
        "dare": "ours, DARE",
        "fixed": "ours, DARE routing w/o predictor",
        "dense": "dense FFN (fused gate/up)",
        "dense_qwen": "dense FFN (Qwen3MoeMLP)",
        "transformers": "transformers Qwen3-MoE, top-2",
    }

    def ms(rounds, name: str) -> float:
        return median_of(rounds, lambda t: t[name]) * 1e3

    print(
        f"\n## experts implementation: {implementation} ({result['tokens']} tokens; medians of {len(forward)} rounds)"
    )
    print(f"| {'layer':<34} | {'Avg K':>5} | {'fwd ms':>9} | {'train ms':>9} |")
    print(f"|{'-' * 36}|{'-' * 7}|{'-' * 11}|{'-' * 11}|")
    for name, label in labels.items():
        train_ms = f"{ms(train, name):9.1f}" if train else f"{'-':>9}"
        print(f"| {label:<34} | {avg_k[name]:5.3f} | {ms(forward, name):9.1f} | {train_ms} |")
    print(f"(DARE Avg K in training mode, predictor dropout on: {result['avg_k_train']:.3f}; "
          f"ours vs transformers max |diff| = {result['max_diff']:.2e})")  # fmt: skip

    rows = [
        ("DARE / Top-2", lambda t: t["dare"] / t["top2"], "<= 0.70 (ideal {:.2f})".format(avg_k["dare"] / 2)),
        ("ours Top-2 / transformers top-2", lambda t: t["top2"] / t["transformers"], "<= 1.05"),
        ("Top-2 / (2 * dense)", lambda t: t["top2"] / (2 * t["dense"]), "<= 1.25"),
        ("DARE / (Avg K * dense)", lambda t: t["dare"] / (avg_k["dare"] * t["dense"]), "<= 1.25"),
        ("DARE / same routing w/o predictor", lambda t: t["dare"] / t["fixed"], "<= 1.05 (train)"),
        ("dense fused / dense Qwen3MoeMLP", lambda t: t["dense"] / t["dense_qwen"], ""),
    ]

    def ratio_spread(rounds, ratio) -> str:
        s = spread([ratio(t) for t in rounds])
        return f"{s['median']:6.3f} [{s['min']:.3f}-{s['max']:.3f}]"

    print(f"\n| {'ratio (median [min-max] of per-round ratios)':<44} | {'fwd':>20} | {'train':>20} | target |")
    print(f"|{'-' * 46}|{'-' * 22}|{'-' * 22}|--------|")
    for label, ratio, target in rows:
        train_ratio = f"{ratio_spread(train, ratio):>20}" if train else f"{'-':>20}"
        print(f"| {label:<44} | {ratio_spread(forward, ratio):>20} | {train_ratio} | {target} |")

    baselines = [name for name in BASELINES if name in forward[0]]
    if not baselines:
        return
    print(f"\n| {'baseline router':<34} | {'Avg K':>5} | {'fwd ms':>9} | {'train ms':>9} | {'fwd / (K*dense)':>15} "
          f"| {'train / (K*dense)':>17} | target |")  # fmt: skip
    print(f"|{'-' * 36}|{'-' * 7}|{'-' * 11}|{'-' * 11}|{'-' * 17}|{'-' * 19}|--------|")
    for name in baselines:
        k = avg_k[name]
        train_ms = f"{ms(train, name):9.1f}" if train else f"{'-':>9}"
        over_ideal = lambda t, name=name, k=k: t[name] / (k * t["dense"])  # noqa: E731
        fwd_ratio = median_of(forward, over_ideal)
        train_ratio = f"{median_of(train, over_ideal):17.3f}" if train else f"{'-':>17}"
        print(f"| {BASELINES[name]:<34} | {k:5.3f} | {ms(forward, name):9.1f} | {train_ms} "
              f"| {fwd_ratio:15.3f} | {train_ratio} | <= 1.25 |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batched-mm-tokens", type=int, default=16, help="tokens for batched_mm (memory ~ tokens)")
    parser.add_argument("--avg-k", type=float, default=1.2, help="DARE's forced Avg K (1..2)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impl", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument(
        "--no-baselines", dest="baselines", action="store_false", help="leave out Top-p, ReMoE, DynMoE and MoE++"
    )
    parser.add_argument("--quick", action="store_true", help="512 tokens, 2 repeats")
    args = parser.parse_args()
    keep_freed_memory()
    if args.quick:
        args.tokens, args.repeats = 512, 2

    started = time.perf_counter()
    print(f"# MoE layer benchmark: {setup_threads(args.threads)}, {args.dtype}")
    print(f"hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts, repeats {args.repeats}")
    dtype = DTYPES[args.dtype]
    modules = build_modules(args, dtype)
    for implementation in args.impl:
        tokens = args.batched_mm_tokens if implementation == "batched_mm" else args.tokens
        result = run_implementation(args, copy.deepcopy(modules), implementation, tokens, dtype)
        print_results(implementation, result)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
