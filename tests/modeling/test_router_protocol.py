"""A router added in test code alone (one class, registered by its definition) gets everything the shipped routers
get, without any other file changing: config validation of its settings, `hf-dare upcycle --router ... --set`,
upcycling (its tensors from its own init), its model-card lines, and the compute dial (or a clear refusal); and
the documentation of the settings is made from the routers."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM
from transformers import initialization as init

import hf_dare
from hf_dare.cli import main
from hf_dare.modeling import MoEConfigError
from hf_dare.modeling.routing import (
    ROUTERS,
    Dial,
    Router,
    load_balancing_loss,
    number_setting,
    settings_table,
    top_n_routing,
)
from tests.conversion.conftest import save_dense_lm
from tests.tiny_models import moe_config, random_batch

DOCS = Path(__file__).parents[2] / "docs" / "routers.md"


@pytest.fixture
def tempered_router():
    """Top-k over softmax(W h / T): a router of the test's own, registered while the test runs."""

    class TemperedTopKRouter(Router, name="tempered_top_k"):
        summary = "softmax(W h / T) over the experts, each token's top-k"
        uses = ("num_experts_per_tok", "norm_topk_prob")
        settings = (number_setting("tempered_temperature", 1.0, "T, the softmax temperature", 0.0, low_open=True),)
        dial = Dial("integer", "num_experts_per_tok")

        def __init__(self, config, layer_idx: int = 0):
            super().__init__(config, layer_idx)
            self.k = config.num_experts_per_tok
            self.temperature = config.tempered_temperature
            self.weight = nn.Parameter(torch.zeros(config.num_experts, config.text_config.hidden_size))

        @classmethod
        def width(cls, config) -> int:
            return config.num_experts_per_tok

        def forward(self, hidden_states, token_mask=None, vision_mask=None):
            logits = F.linear(hidden_states.float(), self.weight.float()) / self.temperature
            counts = torch.full_like(logits[:, 0], self.k, dtype=torch.long)
            return top_n_routing(logits, F.softmax(logits, dim=-1), counts, self.k, hidden_states.dtype)

        def balancing_loss(self, routing, token_mask=None, vision_mask=None):
            return load_balancing_loss(routing.router_probs, routing.expert_indices, token_mask)

        def init_weights(self, std: float) -> None:
            init.normal_(self.weight, mean=0.0, std=std)

        def set_dial(self, value) -> None:
            self.k = int(value)

    yield TemperedTopKRouter
    del ROUTERS["tempered_top_k"]


def test_its_settings_are_config_fields_with_their_checks(tempered_router):
    config = moe_config(router="tempered_top_k")
    assert config.tempered_temperature == 1.0 and config.max_experts_per_token == 2
    assert moe_config(router="tempered_top_k", tempered_temperature=0.5).tempered_temperature == 0.5
    with pytest.raises(MoEConfigError, match=r"tempered_temperature: got -1; allowed: 0 < x"):
        moe_config(router="tempered_top_k", tempered_temperature=-1)
    with pytest.raises(MoEConfigError, match="'tempered_top_k'"):  # listed among the allowed routers
        moe_config(router="nonexistent")
    model = hf_dare.MoEForCausalLM(config)
    out = model(**random_batch(config))
    assert out.loss is not None and out.aux_loss is not None and torch.stack(out.expert_counts).eq(2).all()


def test_upcycled_with_set_has_its_card_and_the_dense_logits(tempered_router, tmp_path):
    dense = save_dense_lm(tmp_path / "dense").eval()
    out = tmp_path / "moe"
    command = ["upcycle", str(tmp_path / "dense"), str(out), "--router", "tempered_top_k", "--set", "tempered_temperature=0.5"]  # fmt: skip
    assert main(command) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["router"] == "tempered_top_k" and config["tempered_temperature"] == 0.5
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(type(block.gate) is tempered_router for block in model.moe_blocks)
    batch = random_batch(model.config, seq_len=10)
    with torch.no_grad():  # identical experts, weights summing to 1: the dense model's function
        torch.testing.assert_close(model(**batch).logits, dense(**batch).logits, atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert "softmax(W h / T) over the experts" in card and "| `tempered_temperature` | 0.5 |" in card
    assert "--set tempered_temperature=0.5" in config["training_stages"][-1]["description"]


def test_its_dial_calibrates_or_a_clear_refusal(tempered_router, monkeypatch):
    torch.manual_seed(0)
    model = hf_dare.MoEForCausalLM(moe_config(router="tempered_top_k"))
    batches = [random_batch(model.config, batch_size=4, seq_len=16)]
    record = hf_dare.calibrate(model, batches, avg_k=3)
    assert record["num_experts_per_tok"] == 3 and record["achieved_avg_k"] == pytest.approx(3.0)
    monkeypatch.setattr(tempered_router, "dial", None)
    with pytest.raises(ValueError, match="the 'tempered_top_k' router has no compute dial"):
        hf_dare.calibrate(model, batches, avg_k=2)


def test_settings_documentation_is_made_from_the_routers():
    """docs/routers.md holds `settings_table()` of the shipped routers (regenerate it when a router changes)."""
    assert settings_table() in DOCS.read_text()
    for router in ROUTERS.values():
        for setting in router.settings:
            assert f"`{setting.name}`" in DOCS.read_text()
