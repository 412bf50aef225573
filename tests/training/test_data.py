"""LLaVA-format loading and `LlavaDataCollator`: labels only on assistant answers, image tokens and pixel
values per sample, clear errors on bad data."""

import json

import pytest
import torch

import hf_dare
from hf_dare.training import LlavaDataCollator, load_llava_dataset
from tests.tiny_models import IMAGE_TOKEN, image_tokens_per_image, llava_config, processor, tokenizer
from tests.training.helpers import llava_records, write_llava_data


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    write_llava_data(folder, llava_records(8))
    return folder


def test_load_llava_dataset(folder):
    data = load_llava_dataset(folder / "data.json", folder / "images")
    assert len(data) == 8 and data.column_names == ["id", "images", "conversations"]
    assert [len(images) for images in data["images"]] == [1, 2, 0, 1] * 2
    assert data[0]["images"][0] == str(folder / "images" / "0.png")
    assert data[3]["conversations"][2] == {"from": "human", "value": "is the digit even ?"}


def test_load_llava_dataset_errors(folder, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps([{"id": "x", "image": "missing.png", "conversations": [{"from": "human", "value": "a"}]}])
    )
    with pytest.raises(FileNotFoundError, match="'x'.*missing.png"):
        load_llava_dataset(bad, folder / "images")
    bad.write_text(json.dumps([{"id": "y", "conversations": [{"from": "robot", "value": "a"}]}]))
    with pytest.raises(ValueError, match="'y'"):
        load_llava_dataset(bad)
    bad.write_text(json.dumps({"id": "z"}))
    with pytest.raises(ValueError, match="JSON list"):
        load_llava_dataset(bad)


def answer_ids(*answers: str) -> list[int]:
    tok = tokenizer()
    ids = []
    for answer in answers:
        ids += tok(f"{answer} <|im_end|>", add_special_tokens=False)["input_ids"]
    return ids


def test_collator_labels_only_assistant_answers(folder):
    data = load_llava_dataset(folder / "data.json", folder / "images")
    samples = [data[i] for i in range(4)]  # one image, two images, none, one image + two turns
    batch = LlavaDataCollator(processor())(samples)
    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert labels.shape == input_ids.shape == mask.shape
    expected_answers = [answer_ids("0"), answer_ids("1"), answer_ids("yes"), answer_ids("2", "yes")]
    for row, expected in enumerate(expected_answers):
        supervised = labels[row] != -100
        assert labels[row][supervised].tolist() == expected
        assert torch.equal(labels[row][supervised], input_ids[row][supervised])
        assert mask[row].tolist() == sorted(mask[row].tolist(), reverse=True)  # right padding
    image_token_id = processor().tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    per_image = image_tokens_per_image()
    assert (input_ids == image_token_id).sum(1).tolist() == [per_image, 2 * per_image, 0, per_image]
    assert (labels[input_ids == image_token_id] == -100).all()
    assert batch["pixel_values"].shape == (4, 3, 28, 28)

    # The batch runs through MoE-LLaVA: every image fills its image tokens.
    model = hf_dare.MoELlavaForConditionalGeneration(llava_config(router="dare"))
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.vision_mask.sum() == 4 * per_image


def test_collator_text_only_batch_and_tokenizer(folder):
    data = load_llava_dataset(folder / "data.json", folder / "images")
    batch = LlavaDataCollator(processor())([data[2], data[6]])
    assert "pixel_values" not in batch
    same = LlavaDataCollator(tokenizer())([data[2], data[6]])
    assert torch.equal(batch["input_ids"], same["input_ids"]) and torch.equal(batch["labels"], same["labels"])
    with pytest.raises(ValueError, match="tokenizer only"):
        LlavaDataCollator(tokenizer())([data[0]])


def test_collator_rejects_image_placeholder_mismatch(folder):
    image = str(folder / "images" / "0.png")
    sample = {"id": "m", "images": [image, image], "conversations": [
        {"from": "human", "value": "<image>\nwhat digit ?"}, {"from": "gpt", "value": "0"}]}  # fmt: skip
    with pytest.raises(ValueError, match=r"'m' has 1 '<image>' placeholder\(s\) but 2 image\(s\)"):
        LlavaDataCollator(processor())([sample])


def test_collator_max_length(folder):
    data = load_llava_dataset(folder / "data.json", folder / "images")
    batch = LlavaDataCollator(processor(), max_length=12)([data[0], data[2]])
    assert batch["input_ids"].shape[1] == 12
    with pytest.raises(ValueError, match="cuts into the image tokens of sample 's1'"):
        LlavaDataCollator(processor(), max_length=5)([data[1]])
