"""A small visual question answering task from real images that ship with packages.

scikit-learn's 8x8 handwritten digits (upscaled to 32x32) give questions with known answers:
"what digit is shown ?", "is the digit even ?", "what is the sum of the two digits ?" (two images);
scikit-image's sample photographs add "is this a digit ?" for variety. Written in the LLaVA conversation
format (a JSON list + an image folder), split into train / test with disjoint digit images.

`make_long_tailed_digits_vqa` subsamples it to long-tailed answer frequencies (CIFAR-100-LT's profile, imbalance
ratio 100) with a test set balanced over the answers.
"""

import json
import math
import random
from collections import defaultdict
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


def answer_of(record: dict) -> str:
    """The reference answer of a digits-VQA record (its last turn)."""
    return record["conversations"][-1]["value"]


def long_tailed_counts(
    available: dict[str, int], imbalance_ratio: float = 100.0, n_max: int | None = None
) -> dict[str, int]:
    """Train samples per answer, CIFAR-100-LT's profile: the answer of rank i (by `available` count, most first;
    ties by name) keeps n_i = int(n_max * imbalance_ratio ** (-i / (C - 1))) samples (at least 1), so the most
    frequent answer has `imbalance_ratio` times the samples of the rarest. `n_max` is capped by what `available`
    allows at every rank."""
    order = sorted(available, key=lambda answer: (-available[answer], answer))
    share = [
        (1 / imbalance_ratio) ** (rank / (len(order) - 1)) for rank in range(len(order))
    ]  # as CIFAR-100-LT's code
    feasible = math.floor(min(available[answer] / share[rank] for rank, answer in enumerate(order)))
    n_max = feasible if n_max is None else min(n_max, feasible)
    return {answer: max(1, int(n_max * share[rank])) for rank, answer in enumerate(order)}


def make_long_tailed_digits_vqa(
    out_dir: str | Path,
    n_max: int = 1000,
    imbalance_ratio: float = 100.0,
    test_per_answer: int = 20,
    seed: int = 0,
) -> dict[str, Path]:
    """A long-tailed digits VQA: `make_digits_vqa` pools (under `out_dir/pool`, large enough for the rarest answers)
    subsampled so that answer frequencies follow CIFAR-100-LT's profile (`long_tailed_counts`: the most frequent of
    the 21 answers 0..18 / yes / no has `n_max` train samples, the rarest `n_max / imbalance_ratio`); answers ranked
    by their frequency in the pool (yes / no, then single digits, then the sums above 9: the rare answers are the
    large sums). The test set is balanced: `test_per_answer` samples of every answer (fewer where the test pool has
    fewer). Answer groups by train rank: `head` the most frequent third, `medium` the next, `tail` the rarest third.

    Writes `train.json`, `test.json` and `answers.json` ({answer: {"train", "test", "group"}}) under `out_dir`;
    returns their paths and `images`.
    """
    out_dir = Path(out_dir)
    # The rarest answers (sums 0 and 18) are ~0.2% of the questions: pools large enough for every rank's count.
    pool = make_digits_vqa(
        out_dir / "pool", n_train=max(30 * n_max, 2000), n_test=max(1000 * test_per_answer, 2000), seed=seed
    )
    by_answer = {}
    for split in ("train", "test"):
        by_answer[split] = defaultdict(list)
        for record in json.loads(pool[split].read_text()):
            by_answer[split][answer_of(record)].append(record)
    counts = long_tailed_counts({a: len(r) for a, r in by_answer["train"].items()}, imbalance_ratio, n_max)
    order = list(counts)  # most frequent first
    rng = random.Random(seed)
    train = [record for answer in order for record in rng.sample(by_answer["train"][answer], counts[answer])]
    rng.shuffle(train)
    test = []
    for answer in order:
        records = by_answer["test"].get(answer, [])
        test += rng.sample(records, min(test_per_answer, len(records)))
    third = math.ceil(len(order) / 3)
    answers = {
        answer: {
            "train": counts[answer],
            "test": sum(answer_of(record) == answer for record in test),
            "group": ("head", "medium", "tail")[rank // third],
        }
        for rank, answer in enumerate(order)
    }
    paths = {"images": pool["images"]}
    for name, content in (("train", train), ("test", test), ("answers", answers)):
        paths[name] = out_dir / f"{name}.json"
        paths[name].write_text(json.dumps(content, indent=1))
    return paths
