import torch

from hf_dare import MoEForCausalLM
from hf_dare.training import set_threshold_update_mode
from hf_dare.training.provenance import _thresholds_by_layer
from tests.tiny_models import moe_config


def test_thresholds_are_recorded_by_layer_in_numeric_order():
    logged = {"threshold_layer_10_1": 0.5, "threshold_layer_2_2": 0.9, "threshold_layer_2_1": 0.2, "avg_k": 1.3}
    assert _thresholds_by_layer(logged) == {2: [0.2, 0.9], 10: [0.5]}


def test_per_batch_mode_is_written_to_the_config():
    torch.manual_seed(0)
    model = MoEForCausalLM(moe_config("qwen2", router="dare"))
    set_threshold_update_mode(model, per_batch=True)
    assert model.config.threshold_update == "per_batch"
    assert all(block.gate.threshold_tracker.mode == "per_batch" for block in model.moe_blocks)
    set_threshold_update_mode(model, per_batch=False)
    assert model.config.threshold_update == "ema"


def test_values_by_layer_are_in_numeric_layer_order():
    from hf_dare.training.metrics import values_by_layer

    logged = {"routing/avg_k_layer_10": 1.5, "routing/avg_k_layer_2": 1.2, "routing/avg_k_text_layer_2": 1.1}
    assert values_by_layer(logged, "routing/avg_k_layer_") == {2: 1.2, 10: 1.5}
