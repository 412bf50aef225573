"""Training stages (freezing by parameter-name patterns) and the `examples/train.py` script end to end."""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

import hf_dare
from hf_dare.training import STAGES, apply_stage
from tests.tiny_models import llava_config, moe_config, save_tiny_processor, text_config, vision_config
from tests.training.helpers import llava_records, write_llava_data

REPO = Path(__file__).resolve().parents[2]


def moe_llava():
    torch.manual_seed(0)
    return hf_dare.MoELlavaForConditionalGeneration(llava_config(router="dare"))


@pytest.mark.parametrize(
    "stage, trainable_parts",
    [
        ("stage1", {"model.multi_modal_projector"}),
        ("stage2", {"model.multi_modal_projector", "model.language_model", "lm_head"}),
        ("stage3", {"model.multi_modal_projector", "model.language_model", "lm_head"}),
    ],
)
def test_apply_stage(stage, trainable_parts):
    model = moe_llava()
    trainable = apply_stage(model, stage)
    for name, param in model.named_parameters():
        part = ".".join(name.split(".")[:2]) if name.startswith("model.") else name.split(".")[0]
        assert param.requires_grad == (part in trainable_parts), name
        assert (name in trainable) == param.requires_grad
    if stage == "stage3":
        assert any("difficulty_predictor" in name for name in trainable)


def test_apply_stage_errors():
    with pytest.raises(ValueError, match="Unknown training stage 'stage4'"):
        apply_stage(moe_llava(), "stage4")
    with pytest.raises(ValueError, match="no parameter of MoEForCausalLM matches"):
        apply_stage(hf_dare.MoEForCausalLM(moe_config()), "stage1")


def test_stage_training_arguments(tmp_path):
    args = STAGES["stage3"].training_arguments(str(tmp_path), max_steps=3, use_cpu=True)
    assert (args.learning_rate, args.predictor_learning_rate, args.max_steps) == (2e-5, 1e-4, 3)
    assert args.lr_scheduler_type == "cosine" and args.remove_unused_columns is False


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_example", REPO / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(tmp_path, model_dir, stage, **extra):
    data = write_llava_data(tmp_path / "data", llava_records(4))
    argv = ["--stage", stage, "--model", str(model_dir), "--data", str(data), "--images", str(data.parent / "images"),
            "--output", str(tmp_path / "out"), "--max-steps", "2", "--batch-size", "2",
            "--gradient-accumulation-steps", "1", "--logging-steps", "1", "--use-cpu", "--save-steps", "1000"]  # fmt: skip
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return load_train_script().main(argv)


def test_train_script_stage1_trains_only_the_projector(tmp_path):
    torch.manual_seed(0)
    config = LlavaConfig(
        text_config=text_config(),
        vision_config=vision_config(),
        image_token_id=4,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "dense")
    save_tiny_processor(tmp_path / "dense")
    run_script(tmp_path, tmp_path / "dense", "stage1")

    before, after = (
        load_file(tmp_path / "dense" / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("multi_modal_projector" in name for name in changed)
    assert (tmp_path / "out" / "processor_config.json").exists() or (tmp_path / "out" / "tokenizer.json").exists()


def test_train_script_stage3_moe(tmp_path):
    moe_llava().save_pretrained(tmp_path / "moe")
    save_tiny_processor(tmp_path / "moe")
    trainer = run_script(tmp_path, tmp_path / "moe", "stage3", learning_rate=1e-3, predictor_learning_rate=5e-3)

    predictor = {id(p) for n, p in trainer.model.named_parameters() if "difficulty_predictor" in n}
    for group in trainer.optimizer.param_groups:
        expected = 5e-3 if all(id(p) in predictor for p in group["params"]) else 1e-3
        assert group["initial_lr"] == expected
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs and "routing/avg_k_vision" in logs[-1] and "routing/threshold_layer_0_1" in logs[-1]
    before, after = (
        load_file(tmp_path / "moe" / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert not any("vision_tower" in name for name in changed)
    assert any("difficulty_predictor" in name for name in changed)
    thresholds = "model.language_model.layers.0.mlp.gate.threshold_tracker.thresholds"
    assert after[thresholds].tolist() == pytest.approx([logs[-1][f"routing/threshold_layer_0_{j}"] for j in (1, 2, 3)])
    reloaded = hf_dare.MoELlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert reloaded.model.language_model.layers[0].mlp.gate.threshold_tracker.thresholds.tolist() != [0.0, 1.0, 2.0]
