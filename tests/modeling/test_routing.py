import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from hf_dare import MoEBlock, MoEForCausalLM, ThresholdTracker
from hf_dare.modeling.routers import DareRouter, LtdrRouter
from hf_dare.modeling.routing import load_balancing_loss, route_top_n
from tests.tiny_models import moe_config, random_batch

HIDDEN = 32


def init_block(block: MoEBlock, seed: int = 0) -> MoEBlock:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return block


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_top_k_matches_transformers_qwen3_moe_block(implementation):
    config = moe_config("qwen2", router="top_k", num_experts_per_tok=2)
    config._experts_implementation = implementation
    ours = init_block(MoEBlock(config, layer_idx=0))
    reference_config = Qwen3MoeConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=config.moe_intermediate_size,
        num_experts=config.num_experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        hidden_act="silu",
    )
    reference_config._experts_implementation = implementation
    reference = Qwen3MoeSparseMoeBlock(reference_config)
    with torch.no_grad():
        reference.gate.weight.copy_(ours.gate.weight)
        reference.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        reference.experts.down_proj.copy_(ours.experts.down_proj)
    hidden_states = torch.randn(3, 7, HIDDEN)
    torch.testing.assert_close(ours(hidden_states), reference(hidden_states), atol=1e-5, rtol=1e-5)


def test_load_balancing_loss_is_e_times_sum_of_f_times_mean_prob():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4]])
    indices = torch.tensor([[0, 1], [1, 2], [0, 3]])  # the last token uses one expert (sentinel 3)
    f = torch.tensor([2.0, 2.0, 1.0]) / 5
    expected = 3 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(probs, indices), expected)
    # A masked-out token counts neither in f nor in the mean probability.
    mask = torch.tensor([True, True, False])
    f_masked = torch.tensor([1.0, 2.0, 1.0]) / 4
    torch.testing.assert_close(load_balancing_loss(probs, indices, mask), 3 * (f_masked * probs[:2].mean(0)).sum())


def test_route_top_n_keeps_each_tokens_top_experts_and_renormalises():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.3, 0.2, 0.1], [0.26, 0.24, 0.3, 0.2]])
    indices, weights = route_top_n(probs, torch.tensor([1, 3, 2]), width=4)
    assert indices.tolist() == [[1, 4, 4, 4], [0, 1, 2, 4], [2, 0, 4, 4]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    torch.testing.assert_close(weights[1, :3], torch.tensor([0.4, 0.3, 0.2]) / 0.9)
    assert (weights[indices == 4] == 0).all()


def test_dare_expert_counts_follow_the_threshold_rule():
    tracker = ThresholdTracker([0.5, 1.0, 2.0], [0.6, 0.3, 0.09, 0.01], momentum=0.9, mode="ema")
    difficulty = torch.tensor([0.0, 0.49, 0.5, 0.99, 1.0, 1.5, 2.0, 7.0])
    assert tracker.expert_counts(difficulty).tolist() == [1, 1, 2, 2, 3, 3, 4, 4]


def test_dare_router_uses_top_n_e_experts_per_token():
    config = moe_config("qwen2", router="dare")
    router = DareRouter(config).eval()
    with torch.no_grad():
        router.weight.copy_(torch.randn(4, HIDDEN))
    router.threshold_tracker.thresholds.copy_(torch.tensor([0.3, 0.6, 0.9]))
    hidden_states = torch.randn(64, HIDDEN)
    routing = router(hidden_states)
    expected_counts = 1 + (routing.difficulty[:, None] >= torch.tensor([0.3, 0.6, 0.9])).sum(-1)
    assert torch.equal(routing.expert_counts, expected_counts)
    assert routing.expert_counts.min() >= 1 and routing.expert_counts.max() <= config.max_experts
    used = routing.expert_indices < config.num_experts
    assert torch.equal(used.sum(-1), routing.expert_counts)
    ranked = routing.router_probs.argsort(-1, descending=True)
    for token in range(64):
        n = int(routing.expert_counts[token])
        assert set(routing.expert_indices[token, :n].tolist()) == set(ranked[token, :n].tolist())
    torch.testing.assert_close(routing.expert_weights.sum(-1), torch.ones(64))


def test_threshold_tracker_moves_by_ema_toward_batch_quantiles():
    pi = [0.6, 0.3, 0.09, 0.01]
    tracker = ThresholdTracker([0.0, 1.0, 2.0], pi, momentum=0.75, mode="ema")
    observed = torch.rand(1000) * 4
    tracker.observe(observed[:600])
    tracker.observe(observed[600:])  # two micro-batches of one optimizer step
    target = torch.quantile(observed, torch.tensor([0.6, 0.9, 0.99]))
    tracker.update()
    torch.testing.assert_close(tracker.thresholds, 0.75 * torch.tensor([0.0, 1.0, 2.0]) + 0.25 * target)
    assert tracker.update() is None  # nothing new observed: unchanged


def test_per_batch_thresholds_are_the_batch_quantiles_and_give_pi():
    pi = [0.6, 0.3, 0.09, 0.01]
    tracker = ThresholdTracker([0.0, 1.0, 2.0], pi, momentum=0.9, mode="per_batch")
    observed = torch.randn(20000).exp()
    tracker.observe(observed)
    tracker.update()
    fractions = torch.bincount(tracker.expert_counts(observed), minlength=5)[1:].float() / observed.numel()
    torch.testing.assert_close(fractions, torch.tensor(pi), atol=2e-3, rtol=0)


def test_tied_predictions_still_give_increasing_thresholds():
    tracker = ThresholdTracker([0.0, 1.0, 2.0], [0.6, 0.3, 0.09, 0.01], momentum=0.0, mode="ema")
    tracker.observe(torch.full((100,), 0.7))
    tracker.update()
    assert (tracker.thresholds[1:] >= tracker.thresholds[:-1]).all()


def test_ltdr_tail_vision_tokens_get_top_a():
    config = moe_config("qwen2", router="ltdr", num_experts_per_tok=2, tail_top_a=4)
    router = LtdrRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(4, HIDDEN))
    hidden_states = torch.randn(40, HIDDEN) * 3
    vision_mask = torch.zeros(40, dtype=torch.bool)
    vision_mask[:24] = True
    routing = router(hidden_states, token_mask=None, vision_mask=vision_mask)
    rpv = routing.router_probs.var(-1, unbiased=False)
    tail = vision_mask & (rpv > rpv[vision_mask].mean())
    assert tail.any() and not tail[24:].any()
    assert torch.equal(routing.expert_counts, torch.where(tail, 4, 2))
    assert torch.equal((routing.expert_indices < 4).sum(-1), routing.expert_counts)


def test_ltdr_balancing_loss_ignores_vision_tokens():
    config = moe_config("qwen2", router="ltdr")
    router = LtdrRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(4, HIDDEN))
    hidden_states = torch.randn(30, HIDDEN)
    vision_mask = torch.arange(30) < 12
    routing = router(hidden_states, vision_mask=vision_mask)
    aux_loss = router.balancing_loss(routing, vision_mask=vision_mask)
    text_only = load_balancing_loss(routing.router_probs[~vision_mask], routing.expert_indices[~vision_mask])
    torch.testing.assert_close(aux_loss, text_only)
    # Changing the vision tokens does not change the loss.
    changed = hidden_states.clone()
    changed[vision_mask] = torch.randn(12, HIDDEN) * 5
    torch.testing.assert_close(
        router.balancing_loss(router(changed, vision_mask=vision_mask), vision_mask=vision_mask), aux_loss
    )


def test_difficulty_loss_can_be_kept_away_from_the_backbone():
    def grads_of_difficulty_loss(detach: bool) -> tuple[float, float]:
        torch.manual_seed(0)
        model = MoEForCausalLM(moe_config("qwen2", router="dare", difficulty_detach_input=detach))
        model(**random_batch(model.config)).difficulty_loss.backward()
        backbone = sum(
            p.grad.abs().sum().item()
            for n, p in model.named_parameters()
            if p.grad is not None and "difficulty_predictor" not in n
        )
        predictor = sum(p.grad.abs().sum().item() for n, p in model.named_parameters() if "difficulty_predictor" in n)
        return backbone, predictor

    backbone, predictor = grads_of_difficulty_loss(detach=True)
    assert backbone == 0.0 and predictor > 0.0
    backbone, predictor = grads_of_difficulty_loss(detach=False)
    assert backbone > 0.0 and predictor > 0.0


def test_ltdr_tail_reference_is_the_samples_own_vision_tokens():
    config = moe_config("qwen2", router="ltdr", num_experts_per_tok=2, tail_top_a=4)
    router = LtdrRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(4, HIDDEN))
    hidden_states = torch.randn(2, 20, HIDDEN) * 3
    hidden_states[1] *= 4  # the second sample's routing is much sharper: a batch-wide mean would mark it all tail
    vision_mask = torch.zeros(2, 20, dtype=torch.bool)
    vision_mask[:, 2:14] = True
    routing = router(hidden_states.reshape(40, HIDDEN), vision_mask=vision_mask)
    rpv = routing.router_probs.var(-1, unbiased=False).view(2, 20)
    for sample in range(2):
        own = vision_mask[sample] & (rpv[sample] > rpv[sample][vision_mask[sample]].mean())
        assert 0 < own.sum() < vision_mask[sample].sum()
        assert torch.equal(routing.expert_counts.view(2, 20)[sample], torch.where(own, 4, 2))
        alone = router(hidden_states[sample], vision_mask=vision_mask[sample])
        assert torch.equal(alone.expert_indices, routing.expert_indices.view(2, 20, -1)[sample])
