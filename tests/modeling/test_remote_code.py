"""Saved folders load with `trust_remote_code=True` in a Python where hf_dare cannot be imported."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

from hf_dare import MoEForCausalLM, MoELlavaForConditionalGeneration
from tests.tiny_models import digit_images, llava_config, moe_config, processor, random_batch

REPO_ROOT = str(Path(__file__).resolve().parents[2])


def run_without_hf_dare(code: str, cwd: Path) -> None:
    """Run `code` in a fresh interpreter where `import hf_dare` fails and the repo is not on sys.path."""
    prelude = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_dare"] = None
        sys.path = [p for p in sys.path if p not in ("", {REPO_ROOT!r})]
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_causal_lm_loads_and_computes_the_same_logits_without_hf_dare(tmp_path):
    torch.manual_seed(0)
    model = MoEForCausalLM(moe_config("qwen3", router="dare")).eval()
    for block in model.moe_blocks:
        block.gate.threshold_tracker.thresholds.copy_(torch.tensor([0.1, 0.4, 1.7]))
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_moe.MoECausalLMConfig",
        "AutoModel": "modeling_moe.MoEModel",
        "AutoModelForCausalLM": "modeling_moe.MoEForCausalLM",
    }
    # A text-only model's config: the decoder's fields at the top level, no nested text config.
    assert "text_config" not in config and config["decoder_model_type"] == "qwen3"
    assert config["hidden_size"] == model.config.hidden_size
    assert {"configuration_moe.py", "modeling_moe.py", "routing.py"} <= {p.name for p in model_dir.iterdir()}
    batch = random_batch(model.config)
    with torch.no_grad():
        save_file(
            {"input_ids": batch["input_ids"], "logits": model(**batch).logits}, tmp_path / "expected.safetensors"
        )

    run_without_hf_dare(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        assert "hf_dare" not in type(model).__module__, type(model).__module__
        assert model.config.get_text_config() is model.config
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=0, rtol=0)
        # The base model (`auto_map["AutoModel"]`), as serving backends build it, under the LM head.
        base = AutoModel.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        assert type(base).__name__ == "MoEModel" and type(base).__module__.startswith("transformers_modules")
        with torch.no_grad():
            hidden = base(input_ids=expected["input_ids"]).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), expected["logits"], atol=0, rtol=0)
        for layer in model.config.moe_layers:
            thresholds = model.get_decoder().layers[layer].mlp.gate.threshold_tracker.thresholds
            torch.testing.assert_close(thresholds, torch.tensor([0.1, 0.4, 1.7]))
        """,
        cwd=tmp_path,
    )


def test_llava_folder_with_processor_loads_and_generates_without_hf_dare(tmp_path):
    torch.manual_seed(0)
    model = MoELlavaForConditionalGeneration(llava_config(tower="clip", router="ltdr")).eval()
    proc = processor("clip")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    proc.save_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what digit is shown ?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(images=digit_images(1), text=[prompt], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    save_file({"expected": expected, **{k: v for k, v in inputs.items()}}, tmp_path / "inputs.safetensors")

    run_without_hf_dare(
        f"""
        import numpy as np, torch
        from safetensors.torch import load_file
        from sklearn.datasets import load_digits
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        assert type(base).__name__ == "MoELlavaModel" and type(base).__module__.startswith("transformers_modules")
        proc = AutoProcessor.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        image = (load_digits().images[0] / 16.0 * 255).astype("uint8")
        image = np.repeat(image[:, :, None], 3, axis=2)
        inputs = proc(images=[image], text=[{prompt!r}], return_tensors="pt")
        saved = load_file({str(tmp_path / "inputs.safetensors")!r})
        assert torch.equal(inputs["input_ids"], saved["input_ids"])
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, saved["expected"]), (generated, saved["expected"])
        """,
        cwd=tmp_path,
    )


def relative_imports(path: Path) -> set[str]:
    """The sibling modules `path` imports, read as transformers < 5.19 reads them (`from .x import y` only)."""
    text = path.read_text()
    return set(re.findall(r"^\s*from\s+\.(\S+)\s+import", text, flags=re.MULTILINE))


def test_auto_map_files_import_every_file_they_need_directly():
    """transformers < 5.19 copies into its module cache only the auto_map file's direct imports, so a file that
    only a sibling imports is missing there (`FileNotFoundError` when loading on 5.0-5.18)."""
    package = Path(REPO_ROOT) / "hf_dare" / "modeling"
    for top in ("configuration_moe", "modeling_moe"):
        needed, todo = set(), [top]
        while todo:
            for name in relative_imports(package / f"{todo.pop()}.py") - needed:
                needed.add(name)
                todo.append(name)
        missing = needed - relative_imports(package / f"{top}.py") - {top}
        assert not missing, f"{top}.py must import {sorted(missing)} directly"
