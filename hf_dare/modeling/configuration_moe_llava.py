"""Configurations of the MoE models: a text-only MoE causal LM and MoE-LLaVA.

Both wrap transformers' own backbone configs (`text_config`, and `vision_config` for MoE-LLaVA) and add
the MoE layout and the router settings. Every setting is validated when the config is built.
"""

import dataclasses
import inspect

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# This file travels with every checkpoint, so it runs on every transformers 5.x; older releases lack two things:
# - transformers < 5.20 has no `SubConfigSpec` / `sub_configs_defaults`: the stand-in below carries the default
#   model types, `MoEConfigBase` builds the sub-configs itself and declares them in `sub_configs`.
# - transformers < 5.4 configs are plain classes, not dataclasses: `MoEConfigBase` gets the `__init__` that the
#   dataclass would generate (the fields declared on the class, then `__post_init__` with the other arguments).
NATIVE_SUB_CONFIG_SPECS = hasattr(PreTrainedConfig, "sub_configs_defaults")
DATACLASS_CONFIGS = dataclasses.is_dataclass(PreTrainedConfig)
try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.20

    @dataclasses.dataclass
    class SubConfigSpec:
        config_class: type
        model_type: str


ROUTERS = ("top_k", "dare", "ltdr")
THRESHOLD_UPDATES = ("ema", "per_batch")
# The DARE paper's target distribution for Qwen2-1.5B with 4 experts.
DEFAULT_TARGET_DISTRIBUTION = (0.6, 0.3, 0.09, 0.01)


class MoEConfigBase(PreTrainedConfig):
    """MoE layout and router settings shared by the configs below; not a model config by itself.

    - `num_experts` (E): experts per MoE layer. `moe_layers`: decoder layers whose FFN is an MoE layer
      (default: every other layer from 0, the MoE-LLaVA layout). `moe_intermediate_size`: expert width
      (default: the backbone's `intermediate_size`, as in upcycling).
    - `router`: `"top_k"` (MoE-LLaVA), `"dare"` (difficulty-aware) or `"ltdr"` (long-tail vision tokens).
    - `num_experts_per_tok` (k): experts per token for `top_k`, and per ordinary token for `ltdr`.
    - DARE: `target_distribution` (Pi, the wanted fraction of tokens using 1..M experts, sums to 1;
      default 0.6/0.3/0.09/0.01 for M=4, uniform otherwise), `max_experts` (M = len(Pi), default
      min(4, E)), `initial_thresholds` (tau_1..tau_{M-1}, strictly increasing, default 0, 1, 2...),
      `threshold_momentum` (gamma of the EMA), `threshold_update` (`"ema"` or `"per_batch"`),
      `difficulty_predictor_size` / `difficulty_predictor_dropout`, `difficulty_detach_input` (the
      difficulty loss does not reach the backbone), `difficulty_loss_coef` (alpha).
    - `router_aux_loss_coef` (beta): weight of the load-balancing loss.
    - LTDR: `tail_top_a`, the experts a tail vision token uses (default E).
    - `training_stages` / `routing_statistics`: what training recorded, shown in the saved model card.
    """

    text_config: dict | PreTrainedConfig | None = None
    num_experts: int = 4
    moe_layers: list[int] | None = None
    moe_intermediate_size: int | None = None
    router: str = "top_k"
    num_experts_per_tok: int = 2
    max_experts: int | None = None
    target_distribution: list[float] | None = None
    initial_thresholds: list[float] | None = None
    threshold_momentum: float = 0.9
    threshold_update: str = "ema"
    difficulty_predictor_size: int = 256
    difficulty_predictor_dropout: float = 0.1
    difficulty_detach_input: bool = False
    difficulty_loss_coef: float = 1.0
    router_aux_loss_coef: float = 0.01
    tail_top_a: int | None = None
    tie_word_embeddings: bool = False
    # Provenance for the model card: appended by training (`hf_dare.training`), not read by the model.
    training_stages: list[dict] | None = None
    routing_statistics: dict | None = None

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

    if not NATIVE_SUB_CONFIG_SPECS:  # transformers < 5.20

        @property
        def sub_configs(self) -> dict:
            return {key: spec.config_class for key, spec in self.sub_configs_defaults.items()}

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
        """Fill derived defaults, then validate; raises `ValueError` naming the field at fault."""
        num_layers = self.text_config.num_hidden_layers
        if self.num_experts < 1:
            raise ValueError(f"{type(self).__name__}.num_experts: got {self.num_experts}; allowed: an integer >= 1.")
        if self.moe_layers is None:
            self.moe_layers = list(range(0, num_layers, 2))
        self.moe_layers = sorted(int(i) for i in self.moe_layers)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.text_config.intermediate_size
        if self.target_distribution is None:
            m = self.max_experts or min(len(DEFAULT_TARGET_DISTRIBUTION), self.num_experts)
            uniform = [1.0 / m] * m
            self.target_distribution = list(DEFAULT_TARGET_DISTRIBUTION) if m == 4 else uniform
        self.target_distribution = [float(p) for p in self.target_distribution]
        if self.max_experts is None:
            self.max_experts = len(self.target_distribution)
        if self.initial_thresholds is None:
            self.initial_thresholds = [float(j) for j in range(self.max_experts - 1)]
        self.initial_thresholds = [float(t) for t in self.initial_thresholds]
        if self.tail_top_a is None:
            self.tail_top_a = self.num_experts
        self._validate_moe_settings(num_layers)

    def _validate_moe_settings(self, num_layers: int) -> None:
        def fail(field: str, problem: str, allowed: str) -> None:
            raise ValueError(f"{type(self).__name__}.{field}: {problem}; allowed: {allowed}.")

        if self.router not in ROUTERS:
            fail("router", f"unknown router {self.router!r}", ", ".join(repr(r) for r in ROUTERS))
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
        if self.moe_intermediate_size < 1:
            fail("moe_intermediate_size", f"got {self.moe_intermediate_size}", "an integer >= 1")
        pi = self.target_distribution
        if len(pi) != self.max_experts:
            fail(
                "target_distribution",
                f"has {len(pi)} entries but max_experts={self.max_experts}",
                "one probability per expert count 1..max_experts",
            )
        if not 1 <= self.max_experts <= self.num_experts:
            fail(
                "max_experts", f"got {self.max_experts} with num_experts={self.num_experts}", f"1..{self.num_experts}"
            )
        if any(p < 0 for p in pi) or abs(sum(pi) - 1.0) > 1e-4:
            fail("target_distribution", f"{pi} sums to {sum(pi):.6g}", "non-negative values that sum to 1")
        taus = self.initial_thresholds
        if len(taus) != self.max_experts - 1:
            fail(
                "initial_thresholds",
                f"has {len(taus)} entries but max_experts={self.max_experts}",
                f"{self.max_experts - 1} values (max_experts - 1)",
            )
        if any(b <= a for a, b in zip(taus, taus[1:], strict=False)):
            fail("initial_thresholds", f"{taus} is not strictly increasing", "strictly increasing values")
        if not 0.0 <= self.threshold_momentum < 1.0:
            fail("threshold_momentum", f"got {self.threshold_momentum}", "0 <= gamma < 1")
        if self.threshold_update not in THRESHOLD_UPDATES:
            fail("threshold_update", f"got {self.threshold_update!r}", ", ".join(repr(u) for u in THRESHOLD_UPDATES))
        if self.difficulty_predictor_size < 1:
            fail("difficulty_predictor_size", f"got {self.difficulty_predictor_size}", "an integer >= 1")
        if not 0.0 <= self.difficulty_predictor_dropout < 1.0:
            fail("difficulty_predictor_dropout", f"got {self.difficulty_predictor_dropout}", "0 <= p < 1")
        if self.difficulty_loss_coef < 0:
            fail("difficulty_loss_coef", f"got {self.difficulty_loss_coef}", "a value >= 0")
        if self.router_aux_loss_coef < 0:
            fail("router_aux_loss_coef", f"got {self.router_aux_loss_coef}", "a value >= 0")
        if not self.num_experts_per_tok <= self.tail_top_a <= self.num_experts:
            fail(
                "tail_top_a",
                f"got {self.tail_top_a} with num_experts_per_tok={self.num_experts_per_tok}, num_experts={self.num_experts}",
                f"num_experts_per_tok <= tail_top_a <= {self.num_experts}",
            )

    @property
    def max_experts_per_token(self) -> int:
        """Width of the routing index: the most experts any token can use under this router."""
        return {"top_k": self.num_experts_per_tok, "dare": self.max_experts, "ltdr": self.tail_top_a}[self.router]


class MoECausalLMConfig(MoEConfigBase):
    r"""Text-only MoE causal LM: a transformers decoder (`text_config`: Qwen2, Qwen3, StableLM, Llama...)
    whose `moe_layers` FFNs are MoE layers. See `MoEConfigBase` for the MoE settings.

    ```python
    >>> from transformers import Qwen2Config
    >>> config = MoECausalLMConfig(text_config=Qwen2Config(num_hidden_layers=4), router="dare")
    >>> config.moe_layers
    [0, 2]
    ```"""

    model_type = "moe_causal_lm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}


class MoELlavaConfig(MoEConfigBase):
    r"""MoE-LLaVA: a vision tower (`vision_config`: CLIP or SigLIP vision), a 2-layer GELU projector
    (`mlp2x_gelu`) and a decoder (`text_config`) whose `moe_layers` FFNs are MoE layers. The LLaVA fields
    mean what they mean in transformers' `LlavaConfig`; see `MoEConfigBase` for the MoE settings."""

    model_type = "moe_llava"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

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
            raise ValueError(
                f"MoELlavaConfig.projector_type: got {self.projector_type!r}; allowed: 'mlp2x_gelu' "
                "(two linear layers with a GELU between them)."
            )
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"MoELlavaConfig.vision_feature_select_strategy: got {self.vision_feature_select_strategy!r}; "
                "allowed: 'default' (drop the CLS token) or 'full'."
            )
        super().__post_init__(**kwargs)


__all__ = ["MoECausalLMConfig", "MoELlavaConfig"]
