"""Checkpoints saved by hf-dare 0.1.0 (tests/fixtures/checkpoints_v0_1, made by make_checkpoints_v0_1.py: a causal
LM with a layer for each of that release's seven routers, and an MoE-LLaVA with DARE) load with the current code,
without missing or unexpected weights, and give the same logits and greedy tokens."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import hf_dare  # noqa: F401  (registers the model types: the current classes load the folders)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "checkpoints_v0_1"


@pytest.mark.parametrize(
    "name, auto_class", [("causal_lm", AutoModelForCausalLM), ("llava", AutoModelForImageTextToText)]
)
def test_checkpoint_of_release_0_1_loads_with_the_same_logits_and_tokens(name, auto_class):
    reference = load_file(FIXTURES / name / "reference.safetensors")
    model, info = auto_class.from_pretrained(FIXTURES / name, output_loading_info=True)
    assert "hf_dare.modeling" in type(model).__module__  # the current code, not the folder's
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    inputs = {k.removeprefix("input."): v for k, v in reference.items() if k.startswith("input.")}
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, reference["logits"], atol=1e-5, rtol=0)
    generate_inputs = {k.removeprefix("generate."): v for k, v in reference.items() if k.startswith("generate.")}
    tokens = model.generate(**generate_inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens[:, generate_inputs["input_ids"].shape[1] :], reference["tokens"])
    # The routing is not trivial: tokens use different numbers of experts.
    with torch.no_grad():
        counts = torch.stack(model(**inputs).expert_counts)
    assert len(counts.unique()) > 1
