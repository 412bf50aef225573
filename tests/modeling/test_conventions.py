"""transformers' conventions: routing state scoped to a forward, MoE outputs and weight names as transformers'
MoE models have them, the loss through `loss_function` (`shift_labels`, `num_items_in_batch`)."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_dare import MoEForCausalLM, MoELlavaForConditionalGeneration
from hf_dare.modeling.routing import current_routing_context
from tests.tiny_models import llava_config, moe_config, random_batch


def build(router: str = "dare", seed: int = 0, **overrides) -> MoEForCausalLM:
    torch.manual_seed(seed)
    return MoEForCausalLM(moe_config("qwen2", router=router, difficulty_predictor_dropout=0.0, **overrides))


def tensors_on(module: torch.nn.Module) -> list[str]:
    """Attributes of `module` holding tensors that are neither parameters nor buffers (per-call state)."""
    owned = set(dict(module.named_parameters(recurse=False))) | set(dict(module.named_buffers(recurse=False)))
    return [
        name
        for name, value in vars(module).items()
        if name not in owned and (torch.is_tensor(value) or type(value).__name__ == "Routing")
    ]


def test_a_forward_that_raises_leaves_no_routing_state_behind():
    model = build("ltdr")
    failing = model.moe_blocks[-1].experts

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    handle = failing.register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        model(**random_batch(model.config))
    handle.remove()
    assert current_routing_context() is None
    assert not [(name, attr) for name, m in model.named_modules() for attr in tensors_on(m)]
    # The next forward routes from scratch: same logits as a fresh model's.
    batch = random_batch(model.config, batch_size=3, seq_len=5, seed=1)
    torch.testing.assert_close(model(**batch).logits, build("ltdr")(**batch).logits)


def test_the_inner_model_called_directly_after_a_batch_of_another_shape():
    model = build("ltdr").eval()
    model(**random_batch(model.config, batch_size=2, seq_len=12))
    inputs = random_batch(model.config, batch_size=3, seq_len=5, seed=1)["input_ids"]
    hidden = model.model(input_ids=inputs).last_hidden_state  # no routing context: no masks, no losses
    torch.testing.assert_close(model.lm_head(hidden), model(input_ids=inputs).logits)


def test_two_models_interleaved_on_two_threads_keep_their_own_routing():
    models = {"top_k": build("top_k").eval(), "dare": build("dare", seed=1).eval()}
    batches = {name: random_batch(model.config, seed=i) for i, (name, model) in enumerate(models.items())}
    expected = {name: model(**batches[name]).expert_counts for name, model in models.items()}
    results, barrier = {}, threading.Barrier(2)

    def run(name):
        outputs = []
        for _ in range(5):
            barrier.wait()  # both threads inside their forwards at the same time
            outputs.append(models[name](**batches[name]).expert_counts)
        results[name] = outputs

    threads = [threading.Thread(target=run, args=(name,)) for name in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, outputs in results.items():
        for counts in outputs:
            assert len(counts) == len(models[name].moe_blocks)
            for got, want in zip(counts, expected[name], strict=True):
                assert torch.equal(got, want)


def test_output_router_logits_one_per_moe_layer():
    model = build("dare")
    batch = random_batch(model.config)
    outputs = model(**batch, output_router_logits=True)
    assert len(outputs.router_logits) == len(model.config.moe_layers)
    for logits in outputs.router_logits:
        assert logits.shape == (batch["input_ids"].numel(), model.config.num_experts)
    assert model(**batch).router_logits is None
    # aux_loss: the mean of the layers' balancing losses; loss = CE + alpha * L_diff + beta * aux_loss.
    config = model.config
    expected = outputs.ce_loss + config.difficulty_loss_coef * outputs.difficulty_loss
    torch.testing.assert_close(outputs.loss, expected + config.router_aux_loss_coef * outputs.aux_loss)


def test_shift_labels_give_the_loss_of_the_equivalent_labels():
    model = build("dare")
    batch = random_batch(model.config)
    batch["labels"][:, :3] = -100
    reference = model(**batch)
    shift_labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    shifted = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    shift_labels=shift_labels)  # fmt: skip
    for name in ("loss", "ce_loss", "difficulty_loss"):
        torch.testing.assert_close(getattr(shifted, name), getattr(reference, name), msg=name)


def test_logits_to_keep_as_an_int_or_a_tensor():
    model = build("top_k").eval()
    input_ids = random_batch(model.config)["input_ids"]
    full = model(input_ids=input_ids).logits
    torch.testing.assert_close(model(input_ids=input_ids, logits_to_keep=1).logits, full[:, -1:])
    positions = torch.tensor([0, 3, 5])
    torch.testing.assert_close(model(input_ids=input_ids, logits_to_keep=positions).logits, full[:, positions])


def test_router_weights_are_named_like_transformers_moe_models(tmp_path):
    model = build("dare")
    keys = set(model.state_dict())
    for layer_idx in model.config.moe_layers:
        assert f"model.language_model.layers.{layer_idx}.mlp.gate.weight" in keys
        assert f"model.language_model.layers.{layer_idx}.mlp.gate.threshold_tracker.thresholds" in keys
    assert not any(".router." in key for key in keys)
    model.save_pretrained(tmp_path)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_llava_inner_model_opens_its_own_routing_context():
    torch.manual_seed(0)
    model = MoELlavaForConditionalGeneration(llava_config(router="ltdr")).eval()
    input_ids = torch.tensor([[2] + [model.config.image_token_id] * 4 + [10, 11, 12]])
    pixel_values = torch.randn(1, 3, 28, 28)
    outer = model(input_ids=input_ids, pixel_values=pixel_values)
    inner = model.model(input_ids=input_ids, pixel_values=pixel_values).last_hidden_state
    torch.testing.assert_close(model.lm_head(inner), outer.logits)  # LTDR saw the same image tokens
