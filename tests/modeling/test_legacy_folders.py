"""Folders written with the old model types (`moe_causal_lm`, `moe_llava`, router weights under `mlp.router.`)
still load with hf_dare imported, as the current classes; saving them again writes the namespaced types."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from hf_dare import MoECausalLMConfig, MoEForCausalLM, MoELlavaConfig, MoELlavaForConditionalGeneration
from tests.tiny_models import llava_config, moe_config, random_batch


def write_old_causal_lm_layout(model: MoEForCausalLM, folder) -> None:
    """`model` saved as the causal LM was before its base model: the decoder at `model.*` (not
    `model.language_model.*`) and its config nested as `text_config`."""
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    decoder = model.config.decoder_config().to_dict()
    kept = ("model_type", "tie_word_embeddings", "auto_map", "architectures")  # the outer config's own
    config = {k: v for k, v in config.items() if k not in decoder or k in kept}
    config.pop("decoder_model_type", None)  # saved only when not the default
    (folder / "config.json").write_text(json.dumps({**config, "text_config": decoder}))
    weights = load_file(folder / "model.safetensors")
    save_file({k.replace("model.language_model.", "model."): v for k, v in weights.items()},
              folder / "model.safetensors", metadata={"format": "pt"})  # fmt: skip


def write_old_format(model, folder, old_model_type: str) -> None:
    """`model` saved as the first release wrote it: old model type, `mlp.router.` weight names (and the causal LM
    in its layout of then)."""
    if isinstance(model, MoEForCausalLM):
        write_old_causal_lm_layout(model, folder)
    else:
        model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = old_model_type
    config.pop("auto_map")
    (folder / "config.json").write_text(json.dumps(config))
    weights = load_file(folder / "model.safetensors")
    save_file({k.replace(".mlp.gate.", ".mlp.router."): v for k, v in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip


@pytest.mark.parametrize(
    "kind, old_model_type, auto_class, current",
    [
        ("causal_lm", "moe_causal_lm", AutoModelForCausalLM, MoEForCausalLM),
        ("llava", "moe_llava", AutoModelForImageTextToText, MoELlavaForConditionalGeneration),
    ],
)
def test_old_model_type_folder_loads_as_the_current_class(tmp_path, kind, old_model_type, auto_class, current):
    torch.manual_seed(0)
    config = moe_config(router="dare") if kind == "causal_lm" else llava_config(router="dare")
    model = current(config).eval()
    for block in model.moe_blocks:
        block.gate.threshold_tracker.thresholds.copy_(torch.tensor([0.1, 0.5, 0.9]))
    write_old_format(model, tmp_path / "old", old_model_type)
    assert any(".mlp.router." in key for key in load_file(tmp_path / "old" / "model.safetensors"))

    loaded, info = auto_class.from_pretrained(tmp_path / "old", output_loading_info=True)
    assert type(loaded) is current and isinstance(loaded.config, (MoECausalLMConfig, MoELlavaConfig))
    assert not info["missing_keys"] and not info["unexpected_keys"]
    input_ids = random_batch(moe_config())["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=input_ids).logits, model(input_ids=input_ids).logits)

    loaded.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model_type"] == current.config_class.model_type
    assert current.config_class.model_type.startswith("hf_dare_")
    keys = load_file(tmp_path / "new" / "model.safetensors")
    assert any(".mlp.gate.weight" in key for key in keys) and not any(".mlp.router." in key for key in keys)


def test_causal_lm_folder_of_the_earlier_layout_migrates_with_the_readmes_key_mapping(tmp_path):
    """The README's recipe for a `hf_dare_moe_causal_lm` folder saved before the base model existed."""
    torch.manual_seed(0)
    model = MoEForCausalLM(moe_config(router="dare")).eval()
    write_old_causal_lm_layout(model, tmp_path / "old")
    assert "model.layers.0.mlp.gate.weight" in load_file(tmp_path / "old" / "model.safetensors")

    key_mapping = {r"^model\.(embed_tokens|layers|norm)\.": r"model.language_model.\1."}
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "old", key_mapping=key_mapping,
                                                        output_loading_info=True)  # fmt: skip
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded.save_pretrained(tmp_path / "new", save_original_format=False)
    assert "model.language_model.layers.0.mlp.gate.weight" in load_file(tmp_path / "new" / "model.safetensors")
    again, info = AutoModelForCausalLM.from_pretrained(tmp_path / "new", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    input_ids = random_batch(model.config)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
