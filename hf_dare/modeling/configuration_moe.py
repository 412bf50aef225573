"""Configurations of the MoE models: a text-only MoE causal LM and MoE-LLaVA.

Both add the MoE layout and the router settings to a transformers decoder's config: MoE-LLaVA nests it (and
the vision tower's) as `text_config` / `vision_config`, as transformers' `LlavaConfig` does; the causal LM
holds the decoder's fields at its top level, as a text-only model's config does (Qwen3-MoE's, and what
vLLM's and SGLang's transformers backends take for a text-only model). Every setting is validated when the
config is built.
"""

import functools
import inspect

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# `routers` registers the routers, whose settings are this config's fields. `.statistics` is imported by
# `routing`: older releases copy only the direct `from .x import` files (see `_compat`).
from . import routers  # noqa: F401
from ._compat import DATACLASS_CONFIGS, NATIVE_SUB_CONFIG_SPECS, SubConfigSpec
from .routers import is_distribution  # noqa: F401  (where it was)
from .routing import ROUTERS, router_settings
from .statistics import expert_load  # noqa: F401

AUX_LOSS_FRACTIONS = ("routed_slots", "top1")
AUX_LOSS_REDUCTIONS = ("mean", "sum")


# The meaning of a saved MoE config's fields: 2 from hf-dare 0.2 (router protocol, settings of the originals' code),
# 3 with ReMoE's gate offset; files without `moe_config_version` are hf-dare 0.1's. A file of an earlier version is
# upgraded on loading (`Router.upgrade_config_dict`): a setting it lacks was added since and takes its legacy value.
MOE_CONFIG_VERSION = 3


class MoEConfigError(ValueError):
    """An invalid MoE setting: the message names the field, what it got and what is allowed."""


class MoEConfigBase(PreTrainedConfig):
    """MoE layout and router settings shared by the configs below; not a model config by itself.

    - `num_experts` (E): experts per MoE layer. `moe_layers`: decoder layers whose FFN is an MoE layer
      (default: every other layer from 0, the MoE-LLaVA layout). `moe_intermediate_size`: expert width
      (default: the backbone's `intermediate_size`, as in upcycling).
    - `router`: the name of a registered router (`hf_dare.modeling.routing.ROUTERS`: `"top_k"`, `"dare"`,
      `"ltdr"`, `"top_p"`, `"remoe"`, `"dynmoe"`, `"moepp"`...) for every MoE layer, or a router per MoE layer: a
      dict {layer index: router name} naming every MoE layer (the DARE paper's DARE on layers 2-26, Top-2 on the
      others). `routers` / `router_for(i)` read it.
    - `num_experts_per_tok` (k): experts per token of the top-k routers (and per ordinary token for `ltdr`).
    - `norm_topk_prob`: renormalise the chosen experts' weights to sum 1 per token (default; what makes an
      upcycled model compute the dense one), or keep their softmax probabilities.
    - `router_aux_loss_coef` (beta): weight of the load-balancing loss; `aux_loss_fraction`: its f_i over all
      routed slots (`"routed_slots"`) or the tokens' top-1 experts (`"top1"`, DeepSpeed's); and
      `router_aux_loss_reduction`: how the layers' balancing losses and routers' own losses add up, `"mean"` or
      `"sum"` over the MoE layers, or None (default): as each router's original code does
      (`Router.layer_loss_reduction`: the sum for MoE-LLaVA's Top-K, ReMoE and DynMoE, the mean for the others).
    - Every registered router's own settings (`Router.settings`: DARE's `target_distribution`, Top-p's
      `top_p_threshold`...) are fields too, each with its default, checked whatever the router (so a config can
      switch routers); docs/routers.md lists them.
    - `training_stages` / `routing_statistics`: what training recorded, shown in the saved model card.
    """

    num_experts: int = 4
    moe_layers: list[int] | None = None
    moe_intermediate_size: int | None = None
    router: str | dict[int, str] = "top_k"
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.01
    aux_loss_fraction: str = "routed_slots"
    router_aux_loss_reduction: str | None = None
    tie_word_embeddings: bool = False
    # Provenance for the model card: appended by training (`hf_dare.training`), not read by the model.
    training_stages: list[dict] | None = None
    routing_statistics: dict | None = None
    moe_config_version: int = MOE_CONFIG_VERSION

    if not DATACLASS_CONFIGS:  # transformers < 5.4

        def __init__(self, **kwargs):
            fields = [
                name
                for cls in type(self).__mro__
                if issubclass(cls, MoEConfigBase)
                for name in inspect.get_annotations(cls)
            ]
            for name in fields:
                setattr(self, name, kwargs.pop(name, getattr(type(self), name)))
            self.__post_init__(**kwargs)

    sub_configs_defaults = {}  # MoE-LLaVA's text and vision configs; none for the causal LM

    if not NATIVE_SUB_CONFIG_SPECS:  # transformers < 5.20

        @property
        def sub_configs(self) -> dict:
            return {key: spec.config_class for key, spec in self.sub_configs_defaults.items()}

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' `from_dict`; a config saved by an earlier version (`moe_config_version` below the current
        one, or none: hf-dare 0.1) is first upgraded so that it means what it meant then (each router's
        `upgrade_config_dict`)."""
        if config_dict.get("moe_config_version", 1) < MOE_CONFIG_VERSION:
            config_dict = dict(config_dict)
            for router in ROUTERS.values():
                router.upgrade_config_dict(config_dict)
            config_dict["moe_config_version"] = MOE_CONFIG_VERSION
        return super().from_dict(config_dict, **kwargs)

    def _build_sub_configs(self) -> None:
        """What transformers >= 5.20 does with `sub_configs_defaults`: a sub-config given as a dict (or not
        given) becomes a config of its `model_type`, by default the spec's."""
        for key, spec in self.sub_configs_defaults.items():
            sub_config = getattr(self, key)
            if sub_config is None:
                sub_config = {}
            if isinstance(sub_config, dict):
                setattr(self, key, CONFIG_MAPPING[sub_config.get("model_type", spec.model_type)](**sub_config))

    def __post_init__(self, **kwargs):
        for setting in router_settings().values():  # the routers' settings: fields with their defaults
            setattr(self, setting.name, kwargs.pop(setting.name, setting.default))
        if not NATIVE_SUB_CONFIG_SPECS:
            self._build_sub_configs()
        if DATACLASS_CONFIGS:
            super().__post_init__(**kwargs)
        else:
            PreTrainedConfig.__init__(self, **kwargs)
        # Checkpoints keep `tie_word_embeddings` in the text config; the model ties from the top-level one.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self._resolve_moe_settings()

    def _resolve_moe_settings(self) -> None:
        """Fill derived defaults, then validate; raises `MoEConfigError` naming the field at fault."""
        num_layers = self.text_config.num_hidden_layers
        if self.num_experts < 1:
            raise MoEConfigError(
                f"{type(self).__name__}.num_experts: got {self.num_experts}; allowed: an integer >= 1."
            )
        if self.moe_layers is None:
            self.moe_layers = list(range(0, num_layers, 2))
        self.moe_layers = sorted(int(i) for i in self.moe_layers)
        if isinstance(self.router, dict):  # config.json holds the layer indices as strings
            keys = [int(k) if isinstance(k, int) or str(k).isdigit() else k for k in self.router]
            router = dict(zip(keys, self.router.values(), strict=True))
            self.router = dict(sorted(router.items())) if all(isinstance(k, int) for k in keys) else router
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.text_config.intermediate_size
        self.validate_moe_settings(num_layers)

    def _fail(self, field: str, problem: str, allowed: str) -> None:
        raise MoEConfigError(f"{type(self).__name__}.{field}: {problem}; allowed: {allowed}.")

    def validate_moe_settings(self, num_layers: int | None = None) -> None:
        """Fill the routers' derived defaults and check every MoE setting (raises `MoEConfigError` naming the
        field at fault): the layout, then each registered router's settings and their relations."""
        fail = self._fail
        num_layers = self.text_config.num_hidden_layers if num_layers is None else num_layers
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            fail(
                "num_experts_per_tok",
                f"got {self.num_experts_per_tok} with num_experts={self.num_experts}",
                f"1 <= num_experts_per_tok <= {self.num_experts}",
            )
        if len(set(self.moe_layers)) != len(self.moe_layers):
            fail("moe_layers", f"repeated indices in {self.moe_layers}", "distinct layer indices")
        bad = [i for i in self.moe_layers if not 0 <= i < num_layers]
        if bad:
            fail("moe_layers", f"indices {bad} out of range", f"0..{num_layers - 1} (text_config.num_hidden_layers)")
        self._validate_router(fail)
        if self.moe_intermediate_size < 1:
            fail("moe_intermediate_size", f"got {self.moe_intermediate_size}", "an integer >= 1")
        if not isinstance(self.norm_topk_prob, bool):
            fail("norm_topk_prob", f"got {self.norm_topk_prob!r}", "True or False")
        if not (isinstance(self.router_aux_loss_coef, (int, float)) and self.router_aux_loss_coef >= 0):
            fail("router_aux_loss_coef", f"got {self.router_aux_loss_coef!r}", "a value >= 0")
        if self.aux_loss_fraction not in AUX_LOSS_FRACTIONS:
            allowed = ", ".join(repr(f) for f in AUX_LOSS_FRACTIONS)
            fail("aux_loss_fraction", f"got {self.aux_loss_fraction!r}", allowed)
        if self.router_aux_loss_reduction not in (None, *AUX_LOSS_REDUCTIONS):
            allowed = "None (each router's own) or " + ", ".join(repr(r) for r in AUX_LOSS_REDUCTIONS)
            fail("router_aux_loss_reduction", f"got {self.router_aux_loss_reduction!r}", allowed)
        for setting in router_settings().values():
            setting.check(getattr(self, setting.name), fail)
        used = set(self.routers.values())
        for name, router in ROUTERS.items():
            router.resolve_settings(self)
            router.validate(self, fail, name in used)

    def _validate_router(self, fail) -> None:
        """`router`: a known router name, or a dict naming the router of every MoE layer and of MoE layers only."""
        allowed = ", ".join(repr(r) for r in ROUTERS)
        if isinstance(self.router, str):
            if self.router not in ROUTERS:
                fail("router", f"unknown router {self.router!r}", allowed)
            return
        if not isinstance(self.router, dict):
            fail(
                "router",
                f"got {self.router!r}",
                f"a router name ({allowed}) or a dict {{MoE layer index: router name}}",
            )
        unknown = [name for name in self.router.values() if not isinstance(name, str) or name not in ROUTERS]
        if unknown:
            fail("router", f"unknown router(s) {unknown}", allowed)
        stray = [k for k in self.router if k not in self.moe_layers]
        if stray:
            fail("router", f"layers {stray} are not MoE layers (moe_layers={self.moe_layers})", "MoE layer indices")
        missing = [i for i in self.moe_layers if i not in self.router]
        if missing:
            fail("router", f"no router for MoE layers {missing}", "one router name for every layer of moe_layers")

    @property
    def routers(self) -> dict[int, str]:
        """The router of every MoE layer: {layer index: router name}, in layer order."""
        if isinstance(self.router, dict):
            return dict(self.router)
        return {layer_idx: self.router for layer_idx in self.moe_layers}

    def router_for(self, layer_idx: int) -> str:
        """The router name of MoE layer `layer_idx`."""
        return self.router if isinstance(self.router, str) else self.router[layer_idx]

    def uses_router(self, name: str) -> bool:
        """Whether any MoE layer uses the router `name`."""
        return name in self.routers.values()

    @property
    def layers_by_router(self) -> dict[str, list[int]]:
        """{router name: its MoE layers}, in order of first use."""
        by_name: dict[str, list[int]] = {}
        for layer_idx, name in self.routers.items():
            by_name.setdefault(name, []).append(layer_idx)
        return by_name

    @property
    def router_description(self) -> str:
        """The router for display: `dare`, or `dare (layers 2, 4) + top_k (layers 0, 6)` for a mixed model."""
        by_name = self.layers_by_router
        if len(by_name) <= 1:
            return next(iter(by_name), self.router if isinstance(self.router, str) else "none")
        return " + ".join(f"{name} (layers {', '.join(map(str, layers))})" for name, layers in by_name.items())

    def experts_per_token_of(self, router: str) -> int:
        """Width of the routing index under `router`: the most experts a token can use."""
        return ROUTERS[router].width(self)

    @property
    def max_experts_per_token(self) -> int:
        """Width of the routing index: the most experts any token can use in any MoE layer."""
        return max((self.experts_per_token_of(name) for name in set(self.routers.values())), default=1)


@functools.cache
def _generic_config_fields() -> frozenset[str]:
    return frozenset(PreTrainedConfig().to_dict())


def _fields_not_of_decoders() -> frozenset[str]:
    """What every config has (`PreTrainedConfig`'s fields), the MoE settings (the routers' included) but
    `tie_word_embeddings`, and `decoder_model_type`."""
    generic = _generic_config_fields() | set(MoEConfigBase.__annotations__) | set(router_settings())
    return frozenset((generic | {"decoder_model_type"}) - {"tie_word_embeddings"})


class MoECausalLMConfig(MoEConfigBase):
    r"""Text-only MoE causal LM: a transformers decoder (Qwen2, Qwen3, StableLM, Llama...) whose `moe_layers`
    FFNs are MoE layers. See `MoEConfigBase` for the MoE settings.

    The decoder's fields (`hidden_size`, `num_hidden_layers`, `rope_parameters`...) sit at the top level beside
    the MoE settings, and `decoder_model_type` names the decoder (`"qwen2"`...); `text_config` is the config
    itself. Give the decoder as `text_config=` (a config, or a dict with its `model_type`), or its fields as
    keyword arguments with `decoder_model_type`; missing fields take that decoder's defaults.

    ```python
    >>> from transformers import Qwen2Config
    >>> config = MoECausalLMConfig(text_config=Qwen2Config(num_hidden_layers=4), router="dare")
    >>> config.moe_layers, config.num_hidden_layers, config.decoder_model_type
    ([0, 2], 4, 'qwen2')
    ```"""

    model_type = "hf_dare_moe_causal_lm"  # namespaced: no upstream model type can collide with it
    decoder_model_type: str = "qwen2"

    def __post_init__(self, **kwargs):
        text_config = kwargs.pop("text_config", None)
        if isinstance(text_config, MoECausalLMConfig):
            text_config = text_config.decoder_config()
        elif text_config is None:  # flat: the decoder's fields are among the keyword arguments
            fields = {name: value for name, value in kwargs.items() if name != "model_type"}
            text_config = CONFIG_MAPPING[self.decoder_model_type](**fields)
        elif isinstance(text_config, dict):
            text_config = CONFIG_MAPPING[text_config.get("model_type", self.decoder_model_type)](**text_config)
        self.decoder_model_type = text_config.model_type
        decoder_fields = self._decoder_fields(text_config)
        decoder_ties = decoder_fields.pop("tie_word_embeddings", False)
        self.tie_word_embeddings = bool(self.tie_word_embeddings or decoder_ties)
        super().__post_init__(**{**kwargs, **decoder_fields})

    @property
    def text_config(self) -> "MoECausalLMConfig":
        """The decoder's settings: this config itself (what `get_text_config()` returns)."""
        return self

    @staticmethod
    def _decoder_fields(decoder: PreTrainedConfig) -> dict:
        """A decoder config's own fields: those that `PreTrainedConfig` and the MoE settings do not have."""
        generic = _fields_not_of_decoders()
        return {name: value for name, value in decoder.to_dict().items() if name not in generic}

    def decoder_config(self) -> PreTrainedConfig:
        """The decoder's own config (a `Qwen2Config`...) with this config's decoder fields."""
        return CONFIG_MAPPING[self.decoder_model_type](**self._decoder_fields(self))

    # The decoder's parallel plans: its modules read them from this config, which they are built with.
    @property
    def base_model_tp_plan(self) -> dict | None:
        return CONFIG_MAPPING[self.decoder_model_type].base_model_tp_plan

    @property
    def base_model_pp_plan(self) -> dict | None:
        return CONFIG_MAPPING[self.decoder_model_type].base_model_pp_plan


class MoELlavaConfig(MoEConfigBase):
    r"""MoE-LLaVA: a vision tower (`vision_config`: CLIP or SigLIP vision), a 2-layer GELU projector
    (`mlp2x_gelu`) and a decoder (`text_config`) whose `moe_layers` FFNs are MoE layers. The LLaVA fields
    mean what they mean in transformers' `LlavaConfig`; see `MoEConfigBase` for the MoE settings."""

    model_type = "hf_dare_moe_llava"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151646
    image_seq_length: int = 576
    projector_type: str = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | list[int] = -2

    def __post_init__(self, **kwargs):
        if self.projector_type != "mlp2x_gelu":
            raise MoEConfigError(
                f"MoELlavaConfig.projector_type: got {self.projector_type!r}; allowed: 'mlp2x_gelu' "
                "(two linear layers with a GELU between them)."
            )
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise MoEConfigError(
                f"MoELlavaConfig.vision_feature_select_strategy: got {self.vision_feature_select_strategy!r}; "
                "allowed: 'default' (drop the CLS token) or 'full'."
            )
        super().__post_init__(**kwargs)

    @property
    def decoder_model_type(self) -> str:
        """The decoder's model type (`"qwen2"`...), as on `MoECausalLMConfig`."""
        return self.text_config.model_type


__all__ = ["MoECausalLMConfig", "MoEConfigBase", "MoEConfigError", "MoELlavaConfig"]
