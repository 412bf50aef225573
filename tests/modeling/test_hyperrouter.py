"""HyperRouter: the router's weights come from a fixed random hypernetwork applied to a trainable embedding, as
giangdip2410/HyperRouter's `HyperRouterGate` computes them; only the embedding learns; upcycled, it computes the
dense model. (Batch invariance, cached generation and reloading without hf_dare: tests/modeling/test_routers.py.)"""

import peft
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import hf_dare
from hf_dare.cli import main
from hf_dare.modeling import HyperRouter
from hf_dare.training import MoETrainer
from tests.conversion.conftest import save_dense_lm
from tests.tiny_models import moe_config, random_batch
from tests.training.helpers import as_dataset, digits_tensors, training_args


def test_routing_is_the_original_gates():
    """custom_gate.py `HyperRouterGate.forward`: weights_splice = hypernet(embedding).reshape(E, -1); logits = h W^T
    + b with W = splice[:, :-1], b = splice[:, -1]; top-k of the logits; scores = softmax of the chosen logits."""
    router = HyperRouter(moe_config(router="hyperrouter"))
    torch.manual_seed(0)
    router.init_weights(0.02)
    hidden = torch.randn(100, 32)
    routing = router(hidden)
    hypernet = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4 * 32 + 4))
    with torch.no_grad():
        hypernet[0].weight.copy_(router.hyper_in_weight)
        hypernet[0].bias.copy_(router.hyper_in_bias)
        hypernet[2].weight.copy_(router.hyper_out_weight)
        hypernet[2].bias.copy_(router.hyper_out_bias)
        splice = hypernet(router.embedding)[0].reshape(4, -1)
        logits = F.linear(hidden, splice[:, :-1], splice[:, -1])
        values, indices = torch.topk(logits, 2, dim=-1)
        scores = F.softmax(values, dim=-1)
    combine = torch.zeros(100, 5).scatter_add(1, routing.expert_indices, routing.expert_weights)[:, :4]
    expected = torch.zeros(100, 4).scatter(1, indices, scores)
    torch.testing.assert_close(combine, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(routing.router_logits, logits, atol=1e-6, rtol=0)


def test_only_the_embedding_learns(tmp_path):
    torch.manual_seed(0)
    model = hf_dare.MoEForCausalLM(moe_config(router="hyperrouter"))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items() if ".gate." in name}
    assert [name for name, p in model.named_parameters() if ".gate." in name] == [
        f"model.language_model.layers.{i}.mlp.gate.embedding" for i in model.config.moe_layers
    ]
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2)
    MoETrainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(8))).train()
    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(after[name], value)
        assert changed == name.endswith("gate.embedding"), name  # the hypernetwork never moves


def test_upcycled_hyperrouter_computes_the_dense_logits(tmp_path):
    dense = save_dense_lm(tmp_path / "dense").eval()
    assert main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--router", "hyperrouter"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert all(isinstance(block.gate, HyperRouter) for block in model.moe_blocks)
    batch = random_batch(model.config, seq_len=10)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, dense(**batch).logits, atol=1e-5, rtol=0)
    assert "computes exactly what the dense one did" in (tmp_path / "moe" / "README.md").read_text()


def test_peft_lora_on_the_experts_with_the_router_trained(tmp_path):
    """PEFT: LoRA on the experts, the router (its embedding) trained as `modules_to_save`; its hypernetwork stays
    as it was, and the merged model gives the adapted model's logits."""
    torch.manual_seed(0)
    base = hf_dare.MoEForCausalLM(moe_config("qwen3", router="hyperrouter"))
    hypernetwork = {k: v.clone() for k, v in base.state_dict().items() if ".hyper_" in k}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"], modules_to_save=["mlp.gate"])  # fmt: skip
    model = peft.get_peft_model(base, config)
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=4, learning_rate=2e-2)
    MoETrainer(model=model, args=args, train_dataset=as_dataset(digits_tensors(8))).train()
    model.eval()
    inputs = digits_tensors(2, start=100)["input_ids"]
    with torch.no_grad():
        adapted = model(input_ids=inputs).logits
    merged = model.merge_and_unload()
    for name, value in merged.state_dict().items():
        if ".hyper_" in name:
            assert torch.equal(value, hypernetwork[name]), name
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=inputs).logits, adapted, atol=1e-5, rtol=1e-5)
