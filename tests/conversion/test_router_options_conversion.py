"""Router options through the conversions: `hf-dare upcycle` with a router per MoE layer (DARE on some layers,
Top-2 on the others) and DARE's difficulty proxies; `hf-dare import-moellava` keeping the original's DeepSpeed
gating settings for training."""

import json
import math
import shlex

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from hf_dare.cli import main
from hf_dare.conversion import ConversionError, import_moellava, upcycle
from hf_dare.evaluation.flops import activated_parameters
from tests import tiny_models

from .test_import_moellava import original_checkpoint


def tensor_names(folder) -> set[str]:
    names = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    return names


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_mixed_upcycle_computes_the_dense_model_and_reports_avg_k_per_layer(dense_dirs, tmp_path, capsys):
    src, out = dense_dirs["qwen2"], tmp_path / "mixed"
    status = main(
        ["upcycle", str(src), str(out), "--experts", "4", "--router", "dare", "--router-layers", "1-2",
         "--moe-layers", "0", "1", "2", "3", "--seed", "2", "--max-shard-size", "30KB"]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["router"] == {"0": "top_k", "1": "dare", "2": "dare", "3": "top_k"}
    names = tensor_names(out)
    for layer_idx in range(4):
        gate = f"model.language_model.layers.{layer_idx}.mlp.gate."
        dare = layer_idx in (1, 2)
        assert (gate + "threshold_tracker.thresholds" in names) == dare
        assert (gate + "difficulty_predictor.up.weight" in names) == dare
    card = (out / "README.md").read_text()
    assert "`top_k` on layers 0, 3; `dare` on layers 1, 2" in card

    dense = AutoModelForCausalLM.from_pretrained(src).eval()
    moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    batch = tiny_models.random_batch(moe.config, batch_size=4, seq_len=16)
    torch.testing.assert_close(logits_of(moe, batch), logits_of(dense, batch), atol=1e-5, rtol=0)

    # Thresholds at the quantiles of Pi: DARE layers now route 1..4 experts, still computing the dense model.
    tiny_models.calibrate_thresholds(moe, batch)
    torch.testing.assert_close(logits_of(moe, batch), logits_of(dense, batch), atol=1e-5, rtol=0)
    with torch.no_grad():
        outputs = moe(**batch)
    avg_k = dict(zip(moe.config.moe_layers, activated_parameters(moe, outputs)["avg_k_per_layer"], strict=True))
    assert avg_k[0] == avg_k[3] == 2.0
    for layer_idx in (1, 2):
        assert 1.0 < avg_k[layer_idx] < 2.0
        assert len(outputs.expert_counts[layer_idx].unique()) > 1

    # The command the checkpoint records makes the same routers.
    command = shlex.split(json.loads((out / "config.json").read_text())["training_stages"][-1]["description"])
    assert "--router-layers" in command and command[0] == "hf-dare"
    again = tmp_path / "again"
    assert main([*command[1:3], str(again), *command[4:]]) == 0
    assert json.loads((again / "config.json").read_text())["router"] == config["router"]


def test_router_per_layer_map_and_difficulty_proxy_from_the_cli(dense_dirs, tmp_path):
    out = tmp_path / "map"
    status = main(
        ["upcycle", str(dense_dirs["stablelm"]), str(out), "--router", "0:dare,1:ltdr,2:top_k,3:dare",
         "--moe-layers", "0,1,2,3", "--difficulty-proxy", "router_entropy"]
    )  # fmt: skip
    assert status == 0
    config = json.loads((out / "config.json").read_text())
    assert config["router"] == {"0": "dare", "1": "ltdr", "2": "top_k", "3": "dare"}
    assert config["difficulty_proxy"] == "router_entropy"
    names = tensor_names(out)
    assert "model.language_model.layers.0.mlp.gate.threshold_tracker.thresholds" in names
    assert not any("difficulty_predictor" in name for name in names)  # the entropy needs no predictor
    assert "--router 0:dare,1:ltdr,2:top_k,3:dare" in config["training_stages"][-1]["description"]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        outputs = model(**tiny_models.random_batch(model.config))
    assert len(outputs.difficulty) == 2 and outputs.difficulty_loss is None


def test_router_layers_refusals(dense_dirs, tmp_path, capsys):
    src = str(dense_dirs["qwen2"])
    assert main(["upcycle", src, str(tmp_path / "a"), "--router-layers", "1"]) == 1  # MoE layers: 0, 2
    assert "router_layers: layer 1 is not an MoE layer (moe_layers=[0, 2])" in capsys.readouterr().err
    assert main(["upcycle", src, str(tmp_path / "b"), "--router-layers", "5-9"]) == 1
    assert "router_layers: 5-9 holds no MoE layer" in capsys.readouterr().err
    assert main(["upcycle", src, str(tmp_path / "c"), "--router", "0:dare"]) == 1
    assert "MoECausalLMConfig.router: no router for MoE layers [2]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["upcycle", src, str(tmp_path / "d"), "--router", "switch"])
    with pytest.raises(ConversionError, match="router_layers needs `router` to be one router name"):
        upcycle(src, tmp_path / "e", router={0: "dare", 2: "top_k"}, router_layers=[0])
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_imported_moellava_keeps_the_deepspeed_gating_settings(tmp_path):
    src, *_ = original_checkpoint(tmp_path, "stablelm", store_vision=True)
    original = json.loads((src / "config.json").read_text())
    moe = {**original["moe"], "capacity_factor": 1.25, "eval_capacity_factor": 2.5, "min_capacity": 3}
    (src / "config.json").write_text(json.dumps({**original, "moe": moe}))
    out = import_moellava(src, tmp_path / "imported")
    config = json.loads((out / "config.json").read_text())
    expected = {
        "router": "top_k",
        "second_expert_sampling": True,
        "capacity_factor": 1.25,
        "eval_capacity_factor": 2.5,
        "min_capacity": 3,
        "aux_loss_fraction": "top1",
        "router_aux_loss_reduction": "sum",
        "norm_topk_prob": True,
    }
    assert {key: config[key] for key in expected} == expected
    card = (out / "README.md").read_text()
    for key, value in expected.items():
        assert f"| `{key}` | {value} |" in card
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    gate = model.model.language_model.layers[2].mlp.gate
    assert gate.second_expert_sampling and (gate.capacity_factor, gate.eval_capacity_factor) == (1.25, 2.5)


ROUTER_CLASS_NAMES = {
    "top_p": "TopPRouter",
    "remoe": "ReMoERouter",
    "dynmoe": "DynMoERouter",
    "moepp": "MoEPlusPlusRouter",
}


@pytest.mark.parametrize("router", list(ROUTER_CLASS_NAMES))
def test_upcycle_into_the_baseline_routers(dense_dirs, tmp_path, router, capsys):
    """Every router of the config upcycles (the router study trains them all from one upcycled start): the
    checkpoint holds exactly the model's tensors, initialised as the router's own `init_upcycled` does,
    the experts are the dense FFN, its card states the measured gap to the dense model, and it trains."""
    src, out = dense_dirs["qwen2"], tmp_path / router
    assert main(["upcycle", str(src), str(out), "--experts", "4", "--router", router, "--seed", "3"]) == 0, (
        capsys.readouterr().err
    )
    model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    dense = AutoModelForCausalLM.from_pretrained(src)
    std = model.config.text_config.initializer_range
    for layer_idx in model.config.moe_layers:
        block = model.get_decoder().layers[layer_idx].mlp
        assert type(block.gate).__name__ == ROUTER_CLASS_NAMES[router]
        dense_ffn = dense.model.layers[layer_idx].mlp
        for e in range(model.config.num_experts):
            gate_up = torch.cat([dense_ffn.gate_proj.weight, dense_ffn.up_proj.weight])
            torch.testing.assert_close(block.experts.gate_up_proj[e], gate_up, atol=0, rtol=0)
        weight = block.gate.weight.detach()
        if router == "dynmoe":  # orthonormal expert embeddings, thresholds 0
            torch.testing.assert_close(weight @ weight.T, torch.eye(weight.shape[0]), atol=1e-5, rtol=0)
            assert torch.equal(block.gate.expert_thresholds, torch.zeros(model.config.num_experts))
        elif router == "remoe":  # gates summing to 1 per token in expectation: std sqrt(2 pi) / (E sqrt(H))
            expected = math.sqrt(2 * math.pi) / (model.config.num_experts * math.sqrt(weight.shape[1]))
            assert 0.5 * expected < weight.std().item() < 1.5 * expected
        else:
            assert 0.5 * std < weight.std().item() < 1.5 * std
        if router == "remoe":
            assert block.gate.l1_coef.dtype == torch.float32
            assert block.gate.l1_coef.item() == pytest.approx(model.config.remoe_initial_l1_coef)
        if router == "moepp":  # the original's init: residual map N(0, std), constant vectors N(0, 1)
            assert 0.5 * std < block.gate.residual_weight.std().item() < 1.5 * std
            assert 0.5 < block.gate.constant_vectors.std().item() < 1.5
    first, second = (model.get_decoder().layers[i].mlp.gate.weight for i in model.config.moe_layers[:2])
    assert not torch.equal(first, second)  # each layer's router has its own random stream

    card = (out / "README.md").read_text()
    assert "Measured after upcycling, on 2 x 32 random text tokens: largest |logit difference|" in card
    again = upcycle(src, tmp_path / "again", router=router, seed=3)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

    batch = tiny_models.random_batch(model.config, batch_size=2, seq_len=8)
    if router in ("top_p", "dynmoe"):  # the active experts' weights sum to 1: the dense model's output
        torch.testing.assert_close(logits_of(model.eval(), batch), logits_of(dense.eval(), batch), atol=1e-5, rtol=0)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.get_decoder().layers[model.config.moe_layers[0]].mlp.gate.weight.grad.abs().sum() > 0


def test_cli_set_gives_any_moe_config_field_and_the_recorded_command_repeats_it(dense_dirs, tmp_path, capsys):
    src, out = str(dense_dirs["qwen2"]), tmp_path / "set"
    argv = ["upcycle", src, str(out), "--router", "remoe", "--set", "remoe_target_sparsity=0.6",
            "--set", "remoe_load_balancing=false"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["remoe_target_sparsity"] == 0.6 and config["remoe_load_balancing"] is False
    command = shlex.split(config["training_stages"][-1]["description"])
    assert "remoe_target_sparsity=0.6" in command and "remoe_load_balancing=false" in command
    assert not any(arg.startswith(("initial_thresholds=", "max_experts=")) for arg in command)  # derived: not set
    again = tmp_path / "again"
    assert main([*command[1:3], str(again), *command[4:]]) == 0
    repeated = json.loads((again / "config.json").read_text())
    assert {k: repeated[k] for k in ("router", "remoe_target_sparsity", "remoe_load_balancing")} == {
        k: config[k] for k in ("router", "remoe_target_sparsity", "remoe_load_balancing")
    }

    capsys.readouterr()
    with pytest.raises(SystemExit):  # not a field: argparse's refusal, listing the fields
        main(["upcycle", src, str(tmp_path / "bad"), "--set", "top_p=0.5"])
    assert "top_p_threshold" in capsys.readouterr().err
    bad = tmp_path / "bad_value"  # a field with a bad value: the config's own message, nothing left behind
    assert main(["upcycle", src, str(bad), "--router", "top_p", "--set", "top_p_threshold=2"]) != 0
    error = capsys.readouterr().err
    assert "top_p_threshold" in error and "usage:" not in error and not bad.exists()
