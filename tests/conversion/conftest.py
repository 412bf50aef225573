"""Tiny dense checkpoints written locally for the conversion tests (nothing is downloaded)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionModel, SiglipVisionModel

from tests import tiny_models


def save_dense_lm(path, family: str = "qwen2", seed: int = 0, max_shard_size: str = "20KB", **overrides):
    """A tiny dense causal LM of `family` with the tiny tokenizer, sharded small."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_models.text_config(family, **overrides))
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tiny_models.tokenizer().save_pretrained(path)
    return model


def save_vision_tower(path, tower: str = "clip", seed: int = 1):
    """A tiny CLIP / SigLIP vision model with its image processor."""
    torch.manual_seed(seed)
    model_class = CLIPVisionModel if tower == "clip" else SiglipVisionModel
    model = model_class(tiny_models.vision_config(tower))
    model.save_pretrained(path)
    tiny_models.processor(tower).image_processor.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    """family -> folder of a tiny dense causal LM (sharded)."""
    root = tmp_path_factory.mktemp("dense")
    return {family: _saved(root / family, family) for family in tiny_models.TEXT_FAMILIES}


def _saved(path, family):
    save_dense_lm(path, family)
    return path


def leftovers(parent, name: str) -> list[str]:
    """Anything a conversion into parent/name left behind (the folder itself or a staging folder)."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))
