"""The README.md model card written beside every converted checkpoint."""

import shlex

from ..modeling import MoEConfigBase
from ..modeling.model_card import GENERATED_MARKER

USAGE_CAUSAL_LM = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{path}")
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```"""

USAGE_LLAVA = """```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{path}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{path}")
inputs = processor(images=image, text="<image>\\nWhat is shown?", return_tensors="pt")
print(processor.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```"""

USAGE_DENSE_LLAVA = """```python
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained("{path}")
processor = AutoProcessor.from_pretrained("{path}")
```"""


def command_line(*args) -> str:
    return "hf-dare " + " ".join(shlex.quote(str(a)) for a in args)


def moe_settings(config: MoEConfigBase) -> list[str]:
    lines = [
        f"- router: `{config.router}`",
        f"- experts per MoE layer (E): {config.num_experts}",
        f"- MoE layers: {config.moe_layers} of {config.text_config.num_hidden_layers} decoder layers",
        f"- expert width: {config.moe_intermediate_size}",
    ]
    if config.router == "dare":
        lines += [
            f"- target distribution (Pi over 1..{config.max_experts} experts): {config.target_distribution}",
            f"- initial thresholds: {config.initial_thresholds}",
        ]
    else:
        lines.append(f"- experts per token (k): {config.num_experts_per_tok}")
    return lines


def model_card(
    title: str,
    made_from: str,
    how: str,
    command: str,
    config: MoEConfigBase | None = None,
    notes: list[str] = (),
    usage: str = USAGE_CAUSAL_LM,
    path: str = "path/to/this/folder",
) -> str:
    """Markdown: what the checkpoint was made from, its MoE settings, the command that made it, how to load it.

    It carries the hf-dare marker, so a later `save_pretrained` of the trained model replaces it with the card
    that lists the training stages (the conversion itself is recorded in `config.training_stages`)."""
    parts = [
        "---\nlibrary_name: transformers\ntags:\n- hf-dare\n- mixture-of-experts\n---\n" + GENERATED_MARKER,
        f"# {title}",
        f"Made from **{made_from}** with hf-dare ({how}).",
    ]
    if config is not None:
        parts.append("## MoE settings\n\n" + "\n".join(moe_settings(config)))
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {note}" for note in notes))
    parts.append(f"## How it was made\n\n```bash\n{command}\n```")
    remote_code = (
        "The modeling code ships in this folder (`trust_remote_code=True`); hf-dare need not be installed.\n\n"
        if config is not None
        else ""
    )
    parts.append(f"## Usage\n\n{remote_code}{usage.format(path=path)}")
    return "\n\n".join(parts) + "\n"
