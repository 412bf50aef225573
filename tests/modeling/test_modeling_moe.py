import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM

from hf_dare import MoEBlock, MoEForCausalLM
from tests.tiny_models import ROUTERS, TEXT_FAMILIES, moe_config, random_batch


def build(family: str = "qwen2", router: str = "top_k", seed: int = 0, **overrides) -> MoEForCausalLM:
    torch.manual_seed(seed)
    return MoEForCausalLM(moe_config(family, router=router, **overrides))


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_forward_backward_and_loss_parts(family, router):
    model = build(family, router)
    outputs = model(**random_batch(model.config))
    alpha, beta = model.config.difficulty_loss_coef, model.config.router_aux_loss_coef
    expected = outputs.ce_loss + beta * outputs.aux_loss
    if router == "dare":
        assert torch.isfinite(outputs.difficulty_loss)
        expected = expected + alpha * outputs.difficulty_loss
    else:
        assert outputs.difficulty_loss is None
    torch.testing.assert_close(outputs.loss, expected)
    assert torch.isfinite(outputs.loss) and torch.isfinite(outputs.aux_loss)
    outputs.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    router_grads = [block.gate.weight.grad for block in model.moe_blocks]
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads)


def test_moe_blocks_replace_every_other_ffn():
    model = build("qwen3")
    kinds = [type(layer.mlp).__name__ for layer in model.get_decoder().layers]
    assert kinds == ["MoEBlock", "Qwen3MLP", "MoEBlock", "Qwen3MLP"]
    assert [block.layer_idx for block in model.moe_blocks] == model.config.moe_layers
    assert type(model.model) is type(AutoModel.from_config(model.config.text_config))


@pytest.mark.parametrize("targets", ["text", "labels"])
def test_dare_target_is_the_models_own_next_token_nll(targets):
    """L_diff: (d_hat - NLL)^2 against the model's own next-token NLL, by default at every text position (the
    prompt too, whose next tokens the input ids give), with `difficulty_targets="labels"` at labelled ones only;
    CE stays on the labelled positions, and padding is never a target."""
    model = build(router="dare", difficulty_targets=targets)
    batch = random_batch(model.config)
    batch["labels"][:, :4] = -100  # a prompt: no label there
    batch["attention_mask"][1, -2:] = 0  # right padding in the second sample
    batch["labels"][1, -2:] = -100
    outputs = model(**batch)
    next_ids = batch["input_ids"][:, 1:]
    nll = F.cross_entropy(outputs.logits[:, :-1].transpose(1, 2), next_ids, reduction="none")
    labelled = batch["labels"][:, 1:] != -100
    text = batch["attention_mask"][:, 1:].bool()  # this token and the next are real (the mask is right-padded)
    positions = text if targets == "text" else labelled
    assert positions.sum() > labelled.sum() or targets == "labels"
    expected = torch.stack([F.mse_loss(d[:, :-1][positions], nll[positions]) for d in outputs.difficulty]).mean()
    torch.testing.assert_close(outputs.difficulty_loss, expected)
    torch.testing.assert_close(outputs.ce_loss, nll[labelled].mean())


@pytest.mark.parametrize("targets", ["text", "labels"])
def test_batch_without_text_labels_has_no_nan(targets):
    """No label at all: CE is 0 (not NaN); L_diff is 0 with labelled targets, and still learns from the text
    positions with the default targets."""
    model = build(router="dare", difficulty_targets=targets)
    batch = random_batch(model.config)
    batch["labels"][:] = -100
    outputs = model(**batch)
    assert outputs.ce_loss.item() == 0.0
    assert (outputs.difficulty_loss.item() == 0.0) == (targets == "labels")
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_padding_is_left_out_of_the_routing_statistics():
    model = build(router="top_k").eval()
    batch = random_batch(model.config, batch_size=2, seq_len=8)
    batch["attention_mask"][1, 5:] = 0
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.equal(outputs.token_mask, batch["attention_mask"].bool())
    routing_of_real_tokens = model(input_ids=batch["input_ids"][1:, :5])
    loads = torch.stack(outputs.expert_load)
    assert torch.allclose(loads.sum(-1), torch.ones(len(loads)))
    # The second sample's real tokens route as they do alone (causal attention).
    for padded, alone in zip(outputs.expert_counts, routing_of_real_tokens.expert_counts, strict=True):
        assert torch.equal(padded[1, :5], alone[0])


def test_training_forward_records_difficulties_for_the_thresholds():
    model = build(router="dare", threshold_momentum=0.0)
    model.train()
    before = [b.gate.threshold_tracker.thresholds.clone() for b in model.moe_blocks]
    outputs = model(**random_batch(model.config, batch_size=4, seq_len=16))
    updated = model.update_difficulty_thresholds()
    assert sorted(updated) == model.config.moe_layers
    for block, old, predictions in zip(model.moe_blocks, before, outputs.difficulty, strict=True):
        levels = torch.tensor([0.6, 0.9, 0.99])
        expected = torch.cummax(torch.quantile(predictions.detach().flatten(), levels), 0).values
        torch.testing.assert_close(block.gate.threshold_tracker.thresholds, expected)
        assert not torch.equal(old, expected)
    model.eval()
    model(**random_batch(model.config))
    assert model.update_difficulty_thresholds() == {}  # eval forwards do not move thresholds


@pytest.mark.parametrize("router", ROUTERS)
def test_greedy_generation_with_cache_equals_without(router):
    model = build("qwen2", router).eval()
    prompt = random_batch(model.config, batch_size=1, seq_len=6)["input_ids"]
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.shape[1] == 16
    assert torch.equal(cached, uncached)


def test_batched_left_padded_generation_matches_single_prompts():
    model = build("qwen3", "dare").eval()
    model.generation_config.pad_token_id = 0
    a = random_batch(model.config, batch_size=1, seq_len=7, seed=1)["input_ids"]
    b = random_batch(model.config, batch_size=1, seq_len=4, seed=2)["input_ids"]
    input_ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    attention_mask = (torch.arange(7)[None] >= torch.tensor([[0], [3]])).long()
    batched = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(batched[0, 7:], model.generate(a, max_new_tokens=6, do_sample=False)[0, 7:])
    assert torch.equal(batched[1, 7:], model.generate(b, max_new_tokens=6, do_sample=False)[0, 4:])


@pytest.mark.parametrize("router", ROUTERS)
def test_save_and_load_round_trip(router, tmp_path):
    model = build("stablelm", router).eval()
    if router == "dare":
        for block in model.moe_blocks:
            block.gate.threshold_tracker.thresholds.copy_(torch.tensor([0.2, 0.7, 1.3]))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MoEForCausalLM
    batch = random_batch(model.config)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    for ours, theirs in zip(model.moe_blocks, loaded.moe_blocks, strict=True):
        assert isinstance(theirs, MoEBlock) and theirs.layer_idx == ours.layer_idx
        if router == "dare":
            assert theirs.gate.threshold_tracker.thresholds.tolist() == pytest.approx([0.2, 0.7, 1.3])


def test_tied_embeddings_stay_tied_after_loading(tmp_path):
    model = build("qwen2", text_overrides={"tie_word_embeddings": True})
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_experts_implementations_give_the_same_model_output(implementation):
    model = build("qwen2", "dare").eval()
    batch = random_batch(model.config, batch_size=2, seq_len=10)
    reference = model(**batch).logits
    model.set_experts_implementation(implementation)
    assert model.config._experts_implementation == implementation
    torch.testing.assert_close(model(**batch).logits, reference, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_keeps_the_routing_gradients():
    batch = random_batch(moe_config("qwen2"))

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = build("qwen2", "dare", difficulty_predictor_dropout=0.0)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        model(**batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if ".gate." in n}

    plain, checkpointed = grads(False), grads(True)
    assert any("difficulty_predictor" in n for n in plain)
    for name, grad in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad)


def test_reentrant_checkpointing_is_refused():
    model = build("qwen2", "dare")
    with pytest.raises(ValueError, match="use_reentrant=True is not supported"):
        model.activation_checkpointing_enable({"use_reentrant": True})


def test_thresholds_stay_float32_in_a_bfloat16_model():
    model = build("qwen2", "dare", threshold_momentum=0.5).to(torch.bfloat16)
    tracker = model.moe_blocks[0].gate.threshold_tracker
    assert model.lm_head.weight.dtype == torch.bfloat16 and tracker.thresholds.dtype == torch.float32
    tracker.thresholds.copy_(torch.tensor([1.0, 1.1, 1.2]))
    tracker.observe(torch.full((100,), 1.07, dtype=torch.bfloat16))
    tracker.update()  # a move finer than bfloat16's spacing near 1 (0.0078) still lands
    torch.testing.assert_close(tracker.thresholds[0], torch.tensor(1.0 + 0.5 * (1.0703125 - 1.0)))


def test_observed_predictions_stay_bounded_without_updates(monkeypatch):
    from hf_dare.modeling import routers

    monkeypatch.setattr(routers, "OBSERVED_LIMIT", 1000)
    tracker = routers.ThresholdTracker([0.0, 1.0, 2.0], [0.6, 0.3, 0.09, 0.01], momentum=0.9, mode="ema")
    for _ in range(50):
        tracker.observe(torch.rand(4, 100), mask=torch.rand(4, 100) > 0.1)
    assert sum(values.numel() for values, _ in tracker._observed) <= 1000
    assert tracker.update() is not None
