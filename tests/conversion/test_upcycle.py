"""Upcycling dense checkpoints: the MoE model computes what the dense one did, the output folder is a complete
checkpoint, and the dense-LLaVA build loads in transformers and upcycles too."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
)

from hf_dare import MoECausalLMConfig, MoELlavaConfig
from hf_dare.cli import main
from hf_dare.conversion import ConversionError, build_llava, upcycle
from tests import tiny_models

from .conftest import save_vision_tower


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("router", ["top_k", "dare"])
@pytest.mark.parametrize("family", tiny_models.TEXT_FAMILIES)
def test_upcycled_lm_matches_dense(dense_dirs, tmp_path, family, router):
    out = upcycle(dense_dirs[family], tmp_path / "moe", num_experts=4, router=router, seed=3, max_shard_size="30KB")
    dense = AutoModelForCausalLM.from_pretrained(dense_dirs[family])
    moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert isinstance(moe.config, MoECausalLMConfig) and moe.config.router == router
    batch = tiny_models.random_batch(moe.config, seq_len=10)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    torch.testing.assert_close(_logits(moe, **inputs), _logits(dense, **inputs), atol=1e-5, rtol=0)


def test_upcycled_folder_is_a_complete_checkpoint(dense_dirs, tmp_path):
    src = dense_dirs["qwen2"]
    out = upcycle(
        src, tmp_path / "moe", num_experts=3, router="dare", moe_layers=[1, 3], seed=0, max_shard_size="30KB"
    )
    files = {p.name for p in out.iterdir()}
    assert {"configuration_moe.py", "modeling_moe.py", "routing.py"} <= files
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"} <= files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(f for f in files if f.startswith("model-"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moe.MoEForCausalLM"
    assert config["moe_layers"] == [1, 3] and config["num_experts"] == 3
    card = (out / "README.md").read_text()
    assert str(src) in card and "trust_remote_code=True" in card and "--moe-layers 1,3" in card

    dense = AutoModelForCausalLM.from_pretrained(src).model.layers
    moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    for layer_idx in (1, 3):
        block, mlp = moe.get_decoder().layers[layer_idx].mlp, dense[layer_idx].mlp
        for e in range(3):
            torch.testing.assert_close(
                block.experts.gate_up_proj[e], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            )
            torch.testing.assert_close(block.experts.down_proj[e], mlp.down_proj.weight)
        assert block.gate.threshold_tracker.thresholds.tolist() == moe.config.initial_thresholds == [0.0, 1.0]
    torch.testing.assert_close(moe.get_decoder().layers[0].mlp.up_proj.weight, dense[0].mlp.up_proj.weight)
    # The seed decides the routers, nothing else does.
    again = upcycle(src, tmp_path / "again", num_experts=3, router="dare", moe_layers=[1, 3], seed=0)
    other = upcycle(src, tmp_path / "other", num_experts=3, router="dare", moe_layers=[1, 3], seed=1)
    router = "model.language_model.layers.1.mlp.gate.weight"
    weights = {
        p.name: AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True).state_dict()[router]
        for p in (again, other)
    }
    torch.testing.assert_close(weights["again"], moe.state_dict()[router])
    assert not torch.equal(weights["other"], weights["again"])


def test_cli_upcycle_settings(dense_dirs, tmp_path, capsys):
    out = tmp_path / "cli"
    status = main(
        ["upcycle", str(dense_dirs["stablelm"]), str(out), "--experts", "4", "--router", "dare",
         "--moe-layers", "0,1", "--target-distribution", "0.4,0.3,0.2,0.1", "--seed", "5"]
    )  # fmt: skip
    assert status == 0 and str(out) in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["moe_layers"] == [0, 1] and config["target_distribution"] == [0.4, 0.3, 0.2, 0.1]
    assert config["router"] == "dare" and config["decoder_model_type"] == "stablelm"


@pytest.fixture(scope="module")
def built_llava(dense_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    save_vision_tower(root / "clip", "clip")
    out = root / "dense-llava"
    assert main(["build", "--llm", str(dense_dirs["qwen2"]), "--vision", str(root / "clip"), str(out),
                 "--max-shard-size", "30KB"]) == 0  # fmt: skip
    return out


def _image_inputs(processor):
    image = tiny_models.digit_images(1)
    return processor(images=image, text="<image> what digit is shown ?", return_tensors="pt")


def test_built_llava_loads_in_transformers(built_llava, dense_dirs):
    model = LlavaForConditionalGeneration.from_pretrained(built_llava)
    processor = AutoProcessor.from_pretrained(built_llava)
    inputs = _image_inputs(processor)
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert image_tokens == tiny_models.image_tokens_per_image("clip") == model.config.image_seq_length
    assert _logits(model, **inputs).shape[-1] == tiny_models.VOCAB_SIZE
    dense = AutoModelForCausalLM.from_pretrained(dense_dirs["qwen2"])
    torch.testing.assert_close(model.lm_head.weight, dense.lm_head.weight)
    assert "Made from" in (built_llava / "README.md").read_text()


def test_upcycled_llava_matches_dense_llava(built_llava, tmp_path):
    out = upcycle(built_llava, tmp_path / "moe-llava", num_experts=4, router="dare", max_shard_size="30KB")
    dense = LlavaForConditionalGeneration.from_pretrained(built_llava)
    moe = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert isinstance(moe.config, MoELlavaConfig) and len(moe.moe_blocks) == 2
    processor = AutoProcessor.from_pretrained(out)
    inputs = _image_inputs(processor)
    torch.testing.assert_close(_logits(moe, **inputs), _logits(dense, **inputs), atol=1e-5, rtol=0)


def test_build_with_siglip_and_new_image_token(dense_dirs, tmp_path):
    save_vision_tower(tmp_path / "siglip", "siglip")
    out = build_llava(
        dense_dirs["qwen3"], tmp_path / "siglip", tmp_path / "llava", image_token="<img>",
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.image_token_id == tiny_models.VOCAB_SIZE  # a new token, one more embedding row
    assert model.get_input_embeddings().weight.shape[0] == tiny_models.VOCAB_SIZE + 1
    inputs = processor(images=tiny_models.digit_images(1), text="<img> what digit", return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 4  # SigLIP: no CLS token
    assert torch.isfinite(_logits(model, **inputs)).all()


@pytest.mark.parametrize(
    "tower, flag, expected_tokens",
    [
        ("siglip", None, tiny_models.image_tokens_per_image()),  # no CLS token: every patch kept
        ("clip", None, tiny_models.image_tokens_per_image()),  # CLS dropped, every patch kept
        ("siglip", "default", tiny_models.image_tokens_per_image() - 1),  # the flag overrides: first patch dropped
        ("clip", "full", tiny_models.image_tokens_per_image() + 1),  # patches + CLS
    ],
)
def test_build_picks_the_select_strategy_of_the_tower(dense_dirs, tmp_path, tower, flag, expected_tokens):
    save_vision_tower(tmp_path / tower, tower)
    out = tmp_path / "llava"
    argv = ["build", "--llm", str(dense_dirs["qwen3"]), "--vision", str(tmp_path / tower), str(out)]
    assert main(argv + (["--vision-feature-select-strategy", flag] if flag else [])) == 0
    model = LlavaForConditionalGeneration.from_pretrained(out)
    inputs = _image_inputs(AutoProcessor.from_pretrained(out))
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == expected_tokens
    assert model.config.image_seq_length == expected_tokens
    with torch.no_grad():  # LLaVA refuses image features whose count differs from the image tokens
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    assert sum(f.shape[0] for f in features) == expected_tokens


@pytest.mark.parametrize(
    "layers, pi",
    [
        (["1", "3"], ["0.6", "0.3", "0.09", "0.01"]),  # space-separated, as MoE-LLaVA's scripts write lists
        (["1,3"], ["0.6,0.3,0.09,0.01"]),
        (["1,", "3"], ["0.6,0.3", "0.09", "0.01"]),  # both at once
    ],
)
def test_cli_list_options_take_spaces_and_commas(dense_dirs, tmp_path, layers, pi):
    out = tmp_path / "cli"
    argv = ["upcycle", str(dense_dirs["qwen3"]), str(out), "--moe-layers", *layers, "--target-distribution", *pi]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["moe_layers"] == [1, 3] and config["target_distribution"] == [0.6, 0.3, 0.09, 0.01]


def test_cli_bad_target_distribution_gets_the_config_message(dense_dirs, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["upcycle", str(dense_dirs["qwen3"]), str(out), "--target-distribution", "0.5", "0.3", "0.1"]
    assert main(argv) != 0
    error = capsys.readouterr().err
    assert "target_distribution" in error and "sum to 1" in error and "usage:" not in error
    assert not out.exists()
    with pytest.raises(SystemExit):  # not a number at all: argparse's own refusal
        main(["upcycle", str(dense_dirs["qwen3"]), str(out), "--moe-layers", "one"])


def test_conversion_outputs_load_without_missing_or_unexpected_keys(dense_dirs, built_llava, tmp_path):
    lm = upcycle(dense_dirs["qwen3"], tmp_path / "lm", num_experts=4, router="dare", max_shard_size="30KB")
    _, info = AutoModelForCausalLM.from_pretrained(lm, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    llava = upcycle(built_llava, tmp_path / "llava", num_experts=4, router="ltdr", max_shard_size="30KB")
    _, info = AutoModelForImageTextToText.from_pretrained(llava, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_drop_upcycling_redraws_exactly_a_fraction_of_each_experts_channels(dense_dirs, tmp_path):
    """Drop-Upcycling: r = 0 gives exact copies (the dense logits); r = 0.5 redraws exactly half of each expert's
    intermediate channels (the same channels in gate, up and down; each expert its own), from the dense weights'
    statistics, seeded and byte-identical on a rerun."""
    src = dense_dirs["qwen2"]
    dense = AutoModelForCausalLM.from_pretrained(src).eval()
    copies = AutoModelForCausalLM.from_pretrained(upcycle(src, tmp_path / "r0", router="top_k", drop_upcycling=0))
    batch = tiny_models.random_batch(copies.config, seq_len=10)
    with torch.no_grad():
        torch.testing.assert_close(copies.eval()(**batch).logits, dense(**batch).logits, atol=1e-5, rtol=0)
    out = upcycle(src, tmp_path / "r05", router="top_k", drop_upcycling=0.5, seed=7)
    model = AutoModelForCausalLM.from_pretrained(out)
    inter = dense.config.intermediate_size
    for layer_idx in model.config.moe_layers:
        ffn = dense.model.layers[layer_idx].mlp
        experts = model.get_decoder().layers[layer_idx].mlp.experts
        subsets = []
        for e in range(model.config.num_experts):
            gate, up = experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:]
            down = experts.down_proj[e]
            redrawn = [
                (gate != ffn.gate_proj.weight).any(-1),
                (up != ffn.up_proj.weight).any(-1),
                (down != ffn.down_proj.weight).any(0),
            ]
            assert all(torch.equal(changed, redrawn[0]) for changed in redrawn)  # the same channels in all three
            assert int(redrawn[0].sum()) == round(0.5 * inter)
            subsets.append(tuple(redrawn[0].nonzero().flatten().tolist()))
            std = ffn.gate_proj.weight.float().std()
            assert 0.7 * std < gate[redrawn[0]].float().std() < 1.3 * std  # drawn from the dense statistics
        assert len(set(subsets)) == model.config.num_experts  # each expert its own channels
    again = upcycle(src, tmp_path / "again", router="top_k", drop_upcycling=0.5, seed=7)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (
        "--drop-upcycling 0.5" in json.loads((out / "config.json").read_text())["training_stages"][-1]["description"]
    )
    with pytest.raises(ConversionError, match="drop_upcycling"):
        upcycle(src, tmp_path / "bad", drop_upcycling=1.0)
