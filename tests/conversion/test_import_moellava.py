"""Importing original MoE-LLaVA checkpoints: synthetic state dicts with the original's DeepSpeed key names
and config fields; the imported model must compute what the original's top-2 gating describes."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from hf_dare.cli import main
from hf_dare.conversion import ConversionError, import_moellava
from tests import tiny_models

from .conftest import leftovers, save_vision_tower

NUM_EXPERTS, MOE_LAYERS = 4, [0, 2]


class ReferenceTop2(nn.Module):
    """The original's gating at inference, written from its description: softmax over the experts, top-1 =
    argmax, top-2 = argmax over the rest, weights renormalised over the two, no token dropped."""

    def __init__(self, wg: torch.Tensor, experts: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.wg, self.experts = wg, experts

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(hidden @ self.wg.T, dim=-1)
        first = probs.argmax(-1)
        second = probs.masked_fill(F.one_hot(first, probs.shape[-1]).bool(), float("-inf")).argmax(-1)
        p1, p2 = probs.gather(-1, first[..., None]), probs.gather(-1, second[..., None])
        out = torch.zeros_like(hidden)
        for e, w in enumerate(self.experts):
            y = (F.silu(hidden @ w["gate"].T) * (hidden @ w["up"].T)) @ w["down"].T
            out += y * ((first == e)[..., None] * p1 + (second == e)[..., None] * p2) / (p1 + p2)
        return out


def original_checkpoint(root, family: str, store_vision: bool, seed: int = 0):
    """Write a synthetic original MoE-LLaVA (`family`: "stablelm" or "qwen", the first Qwen's names) and return
    (folder, reference decoder with `ReferenceTop2` MoE layers, projector tensors, vision folder)."""
    torch.manual_seed(seed)
    vision_dir = root / "clip"
    vision = save_vision_tower(vision_dir, "clip")
    text = tiny_models.text_config("stablelm" if family == "stablelm" else "qwen2", num_key_value_heads=4)
    reference = AutoModelForCausalLM.from_config(text).eval()
    hidden = text.hidden_size
    state, prefix = {}, "model." if family == "stablelm" else "transformer."
    for name, tensor in reference.state_dict().items():
        layer = name.split(".")[2] if ".layers." in name else None
        if layer is not None and int(layer) in MOE_LAYERS and ".mlp." in name:
            continue
        if family == "qwen":
            name = _first_qwen_name(name)
        state[name] = tensor.clone()
    if family == "qwen":  # fuse q / k / v into c_attn, as the first Qwen stores them
        for i in range(text.num_hidden_layers):
            attn = reference.model.layers[i].self_attn
            state[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(
                [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
            )
            state[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
                [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            )
    _add_moe_layers(state, reference, family)
    projector = {"linear_1.weight": torch.randn(hidden, 32) * 0.2, "linear_1.bias": torch.randn(hidden) * 0.1,
                 "linear_2.weight": torch.randn(hidden, hidden) * 0.2, "linear_2.bias": torch.randn(hidden) * 0.1}  # fmt: skip
    projector_key = "model.mm_projector.image_spatial_proj." if family == "stablelm" else "transformer.mm_projector."
    for key, tensor in projector.items():
        state[projector_key + key.replace("linear_1", "0").replace("linear_2", "2")] = tensor
    if store_vision:
        for key, tensor in vision.state_dict().items():
            state[f"{prefix}image_tower.image_tower.vision_model.{key}"] = tensor.clone()

    folder = root / f"moe-llava-{family}"
    folder.mkdir()
    _write_two_shards(folder, state)
    (folder / "config.json").write_text(json.dumps(_original_config(family, text, vision_dir)))
    tokenizer = tiny_models.tokenizer()
    tokenizer.save_pretrained(folder)
    return folder, reference, projector, vision, vision_dir


def _add_moe_layers(state: dict, reference: nn.Module, family: str) -> None:
    """Random DeepSpeed MoE layers (gate + experts) at `MOE_LAYERS`: their tensors under the original's names
    into `state`, the same layers as `ReferenceTop2` into `reference`."""
    hidden, inter = reference.config.hidden_size, reference.config.intermediate_size
    names = {"stablelm": ("gate_proj", "up_proj", "down_proj"), "qwen": ("w2", "w1", "c_proj")}[family]
    layer_key = "model.layers" if family == "stablelm" else "transformer.h"
    for i in MOE_LAYERS:
        wg = torch.randn(NUM_EXPERTS, hidden)
        experts = [
            {
                "gate": torch.randn(inter, hidden) * 0.2,
                "up": torch.randn(inter, hidden) * 0.2,
                "down": torch.randn(hidden, inter) * 0.2,
            }
            for _ in range(NUM_EXPERTS)
        ]
        moe = f"{layer_key}.{i}.mlp.deepspeed_moe."
        state[moe + "gate.wg.weight"] = wg
        for e, w in enumerate(experts):
            for key, original_name in zip(("gate", "up", "down"), names, strict=True):
                state[f"{moe}experts.deepspeed_experts.{e}.{original_name}.weight"] = w[key]
        reference.model.layers[i].mlp = ReferenceTop2(wg, experts)


def _write_two_shards(folder, state: dict) -> None:
    """`state` as two safetensors shards and their index, as the released checkpoints are stored."""
    names_sorted = sorted(state)
    half = len(names_sorted) // 2
    shards = {
        "model-00001-of-00002.safetensors": names_sorted[:half],
        "model-00002-of-00002.safetensors": names_sorted[half:],
    }
    for file_name, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, folder / file_name, metadata={"format": "pt"})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _first_qwen_name(name: str) -> str:
    for old, new in (("model.embed_tokens", "transformer.wte"), ("model.norm", "transformer.ln_f"),
                     ("model.layers", "transformer.h"), ("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2"),
                     ("self_attn.o_proj", "attn.c_proj"), ("mlp.gate_proj", "mlp.w2"), ("mlp.up_proj", "mlp.w1"),
                     ("mlp.down_proj", "mlp.c_proj")):  # fmt: skip
        name = name.replace(old, new)
    return name


def _original_config(family, text, vision_dir) -> dict:
    common = {
        "vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads, "max_position_embeddings": 256, "torch_dtype": "float32",
        "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": MOE_LAYERS, "ep_size": 1,
                "top_k_experts": 2, "capacity_factor": 1.5, "eval_capacity_factor": 2.0, "min_capacity": 0,
                "use_residual": False, "router_aux_loss_coef": 0.01, "num_experts": [NUM_EXPERTS] * len(MOE_LAYERS)},
        "mm_image_tower": str(vision_dir), "mm_hidden_size": 32, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "tune_mm_mlp_adapter": False,
    }  # fmt: skip
    if family == "stablelm":
        return {**common, "model_type": "moe_llava_stablelm", "architectures": ["EvalMoELLaVAStablelmForCausalLM"],
                "intermediate_size": text.intermediate_size, "num_key_value_heads": text.num_key_value_heads,
                "hidden_act": "silu", "rope_pct": 0.25, "rope_theta": 10000, "norm_eps": 1e-5,
                "use_qkv_bias": False, "tie_word_embeddings": False}  # fmt: skip
    return {**common, "model_type": "moe_llava_qwen", "architectures": ["EvalMoELLaVAQWenForCausalLM"],
            "intermediate_size": 2 * text.intermediate_size, "kv_channels": text.hidden_size // text.num_attention_heads,
            "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 256,
            "no_bias": True, "use_dynamic_ntk": True, "use_logn_attn": True}  # fmt: skip


def _reference_logits(reference, projector, vision, input_ids, pixel_values, image_token_id):
    """The original's computation: CLIP layer -2 without CLS -> Linear, GELU, Linear -> in place of the image
    tokens -> decoder with top-2 MoE layers."""
    with torch.no_grad():
        features = vision(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = F.linear(features, projector["linear_1.weight"], projector["linear_1.bias"])
        features = F.linear(F.gelu(features), projector["linear_2.weight"], projector["linear_2.bias"])
        embeds = reference.get_input_embeddings()(input_ids)
        embeds[input_ids == image_token_id] = features.reshape(-1, features.shape[-1])
        return reference(inputs_embeds=embeds).logits


@pytest.mark.parametrize("family", ["stablelm", "qwen"])
def test_import_reproduces_the_original_top2_computation(tmp_path, family):
    src, reference, projector, vision, vision_dir = original_checkpoint(
        tmp_path, family, store_vision=family == "stablelm"
    )
    out = import_moellava(src, tmp_path / "imported", max_shard_size="40KB")
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    assert model.config.router == "top_k" and model.config.moe_layers == MOE_LAYERS
    assert model.config.num_experts == NUM_EXPERTS and model.config.num_experts_per_tok == 2

    # One MoE layer against the reference gating.
    hidden = torch.randn(2, 7, model.config.text_config.hidden_size)
    with torch.no_grad():
        ours = model.model.language_model.layers[2].mlp(hidden)
        theirs = reference.model.layers[2].mlp(hidden)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    # The whole model, image included.
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(images=tiny_models.digit_images(1), text="<image> what digit is shown ?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = _reference_logits(
        reference, projector, vision, inputs["input_ids"], inputs["pixel_values"], model.config.image_token_id
    )
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)

    card = (out / "README.md").read_text()
    assert "Gumbel" in card and "capacity" in card and "trust_remote_code=True" in card


def test_import_refusals(tmp_path, capsys):
    src, *_ = original_checkpoint(tmp_path, "stablelm", store_vision=True)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "moe_llava_phi"}))
    assert main(["import-moellava", str(src), str(tmp_path / "out")]) == 1
    assert "unsupported architecture moe_llava_phi: Phi-2's experts are fc1" in capsys.readouterr().err
    (src / "config.json").write_text(json.dumps({**config, "moe": {**config["moe"], "num_experts": [4, 2]}}))
    with pytest.raises(ConversionError, match=r"num_experts=\[4, 2\]"):
        import_moellava(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**config, "moe": {**config["moe"], "moe_layers_idx": [0, 1]}}))
    with pytest.raises(
        ConversionError, match=r"missing tensor\(s\) for .*: model\.language_model\.layers\.1\.mlp\.gate"
    ):
        import_moellava(src, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []
