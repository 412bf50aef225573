"""Readiness for vLLM's and SGLang's transformers modeling backends, checked on CPU against saved checkpoints
(neither server runs here). Those backends load the `auto_map` classes with `trust_remote_code`, require
`_supports_attention_backend`, build `AutoModel.from_config(config)` (the base model, without the LM head),
swap in their own attention through transformers' attention interface (reached with `**kwargs` passed down
every module), and may call an MoE layer's `experts(hidden_states, top_k_index, top_k_weights)` module of 3-D
weights with a fused kernel. For multimodal models they use the processor's `image_token` and
`_get_num_multimodal_tokens`, and pass the merged `inputs_embeds` instead of `input_ids`."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hf_dare import MoEForCausalLM, MoELlavaForConditionalGeneration
from tests.tiny_models import (
    IMAGE_TOKEN,
    digit_images,
    image_tokens_per_image,
    llava_config,
    moe_config,
    processor,
    random_batch,
)

RECORDING = "hf_dare_recording"
CALLS: list[tuple[torch.nn.Module, dict]] = []


def recording_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention backend that records who called it with which kwargs, then computes SDPA."""
    CALLS.append((module, kwargs))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(RECORDING, recording_attention)
AttentionMaskInterface.register(RECORDING, sdpa_mask)


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()
    yield
    CALLS.clear()


def save_causal_lm(path, router: str = "dare"):
    torch.manual_seed(0)
    model = MoEForCausalLM(moe_config("qwen3", router=router)).eval()
    model.save_pretrained(path)
    return model


def save_llava(path, router: str = "ltdr"):
    torch.manual_seed(0)
    model = MoELlavaForConditionalGeneration(llava_config("qwen3", router=router)).eval()
    model.save_pretrained(path)
    processor().save_pretrained(path)
    return model


def llava_inputs(proc):
    prompt = f"{IMAGE_TOKEN}\nwhat digit is shown ?"
    return proc(images=digit_images(1), text=[prompt], return_tensors="pt")


def test_attention_runs_through_the_interface_with_kwargs_passed_down(tmp_path):
    reference = save_causal_lm(tmp_path / "lm")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "lm", trust_remote_code=True, attn_implementation=RECORDING
    )
    batch = random_batch(model.config)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], backend_probe="kept").logits
        expected = reference(input_ids=batch["input_ids"]).logits
    attention_modules = [layer.self_attn for layer in model.get_decoder().layers]
    assert [module for module, _ in CALLS] == attention_modules  # every decoder layer, once
    assert all(kwargs.get("backend_probe") == "kept" for _, kwargs in CALLS)
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("router", ["dare", "ltdr"])
def test_llava_base_model_is_what_automodel_builds_and_serves_the_full_models_hidden_states(tmp_path, router):
    full = save_llava(tmp_path / "llava", router=router)
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_moe.MoELlavaModel"
    base = AutoModel.from_pretrained(tmp_path / "llava", trust_remote_code=True, attn_implementation=RECORDING).eval()
    # hf_dare's own class here (registered with AutoModel); without hf_dare, the checkpoint's (test_remote_code).
    assert type(base).__name__ == "MoELlavaModel" and type(base).is_backend_compatible()
    inputs = llava_inputs(processor())
    with torch.no_grad():
        expected = full(**inputs).logits
        hidden = base(**inputs, backend_probe="kept").last_hidden_state
    torch.testing.assert_close(full.lm_head(hidden), expected)
    text_attention = {id(layer.self_attn) for layer in base.language_model.layers}
    seen = {id(module) for module, kwargs in CALLS if kwargs.get("backend_probe") == "kept"}
    assert text_attention <= seen

    # What vLLM passes: the merged embeddings, no input ids. Image tokens cannot be told apart then, which
    # changes LTDR's routing (tail vision tokens) but not DARE's or Top-K's (per-token routing).
    with torch.no_grad():
        embeds = base.get_input_embeddings()(inputs["input_ids"])
        features = torch.cat(
            base.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
        )
        mask = base.get_placeholder_mask(inputs["input_ids"], inputs_embeds=embeds, image_features=features)
        merged = embeds.masked_scatter(mask, features)
        from_embeds = full.lm_head(
            base(inputs_embeds=merged, attention_mask=inputs["attention_mask"]).last_hidden_state
        )
    if router == "dare":
        torch.testing.assert_close(from_embeds, expected)
    else:
        assert (from_embeds - expected).abs().max() > 1e-4


def test_moe_blocks_hold_experts_of_3d_weights_called_with_the_routing(tmp_path):
    save_causal_lm(tmp_path / "lm", router="dare")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", trust_remote_code=True)
    config = model.config
    num_experts, hidden, width = config.num_experts, config.text_config.hidden_size, config.moe_intermediate_size
    layers = [model.get_decoder().layers[i] for i in config.moe_layers]
    generator = torch.Generator().manual_seed(0)
    for layer in layers:
        experts = dict(layer.mlp.named_children())["experts"]
        shapes = {name: tuple(p.shape) for name, p in experts.named_parameters()}
        assert shapes == {"gate_up_proj": (num_experts, 2 * width, hidden), "down_proj": (num_experts, hidden, width)}

        tokens = torch.randn(6, hidden, generator=generator)
        index = torch.tensor([[0, 1], [3, 2], [2, 0], [1, 3], [0, 2], [3, 1]])
        weights = torch.rand(6, 2, generator=generator)
        reference = torch.zeros_like(tokens)
        for t in range(6):
            for k in range(2):
                e = index[t, k]
                gate, up = (tokens[t] @ experts.gate_up_proj[e].T).chunk(2)
                reference[t] += weights[t, k] * ((torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T)
        with torch.no_grad():
            torch.testing.assert_close(experts(tokens, index, weights), reference)

            # A variable number of experts per token: the sentinel `num_experts` (skipped) or, as fused kernels with a
            # fixed top-k need it, any valid expert with weight 0 (computed, then multiplied by 0): same output.
            sentinel = index.clone()
            sentinel[::2, 1] = num_experts
            padded_weights = weights.clone()
            padded_weights[::2, 1] = 0
            valid = torch.where(sentinel == num_experts, index[:, :1].expand_as(index), sentinel)
            torch.testing.assert_close(
                experts(tokens, sentinel, padded_weights), experts(tokens, valid, padded_weights)
            )


def test_saved_llava_config_and_processor_carry_what_the_backends_read(tmp_path):
    save_llava(tmp_path / "llava", router="dare")
    raw = json.loads((tmp_path / "llava" / "config.json").read_text())
    assert raw["auto_map"] == {
        "AutoConfig": "configuration_moe.MoELlavaConfig",
        "AutoModel": "modeling_moe.MoELlavaModel",
        "AutoModelForImageTextToText": "modeling_moe.MoELlavaForConditionalGeneration",
    }
    assert {"text_config", "vision_config", "image_token_id"} <= raw.keys()
    config = AutoConfig.from_pretrained(tmp_path / "llava", trust_remote_code=True)
    assert config.get_text_config().model_type == "qwen3" and config.vision_config.model_type == "clip_vision_model"

    proc = AutoProcessor.from_pretrained(tmp_path / "llava")
    assert proc.image_token == IMAGE_TOKEN and proc.image_token_id == config.image_token_id
    assert config.image_token_id in proc.image_token_ids
    inputs = llava_inputs(proc)
    placed = int((inputs["input_ids"] == config.image_token_id).sum())
    counts = proc._get_num_multimodal_tokens(image_sizes=[(28, 28), (64, 40)])
    assert list(counts["num_image_tokens"]) == [placed, placed] == [image_tokens_per_image()] * 2
    assert list(counts["num_image_patches"]) == [1, 1]
    # transformers >= 5.15: vLLM locates each image's placeholder from the processor's replacement offsets.
    offsets = proc(images=digit_images(1), text=[f"{IMAGE_TOKEN}\nwhat digit is shown ?"],
                   return_text_replacement_offsets=True)["text_replacement_offsets"]  # fmt: skip
    assert [entry["type"] for entry in offsets[0]] == ["image"]

    # The full model and the upcycled / imported checkpoints' config carry the same AutoModel entry.
    full = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava", trust_remote_code=True)
    full.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["auto_map"] == raw["auto_map"]


def test_causal_lm_is_a_text_only_moe_whose_base_model_matches_the_checkpoint(tmp_path):
    """What vLLM's transformers backend reads of a text-only model: `config.get_text_config()` is the config (else
    it takes the model for a multimodal one) with the decoder's and the MoE's fields at the top level; it builds
    `AutoModel.from_config(config)` after setting the attention implementation on that config, and loads each
    checkpoint tensor into `model.<name in the base model>` (lm_head beside it) when the base model prefix is
    `model`."""
    full = save_causal_lm(tmp_path / "lm", router="top_k")
    raw = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert "text_config" not in raw and raw["auto_map"]["AutoModel"] == "modeling_moe.MoEModel"
    config = AutoConfig.from_pretrained(tmp_path / "lm", trust_remote_code=True)
    assert config.get_text_config() is config
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (4, 2, 64)
    assert (config.hidden_size, config.num_attention_heads) == (full.config.hidden_size, 4)

    config._attn_implementation = RECORDING  # what the backend does before building the model
    base = AutoModel.from_config(config, trust_remote_code=True)
    assert type(base).__name__ == "MoEModel" and base.base_model_prefix == "model"
    decoder = base.get_decoder()
    assert decoder is base.language_model and len(decoder.layers) == config.num_hidden_layers
    names = {f"model.{name}" for name in base.state_dict()} | {"lm_head.weight"}
    with safe_open(tmp_path / "lm" / "model.safetensors", "pt") as stored:
        assert set(stored.keys()) == names
    # The decoder's tensor-parallel plan, under the base model's `language_model` (none of it left unprefixed).
    assert base.tp_plan and all(key.startswith("language_model.") for key in base.tp_plan)
    assert "language_model.layers.*.self_attn.q_proj" in base.tp_plan

    base.load_state_dict({k.removeprefix("model."): v for k, v in full.state_dict().items() if k.startswith("model.")})
    batch = random_batch(full.config)
    with torch.no_grad():
        hidden = base.eval()(input_ids=batch["input_ids"]).last_hidden_state
        expected = full(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(full.lm_head(hidden), expected)
    assert [module for module, _ in CALLS] == [layer.self_attn for layer in decoder.layers]
