"""Activated parameters N_A and GFLOPs/token of Top-2 vs DARE, from the routing of one forward pass
(`hf_dare.evaluation.flops`; the conventions are in that module's docstring).

    python benchmarks/flops.py                      # the generate.py model (random weights), DARE at Avg K 1.2
    python benchmarks/flops.py --model PATH         # a saved hf_dare checkpoint instead, on random tokens
"""

import argparse

import torch
from _common import force_dare_avg_k, setup_threads
from generate import build_models

from hf_dare.evaluation.flops import flops_per_token
from hf_dare.modeling.routers import DareRouter


def report(name: str, model, input_ids: torch.Tensor) -> dict:
    with torch.no_grad():
        outputs = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    result = flops_per_token(model, outputs)
    params = result["activated_parameters"]
    print(
        f"| {name:<10} | {params['avg_k']:5.3f} | {params['activated_params'] / 1e6:8.1f} | "
        f"{params['total_params'] / 1e6:8.1f} | {result['gflops_per_token']:8.4f} |"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a saved hf_dare checkpoint directory")
    parser.add_argument("--avg-k", type=float, default=1.2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    print(f"# activated parameters and FLOPs/token: {setup_threads(args.threads)}")
    print(f"| {'model':<10} | Avg K | N_A (M)  | all (M)  | GFLOPs/token |")
    print(f"|{'-' * 12}|-------|----------|----------|--------------|")
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).eval()
        vocab = model.config.get_text_config().vocab_size
        report("checkpoint", model, torch.randint(0, vocab, (1, args.tokens)))
        return

    defaults = dict(hidden=1024, intermediate=2816, heads=16, kv_heads=4, experts=4, vocab=4096, impl=None)
    top2, dare = build_models(argparse.Namespace(layers=args.layers, **defaults), torch.float32)
    input_ids = torch.randint(1, defaults["vocab"], (1, args.tokens), generator=torch.Generator().manual_seed(0))
    inputs = {}
    hooks = [
        block.register_forward_hook(lambda b, a, o: inputs.__setitem__(b, a[0].reshape(-1, a[0].shape[-1])))
        for block in dare.moe_blocks
    ]
    with torch.no_grad():
        dare(input_ids)  # each layer's MoE input, to set its thresholds for the wanted Avg K
    for hook in hooks:
        hook.remove()
    for block, hidden_states in inputs.items():
        if isinstance(block.gate, DareRouter):
            force_dare_avg_k(block.gate, hidden_states, args.avg_k)
    dense = report("top-2", top2, input_ids)
    sparse = report("DARE", dare, input_ids)
    saved = 1 - sparse["flops_per_token"] / dense["flops_per_token"]
    print(f"\nDARE uses {saved:.1%} fewer FLOPs/token than Top-2 (the DARE paper: 41.5% at Avg K 1.22, Qwen2-1.5B)")


if __name__ == "__main__":
    main()
