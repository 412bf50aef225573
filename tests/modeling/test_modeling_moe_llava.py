import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from hf_dare import MoELlavaForConditionalGeneration, routing_statistics
from tests.tiny_models import (
    IMAGE_SIZE,
    ROUTERS,
    VISION_TOWERS,
    digit_images,
    image_tokens_per_image,
    llava_config,
    processor,
)


def build(tower: str = "clip", router: str = "top_k", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return MoELlavaForConditionalGeneration(llava_config(tower=tower, router=router, **overrides))


def image_batch(config, batch_size: int = 2, images_per_sample: int = 1, text_len: int = 6, seed: int = 0) -> dict:
    """[bos, <image> x n_tokens per image, text...] with labels on the text only."""
    generator = torch.Generator().manual_seed(seed)
    n_tokens = image_tokens_per_image() * images_per_sample
    image = torch.full((batch_size, n_tokens), config.image_token_id)
    text = torch.randint(8, config.text_config.vocab_size, (batch_size, text_len), generator=generator)
    input_ids = torch.cat([torch.full((batch_size, 1), 2), image, text], dim=1)
    labels = input_ids.clone()
    labels[:, : 1 + n_tokens] = -100
    pixel_values = torch.randn(batch_size * images_per_sample, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return {"input_ids": input_ids, "pixel_values": pixel_values, "labels": labels}


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("tower", VISION_TOWERS)
def test_forward_backward_and_loss_parts(tower, router):
    model = build(tower, router)
    batch = image_batch(model.config)
    outputs = model(**batch)
    assert torch.isfinite(outputs.loss) and torch.isfinite(outputs.ce_loss) and torch.isfinite(outputs.aux_loss)
    assert (outputs.difficulty_loss is not None) == (router == "dare")
    assert torch.equal(outputs.vision_mask, batch["input_ids"] == model.config.image_token_id)
    outputs.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def moe_state_dict_from_dense(dense_state: dict, moe_model) -> dict:
    """Every MoE layer's experts = copies of the dense FFN; all other tensors as in the dense model."""
    state = {}
    for key, value in moe_model.state_dict().items():
        if key in dense_state:
            state[key] = dense_state[key]
        elif key.endswith("mlp.experts.gate_up_proj"):
            prefix = key.removesuffix("experts.gate_up_proj")
            gate_up = torch.cat([dense_state[prefix + "gate_proj.weight"], dense_state[prefix + "up_proj.weight"]])
            state[key] = gate_up.expand_as(value).clone()
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key.removesuffix("experts.down_proj")
            state[key] = dense_state[prefix + "down_proj.weight"].expand_as(value).clone()
        else:
            state[key] = value  # router, difficulty predictor, thresholds
    return state


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("tower", VISION_TOWERS)
def test_identical_experts_give_back_the_dense_llava(tower, router):
    moe = build(tower, router).eval()
    if router == "dare":
        for block in moe.moe_blocks:
            block.gate.threshold_tracker.thresholds.copy_(torch.tensor([-1.0, 0.5, 0.9]))
    config = moe.config
    dense_config = LlavaConfig(
        text_config=config.text_config,
        vision_config=config.vision_config,
        image_token_id=config.image_token_id,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    torch.manual_seed(1)
    dense = LlavaForConditionalGeneration(dense_config).eval()
    moe.load_state_dict(moe_state_dict_from_dense(dense.state_dict(), moe), strict=True)
    batch = image_batch(config)
    outputs = moe(**batch)
    assert max(c.max().item() for c in outputs.expert_counts) > 1  # several experts really mixed
    torch.testing.assert_close(outputs.logits, dense(**batch).logits, atol=1e-5, rtol=1e-5)


def test_several_images_per_sample():
    model = build("siglip", "ltdr")
    batch = image_batch(model.config, batch_size=2, images_per_sample=2)
    outputs = model(**batch)
    assert outputs.vision_mask.sum().item() == 2 * 2 * image_tokens_per_image()
    assert torch.isfinite(outputs.loss)


def test_mismatched_images_and_image_tokens_raise():
    model = build()
    batch = image_batch(model.config, batch_size=2)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:1])


def test_routing_statistics_by_layer_and_modality():
    model = build("clip", "ltdr").eval()
    batch = image_batch(model.config, batch_size=2)
    outputs = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    for counts in outputs.expert_counts:
        text_k = counts[~outputs.vision_mask].float()
        vision_k = counts[outputs.vision_mask].float()
        assert (text_k == 2).all()  # LTDR: text tokens use top-k
        assert set(vision_k.unique().tolist()) <= {2.0, 4.0}  # vision tokens: top-k or top-a (tail)
    assert len(outputs.expert_load) == len(model.config.moe_layers)


@pytest.mark.parametrize("router", ROUTERS)
def test_generation_with_images_cached_equals_uncached(router):
    model = build("clip", router).eval()
    batch = image_batch(model.config, batch_size=1)
    kwargs = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"], "do_sample": False}
    cached = model.generate(**kwargs, max_new_tokens=8)
    uncached = model.generate(**kwargs, max_new_tokens=8, use_cache=False)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 8
    assert torch.equal(cached, uncached)


def chat(question: str, n_images: int = 1) -> list[dict]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def test_processor_round_trip_with_trust_remote_code(tmp_path):
    proc = processor("clip")
    model = build("clip")
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    prompts = [proc.apply_chat_template(chat("what digit is shown ?"), add_generation_prompt=True)] * 2
    images = digit_images(2)
    ours = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    theirs = loaded(images=images, text=prompts, return_tensors="pt", padding=True)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"])
    assert (ours["input_ids"] == model.config.image_token_id).sum(1).tolist() == [image_tokens_per_image()] * 2


def test_processor_refuses_a_mismatched_image_count():
    proc = processor("siglip")
    with pytest.raises(ValueError, match="number of <image> tokens"):
        proc(images=digit_images(2), text=[proc.apply_chat_template(chat("what digit"), add_generation_prompt=True)])


def test_batch_generation_with_left_padding_and_real_images(tmp_path):
    proc = processor("clip")
    proc.tokenizer.padding_side = "left"
    model = build("clip", "dare").eval()
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    prompts = [
        proc.apply_chat_template(chat("what digit is shown ?"), add_generation_prompt=True),
        proc.apply_chat_template(chat("sum of the two digits ?", n_images=2), add_generation_prompt=True),
    ]
    images = digit_images(3)
    batch = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    for i, (prompt, sample_images) in enumerate([(prompts[0], images[:1]), (prompts[1], images[1:])]):
        alone = proc(images=sample_images, text=[prompt], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=5, do_sample=False)
        assert torch.equal(generated[i, -5:], single[0, -5:])


def test_save_and_load_through_image_text_to_text_auto_class(tmp_path):
    model = build("siglip", "dare").eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is MoELlavaForConditionalGeneration
    batch = image_batch(model.config)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_routing_statistics_summarise_a_forward():
    model = build("clip", "ltdr").eval()
    batch = image_batch(model.config, batch_size=2)
    outputs = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    stats = routing_statistics(outputs.expert_counts, outputs.expert_load, outputs.token_mask, outputs.vision_mask)
    counts = torch.stack(outputs.expert_counts).float()
    assert stats["avg_k"] == pytest.approx(counts.mean().item())
    assert stats["avg_k_text"] == pytest.approx(2.0)
    assert stats["avg_k_vision"] == pytest.approx(counts[:, outputs.vision_mask].mean().item())
    assert stats["avg_k_per_layer"] == pytest.approx(counts.mean(dim=(1, 2)).tolist())
    assert len(stats["load_cv"]) == len(model.config.moe_layers)


def test_saved_folder_has_a_model_card_with_routing_and_stages(tmp_path):
    model = build("siglip", "dare")
    model.config.training_stages = [{"name": "stage3", "steps": 7, "trained": ["language_model"], "losses": {}}]
    model.config.routing_statistics = {"avg_k": 1.25, "avg_k_text": 1.4, "avg_k_vision": 1.1}
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "| stage3 | 7 | language_model |" in card
    assert "| avg_k | 1.25 |" in card and "| avg_k_vision | 1.1 |" in card
    assert 'AutoModelForImageTextToText.from_pretrained("path/or/repo-id", trust_remote_code=True)' in card
    assert "pipeline_tag: image-text-to-text" in card
    # A card written by someone else is kept.
    (tmp_path / "README.md").write_text("my own card")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my own card"
