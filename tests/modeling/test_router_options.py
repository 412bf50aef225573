"""Router options: DARE's difficulty proxies (the paper's Table 4 ablation), a router per MoE layer, MoE-LLaVA's
DeepSpeed top-2 gating in training (Gumbel-sampled 2nd expert, capacities, top-1 balancing loss, sum over layers)
and `norm_topk_prob`."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hf_dare import MoEBlock, MoEForCausalLM
from hf_dare.evaluation.flops import activated_parameters
from hf_dare.modeling.routers import DareRouter, TopKRouter
from hf_dare.modeling.routing import load_balancing_loss, within_capacity
from hf_dare.training import MoETrainer
from hf_dare.training.metrics import RoutingMetrics
from tests.modeling.reference_routers import deepspeed_top2gating_reference
from tests.tiny_models import calibrate_thresholds, moe_config, random_batch, randomise
from tests.training.helpers import as_dataset, digits_tensors, expert_shares, training_args

HIDDEN, EXPERTS = 32, 4
PI = [0.6, 0.3, 0.09, 0.01]


def dense_weights(indices: torch.Tensor, weights: torch.Tensor, num_experts: int = EXPERTS) -> torch.Tensor:
    """(T, K) routing with sentinel slots -> (T, E) weight of each expert per token."""
    dense = torch.zeros(indices.shape[0], num_experts + 1, dtype=weights.dtype)
    return dense.scatter_add(1, indices, weights)[:, :num_experts]


# DARE's difficulty proxies


@pytest.mark.parametrize("proxy", ["random", "router_entropy", "hidden_projection"])
def test_proxies_need_no_predictor_and_no_difficulty_loss(proxy):
    torch.manual_seed(0)
    model = MoEForCausalLM(moe_config(router="dare", difficulty_proxy=proxy))
    assert not any("difficulty_predictor" in name for name, _ in model.named_parameters())
    out = model(**random_batch(model.config))
    assert out.difficulty_loss is None and len(out.difficulty) == len(model.config.moe_layers)
    torch.testing.assert_close(out.loss, out.ce_loss + 0.01 * out.aux_loss)
    gate = model.moe_blocks[0].gate.eval()
    hidden = torch.randn(50, HIDDEN)
    routing = gate(hidden)
    if proxy == "router_entropy":
        probs = routing.router_probs
        torch.testing.assert_close(routing.difficulty, -(probs * probs.log()).sum(-1))
    elif proxy == "random":
        # Content-free: at inference a fixed value per position, whatever the hidden states; in training fresh draws.
        assert ((routing.difficulty >= 0) & (routing.difficulty < 1)).all() and routing.difficulty.std() > 0.2
        torch.testing.assert_close(gate(torch.randn(50, HIDDEN)).difficulty, routing.difficulty)
        assert not torch.equal(model.moe_blocks[1].gate.eval()(hidden).difficulty, routing.difficulty)  # per layer
        gate.train()
        assert not torch.equal(gate(hidden).difficulty, gate(hidden).difficulty)
        gate.eval()
    else:  # hf-dare 0.1's `random`: a fixed function of the hidden state, the same in training and in eval
        assert ((routing.difficulty > 0) & (routing.difficulty < 1)).all()
        fresh = DareRouter(moe_config(router="dare", difficulty_proxy=proxy)).train()
        torch.testing.assert_close(fresh(hidden).difficulty, routing.difficulty)
        torch.testing.assert_close(gate(hidden[:7]).difficulty, routing.difficulty[:7])
    expected = 1 + (routing.difficulty[:, None] >= gate.threshold_tracker.thresholds).sum(-1)
    assert torch.equal(routing.expert_counts, expected)


def test_random_proxy_is_independent_of_modality():
    """The `random` proxy draws no information from the tokens: on MoE-LLaVA inputs its mean over image tokens and
    over text tokens agree within sampling noise (hf-dare 0.1's hidden-state projection gave the trained study
    model Avg K 1.58 on text and 1.33 on images). Batch invariance: test_proxy_routing_is_batch_invariant."""
    from hf_dare import MoELlavaForConditionalGeneration
    from tests.modeling.test_modeling_moe_llava import image_batch
    from tests.tiny_models import llava_config

    torch.manual_seed(0)
    model = MoELlavaForConditionalGeneration(llava_config(router="dare", difficulty_proxy="random")).eval()
    with torch.no_grad():
        out = model(**image_batch(model.config, batch_size=1, images_per_sample=8, text_len=40))
    vision, text = out.vision_mask, ~out.vision_mask
    d = torch.stack(out.difficulty)  # (layers, 1, L): every value drawn independently (position, layer)
    standard_error = (d[:, vision].var() / d[:, vision].numel() + d[:, text].var() / d[:, text].numel()).sqrt()
    assert (d[:, vision].mean() - d[:, text].mean()).abs() < 3 * standard_error


@pytest.mark.parametrize("proxy", ["random", "router_entropy"])
def test_proxy_expert_fractions_reach_target_distribution(tmp_path, proxy):
    """The proxies go through the same thresholds: after training (EMA with gamma 0.5), the thresholds are the
    quantiles of Pi (for the random proxy, uniform draws: 0.6, 0.9, 0.99) and, for the router entropy, the share
    of tokens using 1..M experts on the training data, in eval mode, is Pi."""
    torch.manual_seed(0)
    model = MoEForCausalLM(moe_config(router="dare", difficulty_proxy=proxy, threshold_momentum=0.5))
    data = digits_tensors(8)
    args = training_args(tmp_path, max_steps=30, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=10)
    trainer = MoETrainer(model=model, args=args, train_dataset=as_dataset(data))
    trainer.train()
    assert not any("loss/difficulty" in log for log in trainer.state.log_history)
    if proxy == "random":
        for block in model.moe_blocks:
            thresholds = block.gate.threshold_tracker.thresholds
            assert thresholds.tolist() == pytest.approx([0.6, 0.9, 0.99], abs=0.05)
        return
    model.eval()
    with torch.no_grad():
        out = model(**data)
    for counts in out.expert_counts:
        assert expert_shares(counts) == pytest.approx(PI, abs=0.05)


@pytest.mark.parametrize("proxy", ["random", "router_entropy"])
def test_proxy_routing_is_batch_invariant(proxy):
    torch.manual_seed(0)
    model = MoEForCausalLM(moe_config("qwen3", router="dare", difficulty_proxy=proxy))
    with torch.no_grad():
        for block in model.moe_blocks:
            block.gate.weight.normal_(0.0, 0.8)
    calibrate_thresholds(model, random_batch(model.config, batch_size=4, seq_len=16, seed=5))
    prompts = [random_batch(model.config, batch_size=1, seq_len=n, seed=s)["input_ids"] for n, s in ((9, 1), (5, 2))]
    pads = [0, 4]
    input_ids = torch.cat([F.pad(p, (pad, 0)) for p, pad in zip(prompts, pads, strict=True)])
    attention_mask = (torch.arange(9)[None] >= torch.tensor(pads)[:, None]).long()
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask)
        for i, (prompt, pad) in enumerate(zip(prompts, pads, strict=True)):
            alone = model(input_ids=prompt)
            torch.testing.assert_close(batched.logits[i, pad:], alone.logits[0], atol=1e-4, rtol=0)
            for in_batch, single in zip(batched.expert_counts, alone.expert_counts, strict=True):
                assert torch.equal(in_batch[i, pad:], single[0])
    assert len({int(c) for counts in batched.expert_counts for c in counts[attention_mask.bool()]}) > 1


# A router per MoE layer


def test_router_per_layer_config_validation_and_json():
    config = moe_config(router={2: "top_k", 0: "dare"})
    assert config.routers == {0: "dare", 2: "top_k"} and config.router_for(2) == "top_k"
    assert config.max_experts_per_token == 4 and config.uses_router("dare") and not config.uses_router("ltdr")
    # config.json holds string keys; they come back as layer indices.
    as_json = json.loads(config.to_json_string())
    assert as_json["router"] == {"0": "dare", "2": "top_k"}
    assert type(config).from_dict(as_json).router == {0: "dare", 2: "top_k"}
    for router, problem in [
        ({0: "dare", 2: "switch"}, "unknown router"),
        ({0: "dare", 1: "top_k", 2: "top_k"}, r"layers \[1\] are not MoE layers"),
        ({0: "dare"}, r"no router for MoE layers \[2\]"),
        (["dare", "top_k"], "got"),
    ]:
        with pytest.raises(ValueError, match=rf"MoECausalLMConfig\.router: {problem}"):
            moe_config(router=router)


def test_mixed_model_routes_each_layer_with_its_router(tmp_path):
    torch.manual_seed(0)
    model = MoEForCausalLM(moe_config(router={0: "dare", 2: "top_k"}, difficulty_predictor_dropout=0.0))
    gates = [type(block.gate) for block in model.moe_blocks]
    assert gates == [DareRouter, TopKRouter]
    batch = random_batch(model.config, batch_size=2, seq_len=12)
    calibrate_thresholds(model, batch)
    with torch.no_grad():
        out = model(**batch)
    assert len(out.expert_counts) == 2 and len(out.difficulty) == 1 and out.difficulty_loss is not None
    assert out.expert_counts[1].unique().tolist() == [2] and len(out.expert_counts[0].unique()) > 1
    k = activated_parameters(model, out)["avg_k_per_layer"]
    assert k[1] == 2.0 and k[0] != 2.0
    metrics = RoutingMetrics.for_model(model)
    assert metrics.width == 4
    metrics.update(out, batch["labels"])
    assert sum(v for key, v in metrics.compute().items() if key.startswith("routing/frac_")) == pytest.approx(1.0)

    model.save_pretrained(tmp_path / "mixed")
    saved = json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert saved["router"] == {"0": "dare", "2": "top_k"}
    card = (tmp_path / "mixed" / "README.md").read_text()
    assert "`dare` on layers 0; `top_k` on layers 2" in card and "| `target_distribution` |" in card
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed").eval()
    assert loaded.config.router == {0: "dare", 2: "top_k"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, out.logits)


# MoE-LLaVA's DeepSpeed top-2 gating


def top2_block(**options) -> MoEBlock:
    config = moe_config(router="top_k", **options)
    block = randomise(MoEBlock(config, layer_idx=0))
    with torch.no_grad():
        block.gate.weight.mul_(10)  # sharp routing: some experts overflow their capacity
    return block


def block_reference(block: MoEBlock, hidden: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
    experts = block.experts
    outputs = torch.stack(
        [experts.expert(hidden, experts.gate_up_proj[e], experts.down_proj[e]) for e in range(EXPERTS)], 1
    )
    return (combine[:, :, None] * outputs).sum(1)


def test_training_top2_matches_deepspeed_top2gating():
    block = top2_block(second_expert_sampling=True, capacity_factor=0.5, min_capacity=2, aux_loss_fraction="top1")
    block.train()
    flat = torch.randn(24, HIDDEN, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    routing = block.gate(flat)
    torch.manual_seed(7)
    out = block(flat.view(1, 24, HIDDEN)).view(24, HIDDEN)
    torch.manual_seed(7)
    noise = torch.distributions.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).rsample((24, EXPERTS))
    reference = deepspeed_top2gating_reference(routing.router_logits, 0.5, 2, noise)
    l_aux, combine = reference["l_aux"], reference["combine"]

    torch.testing.assert_close(dense_weights(routing.expert_indices, routing.expert_weights), combine)
    torch.testing.assert_close(block.gate.balancing_loss(routing), l_aux)
    torch.testing.assert_close(out, block_reference(block, flat, combine), atol=1e-5, rtol=1e-5)
    kept = (combine > 0).sum(1)
    assert torch.equal(routing.expert_counts, kept)
    # Capacity 6 of 48 slots over 4 experts: choices were dropped, down to whole tokens (output 0: the residual
    # carries them), and a token left with one expert gives it all its weight, as DeepSpeed renormalises.
    assert (kept == 0).any() and (kept == 1).any() and (kept == 2).any()
    assert (out[kept == 0] == 0).all()
    assert (combine[kept == 1].max(1).values == 1).all()


def test_second_expert_is_sampled_in_training_only():
    block = top2_block(second_expert_sampling=True)
    with torch.no_grad():
        block.gate.weight.div_(10)
    hidden = torch.randn(2000, HIDDEN, generator=torch.Generator().manual_seed(0))
    probs = block.gate(hidden).router_probs
    ranked = probs.argsort(-1, descending=True)
    torch.manual_seed(0)
    sampled = block.train().gate(hidden).expert_indices
    assert torch.equal(sampled[:, 0], ranked[:, 0])
    # The 2nd expert is a sample from the softmax over the other experts (the Gumbel-max trick): it is the 2nd
    # most probable with probability P_2nd / (1 - P_1st).
    share = (sampled[:, 1] == ranked[:, 1]).float().mean()
    expected = (probs.gather(-1, ranked[:, 1:2]) / (1 - probs.gather(-1, ranked[:, :1]))).mean()
    assert share == pytest.approx(expected.item(), abs=0.04) and share < 0.95
    assert torch.equal(block.eval().gate(hidden).expert_indices, ranked[:, :2])


def test_top2_inference_is_deterministic_without_drops_unless_eval_capacity():
    block = top2_block(second_expert_sampling=True, capacity_factor=0.75).eval()
    hidden = torch.randn(24, HIDDEN)
    routing = block.gate(hidden)
    assert torch.equal(routing.expert_indices, routing.router_probs.topk(2).indices)
    assert torch.equal(block.gate(hidden).expert_indices, routing.expert_indices)
    torch.testing.assert_close(routing.expert_weights.sum(-1), torch.ones(24))

    block = top2_block(second_expert_sampling=True, capacity_factor=2.0, eval_capacity_factor=0.5).eval()
    routing = block.gate(hidden)
    combine = deepspeed_top2gating_reference(routing.router_logits, 0.5, 0, torch.zeros(24, EXPERTS))["combine"]
    torch.testing.assert_close(dense_weights(routing.expert_indices, routing.expert_weights), combine)
    assert (routing.expert_counts < 2).any()


def test_capacity_counts_real_tokens_only():
    indices = torch.tensor([[0, 1]] * 6)
    token_mask = torch.tensor([False, False, True, True, True, True])  # left padding
    # 4 real tokens: capacity ceil(4 / 4 * 2 * 1.0) = 2 per expert; padding takes no slot.
    used = within_capacity(indices, EXPERTS, 1.0, 0, token_mask)
    assert used.tolist() == [[False, False]] * 2 + [[True, True]] * 2 + [[False, False]] * 2
    assert within_capacity(indices, EXPERTS, 1.0, min_capacity=3, token_mask=token_mask).sum() == 6


def test_top1_balancing_loss_and_sum_over_layers():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1], [0.4, 0.35, 0.15, 0.1]])
    top1 = torch.tensor([2.0, 1.0, 0.0, 0.0]) / 3
    block = top2_block(aux_loss_fraction="top1")
    routing = block.gate(torch.randn(3, HIDDEN))
    routing.router_probs = probs
    torch.testing.assert_close(block.gate.balancing_loss(routing), 4 * (top1 * probs.mean(0)).sum())
    slots = top2_block()  # f_i over every routed slot (hf-dare's default)
    torch.testing.assert_close(slots.gate.balancing_loss(routing), load_balancing_loss(probs, routing.expert_indices))

    batch = random_batch(moe_config(), seq_len=10)
    losses = {}
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        model = MoEForCausalLM(moe_config(router="top_k", router_aux_loss_reduction=reduction))
        out = model(**batch)
        losses[reduction] = out.aux_loss
        torch.testing.assert_close(out.loss, out.ce_loss + 0.01 * out.aux_loss)
    torch.testing.assert_close(losses["sum"], losses["mean"] * 2)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"eval_capacity_factor": -1.0}, "eval_capacity_factor"),
        ({"min_capacity": -1}, "min_capacity"),
        ({"router": "dare", "second_expert_sampling": True}, "second_expert_sampling"),
        ({"router": "ltdr", "capacity_factor": 1.5}, "capacity_factor"),
        ({"aux_loss_fraction": "top2"}, "aux_loss_fraction"),
        ({"router_aux_loss_reduction": "max"}, "router_aux_loss_reduction"),
        ({"difficulty_proxy": "loss"}, "difficulty_proxy"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
    ],
)
def test_invalid_router_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=rf"MoECausalLMConfig\.{field}: .*; allowed: "):
        moe_config(**options)


# norm_topk_prob


@pytest.mark.parametrize("router", ["top_k", "dare"])
@pytest.mark.parametrize("normalize", [True, False])
def test_norm_topk_prob(router, normalize):
    config = moe_config(router=router, norm_topk_prob=normalize)
    block = randomise(MoEBlock(config, layer_idx=0)).eval()
    if router == "dare":
        block.gate.threshold_tracker.thresholds.copy_(torch.tensor([-1.0, 0.0, 100.0]))  # 3 experts
    with torch.no_grad():  # identical experts: the output is (sum of the weights) * the expert's output
        block.experts.gate_up_proj.copy_(block.experts.gate_up_proj[:1].expand_as(block.experts.gate_up_proj))
        block.experts.down_proj.copy_(block.experts.down_proj[:1].expand_as(block.experts.down_proj))
    hidden = torch.randn(2, 10, HIDDEN)
    routing = block.gate(hidden.view(20, HIDDEN))
    used = routing.expert_indices < EXPERTS
    chosen = routing.router_probs.gather(-1, routing.expert_indices.clamp(max=EXPERTS - 1)) * used
    expected = chosen / chosen.sum(-1, keepdim=True) if normalize else chosen
    torch.testing.assert_close(routing.expert_weights, expected)
    assert (routing.expert_weights.sum(-1) < 1 - 1e-3).all() != normalize
    one_expert = block.experts.expert(
        hidden.view(20, HIDDEN), block.experts.gate_up_proj[0], block.experts.down_proj[0]
    )
    with torch.no_grad():
        out = block(hidden).view(20, HIDDEN)
    torch.testing.assert_close(out, expected.sum(-1, keepdim=True) * one_expert, atol=1e-5, rtol=1e-5)
