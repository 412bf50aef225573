"""Every refusal names its reason, exits the CLI with status 1 and one line, and leaves no output behind."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from hf_dare.cli import main
from hf_dare.conversion import ConversionError, upcycle

from .conftest import leftovers, save_dense_lm


def _refused(capsys, argv: list[str], reason: str) -> None:
    assert main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-dare ")]
    assert len(lines) == 1 and lines[0].startswith(f"hf-dare {argv[0]}: error: ") and reason in lines[0], lines


def test_existing_output_is_refused_unless_overwrite(dense_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _refused(capsys, ["upcycle", str(dense_dirs["qwen2"]), str(out)], "already exists")
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["upcycle", str(dense_dirs["qwen2"]), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert leftovers(tmp_path, "out") == ["out"]


def test_pickle_weights_need_allow_pickle(tmp_path, capsys):
    src = tmp_path / "bin"
    model = save_dense_lm(src, "qwen2", max_shard_size="10GB")
    weights = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(weights, src / "pytorch_model.bin")
    _refused(capsys, ["upcycle", str(src), str(tmp_path / "out")], "pickle (.bin)")
    assert leftovers(tmp_path, "out") == []
    assert main(["upcycle", str(src), str(tmp_path / "out"), "--allow-pickle", "--router", "top_k"]) == 0
    stored = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(stored["model.language_model.embed_tokens.weight"], model.model.embed_tokens.weight)


def test_unsupported_architecture(tmp_path, capsys):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32))
    gpt2.save_pretrained(tmp_path / "gpt2")
    _refused(capsys, ["upcycle", str(tmp_path / "gpt2"), str(tmp_path / "out")], "unsupported architecture gpt2")
    assert leftovers(tmp_path, "out") == []


def _edit_tensor(folder, name, edit):
    """Apply `edit(dict)` to the shard holding `name`."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][name]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return index, shard


def in_moe_model(name: str) -> str:
    """A dense causal LM's tensor name as the MoE checkpoint names it (the decoder in `model.language_model`)."""
    return name.replace("model.", "model.language_model.", 1)


def test_missing_tensor(tmp_path, capsys):
    src = tmp_path / "src"
    save_dense_lm(src, "qwen2")
    name = "model.layers.1.mlp.up_proj.weight"  # a dense layer: copied as is
    index, _ = _edit_tensor(src, name, lambda t: t.pop(name))
    del index["weight_map"][name]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(
        capsys,
        ["upcycle", str(src), str(tmp_path / "out")],
        f"missing tensor(s) for MoEForCausalLM (qwen2): {in_moe_model(name)}",
    )
    name = "model.layers.0.mlp.gate_proj.weight"  # an MoE layer's dense FFN
    index, _ = _edit_tensor(src, name, lambda t: t.pop(name))
    del index["weight_map"][name]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=f"missing tensor {in_moe_model(name)}"):
        upcycle(src, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_shape_mismatch(tmp_path, capsys):
    src = tmp_path / "src"
    save_dense_lm(src, "stablelm")
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_tensor(src, name, lambda t: t.update({name: torch.zeros(65, 32)}))
    _refused(capsys, ["upcycle", str(src), str(tmp_path / "out")], f"{in_moe_model(name)} (65, 32) differ from")
    _edit_tensor(src, name, lambda t: t.update({name: torch.zeros(64, 32)}))
    name = "model.layers.1.mlp.up_proj.weight"  # copied as is: checked against the MoE model
    _edit_tensor(src, name, lambda t: t.update({name: torch.zeros(65, 32)}))
    with pytest.raises(
        ConversionError, match=rf"shape mismatch for {in_moe_model(name)}.*got \(65, 32\).*expects \(64, 32\)"
    ):
        upcycle(src, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_failure_while_writing_leaves_nothing(dense_dirs, tmp_path, monkeypatch):
    """An error after the first shards are written removes the staging folder and leaves OUT absent."""
    from hf_dare.conversion import writer

    calls = {"n": 0}
    original = writer._make

    def failing(p, reader):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError("disk full")
        return original(p, reader)

    monkeypatch.setattr(writer, "_make", failing)
    with pytest.raises(OSError, match="disk full"):
        upcycle(dense_dirs["qwen2"], tmp_path / "out", max_shard_size="10KB")
    assert leftovers(tmp_path, "out") == []


def test_user_mistakes_get_one_line(dense_dirs, tmp_path, capsys):
    """A bad value, a missing path, a refused input: status 1 and the reason on one line, for every command."""
    _refused(capsys, ["upcycle", str(tmp_path / "missing"), str(tmp_path / "out")], "no such directory")
    _refused(
        capsys,
        [
            "upcycle",
            str(dense_dirs["qwen2"]),
            str(tmp_path / "out"),
            "--router",
            "top_p",
            "--set",
            "top_p_threshold=2",
        ],
        "top_p_threshold: got 2",
    )
    _refused(capsys, ["report", str(tmp_path / "missing"), str(tmp_path / "data.json")], "not a saved model folder")
    _refused(
        capsys,
        ["calibrate", str(tmp_path / "missing"), str(tmp_path / "data.txt"), str(tmp_path / "cal"), "--avg-k", "1.2"],
        "not a saved model folder",
    )
    assert leftovers(tmp_path, "out") == [] and leftovers(tmp_path, "cal") == []


def test_internal_errors_keep_their_traceback(dense_dirs, tmp_path, monkeypatch, capsys):
    """An error that is not about the input (a bug) is not turned into a one-line message: it propagates."""
    import hf_dare.conversion

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(hf_dare.conversion, "upcycle", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["upcycle", str(dense_dirs["qwen2"]), str(tmp_path / "out")])
    assert "error:" not in capsys.readouterr().err
