"""The DARE paper's baseline routers (Top-p, ReMoE, DynMoE, MoE++, `config.router`): on every backbone and on
MoE-LLaVA (forward, backward, save / load without hf_dare, generation, batching), and their defining properties
against hand computations."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hf_dare import MoEForCausalLM, MoELlavaForConditionalGeneration
from hf_dare.evaluation.flops import activated_parameters
from hf_dare.modeling import DynMoERouter, MoEBlock, MoEPlusPlusRouter, ReMoERouter
from hf_dare.modeling.routers import top_p_counts
from hf_dare.modeling.routing import RoutingContext, routing_context
from tests.modeling.test_batch_invariance import (
    test_image_sample_is_the_same_alone_and_batched_with_other_images as check_image_batch_invariance,
)
from tests.modeling.test_batch_invariance import (
    test_text_sample_is_the_same_alone_and_in_a_left_padded_batch as check_text_batch_invariance,
)
from tests.modeling.test_modeling_moe_llava import image_batch
from tests.modeling.test_remote_code import run_without_hf_dare
from tests.tiny_models import TEXT_FAMILIES, llava_config, moe_config, random_batch, randomise

BASELINES = ("top_p", "remoe", "dynmoe", "moepp", "hyperrouter")
BACKBONES = (*TEXT_FAMILIES, "llava")
HIDDEN = 32


def build(router: str, backbone: str = "qwen2", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if backbone == "llava":
        return MoELlavaForConditionalGeneration(llava_config(tower="clip", router=router, **overrides))
    return MoEForCausalLM(moe_config(backbone, router=router, **overrides))


def batch_for(model, **kwargs) -> dict:
    if isinstance(model, MoELlavaForConditionalGeneration):
        return image_batch(model.config, **kwargs)
    return random_batch(model.config, **kwargs)


def experts_output(block: MoEBlock, token: torch.Tensor, expert_idx: int) -> torch.Tensor:
    experts = block.experts
    return experts.expert(token, experts.gate_up_proj[expert_idx], experts.down_proj[expert_idx])


# --- every router on every backbone ----------------------------------------------------------------------------


@pytest.mark.parametrize("router", BASELINES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_forward_backward_and_loss_parts(backbone, router):
    model = build(router, backbone)
    outputs = model(**batch_for(model))
    beta = model.config.router_aux_loss_coef
    assert torch.isfinite(outputs.ce_loss)
    assert (outputs.aux_loss is None) == (router == "hyperrouter")  # HyperRouter's original gate has no balancing
    assert (outputs.router_loss is None) == (router in ("moepp", "hyperrouter"))  # no router loss of their own
    expected = outputs.ce_loss if outputs.aux_loss is None else outputs.ce_loss + beta * outputs.aux_loss
    if outputs.router_loss is not None:
        assert torch.isfinite(outputs.router_loss) and outputs.router_loss > 0
        expected = expected + outputs.router_loss
    torch.testing.assert_close(outputs.loss, expected)
    assert outputs.difficulty_loss is None
    widest = model.config.max_experts_per_token
    for counts in outputs.expert_counts:
        assert counts.min() >= 0 and counts.max() <= widest
    outputs.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for block in model.moe_blocks:
        gate_grads = {name: p.grad for name, p in block.gate.named_parameters()}
        assert all(g is not None for g in gate_grads.values()), gate_grads.keys()
        assert gate_grads["embedding" if router == "hyperrouter" else "weight"].abs().sum() > 0
    if router == "dynmoe":  # the straight-through gates train the thresholds
        assert all(b.gate.expert_thresholds.grad.abs().sum() > 0 for b in model.moe_blocks)
    if router == "moepp":  # the second MoE layer's residual map sees the first layer's logits
        assert model.moe_blocks[1].gate.residual_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router", BASELINES)
def test_activation_checkpointing_gives_the_same_gradients(router):
    """The recomputation in the backward routes as the forward did (MoE++'s gating residual comes from the
    context of its forward) and observes nothing a second time (ReMoE's gate counts)."""
    grads, counts = [], []
    for checkpointing in (False, True):
        model = build(router, "qwen3").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**random_batch(model.config)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        counts.append([len(getattr(b.gate, "_observed", [])) for b in model.moe_blocks])
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert counts[0] == counts[1]


def perturb_router_state(model) -> None:
    """Non-default router state, so that a reload must restore it: ReMoE's lambda, DynMoE's thresholds, MoE++'s
    residual maps."""
    with torch.no_grad():
        for i, block in enumerate(model.moe_blocks):
            gate = block.gate
            if hasattr(gate, "weight"):
                gate.weight.normal_(0.0, 0.5)
            if hasattr(gate, "embedding"):  # HyperRouter: its embedding, and its fixed hypernetwork (buffers)
                gate.embedding.normal_(0.0, 1.0)
                gate.hyper_out_weight.normal_(0.0, 0.2)
            if hasattr(gate, "l1_coef"):
                gate.l1_coef.fill_(0.37 + i)
            if hasattr(gate, "expert_thresholds"):
                gate.expert_thresholds.normal_(0.0, 0.1)
            if hasattr(gate, "residual_weight"):
                gate.residual_weight.normal_(0.0, 0.3)


def test_every_router_and_backbone_loads_without_hf_dare_with_identical_logits(tmp_path):
    cases = []
    for router in BASELINES:
        for backbone in BACKBONES:
            model = build(router, backbone).eval()
            perturb_router_state(model)
            name = f"{router}-{backbone}"
            model.save_pretrained(tmp_path / name)
            batch = batch_for(model)
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                logits = model(**inputs).logits
            gate_state = {f"gate/{k}": v for k, v in model.state_dict().items() if ".gate." in k}
            save_file({**inputs, "logits": logits, **gate_state}, tmp_path / f"{name}.safetensors")
            cases.append((name, backbone == "llava"))

    run_without_hf_dare(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
        torch.set_num_threads(1)  # as the tests computed the expected logits: the same reduction order
        for name, llava in {cases!r}:
            auto = AutoModelForImageTextToText if llava else AutoModelForCausalLM
            model = auto.from_pretrained({str(tmp_path)!r} + "/" + name, trust_remote_code=True).eval()
            assert "hf_dare" not in type(model).__module__, type(model).__module__
            saved = load_file({str(tmp_path)!r} + "/" + name + ".safetensors")
            inputs = {{k: v for k, v in saved.items() if k not in ("logits",) and not k.startswith("gate/")}}
            with torch.no_grad():
                logits = model(**inputs).logits
            # Loaded (memory-mapped) weights may take another CPU matmul path: equal to float rounding.
            torch.testing.assert_close(logits, saved["logits"], atol=1e-5, rtol=1e-5, msg=name)
            state = model.state_dict()
            for key, value in saved.items():
                if key.startswith("gate/"):
                    torch.testing.assert_close(state[key[5:]], value, atol=0, rtol=0, msg=key)
        """,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("router", BASELINES)
@pytest.mark.parametrize("backbone", ["qwen3", "llava"])
def test_greedy_generation_with_cache_equals_without(backbone, router):
    model = build(router, backbone).eval()
    perturb_router_state(model)
    batch = batch_for(model, batch_size=1)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "attention_mask")}
    # An untrained model may pick the image token, which an uncached step would then take for an image; no EOS
    # either, so that all 8 steps run.
    never = [getattr(model.config, "image_token_id", 0), model.config.get_text_config().eos_token_id]
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, suppress_tokens=never)
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False, suppress_tokens=never)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 8
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("router", BASELINES)
def test_text_sample_is_the_same_alone_and_in_a_left_padded_batch(router):
    check_text_batch_invariance(router)


@pytest.mark.parametrize("router", BASELINES)
def test_image_sample_is_the_same_alone_and_batched_with_other_images(router):
    check_image_batch_invariance(router)


# --- Top-p -----------------------------------------------------------------------------------------------------


def test_top_p_counts_on_hand_made_probabilities():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    for p, n in ((0.5, 1), (0.6, 2), (0.8, 2), (0.9, 3), (0.96, 4), (1.0, 4)):  # kept: the experts above hold <= p
        assert top_p_counts(probs, p).tolist() == [n], p
    assert top_p_counts(probs[:, [2, 0, 3, 1]], 0.8).tolist() == [2]  # order of the experts does not matter


# --- ReMoE -----------------------------------------------------------------------------------------------------


def test_remoe_uses_exactly_the_positive_gates_and_outputs_their_gated_sum():
    config = moe_config(router="remoe")
    block = randomise(MoEBlock(config, layer_idx=0))
    hidden_states = torch.randn(1, 12, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # token 0: every gate negative, so it uses no expert
        weight, token = block.gate.weight, hidden_states[0, 0]
        scores = weight @ token
        weight -= ((scores.clamp(min=0) + 0.1) / token.dot(token))[:, None] * token[None, :]
    context = RoutingContext(with_aux_loss=True)
    with routing_context(context):
        out = block(hidden_states)
    routing = context.routings[0]
    gates = F.relu(hidden_states[0] @ block.gate.weight.T)
    assert torch.equal(routing.expert_counts, (gates > 0).sum(-1))
    assert routing.expert_counts[0] == 0 and (routing.expert_counts[1:] > 0).all()
    for t in range(12):
        active = {i for i in range(4) if gates[t, i] > 0}
        assert {i for i in routing.expert_indices[t].tolist() if i < 4} == active
        expected = sum((gates[t, i] * experts_output(block, hidden_states[0, t : t + 1], i) for i in active),
                       torch.zeros(1, HIDDEN))  # fmt: skip
        torch.testing.assert_close(out[0, t : t + 1], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0, 0], torch.zeros(HIDDEN))
    # The L1 penalty: lambda * mean_t sum_i f_i G_ti, f_i = E / (k T) * #{t : G_ti > 0}; no other balancing loss.
    f = 4 / (2 * 12) * (gates > 0).sum(0)
    torch.testing.assert_close(routing.router_loss, block.gate.l1_coef * (gates * f).sum(-1).mean())
    assert routing.aux_loss == 0


def test_remoe_lambda_moves_toward_the_target_sparsity_from_training_forwards_only():
    model = build("remoe", num_experts_per_tok=1)  # target sparsity 0.75
    lambdas = [b.gate.l1_coef.clone() for b in model.moe_blocks]
    assert model.update_routing_state() == {}  # nothing observed: unchanged
    model.eval()
    with torch.no_grad():
        model(**random_batch(model.config))
    assert model.update_routing_state() == {}  # evaluation observes nothing
    model.train()
    outputs = model(**random_batch(model.config, batch_size=3))
    state = model.update_routing_state()
    for block, before, counts in zip(model.moe_blocks, lambdas, outputs.expert_counts, strict=True):
        sparsity = 1 - counts.sum().item() / (counts.numel() * 4)
        assert state[block.layer_idx]["sparsity"] == pytest.approx(sparsity)
        expected = before.clone().mul_(1.2) if sparsity < 0.75 else before.clone().div_(1.2)
        assert torch.equal(block.gate.l1_coef, expected)
        assert state[block.layer_idx]["l1_coef"] == expected.item()
    # The older name still updates (every router) and reports DARE's thresholds only.
    model(**random_batch(model.config))
    assert model.update_difficulty_thresholds() == {}
    assert all(not torch.equal(b.gate.l1_coef, before) for b, before in zip(model.moe_blocks, lambdas, strict=True))


def test_remoe_gate_offset_takes_over_below_lambdas_floor_and_gives_way_above_it():
    """One controller, lambda above its floor and the gate offset b below it: too sparse at the floor raises b, too
    dense lowers b first (to 0) and only then multiplies lambda; above the floor the original rule, b untouched."""
    router = ReMoERouter(moe_config(router="remoe", remoe_initial_l1_coef=1e-3))  # target 0.5, step 0.01
    floor = router.l1_coef.item()  # 1e-3 as float32: lambda clamped to its floor compares equal to it
    assert router.stepped(floor, 0.0, 0.6) == (floor, 0.01)
    assert router.stepped(floor * 1.2, 0.0, 0.6) == (floor, 0.0)  # reaches the floor; b moves on the next step
    assert router.stepped(floor, 0.03, 0.6) == (floor, pytest.approx(0.04))
    assert router.stepped(floor, 0.03, 0.4) == (floor, pytest.approx(0.02))
    assert router.stepped(floor, 0.005, 0.4) == (floor, 0.0)
    assert router.stepped(floor, 0.0, 0.4) == (pytest.approx(1.2e-3), 0.0)
    assert router.stepped(1.0, 0.0, 0.6) == (pytest.approx(1 / 1.2), 0.0)
    original = ReMoERouter(moe_config(router="remoe", remoe_initial_l1_coef=1e-3, remoe_gate_offset_step=0.0))
    assert original.stepped(floor, 0.0, 0.6) == (floor, 0.0)
    assert "gate_offset" not in original.state_dict() and "gate_offset" in router.state_dict()


def test_remoe_checkpoint_saved_before_the_gate_offset_loads_as_the_original(tmp_path):
    """A config of moe_config_version 2 has no `remoe_gate_offset_step`: it loads with 0 (the original controller,
    no buffer), without missing weights; a current one keeps its offset."""
    model = build("remoe", remoe_gate_offset_step=0.0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["remoe_gate_offset_step"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "moe_config_version": 2}))
    loaded, info = MoEForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.config.remoe_gate_offset_step == 0.0 and loaded.moe_blocks[0].gate.gate_offset is None
    assert loaded.config.moe_config_version == 3
    current = build("remoe")
    with torch.no_grad():
        current.moe_blocks[0].gate.gate_offset.fill_(0.25)
    current.save_pretrained(tmp_path / "current")
    reloaded = MoEForCausalLM.from_pretrained(tmp_path / "current")
    assert reloaded.config.remoe_gate_offset_step == 0.01
    assert reloaded.moe_blocks[0].gate.gate_offset.item() == 0.25


def test_remoe_gate_offset_is_added_to_every_logit_before_the_relu():
    model = build("remoe")
    block = model.moe_blocks[0]
    with torch.no_grad():
        block.gate.gate_offset.fill_(0.05)
    hidden_states = torch.randn(1, 12, HIDDEN, generator=torch.Generator().manual_seed(0))
    context = RoutingContext(with_aux_loss=True)
    with routing_context(context), torch.no_grad():
        block(hidden_states)
    routing = context.routings[0]
    logits = hidden_states[0] @ block.gate.weight.T + 0.05
    torch.testing.assert_close(routing.router_logits, logits)
    assert torch.equal(routing.expert_counts, (logits > 0).sum(-1))
    assert (routing.expert_counts > (logits - 0.05 > 0).sum(-1)).any()  # the offset turned gates on
    state = model.update_routing_state()  # nothing observed: unchanged
    assert state == {} and block.gate.logged_state()["gate_offset_layer_0"] == pytest.approx(0.05)


def test_remoe_lambda_stays_float32_and_a_token_without_experts_counts_zero_in_flops():
    model = build("remoe").to(torch.bfloat16)
    assert all(b.gate.l1_coef.dtype == b.gate.gate_offset.dtype == torch.float32 for b in model.moe_blocks)
    model = build("remoe").eval()
    with torch.no_grad():
        model.moe_blocks[0].gate.weight.zero_()  # G = ReLU(0) = 0: no expert in the first layer
        outputs = model(**random_batch(model.config))
    assert outputs.expert_counts[0].max() == 0 and outputs.expert_counts[1].sum() > 0
    params = activated_parameters(model, outputs)
    avg_k = [c.float().mean().item() for c in outputs.expert_counts]
    assert params["avg_k_per_layer"] == pytest.approx(avg_k) and avg_k[0] == 0
    per_expert = params["params_per_expert"]
    assert params["expert_params"] == pytest.approx(sum(k * n for k, n in zip(avg_k, per_expert, strict=True)))


# --- DynMoE ----------------------------------------------------------------------------------------------------


def test_dynmoe_activates_exactly_the_experts_above_their_thresholds_and_at_inference_never_none():
    """At inference a token with no active expert takes its best one (in training it uses none, as the original:
    test_router_fidelity.py)."""
    config = moe_config(router="dynmoe")
    router = randomise(DynMoERouter(config)).eval()
    with torch.no_grad():
        router.expert_thresholds.copy_(torch.tensor([0.15, -0.05, 0.2, 0.1]))
    hidden_states = torch.randn(200, HIDDEN)
    routing = router(hidden_states)
    cosine = F.normalize(hidden_states, dim=-1) @ F.normalize(router.weight, dim=-1).T
    active = torch.sigmoid(cosine) > torch.sigmoid(router.expert_thresholds)
    none = ~active.any(-1)
    assert none.any() and (active.sum(-1) > 1).any()  # both cases occur
    chosen = active.clone()
    chosen[none, cosine[none].argmax(-1)] = True  # a token with none active takes its best expert
    assert torch.equal(routing.expert_counts, chosen.sum(-1)) and routing.expert_counts.min() >= 1
    for t in range(200):
        used = [i for i in routing.expert_indices[t].tolist() if i < 4]
        assert set(used) == set(chosen[t].nonzero().flatten().tolist())
        torch.testing.assert_close(routing.expert_weights[t, : len(used)], torch.full((len(used),), 1 / len(used)))
    # Straight-through: the weights are 1 / K forward, and the thresholds learn through them.
    (routing.expert_weights * torch.randn_like(routing.expert_weights)).sum().backward()
    assert router.expert_thresholds.grad.abs().sum() > 0


def test_dynmoe_regularisers():
    config = moe_config(router="dynmoe", dynmoe_diversity_coef=0.3, dynmoe_simplicity_coef=0.2,
                        dynmoe_efficiency_coef=0.1)  # fmt: skip
    router = randomise(DynMoERouter(config))
    hidden_states = torch.randn(50, HIDDEN)
    routing = router(hidden_states)
    unit = F.normalize(router.weight, dim=-1)
    diversity = torch.linalg.matrix_norm(unit @ unit.T - torch.eye(4))
    simplicity = router.weight.norm(dim=-1).mean()
    active = torch.sigmoid(routing.router_logits) > torch.sigmoid(router.expert_thresholds)
    efficiency = active.float().mean()
    expected = 0.3 * diversity + 0.2 * simplicity + 0.1 * efficiency
    torch.testing.assert_close(router.router_loss(routing), expected)


# --- MoE++ -----------------------------------------------------------------------------------------------------


# The mechanics of the experts and the residual on a one-linear gate, all chosen weights renormalised and the
# experts on h; the original's defaults (two-layer gate, zero gate, 2h) against its code: test_router_fidelity.py.
MOEPP_PLAIN = {"moepp_gate": "linear", "moepp_zero_gate": False, "moepp_scale_expert_input": False}


def test_moepp_zero_copy_and_constant_experts_and_ffn_experts_through_the_kernels_only():
    config = moe_config(router="moepp", **MOEPP_PLAIN)  # 4 FFN experts, then zero (4), copy (5), constant (6, 7)
    block = randomise(MoEBlock(config, layer_idx=0))
    with torch.no_grad():
        block.gate.weight.mul_(10.0)  # varied choices
    router = block.gate
    hidden_states = torch.randn(1, 96, HIDDEN)
    kernel_indices = []
    block.experts.register_forward_pre_hook(lambda module, args: kernel_indices.append(args[1].clone()))
    out = block(hidden_states)[0]  # outside a model: no gating residual
    h = hidden_states[0]
    probs = torch.softmax(h @ router.weight.T, dim=-1)
    top_probs, top_indices = probs.topk(2, dim=-1)
    weights = top_probs / top_probs.sum(-1, keepdim=True)

    def expert(j: int, token: torch.Tensor) -> torch.Tensor:
        if j < 4:
            return experts_output(block, token[None], j)[0]
        if j == 4:
            return torch.zeros_like(token)  # zero expert
        if j == 5:
            return token  # copy expert
        c = j - 6  # constant expert c: alpha_1 h + alpha_2 v_c, [alpha_1, alpha_2] = softmax(W_c h)
        alpha = torch.softmax(router.constant_gate[2 * c : 2 * c + 2] @ token, dim=-1)
        return alpha[0] * token + alpha[1] * router.constant_vectors[c]

    for t in range(96):
        expected = sum(weights[t, s] * expert(int(top_indices[t, s]), h[t]) for s in range(2))
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)
    assert set(top_indices.flatten().tolist()) == set(range(8))  # every kind of expert was chosen
    (indices,) = kernel_indices
    assert indices.max() <= 4  # the kernels see FFN experts and the sentinel only
    assert torch.equal(indices < 4, top_indices < 4)


def test_moepp_gating_residual_adds_the_previous_layers_logits_through_the_learned_map():
    model = build("moepp", **MOEPP_PLAIN).eval()
    perturb_router_state(model)
    inputs = {}
    for block in model.moe_blocks:
        block.register_forward_pre_hook(lambda module, args: inputs.setdefault(module.layer_idx, args[0].clone()))
    batch = random_batch(model.config)
    with torch.no_grad():
        outputs = model(input_ids=batch["input_ids"], output_router_logits=True)
    previous = None
    for block, logits in zip(model.moe_blocks, outputs.router_logits, strict=True):
        gate = block.gate
        expected = inputs[block.layer_idx].reshape(-1, HIDDEN) @ gate.weight.T
        if previous is not None:
            expected = expected + previous @ gate.residual_weight.T
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        previous = logits
    # Avg K counts FFN experts only: tokens that chose a zero-computation expert count fewer than 2.
    counts = torch.cat([c.flatten() for c in outputs.expert_counts])
    assert counts.max() <= 2 and counts.float().mean() < 2


# --- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_p_threshold", 0.0),
        ("top_p_threshold", 1.5),
        ("top_p_dynamic_loss_coef", -1e-7),
        ("remoe_initial_l1_coef", 0.0),
        ("remoe_l1_coef_multiplier", 1.0),
        ("remoe_target_sparsity", 1.0),
        ("remoe_load_balancing", "yes"),
        ("dynmoe_diversity_coef", -0.1),
        ("dynmoe_simplicity_coef", "0.01"),
        ("dynmoe_efficiency_coef", -1),
        ("moepp_zero_experts", -1),
        ("moepp_copy_experts", 1.5),
        ("moepp_constant_experts", True),
        ("moepp_gating_residual", 1),
        ("moepp_tau", -0.5),
    ],
)
def test_invalid_baseline_router_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}: .*allowed"):
        moe_config(router="top_k", **{field: value})


def test_widest_routing_of_each_baseline():
    assert [moe_config(router=r).max_experts_per_token for r in BASELINES] == [4, 4, 4, 2, 2]
    assert moe_config(router={0: "remoe", 2: "moepp"}).max_experts_per_token == 4
    config = moe_config(router="moepp", moepp_zero_experts=0, moepp_copy_experts=2, moepp_constant_experts=0)
    router = MoEPlusPlusRouter(config)  # the two-layer gate: H -> 8N -> N over N = 6 routed experts
    assert router.hidden_weight.shape == (48, HIDDEN) and router.weight.shape == (6, 48)
    assert not hasattr(router, "constant_vectors")
    assert ReMoERouter(moe_config(router="remoe", num_experts_per_tok=1)).target_sparsity == 0.75
    assert ReMoERouter(moe_config(router="remoe", remoe_target_sparsity=0.6)).target_sparsity == 0.6


def test_saved_lambda_round_trips(tmp_path):
    model = build("remoe")
    model.moe_blocks[1].gate.l1_coef.fill_(0.125)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert state["model.language_model.layers.2.mlp.gate.l1_coef"].item() == 0.125
    loaded = MoEForCausalLM.from_pretrained(tmp_path)
    assert loaded.moe_blocks[1].gate.l1_coef.item() == 0.125
    assert loaded.moe_blocks[0].gate.l1_coef.item() == pytest.approx(1e-8)
    card = (tmp_path / "README.md").read_text()
    assert "| `remoe_l1_coef_multiplier` | 1.2 |" in card and "| `remoe_target_sparsity` | None |" in card
