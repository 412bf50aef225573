"""Folders written before the model types were namespaced (`moe_causal_lm`, `moe_llava`, router weights under
`mlp.router.`) load with hf_dare imported, as the current classes.

With `trust_remote_code=True` such a folder runs the code saved in it and needs nothing from here. Without it,
the Auto classes find the old model types here: the weights are renamed on loading (`mlp.router.` ->
`mlp.gate.`) and the model comes back as the current class with the current config (built anew around the
loaded tensors), so saving it again writes the new format. The aliases are registered only where transformers has no model type of that name.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..modeling import MoECausalLMConfig, MoEForCausalLM, MoELlavaConfig, MoELlavaForConditionalGeneration

LEGACY_MODEL_TYPES = {"moe_causal_lm": MoECausalLMConfig, "moe_llava": MoELlavaConfig}
LEGACY_KEY_RENAMES = {r"\.mlp\.router\.": ".mlp.gate."}
# The causal LM's decoder, saved at `model.layers.*` in those folders, now sits in the base model's `language_model`.
LAYOUT_RENAMES = {
    "moe_causal_lm": {r"^model.(embed_tokens|layers|norm).": r"model.language_model.\1."},
    "moe_llava": {},
}


def _legacy_config(model_type: str, current: type) -> type:
    """The current config class under the old `model_type` (only for the Auto classes' lookup)."""
    return type(f"Legacy{current.__name__}", (current,), {"model_type": model_type})


def _register_weight_renames(class_name: str, model_type: str) -> None:
    renames = [WeightRenaming(old, new) for old, new in {**LEGACY_KEY_RENAMES, **LAYOUT_RENAMES[model_type]}.items()]
    register_checkpoint_conversion_mapping(class_name, renames, overwrite=True)


def _legacy_model(current: type, config_class: type) -> type:
    """A subclass for loading old folders; `from_pretrained` hands back an instance of the current class."""

    def from_pretrained(cls, *args, **kwargs):
        loaded = super(legacy, cls).from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with `output_loading_info`
        # A model of the current class holding the loaded tensors (no copy): it saves in the new format,
        # where the loaded one would write the old weight names back.
        model.config.__class__ = current.config_class  # the subclass adds no state
        upgraded = current(model.config)
        upgraded.load_state_dict(model.state_dict(), strict=True, assign=True)
        upgraded.train(model.training)
        return (upgraded, *loaded[1:]) if isinstance(loaded, tuple) else upgraded

    legacy = type(
        f"Legacy{current.__name__}",
        (current,),
        {"config_class": config_class, "from_pretrained": classmethod(from_pretrained)},
    )
    _register_weight_renames(legacy.__name__, config_class.model_type)
    return legacy


def register_legacy_model_types() -> None:
    """Register the old model types with the Auto classes, unless transformers has its own of that name."""
    auto_classes = {"moe_causal_lm": AutoModelForCausalLM, "moe_llava": AutoModelForImageTextToText}
    models = {"moe_causal_lm": MoEForCausalLM, "moe_llava": MoELlavaForConditionalGeneration}
    for model_type, current in LEGACY_MODEL_TYPES.items():
        if model_type in CONFIG_MAPPING:
            continue
        config_class = _legacy_config(model_type, current)
        AutoConfig.register(model_type, config_class)
        auto_classes[model_type].register(config_class, _legacy_model(models[model_type], config_class))
