"""A small visual question answering task from real images that ship with packages.

scikit-learn's 8x8 handwritten digits (upscaled to 32x32) give questions with known answers:
"what digit is shown ?", "is the digit even ?", "what is the sum of the two digits ?" (two images);
scikit-image's sample photographs add "is this a digit ?" for variety. Written in the LLaVA conversation
format (a JSON list + an image folder), split into train / test with disjoint digit images.
"""

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

IMAGE_SIZE = 32
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTIONS = {
    "digit": "what digit is shown ?",
    "parity": "is the digit even ?",
    "sum": "what is the sum of the two digits ?",
    "is_digit": "is this a digit ?",
}
PHOTOS = ("camera", "coins", "astronaut", "moon", "horse", "coffee", "chelsea", "rocket")


def vocabulary() -> list[str]:
    """Every word the questions, answers and chat roles use."""
    words = {"user", "assistant", "yes", "no"} | {str(n) for n in range(19)}
    for question in QUESTIONS.values():
        words |= set(question.split())
    return SPECIAL_TOKENS + sorted(words)


def word_level_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (special tokens first; default `vocabulary()`), with `<image>` and a
    ChatML-style chat template."""
    vocab = {word: i for i, word in enumerate(vocabulary() if words is None else words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, "<|im_start|>", "<|im_end|>", "</s>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _digit_image(pixels: np.ndarray) -> Image.Image:
    gray = (pixels / 16.0 * 255).astype(np.uint8)
    scale = IMAGE_SIZE // gray.shape[0]
    return Image.fromarray(np.kron(gray, np.ones((scale, scale), dtype=np.uint8))).convert("RGB")


def _photo_crops(n: int, rng: random.Random) -> list[Image.Image]:
    import skimage.data

    photos = [np.asarray(getattr(skimage.data, name)()) for name in PHOTOS]
    crops = []
    for _ in range(n):
        photo = rng.choice(photos)
        side = rng.randint(48, min(photo.shape[:2]))
        top, left = rng.randint(0, photo.shape[0] - side), rng.randint(0, photo.shape[1] - side)
        image = Image.fromarray(photo[top : top + side, left : left + side]).convert("RGB")
        crops.append(image.resize((IMAGE_SIZE, IMAGE_SIZE)))
    return crops


def _sample(sample_id: str, images: list[str], question: str, answer: str) -> dict:
    human = "\n".join([IMAGE_TOKEN] * len(images) + [question])
    return {
        "id": sample_id,
        "image": images[0] if len(images) == 1 else images,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
    }


def make_digits_vqa(out_dir: str | Path, n_train: int = 3000, n_test: int = 400, seed: int = 0) -> dict[str, Path]:
    """Write `images/`, `train.json` and `test.json` under `out_dir`; returns their paths.

    Question mix per split: 40% digit, 25% parity, 20% sum of two digits, 15% is-this-a-digit.
    """
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    digits = load_digits()
    order = list(range(len(digits.target)))
    rng.shuffle(order)
    cut = int(0.8 * len(order))
    pools = {"train": order[:cut], "test": order[cut:]}
    for index in order:
        _digit_image(digits.images[index]).save(image_dir / f"digit_{index}.png")
    photos = _photo_crops(200, rng)
    for i, photo in enumerate(photos):
        photo.save(image_dir / f"photo_{i}.png")
    photo_pools = {"train": list(range(160)), "test": list(range(160, 200))}

    paths = {"images": image_dir}
    for split, size in (("train", n_train), ("test", n_test)):
        pool, records = pools[split], []
        for n in range(size):
            kind = rng.choices(list(QUESTIONS), weights=[40, 25, 20, 15])[0]
            a, b = rng.choice(pool), rng.choice(pool)
            label_a, label_b = int(digits.target[a]), int(digits.target[b])
            sample_id = f"{split}_{n}_{kind}"
            if kind == "digit":
                record = _sample(sample_id, [f"digit_{a}.png"], QUESTIONS[kind], str(label_a))
            elif kind == "parity":
                record = _sample(sample_id, [f"digit_{a}.png"], QUESTIONS[kind], "yes" if label_a % 2 == 0 else "no")
            elif kind == "sum":
                images = [f"digit_{a}.png", f"digit_{b}.png"]
                record = _sample(sample_id, images, QUESTIONS[kind], str(label_a + label_b))
            elif rng.random() < 0.5:
                record = _sample(sample_id, [f"digit_{a}.png"], QUESTIONS[kind], "yes")
            else:
                record = _sample(sample_id, [f"photo_{rng.choice(photo_pools[split])}.png"], QUESTIONS[kind], "no")
            records.append(record)
        paths[split] = out_dir / f"{split}.json"
        paths[split].write_text(json.dumps(records, indent=1))
    return paths
