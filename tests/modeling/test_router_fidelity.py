"""Each baseline router against a reference written from its original code (tests/modeling/reference_routers.py,
which cites the file and line it transcribes): on seeded inputs the same combine weights, experts per token and
losses (1e-6), and the layers' losses reduced as the original reduces them."""

import pytest
import torch

from hf_dare import MoEBlock, MoEForCausalLM
from hf_dare.modeling.routers import DynMoERouter, MoEPlusPlusRouter, ReMoERouter, TopPRouter, top_p_counts
from hf_dare.modeling.routing import RoutingContext, routing_context
from tests.modeling import reference_routers as reference
from tests.tiny_models import moe_config, random_batch, randomise

HIDDEN = 32
ATOL = 1e-6


def dense_weights(routing, num_experts: int) -> torch.Tensor:
    """A `Routing`'s FFN experts' weights as (T, E), whatever their slot order (sentinel slots dropped)."""
    weights = torch.zeros(routing.expert_indices.shape[0], num_experts + 1, dtype=torch.float32)
    weights.scatter_add_(1, routing.expert_indices, routing.expert_weights.float())
    return weights[:, :num_experts]


# --- Top-p (ZhenweiAn/Dynamic_MoE) -----------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.4, 0.75, 0.9999])
def test_top_p_keeps_the_originals_experts_with_their_raw_probabilities(p):
    router = randomise(TopPRouter(moe_config(router="top_p", top_p_threshold=p)), scale=0.4)
    hidden = torch.randn(200, HIDDEN)
    routing = router(hidden)
    original = reference.top_p_reference(hidden, router.weight, p)
    torch.testing.assert_close(dense_weights(routing, 4), original["combine"], atol=ATOL, rtol=0)
    assert torch.equal(routing.expert_counts, original["counts"])
    if p < 0.99:
        assert len(set(routing.expert_counts.tolist())) > 1  # the rule really varies per token


def test_top_p_keeps_an_expert_whose_predecessors_hold_exactly_p():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]])  # exact in binary: ties are real
    assert top_p_counts(probs, 0.75).tolist() == [3]  # 0.5 + 0.25 = p: the third is still kept
    assert top_p_counts(probs, 0.74).tolist() == [2]


def test_top_p_dynamic_loss_is_the_mean_router_entropy():
    router = randomise(TopPRouter(moe_config(router="top_p", top_p_dynamic_loss_coef=0.5)), scale=0.4)
    routing = router(torch.randn(64, HIDDEN))
    torch.testing.assert_close(
        router.router_loss(routing), 0.5 * reference.top_p_dynamic_loss(routing.router_probs), atol=ATOL, rtol=0
    )


# --- ReMoE (thu-ml/ReMoE) --------------------------------------------------------------------------------------


def test_remoe_gates_and_layer_l1_are_the_originals():
    router = randomise(ReMoERouter(moe_config(router="remoe")))
    router.l1_coef.fill_(0.01)
    hidden = torch.randn(200, HIDDEN)
    routing = router(hidden)
    original = reference.remoe_reference(hidden, router.weight, 0.01, k=2)
    torch.testing.assert_close(dense_weights(routing, 4), original["combine"], atol=ATOL, rtol=0)
    assert torch.equal(routing.expert_counts, original["active"].sum(-1))
    torch.testing.assert_close(router.router_loss(routing), original["l1_loss"], atol=ATOL, rtol=1e-6)


def layer_losses(model, batch) -> tuple[list[torch.Tensor], object]:
    """The MoE layers' own router losses (each gate asked again on its routing) and the model's output."""
    seen = []
    hooks = [
        block.gate.register_forward_hook(lambda gate, args, routing: seen.append((gate, routing, args)))
        for block in model.moe_blocks
    ]
    out = model(**batch)
    for hook in hooks:
        hook.remove()
    losses = [gate.router_loss(routing, batch["attention_mask"]) for gate, routing, _ in seen]
    return losses, out


def test_remoe_layers_l1_add_up_and_one_lambda_follows_their_mean_sparsity():
    torch.manual_seed(0)
    config = moe_config(router="remoe", remoe_initial_l1_coef=0.01, remoe_l1_coef_min=1e-8)
    model = randomise(MoEForCausalLM(config)).train()
    batch = random_batch(model.config, batch_size=2, seq_len=16)
    losses, out = layer_losses(model, batch)
    torch.testing.assert_close(out.router_loss, reference.remoe_total_l1(losses), atol=ATOL, rtol=1e-6)

    # The step: one lambda from the mean over layers of each layer's sparsity (one micro-batch per layer here).
    sparsities = [1 - counts.sum().item() / (counts.numel() * 4) for counts in out.expert_counts]
    expected, _ = reference.remoe_update_l1_coef(0.01, sparsities, 2, 1, k=2, num_experts=4)
    model.update_routing_state()
    for block in model.moe_blocks:
        assert block.gate.l1_coef.item() == pytest.approx(expected, rel=1e-6)


def test_remoe_tie_divides_as_the_original():
    router = ReMoERouter(moe_config(router="remoe"))  # target 0.5
    assert router.stepped(1.0, 0.0, 0.5) == (pytest.approx(1 / 1.2), 0.0)
    assert router.stepped(1.0, 0.0, 0.49) == (pytest.approx(1.2), 0.0)


# --- DynMoE (LINs-lab/DynMoE) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_dynmoe_gates_and_losses_are_the_originals(training):
    router = randomise(DynMoERouter(moe_config(router="dynmoe", dynmoe_diversity_coef=1.0,
                                               dynmoe_simplicity_coef=1.0, dynmoe_efficiency_coef=1.0)))  # fmt: skip
    with torch.no_grad():
        router.expert_thresholds.copy_(torch.tensor([0.15, -0.05, 0.2, 0.1]))
    router.train(training)
    hidden = torch.randn(300, HIDDEN)
    routing = router(hidden)
    original = reference.dynmoe_reference(
        hidden, router.weight.T, router.expert_thresholds, torch.ones(4), training=training
    )
    torch.testing.assert_close(dense_weights(routing, 4), original["combine"], atol=ATOL, rtol=0)
    assert torch.equal(routing.expert_counts, original["counts"].long())
    assert (routing.expert_counts == 0).any() == training  # a training token with no active expert uses none
    if training:
        torch.testing.assert_close(router.balancing_loss(routing), original["load_balance"], atol=ATOL, rtol=1e-6)
        regularisers = original["diversity"] + original["simplicity"] + original["efficiency"]
        torch.testing.assert_close(router.router_loss(routing), regularisers, atol=ATOL, rtol=1e-6)


def test_dynmoe_layers_losses_add_up():
    torch.manual_seed(0)
    model = randomise(MoEForCausalLM(moe_config(router="dynmoe"))).train()
    batch = random_batch(model.config, batch_size=2, seq_len=16)
    losses, out = layer_losses(model, batch)
    torch.testing.assert_close(out.router_loss, torch.stack(losses).sum(), atol=ATOL, rtol=1e-6)


# --- MoE++ (SkyworkAI/MoE-plus-plus) ---------------------------------------------------------------------------

# hf-dare's order of the routed experts is [FFN 0-3, zero, copy, constant, constant]; the original's is
# [FFN 0-3, constant, constant, copy, zero]: ORIGINAL_POSITION[j] is where hf-dare's expert j sits there.
ORIGINAL_POSITION = [0, 1, 2, 3, 7, 6, 4, 5]


def moepp_original(router: MoEPlusPlusRouter, hidden: torch.Tensor, previous: torch.Tensor | None = None) -> dict:
    """The original's forward on `router`'s weights, laid out in the original's expert order."""
    order = torch.tensor(ORIGINAL_POSITION)
    inverse = torch.argsort(order)  # hf-dare index of each original position
    w2 = router.weight[inverse]
    gate_map = router.residual_weight[inverse][:, inverse]
    return reference.moepp_reference(
        hidden,
        (router.hidden_weight, w2),
        router.constant_vectors,
        router.constant_gate.view(-1, 2, HIDDEN),
        gate_map=gate_map,
        gate_residual=None if previous is None else previous[:, inverse],
    )


def test_moepp_gate_weights_and_experts_are_the_originals():
    config = moe_config(router="moepp")  # the original's defaults: two-layer tanh gate, zero gate, 2h inputs
    block = randomise(MoEBlock(config, layer_idx=0), scale=0.5)
    router = block.gate
    hidden = torch.randn(300, HIDDEN)
    routing = router(hidden)
    original = moepp_original(router, hidden)
    torch.testing.assert_close(routing.router_logits, original["logits"][:, torch.tensor(ORIGINAL_POSITION)])
    combine = original["combine"]
    torch.testing.assert_close(dense_weights(routing, 4), combine[:, :4], atol=ATOL, rtol=0)
    torch.testing.assert_close(routing.zero_computation_output, original["zc_output"], atol=1e-5, rtol=1e-5)
    chose_zero = combine.new_zeros(combine.shape).scatter(1, original["indices"], 1.0)[:, 7] > 0
    assert chose_zero.any()  # tokens with the zero expert: their other expert's weight is 1
    assert torch.allclose(combine[chose_zero].sum(-1), torch.ones(int(chose_zero.sum())))
    # The block: the FFN experts on 2h, plus the zero-computation experts' outputs.
    with torch.no_grad():
        out = block(hidden[None])[0]
    experts = block.experts
    ffn = sum(
        combine[:, j : j + 1] * experts.expert(2 * hidden, experts.gate_up_proj[j], experts.down_proj[j])
        for j in range(4)
    )
    torch.testing.assert_close(out, ffn + original["zc_output"], atol=1e-5, rtol=1e-5)


def test_moepp_gating_residual_and_balancing_loss_are_the_originals():
    config = moe_config(router="moepp", moepp_tau=0.25)
    router = randomise(MoEPlusPlusRouter(config), scale=0.5)
    hidden, previous = torch.randn(200, HIDDEN), torch.randn(200, 8)
    with routing_context(RoutingContext(previous_router_logits=previous)):
        routing = router(hidden)
    original = moepp_original(router, hidden, previous)
    torch.testing.assert_close(routing.router_logits, original["logits"][:, torch.tensor(ORIGINAL_POSITION)])
    expected = reference.moepp_heterogeneous_balance_loss(original["probs"], original["indices"], 4, tau=0.25)
    torch.testing.assert_close(router.balancing_loss(routing), expected, atol=ATOL, rtol=1e-6)
