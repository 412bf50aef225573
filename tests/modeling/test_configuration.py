import pytest
from transformers import AutoConfig

import hf_dare  # noqa: F401  (registers the model types)
from hf_dare import MoECausalLMConfig, MoELlavaConfig
from tests.tiny_models import llava_config, moe_config, text_config


def test_defaults_follow_moe_llava_layout():
    config = moe_config("qwen2", router="dare", text_overrides={"num_hidden_layers": 6})
    assert config.moe_layers == [0, 2, 4]
    assert config.moe_intermediate_size == config.text_config.intermediate_size
    assert config.target_distribution == [0.6, 0.3, 0.09, 0.01]
    assert config.max_experts == 4
    assert config.initial_thresholds == [0.0, 1.0, 2.0]
    assert config.tail_top_a == config.num_experts


def test_fewer_experts_get_a_uniform_default_distribution():
    config = moe_config("qwen2", router="dare", num_experts=2)
    assert config.max_experts == 2
    assert config.target_distribution == [0.5, 0.5]
    assert config.initial_thresholds == [0.0]


@pytest.mark.parametrize("make", [moe_config, llava_config])
def test_round_trip_through_disk_and_auto_config(make, tmp_path):
    config = make(router="dare", target_distribution=[0.4, 0.3, 0.2, 0.1], threshold_momentum=0.5)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config)
    for field in ("router", "moe_layers", "target_distribution", "initial_thresholds", "threshold_momentum"):
        assert getattr(loaded, field) == getattr(config, field)
    assert loaded.text_config.hidden_size == config.text_config.hidden_size


def test_tie_word_embeddings_is_taken_from_the_text_config():
    config = MoECausalLMConfig(text_config=text_config("qwen2", tie_word_embeddings=True))
    assert config.tie_word_embeddings


BAD_SETTINGS = [
    ({"router": "switch"}, "router"),
    ({"num_experts": 0}, "num_experts"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"moe_layers": [0, 7]}, "moe_layers"),
    ({"moe_layers": [1, 1]}, "moe_layers"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ({"target_distribution": [0.5, 0.3, 0.1, 0.05]}, "target_distribution"),
    ({"target_distribution": [0.7, 0.3], "max_experts": 3}, "target_distribution"),
    ({"target_distribution": [-0.1, 0.6, 0.5]}, "target_distribution"),
    ({"target_distribution": [float("nan"), 0.5, 0.3, 0.2]}, "target_distribution"),
    ({"target_distribution": [0.2] * 5}, "max_experts"),
    ({"initial_thresholds": [0.0, 2.0, 1.0]}, "initial_thresholds"),
    ({"initial_thresholds": [0.0, 0.0, 1.0]}, "initial_thresholds"),
    ({"initial_thresholds": [0.0, 1.0]}, "initial_thresholds"),
    ({"threshold_momentum": 1.0}, "threshold_momentum"),
    ({"threshold_update": "sometimes"}, "threshold_update"),
    ({"difficulty_predictor_size": 0}, "difficulty_predictor_size"),
    ({"difficulty_predictor_dropout": 1.0}, "difficulty_predictor_dropout"),
    ({"difficulty_loss_coef": -1.0}, "difficulty_loss_coef"),
    ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef"),
    ({"tail_top_a": 1}, "tail_top_a"),
    ({"tail_top_a": 5}, "tail_top_a"),
]


@pytest.mark.parametrize(("settings", "field"), BAD_SETTINGS, ids=[f for _, f in BAD_SETTINGS])
def test_invalid_settings_raise_a_value_error_naming_the_field(settings, field):
    with pytest.raises(ValueError, match=rf"MoECausalLMConfig\.{field}: .*allowed: "):
        moe_config("qwen2", **settings)


@pytest.mark.parametrize(
    ("settings", "field"),
    [({"projector_type": "linear"}, "projector_type"), ({"router": "nope"}, "router")],
)
def test_invalid_llava_settings_raise_a_value_error_naming_the_field(settings, field):
    with pytest.raises(ValueError, match=rf"MoELlavaConfig\.{field}: .*allowed: "):
        llava_config(**settings)


def test_invalid_feature_strategy_is_refused():
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        MoELlavaConfig(text_config=text_config(), vision_feature_select_strategy="cls")
