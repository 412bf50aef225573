"""The experts implementations (`eager`, `batched_mm`, `grouped_mm`, and the CPU decode path) against a
naive per-token reference, on routings with a variable number of experts per token (sentinel slots)."""

import pytest
import torch

from hf_dare.modeling import modeling_moe_llava
from hf_dare.modeling.modeling_moe_llava import MoEBlock
from tests import tiny_models

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
NUM_EXPERTS, WIDTH, NUM_TOKENS = 4, 4, 11


def dare_block(seed: int = 0) -> MoEBlock:
    """A DARE MoE block (hidden 32, intermediate 64, 4 experts, up to 4 per token) with random weights."""
    torch.manual_seed(seed)
    block = MoEBlock(tiny_models.moe_config(router="dare"), layer_idx=0)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.2)
    return block


def variable_routing(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, 4) expert indices with the sentinel 4 in unused slots and (T, 4) weights (0 there, sum 1):
    tokens use 1, 2, 3 or 4 distinct experts, including several with all but one slot a sentinel."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.tensor([1, 2, 3, 4, 1, 1, 2, 4, 3, 1, 2])
    indices = torch.stack([torch.randperm(NUM_EXPERTS, generator=generator) for _ in range(NUM_TOKENS)])
    unused = torch.arange(WIDTH)[None, :] >= counts[:, None]
    indices = indices.masked_fill(unused, NUM_EXPERTS)
    weights = torch.rand(NUM_TOKENS, WIDTH, generator=generator).masked_fill(unused, 0.0)
    return indices, weights / weights.sum(-1, keepdim=True)


def naive_experts(experts, hidden_states, indices, weights) -> torch.Tensor:
    """sum over a token's used slots of weight * expert(token), one token and one slot at a time."""
    rows = []
    for token, token_indices, token_weights in zip(hidden_states, indices, weights, strict=True):
        out = torch.zeros_like(token)
        for expert_idx, weight in zip(token_indices.tolist(), token_weights, strict=True):
            if expert_idx < experts.num_experts:
                gate, up = (experts.gate_up_proj[expert_idx] @ token).chunk(2)
                out = out + weight * (experts.down_proj[expert_idx] @ (experts.act_fn(gate) * up))
        rows.append(out)
    return torch.stack(rows)


def forward_and_grads(experts, function, hidden_states, indices, weights):
    hidden_states = hidden_states.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    out = function(hidden_states, indices, weights)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [hidden_states.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad]
    return out.detach(), grads


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_implementation_matches_naive_reference_forward_and_backward(implementation):
    block = dare_block()
    experts = block.experts
    assert experts._is_expert_parallel  # set by MoEBlock for routers that emit sentinels
    hidden_states = torch.randn(NUM_TOKENS, 32)
    indices, weights = variable_routing()

    reference, reference_grads = forward_and_grads(
        experts, lambda h, i, w: naive_experts(experts, h, i, w), hidden_states, indices, weights
    )
    experts.config._experts_implementation = implementation
    out, grads = forward_and_grads(experts, experts, hidden_states, indices, weights)

    assert not out.isnan().any()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    for name, grad, reference_grad in zip(
        ("input", "weights", "gate_up", "down"), grads, reference_grads, strict=True
    ):
        assert not grad.isnan().any(), name
        torch.testing.assert_close(grad, reference_grad, atol=1e-5, rtol=1e-5, msg=name)
    assert (grads[1][indices == NUM_EXPERTS] == 0).all()  # sentinel slots get no routing-weight gradient


def test_grouped_mm_with_sentinels_has_no_nan_on_repeated_calls():
    """transformers' grouped_mm leaves sentinel rows uninitialised unless masked; many calls with fresh
    allocations would expose garbage (NaN / huge values) if the masking were off."""
    experts = dare_block().experts
    experts.config._experts_implementation = "grouped_mm"
    indices, weights = variable_routing()
    hidden_states = torch.randn(NUM_TOKENS, 32)
    reference = naive_experts(experts, hidden_states, indices, weights).detach()
    for _ in range(20):
        torch.empty(1 << 16).fill_(float("nan"))  # dirty the allocator's free blocks
        with torch.no_grad():
            out = experts(hidden_states, indices, weights)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_decode_forward_matches_naive_reference():
    experts = dare_block().experts
    hidden_states = torch.randn(NUM_TOKENS, 32)
    indices, weights = variable_routing(seed=1)
    out = experts.decode_forward(hidden_states, indices, weights)
    torch.testing.assert_close(out, naive_experts(experts, hidden_states, indices, weights), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_eager_and_decode_path_agree_inside_the_block(implementation):
    """A block's output on a few tokens is the same whether it takes the decode path (no grad) or the
    experts implementation (grad enabled)."""
    block = dare_block().eval()
    block.router.threshold_tracker.thresholds.copy_(torch.tensor([-1.0, 0.7, 1e6]))  # 2-3 experts per token
    block.experts.config._experts_implementation = implementation
    hidden_states = torch.randn(1, modeling_moe_llava.DECODE_PATH_MAX_TOKENS, 32)
    with torch.no_grad():
        decoded = block(hidden_states)
    counts = block.pop_routing().expert_counts
    assert counts.min() >= 2 and counts.max() <= 3
    full = block(hidden_states).detach()
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)


class Spy:
    def __init__(self):
        self.calls = 0

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        self.calls += 1
        return torch.zeros_like(hidden_states)


@pytest.mark.parametrize(
    ("num_tokens", "grad", "device", "expect_decode"),
    [
        (1, False, "cpu", True),
        (modeling_moe_llava.DECODE_PATH_MAX_TOKENS, False, "cpu", True),
        (modeling_moe_llava.DECODE_PATH_MAX_TOKENS + 1, False, "cpu", False),
        (1, True, "cpu", False),
        (1, False, "meta", False),  # any non-CPU device
    ],
)
def test_decode_path_only_on_cpu_without_grad_for_few_tokens(num_tokens, grad, device, expect_decode):
    block = dare_block().eval().to(device)
    decode, experts_forward = Spy(), Spy()
    block.experts.decode_forward = decode
    block.experts.forward = experts_forward
    with torch.set_grad_enabled(grad):
        block(torch.randn(1, num_tokens, 32, device=device))
    assert (decode.calls, experts_forward.calls) == ((1, 0) if expect_decode else (0, 1))
