"""Inference is batch-invariant: a sample's logits and greedy generation are the same alone and batched with
others (left-padded text, other images), for every router."""

import pytest
import torch

from hf_dare import MoEForCausalLM, MoELlavaForConditionalGeneration
from tests.tiny_models import ROUTERS, digit_images, llava_config, moe_config, processor, random_batch


def sharpen_routers(model, scale: float = 40.0) -> None:
    """Routers far from uniform (as trained ones are), so that routing decisions differ between tokens."""
    with torch.no_grad():
        for block in model.moe_blocks:
            if hasattr(block.gate, "hyper_out_weight"):  # HyperRouter: its generated router weights
                block.gate.hyper_out_weight.normal_(0.0, scale * 0.02)
            else:
                block.gate.weight.normal_(0.0, scale * 0.02)


def text_model(router: str) -> MoEForCausalLM:
    torch.manual_seed(0)
    model = MoEForCausalLM(moe_config("qwen3", router=router)).eval()
    sharpen_routers(model)
    model.generation_config.pad_token_id = 0
    return model


def llava_model(router: str) -> MoELlavaForConditionalGeneration:
    torch.manual_seed(0)
    model = MoELlavaForConditionalGeneration(llava_config(tower="clip", router=router)).eval()
    sharpen_routers(model)
    return model


def assert_same_generation(batched: torch.Tensor, alone: torch.Tensor, pad_token_id: int) -> None:
    """The new tokens of a sample generated in a batch equal those generated alone; a sample that stopped at
    EOS while the batch went on is padded after it."""
    assert torch.equal(batched[: len(alone)], alone)
    assert (batched[len(alone) :] == pad_token_id).all()


@pytest.mark.parametrize("router", ROUTERS)
def test_text_sample_is_the_same_alone_and_in_a_left_padded_batch(router):
    model = text_model(router)
    prompts = [random_batch(model.config, batch_size=1, seq_len=n, seed=s)["input_ids"] for n, s in ((7, 1), (4, 2))]
    width = max(p.shape[1] for p in prompts)
    pads = [width - p.shape[1] for p in prompts]
    input_ids = torch.cat(
        [torch.cat([torch.zeros(1, pad, dtype=torch.long), p], 1) for p, pad in zip(prompts, pads, strict=True)]
    )
    attention_mask = (torch.arange(width)[None] >= torch.tensor(pads)[:, None]).long()
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask).logits
        for i, (prompt, pad) in enumerate(zip(prompts, pads, strict=True)):
            torch.testing.assert_close(batched[i, pad:], model(input_ids=prompt).logits[0], atol=1e-4, rtol=0)
    generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert_same_generation(generated[i, width:], alone[0, prompt.shape[1] :], pad_token_id=0)


def chat(question: str, n_images: int = 1) -> list[dict]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("router", ROUTERS)
def test_image_sample_is_the_same_alone_and_batched_with_other_images(router):
    """The LTDR rule compares a vision token with the sample's own vision tokens: with the batch's as the
    reference, the first sample's logits changed with the images batched beside it."""
    proc = processor("clip")
    proc.tokenizer.padding_side = "left"
    model = llava_model(router)
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    questions = [("what digit is shown ?", 1), ("is the digit even ?", 1), ("sum of the two digits ?", 2)]
    prompts = [proc.apply_chat_template(chat(q, n), add_generation_prompt=True) for q, n in questions]
    images = digit_images(4)
    per_sample = [images[:1], images[1:2], images[2:]]
    batch = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        batched = model(**batch).logits
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    for i, (prompt, sample_images) in enumerate(zip(prompts, per_sample, strict=True)):
        alone = proc(images=sample_images, text=[prompt], return_tensors="pt")
        length = alone["input_ids"].shape[1]
        with torch.no_grad():
            torch.testing.assert_close(batched[i, width - length :], model(**alone).logits[0], atol=1e-4, rtol=0)
        single = model.generate(**alone, max_new_tokens=5, do_sample=False)
        assert_same_generation(generated[i, width:], single[0, length:], proc.tokenizer.pad_token_id)
