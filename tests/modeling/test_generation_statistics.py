"""Routing statistics are off in generation unless asked for, and turning them off changes no token."""

import pytest
import torch

from hf_dare import MoEForCausalLM
from tests.tiny_models import ROUTERS, moe_config, random_batch


@pytest.mark.parametrize("router", ROUTERS)
def test_generation_without_routing_statistics_gives_the_same_tokens(router):
    torch.manual_seed(0)
    model = MoEForCausalLM(moe_config("qwen3", router=router)).eval()
    prompt = random_batch(model.config, batch_size=2, seq_len=6)["input_ids"]
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(output.expert_counts))
    default = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert seen and all(counts is None for counts in seen)  # off in every generation step
    seen.clear()
    with_statistics = model.generate(prompt, max_new_tokens=8, do_sample=False, output_routing_statistics=True)
    assert all(counts is not None and len(counts) == len(model.moe_blocks) for counts in seen)
    assert torch.equal(default, with_statistics)


def test_a_plain_forward_reports_routing_statistics_unless_told_not_to():
    torch.manual_seed(0)
    model = MoEForCausalLM(moe_config(router="dare")).eval()
    batch = random_batch(model.config)
    on = model(**batch)
    off = model(**batch, output_routing_statistics=False)
    assert len(on.expert_counts) == len(on.expert_load) == len(model.moe_blocks)
    assert off.expert_counts is None and off.expert_load is None
    torch.testing.assert_close(on.logits, off.logits, atol=0, rtol=0)
