"""The experts kernels registered in transformers' experts interface (hf-dare's `eager`, `hf_dare`,
`hf_dare_token_loop`, `hf_dare_grouped_mm`, and transformers' `grouped_mm` / `batched_mm`) against a naive
per-token reference, on routings with a variable number of experts per token (sentinel slots)."""

import re
from pathlib import Path

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from hf_dare import MoEForCausalLM
from hf_dare.modeling import experts as experts_module
from hf_dare.modeling.configuration_moe import ROUTERS
from hf_dare.modeling.experts import (
    TOKEN_LOOP_MAX_TOKENS,
    padded_routing,
    sentinel_safe_routing,
    used_slots_forward,
)
from hf_dare.modeling.modeling_moe import MoEBlock
from tests import tiny_models

IMPLEMENTATIONS = ("eager", "hf_dare", "hf_dare_token_loop", "hf_dare_grouped_mm", "grouped_mm", "batched_mm")
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


def through_the_interface(experts, implementation: str):
    """The experts as an MoE block calls them under `implementation` (sentinels as that kernel takes them)."""
    experts.config._experts_implementation = implementation

    def call(hidden_states, indices, weights):
        return experts(hidden_states, *sentinel_safe_routing(indices, weights, NUM_EXPERTS, implementation))

    return call


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
    experts = dare_block().experts
    hidden_states = torch.randn(NUM_TOKENS, 32)
    indices, weights = variable_routing()

    reference, reference_grads = forward_and_grads(
        experts, lambda h, i, w: naive_experts(experts, h, i, w), hidden_states, indices, weights
    )
    out, grads = forward_and_grads(
        experts, through_the_interface(experts, implementation), hidden_states, indices, weights
    )

    assert not out.isnan().any()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    for name, grad, reference_grad in zip(
        ("input", "weights", "gate_up", "down"), grads, reference_grads, strict=True
    ):
        assert not grad.isnan().any(), name
        torch.testing.assert_close(grad, reference_grad, atol=1e-5, rtol=1e-5, msg=name)
    assert (grads[1][indices == NUM_EXPERTS] == 0).all()  # sentinel slots get no routing-weight gradient


@pytest.mark.parametrize("implementation", ["hf_dare_grouped_mm", "grouped_mm"])
def test_grouped_mm_with_sentinels_has_no_nan_on_repeated_calls(implementation):
    """grouped_mm leaves the rows past the last group uninitialised; many calls with fresh allocations would
    expose garbage (NaN / huge values) if sentinel slots reached them unmasked."""
    experts = dare_block().experts
    call = through_the_interface(experts, implementation)
    indices, weights = variable_routing()
    hidden_states = torch.randn(NUM_TOKENS, 32)
    reference = naive_experts(experts, hidden_states, indices, weights).detach()
    for _ in range(20):
        torch.empty(1 << 16).fill_(float("nan"))  # dirty the allocator's free blocks
        with torch.no_grad():
            out = call(hidden_states, indices, weights)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_set_experts_implementation_selects_each_kernel_in_a_model(implementation):
    """`set_experts_implementation` accepts every registered name, and the model computes the same logits and
    gradients with each (DARE: a variable number of experts per token)."""
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_models.moe_config(router="dare", difficulty_predictor_dropout=0.0))
    batch = tiny_models.random_batch(model.config)
    with torch.no_grad():
        predicted = model(**batch).difficulty
    for block, difficulty in zip(model.moe_blocks, predicted, strict=True):  # 1-4 experts, a quarter each
        block.gate.threshold_tracker.thresholds.copy_(torch.quantile(difficulty, torch.tensor([0.25, 0.5, 0.75])))
    results = {}
    for name in ("eager", implementation):
        model.set_experts_implementation(name)
        assert model.config._experts_implementation == name
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        results[name] = (out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    counts = torch.cat([c.flatten() for c in out.expert_counts])
    assert counts.min() < counts.max()  # sentinels were in play
    torch.testing.assert_close(results[implementation][0], results["eager"][0], atol=1e-5, rtol=1e-5)
    for grad, reference in zip(results[implementation][1], results["eager"][1], strict=True):
        torch.testing.assert_close(grad, reference, atol=1e-5, rtol=1e-4)


def test_the_default_kernel_follows_the_device():
    model = MoEForCausalLM(tiny_models.moe_config(router="dare"))
    expected = "hf_dare_grouped_mm" if torch.cuda.is_available() else "hf_dare"
    assert model.config._experts_implementation == expected


class Spy:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __call__(self, experts, hidden_states, top_k_index, top_k_weights):
        self.log.append(self.name)
        return torch.zeros_like(hidden_states)


@pytest.mark.parametrize(
    ("num_tokens", "grad", "device", "expect_token_loop"),
    [
        (1, False, "cpu", True),
        (TOKEN_LOOP_MAX_TOKENS, False, "cpu", True),
        (TOKEN_LOOP_MAX_TOKENS + 1, False, "cpu", False),
        (1, True, "cpu", False),
        (1, False, "meta", False),  # any non-CPU device
    ],
)
def test_hf_dare_takes_the_token_loop_only_on_cpu_without_grad_for_few_tokens(
    monkeypatch, num_tokens, grad, device, expect_token_loop
):
    block = dare_block().eval().to(device)
    block.experts.config._experts_implementation = "hf_dare"
    calls = []
    # The module of the kernel registered under `hf_dare`: a checkpoint's own copy of experts.py, loaded with
    # remote code earlier in the session, registers its (identical) kernels under the same names.
    kernel_globals = ALL_EXPERTS_FUNCTIONS["hf_dare"].__globals__
    monkeypatch.setitem(kernel_globals, "token_loop_experts_forward", Spy("loop", calls))
    monkeypatch.setitem(kernel_globals, "sorted_experts_forward", Spy("sorted", calls))
    with torch.set_grad_enabled(grad):
        block(torch.randn(1, num_tokens, 32, device=device))
    assert calls == ["loop" if expect_token_loop else "sorted"]


def test_no_private_transformers_attribute_is_set():
    """Sentinel masking and the kernel default go through the experts interface, not transformers' flags."""
    package = Path(experts_module.__file__).parents[1]
    source = "\n".join(path.read_text() for path in package.rglob("*.py"))
    assert "_is_expert_parallel" not in source
    assert not re.search(r"\._experts_implementation(_internal)?\s*=[^=]", source)


@pytest.mark.parametrize("router", ROUTERS)
def test_decoding_with_each_kernel_gives_eager_tokens_and_scores_for_every_router(router):
    """Greedy decoding (one token per sequence per step: the token loop under `hf_dare` on CPU) with every kernel
    gives eager's tokens and step scores, for every router, with a variable number of experts per token."""
    torch.manual_seed(0)
    overrides = {"top_p_threshold": 0.6} if router == "top_p" else {}  # at 0.9999 every token takes all 4
    model = MoEForCausalLM(tiny_models.moe_config(router=router, **overrides)).eval()
    tiny_models.randomise(model)
    for block in model.moe_blocks:  # sharper routers (the weight only): routing that varies by token
        sharpened = block.gate.hyper_out_weight if router == "hyperrouter" else block.gate.weight
        torch.nn.init.normal_(sharpened, std=1.0)
    prompt = tiny_models.random_batch(model.config, batch_size=2, seq_len=5)["input_ids"]
    if router == "dare":  # thresholds at the quartiles of the prompt's difficulties: 1-4 experts
        with torch.no_grad():
            predicted = model(input_ids=prompt).difficulty
        for block, difficulty in zip(model.moe_blocks, predicted, strict=True):
            block.gate.threshold_tracker.thresholds.copy_(torch.quantile(difficulty, torch.tensor([0.25, 0.5, 0.75])))
    counts = []
    model.register_forward_hook(lambda module, args, output: counts.append(output.expert_counts))

    def decode(implementation: str):
        model.set_experts_implementation(implementation)
        counts.clear()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, output_routing_statistics=True)  # fmt: skip
        return out.sequences, torch.stack(out.scores), torch.cat([c.flatten() for step in counts for c in step])

    tokens, scores, used = decode("eager")
    if router not in ("top_k", "ltdr", "hyperrouter"):  # fixed k (LTDR varies on vision tokens only: none here)
        assert used.min() < used.max()  # a variable number of experts per token: sentinels in play
    for implementation in IMPLEMENTATIONS[1:]:
        other_tokens, other_scores, _ = decode(implementation)
        assert torch.equal(other_tokens, tokens), implementation
        torch.testing.assert_close(other_scores, scores, atol=1e-4, rtol=1e-4, msg=implementation)


def test_padded_routing_names_an_expert_each_token_already_uses_with_weight_0():
    """Kernels that compute every slot (transformers' grouped_mm, vLLM's fused MoE) get no sentinel: each unused
    slot names the token's first used expert (expert 0 for a token that uses none) with weight 0, so a kernel
    that runs expert by expert reads no other expert's weights for it; the output is the same."""
    indices, weights = variable_routing()
    indices[0] = torch.tensor([NUM_EXPERTS, 2, NUM_EXPERTS, NUM_EXPERTS])  # MoE++: a zero-computation expert first
    weights[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    indices[1] = NUM_EXPERTS  # ReMoE: no expert at all
    weights[1] = 0.0
    padded, padded_weights = padded_routing(indices, weights, NUM_EXPERTS)
    sentinel = indices == NUM_EXPERTS
    assert padded.max() < NUM_EXPERTS and padded.min() >= 0
    assert torch.equal(padded[~sentinel], indices[~sentinel]) and torch.equal(padded_weights, weights)
    for token in range(NUM_TOKENS):
        used = set(indices[token][~sentinel[token]].tolist()) or {0}
        assert set(padded[token].tolist()) == used, token
    experts = dare_block().experts
    hidden_states = torch.randn(NUM_TOKENS, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            experts(hidden_states, padded, padded_weights), naive_experts(experts, hidden_states, indices, weights)
        )


def test_a_block_hands_no_sentinel_to_experts_it_does_not_own():
    """A serving backend may put its own experts module in the block (vLLM's transformers backend puts its fused
    MoE there and leaves the routing to the block): that module gets valid experts only. PEFT's wrappers around
    `MoEExperts` do not count as another module: the sentinel stays, hf-dare's kernels skip it."""
    block = dare_block().eval()
    block.gate.threshold_tracker.thresholds.copy_(torch.tensor([-1e9, 1e9, 2e9]))  # 2 experts per token of 4
    hidden_states = torch.randn(1, 6, 32)
    with torch.no_grad():
        expected = block(hidden_states)
    calls = []

    class ServingExperts(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.inner = experts

        def forward(self, hidden_states, top_k_index, top_k_weights):
            calls.append(top_k_index)
            return naive_experts(self.inner, hidden_states, top_k_index, top_k_weights)

    class Wrapper(torch.nn.Module):  # what PEFT's ParamWrapper looks like from the block
        def __init__(self, experts):
            super().__init__()
            self.base_layer = experts

        def forward(self, *args):
            calls.append(args[1])
            return self.base_layer(*args)

    ours = block.experts
    for replacement, owned in ((ServingExperts(ours), False), (Wrapper(Wrapper(ours)), True)):
        block.experts, calls[:] = replacement, []
        assert block.owns_experts() is owned
        with torch.no_grad():
            torch.testing.assert_close(block(hidden_states), expected)
        assert calls and bool((calls[0] == NUM_EXPERTS).any()) is owned
        if not owned:  # eagerly, the used slots only: one row (width 1) per token and expert used
            assert calls[0].shape == (6 * 2, 1) and int(calls[0].max()) < NUM_EXPERTS


def test_used_slots_forward_computes_only_the_used_slots_and_matches_the_reference():
    """`used_slots_forward`: a kernel that computes every slot it is given gets T x Avg K rows of width 1."""
    indices, weights = variable_routing()
    experts = dare_block().experts
    hidden_states = torch.randn(NUM_TOKENS, 32)
    seen = []

    def every_slot(hidden, index, weight):  # a fused kernel that would read every slot's expert
        seen.append(index)
        return naive_experts(experts, hidden, index, weight)

    with torch.no_grad():
        out = used_slots_forward(every_slot, hidden_states, indices, weights, NUM_EXPERTS)
    torch.testing.assert_close(out, naive_experts(experts, hidden_states, indices, weights))
    assert seen[0].shape == (int((indices < NUM_EXPERTS).sum()), 1) and int(seen[0].max()) < NUM_EXPERTS
