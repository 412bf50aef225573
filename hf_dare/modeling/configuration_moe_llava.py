"""Configurations of the MoE models: a text-only MoE causal LM and MoE-LLaVA.

Both add the MoE layout and the router settings to a transformers decoder's config: MoE-LLaVA nests it (and
the vision tower's) as `text_config` / `vision_config`, as transformers' `LlavaConfig` does; the causal LM
holds the decoder's fields at its top level, as a text-only model's config does (Qwen3-MoE's, and what
vLLM's and SGLang's transformers backends take for a text-only model). Every setting is validated when the
config is built.
"""

import functools
import inspect
import math

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ._compat import DATACLASS_CONFIGS, NATIVE_SUB_CONFIG_SPECS, SubConfigSpec

# top_k / dare / ltdr, then the DARE paper's baselines (its Table 1): Top-p, ReMoE, DynMoE and MoE++.
ROUTERS = ("top_k", "dare", "ltdr", "top_p", "remoe", "dynmoe", "moepp")
THRESHOLD_UPDATES = ("ema", "per_batch")
# DARE's difficulty signal (the paper's Table 4 ablation): the predictor trained toward the next-token NLL, a fixed
# pseudo-random signal, or the entropy of the router's probabilities.
DIFFICULTY_PROXIES = ("nll", "random", "router_entropy")
# f_i of the load-balancing loss: share of all routed (token, expert) slots, or of the tokens' top-1 experts
# (DeepSpeed's `top2gating`, as MoE-LLaVA trains).
AUX_LOSS_FRACTIONS = ("routed_slots", "top1")
AUX_LOSS_REDUCTIONS = ("mean", "sum")
# The DARE paper's target distribution for Qwen2-1.5B with 4 experts.
DEFAULT_TARGET_DISTRIBUTION = (0.6, 0.3, 0.09, 0.01)


class MoEConfigError(ValueError):
    """An invalid MoE setting: the message names the field, what it got and what is allowed."""


def is_distribution(values) -> bool:
    """Whether `values` are shares of tokens (Pi): at least one, each finite and >= 0, summing to 1 (within 1e-4)."""
    values = [float(v) for v in values]
    return bool(values) and all(math.isfinite(v) and v >= 0 for v in values) and abs(sum(values) - 1.0) <= 1e-4


class MoEConfigBase(PreTrainedConfig):
    """MoE layout and router settings shared by the configs below; not a model config by itself.

    - `num_experts` (E): experts per MoE layer. `moe_layers`: decoder layers whose FFN is an MoE layer
      (default: every other layer from 0, the MoE-LLaVA layout). `moe_intermediate_size`: expert width
      (default: the backbone's `intermediate_size`, as in upcycling).
    - `router`: `"top_k"` (MoE-LLaVA), `"dare"` (difficulty-aware) or `"ltdr"` (long-tail vision tokens) for
      every MoE layer, or a router per MoE layer: a dict {layer index: router name} naming every MoE layer
      (the DARE paper's DARE on layers 2-26, Top-2 on the others). `routers` / `router_for(i)` read it.
    - `num_experts_per_tok` (k): experts per token for `top_k`, and per ordinary token for `ltdr`.
    - `norm_topk_prob`: renormalise the chosen experts' weights to sum 1 per token (default; what makes an
      upcycled model compute the dense one), or keep their softmax probabilities (`top_k`, `dare`, `ltdr`).
    - DeepSpeed's `top2gating` (MoE-LLaVA's training), options of `top_k`: `second_expert_sampling` (in
      training, experts 2..k by argmax of logits + Gumbel noise), `capacity_factor` / `eval_capacity_factor`
      (training / inference; None: no capacity) with `min_capacity`: an expert takes at most
      max(ceil(k * factor * T / E), min_capacity) of the T real tokens' slots, top-1 choices first, in token
      order; a slot over capacity is dropped (its weight goes, the residual carries the token).
    - DARE: `target_distribution` (Pi, the wanted fraction of tokens using 1..M experts, sums to 1;
      default 0.6/0.3/0.09/0.01 for M=4, uniform otherwise), `max_experts` (M = len(Pi), default
      min(4, E)), `initial_thresholds` (tau_1..tau_{M-1}, strictly increasing, default 0, 1, 2...),
      `threshold_momentum` (gamma of the EMA), `threshold_update` (`"ema"` or `"per_batch"`),
      `difficulty_predictor_size` / `difficulty_predictor_dropout`, `difficulty_detach_input` (the
      difficulty loss does not reach the backbone), `difficulty_loss_coef` (alpha), `difficulty_proxy`
      (`"nll"`: the predictor trained toward the next-token NLL; `"random"`: a fixed pseudo-random function of
      the hidden state, no predictor; `"router_entropy"`: -sum P log P of the router, no predictor).
    - `router_aux_loss_coef` (beta): weight of the load-balancing loss; `aux_loss_fraction`: its f_i over all
      routed slots (`"routed_slots"`) or the tokens' top-1 experts (`"top1"`, DeepSpeed's); and
      `router_aux_loss_reduction`: the model's `aux_loss` is the `"mean"` or the `"sum"` (MoE-LLaVA's) over layers.
    - LTDR: `tail_top_a`, the experts a tail vision token uses (default E).
    - The DARE paper's baselines (`hf_dare.modeling.routing`). A router's own training terms (`router_loss`) come
      with their own coefficients, outside beta:
      - `top_p` (Huang et al. 2024): the smallest set of most probable experts whose probabilities reach
        `top_p_threshold` (p, 0 < p <= 1, default 0.9999 as in the DARE paper), renormalised
        (`norm_topk_prob`); dynamic loss (entropy of P) weighted by `top_p_dynamic_loss_coef` (default 3e-7).
      - `remoe` (Wang et al. 2024): G = ReLU(W h), every expert with G_i > 0, output sum_i G_i E_i(h); L1
        penalty lambda * mean_t sum_i f_i G_i with lambda from `remoe_initial_l1_coef` (default 1e-8, > 0)
        times `remoe_l1_coef_multiplier` (alpha, default 1.2, > 1) or divided by it once per optimizer step
        toward `remoe_target_sparsity` (default None: 1 - k/E; 0 <= s < 1); `remoe_load_balancing` (default
        True): f_i the expert's load (the paper's load-balanced L1), else 1. No other balancing loss.
      - `dynmoe` (Guo et al. 2024, top-any): expert i active when sigmoid(cos(h, w_i)) > sigmoid(theta_i),
        trainable theta; the best expert when none is; regularisers weighted by `dynmoe_diversity_coef`,
        `dynmoe_simplicity_coef` and `dynmoe_efficiency_coef` (default 0.01 each, >= 0: DynMoE's weights under
        beta = 0.01).
      - `moepp` (Jin et al. 2024, MoE++): top-`num_experts_per_tok` over the E FFN experts plus
        `moepp_zero_experts` (default 1), `moepp_copy_experts` (default 1) and `moepp_constant_experts`
        (default 2) zero-computation experts (integers >= 0); `moepp_gating_residual` (default True): logits
        add a learned map of the previous MoE++ layer's; `moepp_tau` (default 0.75, >= 0): weight of the
        zero-computation experts in the heterogeneous load-balancing loss.
    - `training_stages` / `routing_statistics`: what training recorded, shown in the saved model card.
    """

    num_experts: int = 4
    moe_layers: list[int] | None = None
    moe_intermediate_size: int | None = None
    router: str | dict[int, str] = "top_k"
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    second_expert_sampling: bool = False
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 0
    max_experts: int | None = None
    target_distribution: list[float] | None = None
    initial_thresholds: list[float] | None = None
    threshold_momentum: float = 0.9
    threshold_update: str = "ema"
    difficulty_predictor_size: int = 256
    difficulty_predictor_dropout: float = 0.1
    difficulty_detach_input: bool = False
    difficulty_loss_coef: float = 1.0
    difficulty_proxy: str = "nll"
    router_aux_loss_coef: float = 0.01
    aux_loss_fraction: str = "routed_slots"
    router_aux_loss_reduction: str = "mean"
    tail_top_a: int | None = None
    top_p_threshold: float = 0.9999
    top_p_dynamic_loss_coef: float = 3e-7
    remoe_initial_l1_coef: float = 1e-8
    remoe_l1_coef_multiplier: float = 1.2
    remoe_target_sparsity: float | None = None
    remoe_load_balancing: bool = True
    dynmoe_diversity_coef: float = 0.01
    dynmoe_simplicity_coef: float = 0.01
    dynmoe_efficiency_coef: float = 0.01
    moepp_zero_experts: int = 1
    moepp_copy_experts: int = 1
    moepp_constant_experts: int = 2
    moepp_gating_residual: bool = True
    moepp_tau: float = 0.75
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

    sub_configs_defaults = {}  # MoE-LLaVA's text and vision configs; none for the causal LM

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
            raise MoEConfigError(f"{type(self).__name__}.{field}: {problem}; allowed: {allowed}.")

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
        if not is_distribution(pi):
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
        if self.difficulty_proxy not in DIFFICULTY_PROXIES:
            fail("difficulty_proxy", f"got {self.difficulty_proxy!r}", ", ".join(repr(p) for p in DIFFICULTY_PROXIES))
        if self.aux_loss_fraction not in AUX_LOSS_FRACTIONS:
            fail(
                "aux_loss_fraction", f"got {self.aux_loss_fraction!r}", ", ".join(repr(f) for f in AUX_LOSS_FRACTIONS)
            )
        if self.router_aux_loss_reduction not in AUX_LOSS_REDUCTIONS:
            allowed = ", ".join(repr(r) for r in AUX_LOSS_REDUCTIONS)
            fail("router_aux_loss_reduction", f"got {self.router_aux_loss_reduction!r}", allowed)
        self._validate_top_k_options(fail)
        if not self.num_experts_per_tok <= self.tail_top_a <= self.num_experts:
            fail(
                "tail_top_a",
                f"got {self.tail_top_a} with num_experts_per_tok={self.num_experts_per_tok}, num_experts={self.num_experts}",
                f"num_experts_per_tok <= tail_top_a <= {self.num_experts}",
            )
        self._validate_baseline_routers(fail)

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

    def _validate_top_k_options(self, fail) -> None:
        """DeepSpeed's top-2 options (Gumbel sampling, capacity) are `top_k`'s: refused without a `top_k` layer."""
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                fail(name, f"got {value!r}", "None (no capacity) or a number > 0")
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            fail("min_capacity", f"got {self.min_capacity!r}", "an integer >= 0")
        for name in ("norm_topk_prob", "second_expert_sampling"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"got {getattr(self, name)!r}", "True or False")
        if "top_k" not in self.routers.values():
            for name in ("second_expert_sampling", "capacity_factor", "eval_capacity_factor"):
                if getattr(self, name) not in (None, False):
                    fail(
                        name, f"set to {getattr(self, name)!r} but no MoE layer uses the 'top_k' router", "the default"
                    )

    def _validate_baseline_routers(self, fail) -> None:
        """The settings of the DARE paper's baseline routers (top_p, remoe, dynmoe, moepp), checked whatever the router."""

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not (is_number(self.top_p_threshold) and 0.0 < self.top_p_threshold <= 1.0):
            fail("top_p_threshold", f"got {self.top_p_threshold!r}", "0 < p <= 1")
        for name in ("top_p_dynamic_loss_coef", "dynmoe_diversity_coef", "dynmoe_simplicity_coef",
                     "dynmoe_efficiency_coef", "moepp_tau"):  # fmt: skip
            value = getattr(self, name)
            if not (is_number(value) and value >= 0):
                fail(name, f"got {value!r}", "a number >= 0")
        if not (is_number(self.remoe_initial_l1_coef) and self.remoe_initial_l1_coef > 0):
            fail("remoe_initial_l1_coef", f"got {self.remoe_initial_l1_coef!r}", "a number > 0 (lambda only scales)")
        if not (is_number(self.remoe_l1_coef_multiplier) and self.remoe_l1_coef_multiplier > 1):
            fail("remoe_l1_coef_multiplier", f"got {self.remoe_l1_coef_multiplier!r}", "a number > 1")
        target = self.remoe_target_sparsity
        if target is not None and not (is_number(target) and 0.0 <= target < 1.0):
            allowed = "None (1 - num_experts_per_tok / num_experts) or 0 <= s < 1"
            fail("remoe_target_sparsity", f"got {target!r}", allowed)
        for name in ("remoe_load_balancing", "moepp_gating_residual"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"got {getattr(self, name)!r}", "True or False")
        for name in ("moepp_zero_experts", "moepp_copy_experts", "moepp_constant_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, f"got {value!r}", "an integer >= 0")

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
    def router_description(self) -> str:
        """The router for display: `dare`, or `dare (layers 2, 4) + top_k (layers 0, 6)` for a mixed model."""
        by_name: dict[str, list[int]] = {}
        for layer_idx, name in self.routers.items():
            by_name.setdefault(name, []).append(layer_idx)
        if len(by_name) <= 1:
            return next(iter(by_name), self.router if isinstance(self.router, str) else "none")
        return " + ".join(f"{name} (layers {', '.join(map(str, layers))})" for name, layers in by_name.items())

    def experts_per_token_of(self, router: str) -> int:
        """Width of the routing index under `router`: the most experts a token can use."""
        return {
            "top_k": self.num_experts_per_tok,
            "dare": self.max_experts,
            "ltdr": self.tail_top_a,
            "top_p": self.num_experts,
            "remoe": self.num_experts,
            "dynmoe": self.num_experts,
            "moepp": self.num_experts_per_tok,  # FFN experts among its top-k
        }[router]

    @property
    def max_experts_per_token(self) -> int:
        """Width of the routing index: the most experts any token can use in any MoE layer."""
        return max((self.experts_per_token_of(name) for name in set(self.routers.values())), default=1)


@functools.cache
def _fields_not_of_decoders() -> frozenset[str]:
    """What every config has (`PreTrainedConfig`'s fields), the MoE settings but `tie_word_embeddings`, and
    `decoder_model_type`."""
    generic = set(PreTrainedConfig().to_dict()) | set(MoEConfigBase.__annotations__) | {"decoder_model_type"}
    return frozenset(generic - {"tie_word_embeddings"})


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


__all__ = ["MoECausalLMConfig", "MoEConfigError", "MoELlavaConfig"]
