"""A synthetic visual question answering task with questions of graded difficulty, drawn locally with PIL.

Each 32x32 image holds 1 to 4 shapes (circle, square, triangle) in four colours (red, green, blue, yellow), each
in its own cell of a 2x2 grid (top left, top right, bottom left, bottom right), with jittered sizes, positions
and shades on a noisy dark background. Seven question types, from reading one attribute to binding, counting
with a filter and comparing positions:

| type | question | answer | needs |
| --- | --- | --- | --- |
| `color` | what color is the shape ? (one shape) | red | one attribute |
| `shape` | what shape is it ? (one shape) | circle | one attribute |
| `count` | how many shapes are there ? | 3 | counting |
| `where` | where is the red circle ? | top left | finding an object by two attributes |
| `color_of` | what color is the square ? (its only square) | blue | binding shape to colour |
| `count_color` | how many red shapes are there ? | 2 | counting with a filter |
| `left_of` | is the red circle left of the blue square ? | yes | relation between two objects |

Written in the LLaVA conversation format (a JSON list + an image folder), like `digits_vqa_data.py`; sample ids
end with the question type (`train_12_count_color`), which the study reads back per question type. Every
image is drawn for its sample, from a seeded generator: train and test images differ.
"""

import json
import random
from pathlib import Path

import numpy as np
from digits_vqa_data import IMAGE_TOKEN, SPECIAL_TOKENS, word_level_tokenizer
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
CELLS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
QUESTION_TYPES = ("color", "shape", "count", "where", "color_of", "count_color", "left_of")
# Question mix per split (the harder types get more samples).
WEIGHTS = (10, 10, 15, 15, 15, 15, 20)


def vocabulary() -> list[str]:
    """Special tokens, then every word of the questions, answers and chat roles."""
    words = {"user", "assistant", "yes", "no", "what", "color", "is", "the", "shape", "it", "how", "many"}
    words |= {"shapes", "are", "there", "where", "left", "of", "?"} | {str(n) for n in range(5)}
    words |= set(COLORS) | set(SHAPES) | {word for cell in CELLS for word in cell.split()}
    return SPECIAL_TOKENS + sorted(words)


def shapes_tokenizer():
    """A word-level tokenizer over `vocabulary()` (as the digits task's, with this task's words)."""
    return word_level_tokenizer(vocabulary())


def draw_scene(objects: list[tuple[str, str, str]], rng: random.Random) -> Image.Image:
    """`objects`: (color, shape, cell) each; one object per cell of the 2x2 grid."""
    noise = np.random.default_rng(rng.randrange(2**32)).integers(0, 40, (IMAGE_SIZE, IMAGE_SIZE, 3))
    image = Image.fromarray(noise.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cell = IMAGE_SIZE // 2
    for color, shape, where in objects:
        row, col = CELLS[where]
        size = rng.randint(9, 13)
        left = col * cell + rng.randint(1, cell - size - 1)
        top = row * cell + rng.randint(1, cell - size - 1)
        fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLORS[color])
        box = (left, top, left + size, top + size)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(left + size / 2, top), (left, top + size), (left + size, top + size)], fill=fill)
    return image


def _scene(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    cells = rng.sample(list(CELLS), count)
    return [(rng.choice(list(COLORS)), rng.choice(SHAPES), where) for where in cells]


def _distinct(objects) -> bool:
    """No two objects share both colour and shape (so "the red circle" names one object)."""
    return len({(c, s) for c, s, _ in objects}) == len(objects)


def make_question(kind: str, rng: random.Random) -> tuple[list[tuple[str, str, str]], str, str]:
    """A scene, a question of type `kind` about it and the answer."""
    while True:
        if kind in ("color", "shape"):
            objects = _scene(rng, 1)
            color, shape, _ = objects[0]
            if kind == "color":
                return objects, "what color is the shape ?", color
            return objects, "what shape is it ?", shape
        objects = _scene(rng, rng.randint(1 if kind in ("count", "count_color") else 2, 4))
        if kind == "count":
            return objects, "how many shapes are there ?", str(len(objects))
        if kind == "count_color":
            color = rng.choice(list(COLORS))
            return objects, f"how many {color} shapes are there ?", str(sum(c == color for c, _, _ in objects))
        if not _distinct(objects):
            continue
        if kind == "where":
            color, shape, where = rng.choice(objects)
            return objects, f"where is the {color} {shape} ?", where
        if kind == "color_of":
            unique = [o for o in objects if sum(s == o[1] for _, s, _ in objects) == 1]
            if unique:
                color, shape, _ = rng.choice(unique)
                return objects, f"what color is the {shape} ?", color
            continue
        # left_of: two objects in different columns
        a, b = rng.sample(objects, 2)
        if CELLS[a[2]][1] == CELLS[b[2]][1]:
            continue
        answer = "yes" if CELLS[a[2]][1] < CELLS[b[2]][1] else "no"
        return objects, f"is the {a[0]} {a[1]} left of the {b[0]} {b[1]} ?", answer


def make_shapes_vqa(out_dir: str | Path, n_train: int = 6000, n_test: int = 500, seed: int = 0) -> dict[str, Path]:
    """Write `images/`, `train.json` and `test.json` under `out_dir`; returns their paths (as `make_digits_vqa`)."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {"images": image_dir}
    for split, size in (("train", n_train), ("test", n_test)):
        records = []
        for n in range(size):
            kind = rng.choices(QUESTION_TYPES, weights=WEIGHTS)[0]
            objects, question, answer = make_question(kind, rng)
            name = f"{split}_{n}.png"
            draw_scene(objects, rng).save(image_dir / name)
            records.append(
                {
                    "id": f"{split}_{n}_{kind}",
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
        paths[split] = out_dir / f"{split}.json"
        paths[split].write_text(json.dumps(records, indent=1))
    return paths
