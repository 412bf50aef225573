"""PEFT LoRA on the experts: `target_parameters` on the 3-D expert tensors, the router (and DARE's difficulty
predictor inside it) fully trained through `modules_to_save`, training with `MoETrainer`, merging, and the
merged checkpoint loading without hf_dare."""

import pytest
import torch
from safetensors.torch import save_file

from hf_dare import MoEForCausalLM
from hf_dare.modeling.routing import Router
from hf_dare.training import MoETrainer
from tests.modeling.test_remote_code import run_without_hf_dare
from tests.tiny_models import moe_config
from tests.training.helpers import as_dataset, digits_tensors, training_args

peft = pytest.importorskip("peft")

EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
# PEFT matches `modules_to_save` by suffix (`name.endswith`): `mlp.gate` is each MoE block's router (the name
# transformers' own MoE blocks use), and does not match a dense FFN's `mlp.gate_proj`.
ROUTER_MODULES = ["mlp.gate"]
RANK = 4


def build(seed: int = 0) -> MoEForCausalLM:
    torch.manual_seed(seed)
    # Every layer MoE, DARE (router + predictor + thresholds), no predictor dropout: merged and unmerged
    # training-mode forwards are comparable too.
    config = moe_config("qwen3", router="dare", moe_layers=[0, 1, 2, 3], difficulty_predictor_dropout=0.0)
    return MoEForCausalLM(config)


def lora_config(**overrides) -> "peft.LoraConfig":
    kwargs = dict(
        r=RANK,
        lora_alpha=2 * RANK,
        target_modules=[],  # only the expert parameters
        target_parameters=EXPERT_PARAMETERS,
        modules_to_save=ROUTER_MODULES,
    )
    kwargs.update(overrides)
    return peft.LoraConfig(**kwargs)


def router_name(block) -> str:
    """The router's attribute name in an MoE block (`gate`), found by type."""
    return next(name for name, module in block.named_children() if isinstance(_unwrapped(module), Router))


def _unwrapped(module):
    return getattr(module, "original_module", module)


def logits_of(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_lora_adapters_on_every_moe_layers_experts_and_trainable_routers():
    model = peft.get_peft_model(build(), lora_config())
    core = model.get_base_model()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    expected = set()
    config = core.config
    num_experts, hidden, width = config.num_experts, config.text_config.hidden_size, config.moe_intermediate_size
    assert [block.layer_idx for block in core.moe_blocks] == [0, 1, 2, 3]
    for block in core.moe_blocks:
        prefix = f"base_model.model.model.language_model.layers.{block.layer_idx}.mlp"
        # Two nested `ParamWrapper`s (one per targeted parameter) around the experts; each LoRA pair holds
        # one rank-r update per expert: A (E * r, in), B (out, E * r).
        outer = block.experts
        inner = outer.base_layer
        assert type(outer).__name__ == type(inner).__name__ == "ParamWrapper"
        shapes = {
            inner.parameter_name: (inner.lora_A["default"].weight.shape, inner.lora_B["default"].weight.shape),
            outer.parameter_name: (outer.lora_A["default"].weight.shape, outer.lora_B["default"].weight.shape),
        }
        assert shapes == {
            "down_proj": ((num_experts * RANK, width), (hidden, num_experts * RANK)),
            "gate_up_proj": ((num_experts * RANK, hidden), (2 * width, num_experts * RANK)),
        }
        for wrapper in ("experts.base_layer", "experts"):
            expected |= {f"{prefix}.{wrapper}.lora_{ab}.default.weight" for ab in "AB"}
        router = getattr(block, router_name(block))
        assert type(router).__name__ == "ModulesToSaveWrapper"
        expected |= {
            f"{prefix}.{router_name(block)}.modules_to_save.default.{name}"
            for name, _ in router.original_module.named_parameters()
        }
        assert any("difficulty_predictor" in name for name, _ in router.original_module.named_parameters())
    # Nothing else: the base expert weights, attention, embeddings and LM head stay frozen.
    assert trainable == expected


def test_lora_training_merge_and_reload_without_hf_dare(tmp_path):
    base = build()
    inputs = digits_tensors(2, start=300)["input_ids"]
    before = logits_of(base.eval(), inputs)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}

    model = peft.get_peft_model(base, lora_config())
    args = training_args(tmp_path / "run", max_steps=4, per_device_train_batch_size=4, learning_rate=2e-2)
    MoETrainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(16))).train()
    model.eval()
    core = model.get_base_model()

    # The adapters trained; the base weights under them did not.
    for block in core.moe_blocks:
        for wrapper in (block.experts, block.experts.base_layer):
            assert wrapper.lora_B["default"].weight.abs().max() > 0  # B starts at 0
    for name, param in base.named_parameters():
        if "lora_" not in name and "modules_to_save" not in name:
            key = name.replace(".base_layer", "").replace(".original_module", "")
            torch.testing.assert_close(param, base_weights[key], atol=0, rtol=0, msg=key)
    # DARE's thresholds moved (DareCallback through PEFT's wrappers), on the trained copy of each router.
    thresholds = {}
    for block in core.moe_blocks:
        tracker = getattr(block, router_name(block)).threshold_tracker
        assert tracker is getattr(block, router_name(block)).modules_to_save["default"].threshold_tracker
        assert tracker.thresholds.tolist() != core.config.initial_thresholds
        thresholds[block.layer_idx] = tracker.thresholds.clone()
    unmerged = logits_of(model, inputs)
    assert (unmerged - before).abs().max() > 1e-2
    generated = model.generate(input_ids=inputs[:, :20], max_new_tokens=4, do_sample=False)

    # The adapter alone round-trips through PEFT.
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(build(), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits_of(reloaded, inputs), unmerged, atol=1e-6, rtol=0)

    merged = model.merge_and_unload()
    assert isinstance(merged, MoEForCausalLM)
    torch.testing.assert_close(logits_of(merged, inputs), unmerged, atol=1e-5, rtol=1e-5)
    # Generation takes the per-token decode path once merged (plain experts) and the LoRA forward before.
    assert torch.equal(merged.generate(input_ids=inputs[:, :20], max_new_tokens=4, do_sample=False), generated)
    for block in merged.moe_blocks:
        assert type(block.experts).__name__ == "MoEExperts"
        torch.testing.assert_close(getattr(block, router_name(block)).threshold_tracker.thresholds,
                                   thresholds[block.layer_idx])  # fmt: skip

    merged.save_pretrained(tmp_path / "merged")
    save_file({"input_ids": inputs, "logits": logits_of(merged, inputs)}, tmp_path / "expected.safetensors")
    run_without_hf_dare(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}, trust_remote_code=True).eval()
        assert "hf_dare" not in type(model).__module__
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=1e-6, rtol=0)
        """,
        cwd=tmp_path,
    )
