"""CI: saved checkpoints load, compute the same logits and generate the same tokens on every transformers 5.x,
without hf_dare installed.

The code inside a checkpoint (`hf_dare/modeling/*.py`, loaded with `trust_remote_code=True`) runs on transformers
5.0 and later; what differs between releases is handled in `hf_dare/modeling/_compat.py`. The package itself needs
a newer floor (setup.cfg). This script, run in the project's environment (hf_dare installed):

1. builds a tiny MoE causal LM (DARE router, Qwen2 decoder) and a tiny MoE-LLaVA (LTDR router, CLIP tower),
   saves them with `save_pretrained` and records, on fixed inputs, their logits and their greedy generations:
   the causal LM on a left-padded batch of text; MoE-LLaVA on a left-padded batch with images (batched, with the
   KV cache) and on text alone (no `pixel_values`);
2. for each transformers release, in an environment with torch and that release but without hf_dare (the
   virtual environment `.ci-venv-tf` holds torch, `.ci-venv-tf/transformers-<version>` each release and its
   dependencies, kept between runs), and in an interpreter outside the repository where `import hf_dare`
   fails: loads both folders with the Auto classes, checks the logits against the reference (atol 1e-5) and the
   generated tokens (equal), saves the model again with that release and checks that this copy gives the same
   logits and tokens.

Usage: python .ci/check_transformers_versions.py [VERSION ...]
VERSION is a release (5.10.4), a release series (`5.24.*`: its newest patch), `latest` (the newest 5.x release
on PyPI) or `pre` (the newest 5.x pre-release, checked only when it is newer than `latest`; its failure is
printed as a warning and does not fail the run). The default is the oldest supported release, the last release
before each change the checkpoint code has a fallback for, 5.23 and 5.24 (the releases around the image-output
and cache-argument changes), `latest` and `pre`.
Prints one line per release; exits non-zero if any release (pre-releases aside) fails.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, Qwen2Config

from hf_dare import MoECausalLMConfig, MoEForCausalLM, MoELlavaConfig, MoELlavaForConditionalGeneration

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV = REPO_ROOT / ".ci-venv-tf"
LATEST = "latest"
PRE = "pre"
DEFAULT_VERSIONS = [
    "5.0.0",  # the oldest release the checkpoint code supports
    "5.3.0",  # the last with `__init__`-based configs (and CompileableContextVar(name, default))
    "5.5.4",  # the last with CLIP / SigLIP's `vision_model` level, before registered experts kernels (5.7)
    "5.23.*",  # the last with `image_hidden_states` as a field
    "5.24.*",  # `image_outputs`; the last with the `past_key_values` argument
    LATEST,
    PRE,
]
MAX_NEW_TOKENS = 8
TORCH_VERSION = torch.__version__.split("+")[0]  # the project environment's torch, without the local tag
IMAGE_TOKEN_ID = 4

# Runs in the checked environment. argv: the expected transformers version, then a JSON list of
# [model folder, reference file, Auto class, scratch folder].
LOAD_AND_COMPARE = textwrap.dedent(
    """
    import json
    import sys
    sys.modules["hf_dare"] = None  # the checkpoint's own code must do without the package

    import torch
    import transformers
    from safetensors.torch import load_file

    assert transformers.__version__ == sys.argv[1], (transformers.__version__, transformers.__file__)
    for model_dir, reference_file, auto_class, scratch in json.loads(sys.argv[2]):
        auto_class = getattr(transformers, auto_class)
        reference = load_file(reference_file)
        inputs = {k: v for k, v in reference.items() if k.startswith("input.")}
        inputs = {k.removeprefix("input."): v for k, v in inputs.items()}
        generations = sorted({k.split(".")[1] for k in reference if k.startswith("generate.")})

        def check(path):
            model = auto_class.from_pretrained(path, trust_remote_code=True).eval()
            assert "hf_dare" not in type(model).__module__, type(model).__module__
            with torch.no_grad():
                logits = model(**inputs).logits
            torch.testing.assert_close(logits, reference["logits"], atol=1e-5, rtol=0)
            for name in generations:
                prefix = f"generate.{name}."
                kwargs = {k.removeprefix(prefix): v for k, v in reference.items() if k.startswith(prefix)}
                expected = kwargs.pop("tokens")
                tokens = model.generate(**kwargs, max_new_tokens=expected.shape[1], do_sample=False, use_cache=True)
                tokens = tokens[:, kwargs["input_ids"].shape[1]:]
                assert torch.equal(tokens, expected), f"{name}: generated {tokens.tolist()}, reference {expected.tolist()}"
            return model, logits

        model, logits = check(model_dir)
        model.save_pretrained(scratch)  # this release's own save, loaded back
        check(scratch)
        diff = (logits - reference["logits"]).abs().max().item()
        print(f"{model.config.model_type} max |diff| {diff:.1e}, tokens equal ({', '.join(generations)})")
    """
)


def tiny_text_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # logits large enough that a weight loaded wrong shows
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def perturb_buffers(model: torch.nn.Module) -> None:
    """Move the saved buffers (DARE's thresholds) off their initial values, so that loading must restore them."""
    saved = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name in saved and buffer.is_floating_point():
            buffer.add_(0.25)


def build_references(root: Path) -> dict[str, tuple[Path, Path, str]]:
    """Save the two tiny models, their logits and their greedy generations under `root`: name -> (folder, reference
    file, Auto class). The reference file holds the forward's inputs (`input.*`), its `logits`, and per generation
    its inputs and new tokens (`generate.<name>.*`)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(IMAGE_TOKEN_ID + 1, 96, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # a left-padded row
    input_ids[1, :3] = 0  # the pad token
    causal_lm = MoEForCausalLM(MoECausalLMConfig(text_config=tiny_text_config(), router="dare"))
    causal_lm_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    causal_lm_generations = {"text": causal_lm_inputs}

    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14
    )
    llava = MoELlavaForConditionalGeneration(
        MoELlavaConfig(
            text_config=tiny_text_config(), vision_config=vision_config, image_token_id=IMAGE_TOKEN_ID, router="ltdr"
        )
    )
    image_tokens = torch.full((2, 4), IMAGE_TOKEN_ID)  # 28x28 pixels, 14x14 patches, CLS dropped
    llava_ids = torch.cat([input_ids[:, :3], image_tokens, input_ids[:, 3:]], dim=1)
    llava_mask = torch.cat([attention_mask[:, :3], torch.ones_like(image_tokens), attention_mask[:, 3:]], dim=1)
    pixel_values = torch.randn(2, 3, 28, 28, generator=generator)
    llava_inputs = {"input_ids": llava_ids, "pixel_values": pixel_values}
    llava_generations = {
        "images": {"input_ids": llava_ids, "attention_mask": llava_mask, "pixel_values": pixel_values},
        "text_only": causal_lm_inputs,
    }

    references = {}
    for name, model, inputs, generations, auto_class in [
        ("causal_lm", causal_lm, causal_lm_inputs, causal_lm_generations, "AutoModelForCausalLM"),
        ("llava", llava, llava_inputs, llava_generations, "AutoModelForImageTextToText"),
    ]:
        model.eval()
        model.generation_config.pad_token_id = 0
        perturb_buffers(model)
        tensors = {f"input.{key}": value for key, value in inputs.items()}
        with torch.no_grad():
            tensors["logits"] = model(**inputs).logits
        for generation, kwargs in generations.items():
            tokens = model.generate(**kwargs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, use_cache=True)
            kwargs = {**kwargs, "tokens": tokens[:, kwargs["input_ids"].shape[1] :]}
            tensors.update({f"generate.{generation}.{key}": value for key, value in kwargs.items()})
        model.save_pretrained(root / name)
        save_file({key: value.clone() for key, value in tensors.items()}, root / f"{name}.safetensors")
        references[name] = (root / name, root / f"{name}.safetensors", auto_class)
    return references


def pip(*args: str) -> str:
    command = [str(VENV / "bin" / "python"), "-m", "pip", *args, "--quiet", "--disable-pip-version-check"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return result.stdout


def setup_torch() -> None:
    """The environment that every release shares: torch (the CPU wheel, as in .ci/run) and safetensors."""
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip("install", f"torch=={TORCH_VERSION}", "safetensors")


def resolve(version: str) -> str | None:
    """The release `version` names: itself, the newest of a series (`5.24.*`), the newest 5.x (`latest`), or the
    newest 5.x pre-release (`pre`; None when no pre-release is newer than the newest release)."""
    if version not in (LATEST, PRE) and not version.endswith(".*"):
        return version

    def newest(*args: str) -> str:
        report = pip("install", "--dry-run", "--no-deps", "--ignore-installed", "--report", "-", *args)
        return json.loads(report)["install"][0]["metadata"]["version"]

    if version.endswith(".*"):
        return newest(f"transformers=={version}")
    release = newest("transformers>=5,<6")
    if version == LATEST:
        return release
    pre = newest("--pre", "transformers>=5,<6")
    return pre if pre != release else None


def install_transformers(version: str) -> tuple[str | None, Path | None]:
    """Install the release `version` names with its dependencies into its own folder; returns (release, folder),
    (None, None) for `pre` when there is no newer pre-release."""
    version = resolve(version)
    if version is None:
        return None, None
    target = VENV / f"transformers-{version}"
    if not (target / f"transformers-{version}.dist-info").is_dir():
        shutil.rmtree(target, ignore_errors=True)  # an interrupted install
        pre = ["--pre"] if Version(version).is_prerelease else []  # only then may dependencies be pre-releases
        pip("install", *pre, "--target", str(target), f"transformers=={version}")
    return version, target


def check(version: str, target: Path, references: dict, scratch: Path) -> str:
    """Load every reference folder with transformers `version` from `target` (a fresh interpreter, cwd outside
    the repository, nothing of the project's environment on its path); returns what it printed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHOME"}
    env.update(
        PYTHONPATH=str(target),
        PYTHONNOUSERSITE="1",
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(scratch / "modules"),
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    jobs = [[str(folder), str(logits), auto, str(scratch / f"resaved_{name}")] for name, (folder, logits, auto) in references.items()]  # fmt: skip
    result = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", LOAD_AND_COMPARE, version, json.dumps(jobs)],
        cwd=scratch, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip()[-3000:])
    return "; ".join(result.stdout.strip().splitlines())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("versions", nargs="*", default=DEFAULT_VERSIONS)
    args = parser.parse_args()
    start = time.monotonic()
    transformers.utils.logging.disable_progress_bar()
    failures = 0
    # One worker installs, in order, while the references are built and the releases installed before are checked.
    with tempfile.TemporaryDirectory(prefix="hf-dare-tf-versions-") as tmp, ThreadPoolExecutor(1) as installer:
        root = Path(tmp)
        torch_ready = installer.submit(setup_torch)
        installs = [installer.submit(install_transformers, version) for version in args.versions]
        references = build_references(root / "reference")
        print(f"references saved with transformers {transformers.__version__}, torch {TORCH_VERSION}", flush=True)
        torch_ready.result()
        checked, warnings = 0, 0
        for requested, install in zip(args.versions, installs, strict=True):
            try:
                version, target = install.result()
                if version is None:
                    print(f"transformers {requested}: no pre-release newer than the newest release", flush=True)
                    continue
                checked += 1
                label = version if requested == version else f"{version} ({requested})"
                scratch = root / f"check-{version}"
                scratch.mkdir(exist_ok=True)
                print(f"transformers {label}: OK ({check(version, target, references, scratch)})", flush=True)
            except Exception as error:  # report it and go on with the next release
                if requested == PRE:  # a pre-release may break what its release will fix: a warning only
                    print(f"transformers {requested}: WARNING, the pre-release fails\n{error}", flush=True)
                    warnings += 1
                    continue
                print(f"transformers {requested}: FAILED\n{error}", flush=True)
                failures += 1
    elapsed = time.monotonic() - start
    print(f"{checked} transformers releases checked, {failures} failed, {warnings} warnings, {elapsed:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
