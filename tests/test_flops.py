"""Activated parameters and FLOPs per token (hf_dare.evaluation.flops) against numbers counted by hand on tiny models."""

import pytest
import torch

from hf_dare import MoEForCausalLM, MoELlavaForConditionalGeneration
from hf_dare.evaluation.flops import activated_parameters, activated_parameters_at, flops_per_token, flops_per_token_at
from tests import tiny_models

HIDDEN, INTERMEDIATE, VOCAB, LAYERS, HEADS, KV_HEADS = 32, 64, 96, 4, 4, 2


def hand_counted_decoder_params(moe_layers: list[int], num_experts: int, router: str) -> tuple[int, int]:
    """(non-expert params without embeddings, params per expert) of a tiny Qwen2 decoder, counted by hand."""
    head_dim = HIDDEN // HEADS
    q = HIDDEN * HIDDEN + HIDDEN  # Qwen2 has q/k/v biases
    kv = 2 * (HIDDEN * KV_HEADS * head_dim + KV_HEADS * head_dim)
    o = HIDDEN * HIDDEN
    norms = 2 * HIDDEN
    dense_mlp = 3 * HIDDEN * INTERMEDIATE
    router_params = num_experts * HIDDEN
    if router == "dare":  # RMSNorm + Linear(H, 256) + Linear(256, 1)
        router_params += HIDDEN + HIDDEN * 256 + 256 + 256 + 1
    per_layer = q + kv + o + norms
    non_expert = sum(per_layer + (router_params if i in moe_layers else dense_mlp) for i in range(LAYERS))
    return non_expert + HIDDEN, 3 * HIDDEN * INTERMEDIATE  # + final norm


def causal_lm(router: str) -> MoEForCausalLM:
    config = tiny_models.moe_config(
        "qwen2",
        router=router,
        text_overrides=dict(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            vocab_size=VOCAB,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
        ),
    )
    torch.manual_seed(0)
    return MoEForCausalLM(config).eval()


@pytest.mark.parametrize("router", ["top_k", "dare"])
def test_activated_parameters_match_hand_count(router):
    model = causal_lm(router)
    assert model.config.text_config.hidden_size == HIDDEN
    batch = tiny_models.random_batch(model.config, batch_size=2, seq_len=6)
    batch["attention_mask"][1, :2] = 0  # two padding tokens: not counted
    with torch.no_grad():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    non_expert, per_expert = hand_counted_decoder_params(model.config.moe_layers, 4, router)
    real = batch["attention_mask"].bool()
    avg_k = [counts[real].float().mean().item() for counts in outputs.expert_counts]
    if router == "top_k":
        assert avg_k == [2.0, 2.0]

    result = activated_parameters(model, outputs)
    assert result["non_expert_params"] == non_expert
    assert result["params_per_expert"] == [per_expert, per_expert]
    assert result["avg_k_per_layer"] == pytest.approx(avg_k)
    assert result["activated_params"] == pytest.approx(non_expert + sum(avg_k) * per_expert)
    assert result["lm_head_params"] == VOCAB * HIDDEN
    assert result["total_params"] == sum(p.numel() for p in model.parameters())

    # FLOPs: 2 * N_A + 4 * layers * heads * head_dim * mean causal context ((6 + 1) / 2 and (4 + 1) / 2).
    flops = flops_per_token(model, outputs)
    context = ((6 + 1) / 2 + (4 + 1) / 2) / 2
    attention = 4 * LAYERS * HEADS * (HIDDEN // HEADS) * context
    assert flops["context"] == pytest.approx(context)
    assert flops["flops_per_token"] == pytest.approx(2 * result["activated_params"] + attention)
    with_head = flops_per_token(model, outputs, include_attention=False, include_lm_head=True)
    assert with_head["flops_per_token"] == pytest.approx(2 * result["activated_params"] + 2 * VOCAB * HIDDEN)
    # The same from Avg K per layer and the context, as measured over a whole evaluation set.
    at = flops_per_token_at(model, avg_k, context)
    assert at["flops_per_token"] == pytest.approx(flops["flops_per_token"])
    assert at["attention_flops"] == pytest.approx(attention)


def test_fewer_experts_give_fewer_activated_parameters():
    """DARE with every token on one expert activates exactly one expert's parameters per layer less than
    with every token on two."""
    model = causal_lm("dare")
    batch = tiny_models.random_batch(model.config, batch_size=1, seq_len=8)
    results = {}
    for experts, thresholds in ((1, [1e6, 2e6, 3e6]), (2, [-2.0, 1e6, 2e6])):
        for block in model.moe_blocks:
            block.gate.threshold_tracker.thresholds.copy_(torch.tensor(thresholds))
        with torch.no_grad():
            outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
        assert all((counts == experts).all() for counts in outputs.expert_counts)
        results[experts] = activated_parameters(model, outputs)["activated_params"]
    assert results[2] - results[1] == 2 * 3 * HIDDEN * INTERMEDIATE


def test_moe_llava_excludes_vision_tower_and_splits_modalities():
    config = tiny_models.llava_config("qwen2", "clip", router="ltdr")
    torch.manual_seed(0)
    model = MoELlavaForConditionalGeneration(config).eval()
    proc = tiny_models.processor("clip")
    inputs = proc(images=tiny_models.digit_images(1), text=["<image> what digit is shown ?"], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    text = activated_parameters(model, outputs, modality="text")
    vision = activated_parameters(model, outputs, modality="vision")
    language_model = model.model.language_model
    embeddings = language_model.get_input_embeddings().weight.numel()
    experts = sum(p.numel() for block in model.moe_blocks for p in block.experts.parameters())
    assert text["non_expert_params"] == sum(p.numel() for p in language_model.parameters()) - embeddings - experts
    assert text["avg_k_per_layer"] == pytest.approx([2.0] * len(model.moe_blocks))  # LTDR: text tokens use top-2
    vision_mask = outputs.vision_mask
    expected = [counts[vision_mask].float().mean().item() for counts in outputs.expert_counts]
    assert vision["avg_k_per_layer"] == pytest.approx(expected)


def test_bad_inputs_raise():
    model = causal_lm("top_k")
    batch = tiny_models.random_batch(model.config, batch_size=1, seq_len=4)
    with torch.no_grad():
        outputs = model(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="modality"):
        activated_parameters(model, outputs, modality="audio")
    with pytest.raises(ValueError, match="vision_mask"):
        activated_parameters(model, outputs, modality="vision")
    with pytest.raises(ValueError, match="MoE layers"):
        activated_parameters(model, outputs.__class__(expert_counts=outputs.expert_counts[:1]))


def test_activated_parameters_at_a_given_avg_k():
    model = causal_lm("dare")
    non_expert, per_expert = hand_counted_decoder_params(model.config.moe_layers, 4, "dare")
    result = activated_parameters_at(model, [1.25, 1.5])
    assert result["activated_params"] == pytest.approx(non_expert + 2.75 * per_expert)
    assert result["avg_k"] == pytest.approx(1.375)
    with pytest.raises(ValueError, match="Avg K for 1 MoE layers but the model has 2"):
        activated_parameters_at(model, [1.0])
