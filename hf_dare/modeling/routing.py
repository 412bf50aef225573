"""The routing protocol of the MoE layers: what a router is, what it returns, and the machinery routers share.

A router maps the tokens of one MoE layer, `hidden_states` (T, H), to a `Routing`: for each token the experts it
uses, padded to the router's widest case with the sentinel index `num_experts` (how transformers' experts interface
expresses "no expert in this slot"), and their weights. Every router is one subclass of `Router` that owns all it
needs: its settings (declared once as `Setting`s, which the config validates, `hf-dare upcycle --set` accepts and
the docs and model card list), its losses, what it observes in training and how its state moves once per
optimizer step, what the compute dial (`hf_dare.calibrate`) can set, its initialisation (model init and upcycling
alike) and its model-card lines. Defining the subclass with `name=` registers it (`ROUTERS`): nothing else
changes to add a router. The routers of the papers are in `routers.py`.

The shared top-k machinery (`route_top_n`, `route_slots`, `top_k_choices`, `within_capacity`,
`load_balancing_loss`, `softmax_router`) is composed by the routers that use it, not inherited.
"""

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ._compat import context_var
from .statistics import expert_load

# --- Settings ---------------------------------------------------------------------------------------------------


UNSET = object()
"""`Setting.legacy_default` of a setting that existed from the first release (nothing to fill in)."""


@dataclass(frozen=True)
class Setting:
    """A config field a router reads: its name, default, what it does (`doc`, one line) and what values it allows
    (`allowed`, as error messages and docs say it; `valid` checks one value). `legacy_default`: for a setting
    added after the first release, the value that gives the behaviour of before, which a config saved by an earlier
    version (`moe_config_version`) gets when it lacks it (`Router.upgrade_config_dict`)."""

    name: str
    default: Any
    doc: str
    allowed: str
    valid: Callable[[Any], bool]
    legacy_default: Any = UNSET

    def check(self, value, fail) -> None:
        """`fail(field, problem, allowed)` unless `value` is allowed."""
        if not self.valid(value):
            fail(self.name, f"got {value!r}", self.allowed)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number_setting(
    name: str,
    default: float | None,
    doc: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    legacy: Any = UNSET,
) -> Setting:
    """A finite number in [low, high] (`low_open` / `high_open`: the bound excluded); None too with `optional`."""
    parts = []
    if low is not None:
        parts.append(f"{low:g} {'<' if low_open else '<='} x")
    if high is not None:
        parts.append(f"x {'<' if high_open else '<='} {high:g}")
    allowed = " and ".join(parts) or "a finite number"
    allowed = f"None or {allowed}" if optional else allowed

    def valid(value) -> bool:
        if value is None:
            return optional
        if not _is_number(value):
            return False
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        return above and below

    return Setting(name, default, doc, allowed, valid, legacy)


def integer_setting(
    name: str, default: int | None, doc: str, low: int = 0, optional: bool = False, legacy: Any = UNSET
) -> Setting:
    """An integer >= `low`; None too with `optional`."""
    allowed = f"an integer >= {low}" + (" or None" if optional else "")

    def valid(value) -> bool:
        if value is None:
            return optional
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    return Setting(name, default, doc, allowed, valid, legacy)


def flag_setting(name: str, default: bool, doc: str, legacy: Any = UNSET) -> Setting:
    return Setting(name, default, doc, "True or False", lambda value: isinstance(value, bool), legacy)


def choice_setting(name: str, default: str, doc: str, choices: Sequence[str], legacy: Any = UNSET) -> Setting:
    return Setting(name, default, doc, ", ".join(repr(c) for c in choices), lambda value: value in choices, legacy)


def list_setting(name: str, doc: str, allowed: str, valid_item: Callable[[Any], bool] = _is_number) -> Setting:
    """A list (default None: derived from other settings) whose items satisfy `valid_item`."""

    def valid(value) -> bool:
        return value is None or (isinstance(value, (list, tuple)) and all(valid_item(v) for v in value))

    return Setting(name, None, doc, f"None or {allowed}", valid)


# --- What a router returns --------------------------------------------------------------------------------------


@dataclass
class Routing:
    """What a router decided for T tokens of one MoE layer (K = the router's widest case, `Router.width`).

    - `router_logits` (T, E'): the router's raw scores, one per routed expert (transformers' `router_logits`
      output; E' = E, or more for MoE++'s zero-computation experts)
    - `router_probs` (T, E') float32: the softmax of the logits, for routers that take one (else None)
    - `expert_indices` (T, K) long: the FFN experts each token uses, `num_experts` in unused slots
    - `expert_weights` (T, K): their weights, 0 in unused slots
    - `expert_counts` (T,) long: FFN experts used per token
    - `difficulty` (T,): the difficulty signal a router routes by (DARE), else None
    - `zero_computation_output` (T, H): what experts the router computes itself contribute (MoE++'s zero, copy and
      constant experts), added by the MoE block to the FFN experts' output; else None
    - `expert_input_scale`: the FFN experts get `expert_input_scale * h` (MoE++'s original feeds them 2h), else 1
    - `aux_loss`, `router_loss`: the layer's load-balancing loss and the router's own weighted terms, filled by the
      MoE block when the model asks for losses (`Router.balancing_loss`, `Router.router_loss`)

    A router that needs more for its losses returns a subclass with its own fields.
    """

    router_logits: torch.Tensor
    expert_indices: torch.Tensor
    expert_weights: torch.Tensor
    expert_counts: torch.Tensor
    router_probs: torch.Tensor | None = None
    difficulty: torch.Tensor | None = None
    zero_computation_output: torch.Tensor | None = None
    expert_input_scale: float = 1.0
    aux_loss: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None


@dataclass
class RoutingContext:
    """What the MoE blocks of one forward share, opened by the model around its decoder (`routing_context`).

    - `token_mask` (B, L): real (non-padding) tokens; `vision_mask` (B, L): image tokens; None: all / none.
    - `with_aux_loss`: the blocks compute their routers' losses (training, or labels given).
    - `observe`: the routers keep what they see for their per-step state update (training).
    - `routings`: filled by the blocks (`record`), in the order they ran, and `routers` the router of each;
      `record=False` (a gradient-checkpointing recomputation of a forward already recorded) leaves them, and the
      observations, alone.
    - `observations`: (router, what it saw), handed to the routers (`Router.observe`) by `hand_over` once the
      forward has completed: a forward that raises leaves nothing behind.
    - `previous_router_logits` (T, E'): MoE++'s gating residual, the router logits of the MoE++ layer that ran
      last in this forward (None before the first).
    - `positions` (B, L): each token's position in its own sequence (None: 0..L-1), for routers whose routing
      depends on it (DARE's random proxy at inference).
    """

    token_mask: torch.Tensor | None = None
    vision_mask: torch.Tensor | None = None
    with_aux_loss: bool = False
    observe: bool = False
    record: bool = True
    routings: list[Routing] = field(default_factory=list)
    routers: list["Router"] = field(default_factory=list)
    observations: list[tuple["Router", Any]] = field(default_factory=list)
    previous_router_logits: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    def masks_for(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This forward's (B, L) masks, or None where a mask does not fit the tokens the block sees."""
        shape = (batch_size, seq_len)
        fit = [m if m is not None and tuple(m.shape) == shape else None for m in (self.token_mask, self.vision_mask)]
        return fit[0], fit[1]

    def positions_for(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """(T,) positions of the T tokens a block routes: this forward's, when they fit, else 0..T-1."""
        if self.positions is not None and self.positions.numel() == num_tokens:
            return self.positions.reshape(-1).to(device)
        return torch.arange(num_tokens, device=device)

    def add(self, router: "Router", routing: Routing) -> None:
        """Record a block's routing (unless this is a recomputation, `record=False`)."""
        if self.record:
            self.routers.append(router)
            self.routings.append(routing)

    def hand_over(self) -> None:
        """Give each router what it observed in this (completed) forward."""
        observations, self.observations = self.observations, []
        for router, observation in observations:
            router.observe(observation)


_ACTIVE_ROUTING = context_var("hf_dare_routing_context")


def current_routing_context() -> RoutingContext | None:
    """The routing context of the forward in progress on this thread, or None outside a model's forward."""
    return _ACTIVE_ROUTING.get()


def observing() -> bool:
    """Whether the forward in progress asks the routers to keep what they see for their per-step state update:
    in training, and not in an activation-checkpoint recomputation."""
    context = current_routing_context()
    return context is not None and context.observe and context.record


@contextmanager
def routing_context(context: RoutingContext) -> Iterator[RoutingContext]:
    """Make `context` the one the MoE blocks see until the block exits (per thread, nestable)."""
    token = _ACTIVE_ROUTING.set(context)
    try:
        yield context
    finally:
        _ACTIVE_ROUTING.reset(token)


# --- The compute dial -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dial:
    """What `hf_dare.calibrate` can set on a trained router, without training (`Router.dial`).

    - `kind="shares"`: per layer, thresholds over the router's difficulty signal (`Routing.difficulty`) at the
      cumulative shares of a distribution over 1..M experts (`Router.set_thresholds`); `setting` names the config's
      distribution, which becomes the calibrated one.
    - `kind="scalar"`: one value of the config field `setting` in [`low`, `high`], Avg K increasing with it, found
      by bisection (`Router.set_dial`).
    - `kind="integer"`: `setting` becomes the requested Avg K, an integer in 1..E (`Router.set_dial`).
    """

    kind: str
    setting: str
    low: float = 0.0
    high: float = 1.0


# --- The router protocol ----------------------------------------------------------------------------------------

ROUTERS: dict[str, type["Router"]] = {}
"""Every registered router by its config name (`config.router`), in registration order."""


class Router(nn.Module):
    """One MoE layer's router: `forward` (T, H) -> `Routing`, and everything else the router needs.

    Subclass with `class MyRouter(Router, name="my_router")` to register it under that name. Class attributes:
    `settings` (its config fields, `Setting`s), `uses` (the generic MoE config fields it reads, for docs and
    cards), `summary` (one line: what it does), `dial` (a `Dial`, or None: no compute dial). Every method below
    has a default that does nothing (or nothing more than a softmax router needs), so a router overrides only what
    it has.
    """

    name: ClassVar[str] = ""
    settings: ClassVar[tuple[Setting, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    dial: ClassVar[Dial | None] = None
    # How the model adds up the layers' `balancing_loss` and `router_loss`: "mean" or "sum" over the MoE layers of
    # this router (its original's choice; `config.router_aux_loss_reduction` overrides it for every router).
    layer_loss_reduction: ClassVar[str] = "mean"
    # Whether the model computes its own next-token NLL for `token_nll_loss` (DARE's predictor), that loss's
    # weight in the model's loss, and the positions it learns from ("labels": those with a label; "text": every
    # text position).
    uses_token_nll: bool = False
    token_nll_loss_coef: float = 1.0
    token_nll_targets: str = "labels"

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        known = {s.name: s for router in ROUTERS.values() for s in router.settings if router.name != name}
        for setting in cls.settings:
            other = known.get(setting.name)
            if other is not None and (other.default, other.allowed) != (setting.default, setting.allowed):
                raise ValueError(
                    f"router {name!r}: setting {setting.name!r} is declared differently by another router"
                )
        cls.name = name
        ROUTERS[name] = cls

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts

    # The config (class methods: they run on a config, before any model exists).

    @classmethod
    def resolve_settings(cls, config) -> None:
        """Fill the settings whose default depends on other fields (e.g. DARE's M from its Pi)."""

    @classmethod
    def upgrade_config_dict(cls, config_dict: dict) -> None:
        """Make a config dict saved by an earlier version (hf-dare 0.1, or an older `moe_config_version`) mean what
        it meant then: each setting added since takes its `legacy_default` where the dict lacks it."""
        for setting in cls.settings:
            if setting.legacy_default is not UNSET:
                config_dict.setdefault(setting.name, setting.legacy_default)

    @classmethod
    def validate(cls, config, fail, used: bool) -> None:
        """Check what relates several fields; `used`: some MoE layer uses this router. `fail(field, problem,
        allowed)` raises the config's error."""

    @classmethod
    def width(cls, config) -> int:
        """The most experts a token can use: the width of the routing index."""
        return config.num_experts

    # One forward.

    def balancing_loss(
        self, routing: Routing, token_mask: torch.Tensor | None = None, vision_mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The layer's load-balancing loss (weighted by the model's `router_aux_loss_coef`), or None."""
        return None

    def router_loss(
        self, routing: Routing, token_mask: torch.Tensor | None = None, vision_mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The router's own training terms, already weighted by their own coefficients, or None."""
        return None

    def token_nll_loss(self, routing: Routing, nll: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """A loss against the model's own next-token NLL (T,) at the positions `weight` (T,) marks (1 for the
        positions to learn from), as a mean over them; only asked of routers with `uses_token_nll`, weighted in the
        model's loss by `token_nll_loss_coef`."""
        return None

    # Training state: what a forward observes, and how the state moves once per optimizer step.

    def keep(self, observation) -> None:
        """Keep `observation` for `observe`, if this forward is observed (training); it reaches `observe` only when
        the forward completes (`RoutingContext.hand_over`)."""
        if observing():
            current_routing_context().observations.append((self, observation))

    def observe(self, observation) -> None:
        """Take what a completed training forward kept (`keep`)."""

    def update_state(self) -> dict | None:
        """Move the per-step state (persistent buffers) from what was observed since the last call, identically
        on every rank (every rank calls it once per optimizer step). Returns what moved, or None."""
        return None

    @classmethod
    def update_states(cls, routers: list["Router"]) -> list[dict | None]:
        """The per-step update of every layer of this router, in layer order (what the model calls): each
        layer's own `update_state` unless the router's state is shared between its layers (ReMoE's lambda)."""
        return [router.update_state() for router in routers]

    def logged_state(self) -> dict[str, float]:
        """The per-step state for the training logs, keyed as logged under `routing/`."""
        return {}

    # Initialisation, when a model is built and when a dense FFN is upcycled.

    def init_weights(self, std: float) -> None:
        """Initialise every parameter and buffer (`std`: the backbone's `initializer_range`); the model's init and
        the upcycling conversion both call it, so an upcycled router starts as a new model's does."""
        for parameter in self.parameters(recurse=False):
            init.normal_(parameter, mean=0.0, std=std)

    def init_upcycled(self, std: float) -> None:
        """Initialise a router for a model upcycled from a dense FFN (whose experts are copies of it): as a new
        model's (`init_weights`) unless the router can start closer to the dense model's function."""
        self.init_weights(std)

    @classmethod
    def upcycling_note(cls, config) -> str:
        """What holds for a model upcycled into this router before training (its model card says it)."""
        if config.norm_topk_prob:
            return (
                "with identical experts and weights that sum to 1, the model computes exactly what the dense one did"
            )
        return (
            "norm_topk_prob=False: the experts' weights are their router probabilities, which do not sum to 1, so the "
            "model does not compute what the dense one did"
        )

    # The compute dial (see `Dial`).

    def set_dial(self, value) -> None:
        """Set the value the `scalar` or `integer` dial moves."""
        raise NotImplementedError(f"the {self.name!r} router has no dial")

    def set_thresholds(self, thresholds: torch.Tensor, cumulative: Sequence[float]) -> None:
        """Set the thresholds the `shares` dial moves (at the cumulative shares `cumulative`)."""
        raise NotImplementedError(f"the {self.name!r} router has no shares dial")

    # The model card and docs.

    @classmethod
    def card_lines(cls, config) -> list[str]:
        """Lines of the model card that describe this router (its settings table is added from `settings`)."""
        return [f"`{cls.name}`: {cls.summary}"]


def router_settings() -> dict[str, Setting]:
    """Every registered router's settings by name (each name once)."""
    return {setting.name: setting for router in ROUTERS.values() for setting in router.settings}


def settings_table() -> str:
    """The settings of every registered router as a markdown table (docs/routers.md holds it)."""
    lines = ["| router | setting | default | allowed | what it does |", "| --- | --- | --- | --- | --- |"]
    for name, router in ROUTERS.items():
        for setting in router.settings:
            lines.append(
                f"| `{name}` | `{setting.name}` | `{setting.default!r}` | {setting.allowed} | {setting.doc} |"
            )
    return "\n".join(lines)


# --- Shared machinery -------------------------------------------------------------------------------------------


def softmax_router(weight: torch.Tensor, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, H) -> router logits and probabilities (T, E) under the router weight (E, H), float32 like DeepSpeed's
    gate, so low-precision models pick the same experts."""
    router_logits = F.linear(hidden_states.float(), weight.float())
    return router_logits, F.softmax(router_logits, dim=-1, dtype=torch.float32)


def token_weights(token_mask: torch.Tensor | None, reference: torch.Tensor) -> torch.Tensor:
    """(T,) float32: 1 for the real tokens of `token_mask` ((T,) or (B, L)), every token of `reference` (T, ...)
    without a mask."""
    if token_mask is None:
        return reference.new_ones(reference.shape[0], dtype=torch.float32)
    return token_mask.reshape(-1).float()


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (T,) over the tokens with weight 1 (0 when there is none)."""
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def load_balancing_loss(
    router_probs: torch.Tensor, expert_indices: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch / GShard balancing loss E * sum_i f_i * Pbar_i over the tokens in `token_mask`.

    f_i is the fraction of routed (token, expert) slots that go to expert i (`expert_load`), Pbar_i the mean
    router probability of expert i. `router_probs` (T, E), `expert_indices` (T, K) with sentinel E,
    `token_mask` (T,) or (B, L) with B * L = T.
    Returns 0 (still attached to the graph) when no token is selected.
    """
    num_experts = router_probs.shape[-1]
    weights = token_weights(token_mask, router_probs).to(router_probs.dtype)
    expert_fraction = expert_load(expert_indices, num_experts, token_mask).to(router_probs.dtype)
    mean_probs = (router_probs * weights[:, None]).sum(0) / weights.sum().clamp(min=1.0)
    return num_experts * (expert_fraction * mean_probs).sum()


def route_top_n(
    router_probs: torch.Tensor, expert_counts: torch.Tensor, width: int, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-`expert_counts[t]` experts by probability, weights renormalised over them (or their
    probabilities, `normalize=False`).

    `router_probs` (T, E), `expert_counts` (T,) in 1..width. Returns `expert_indices` (T, width) with the
    sentinel E in unused slots and `expert_weights` (T, width) with 0 there.
    """
    top_indices = torch.topk(router_probs, width, dim=-1).indices
    used = torch.arange(width, device=router_probs.device)[None, :] < expert_counts[:, None]
    return route_slots(router_probs, top_indices, used, normalize)


def route_slots(
    router_probs: torch.Tensor, indices: torch.Tensor, used: torch.Tensor, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts `indices` (T, K) of each token where `used` (T, K), weighted by their probabilities,
    renormalised over the used ones with `normalize` (as DeepSpeed does: a token with no slot left gets 0).
    Returns `expert_indices` (sentinel E where unused) and `expert_weights` (0 there)."""
    num_experts = router_probs.shape[-1]
    probs = router_probs.gather(-1, indices).masked_fill(~used, 0.0)
    if normalize:
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=torch.finfo(probs.dtype).eps)
    return indices.masked_fill(~used, num_experts), probs


def top_n_routing(
    router_logits: torch.Tensor,
    router_probs: torch.Tensor,
    expert_counts: torch.Tensor,
    width: int,
    dtype: torch.dtype,
    normalize: bool = True,
    difficulty: torch.Tensor | None = None,
) -> Routing:
    """The `Routing` that sends each token to its top-`expert_counts[t]` experts by probability, padded to
    `width` (`route_top_n`), weights in `dtype`."""
    indices, weights = route_top_n(router_probs, expert_counts, width, normalize)
    return Routing(
        router_logits=router_logits,
        router_probs=router_probs,
        expert_indices=indices,
        expert_weights=weights.to(dtype),
        expert_counts=expert_counts,
        difficulty=difficulty,
    )


def top_k_choices(
    router_logits: torch.Tensor, router_probs: torch.Tensor, k: int, sample: bool = False
) -> torch.Tensor:
    """(T, k) experts per token: the top-k by probability, or with `sample` DeepSpeed's `top2gating` choice
    (generalised to k): the 1st is the most probable, the others the top-(k-1) of the rest by logits + Gumbel
    noise (the Gumbel-max trick: a sample from the softmax over the other experts), noise from torch's global
    generator (`torch.manual_seed` makes it reproducible)."""
    if not sample or k == 1:
        return torch.topk(router_probs, k, dim=-1).indices
    first = router_probs.argmax(-1, keepdim=True)
    noise = torch.distributions.Gumbel(
        torch.tensor(0.0, device=router_logits.device), torch.tensor(1.0, device=router_logits.device)
    ).rsample(router_logits.shape)
    noisy = (router_logits + noise).scatter(-1, first, float("-inf"))
    return torch.cat([first, torch.topk(noisy, k - 1, dim=-1).indices], dim=-1)


def within_capacity(
    indices: torch.Tensor,
    num_experts: int,
    capacity_factor: float,
    min_capacity: int = 0,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(T, k) bool: the slots of `indices` (T, k) that fit in their expert's capacity, DeepSpeed's rule.

    capacity = max(ceil(k * capacity_factor * T / E), min_capacity) slots per expert, T the real tokens
    (`token_mask` (T,) or (B, L); padding takes no slot). Each expert's queue holds every token's 1st choice in
    token order, then every 2nd choice, and so on; the slots past the capacity are dropped. On tensors only
    (no host sync)."""
    num_tokens, k = indices.shape
    real = torch.ones_like(indices[:, 0], dtype=torch.bool) if token_mask is None else token_mask.reshape(-1).bool()
    assigned = F.one_hot(indices, num_experts) * real[:, None, None]  # (T, k, E)
    per_rank = assigned.transpose(0, 1)  # (k, T, E): the 1st choices, then the 2nd...
    totals = per_rank.sum(1)  # (k, E)
    earlier = totals.cumsum(0) - totals  # slots the earlier choice ranks take in each expert
    locations = per_rank.cumsum(1) - 1 + earlier[:, None, :]
    location = (locations * per_rank).sum(-1).transpose(0, 1)  # (T, k)
    tokens = real.sum().float()
    capacity = torch.ceil(tokens / num_experts * (capacity_factor * k)).clamp(min=min_capacity)
    return real[:, None] & (location < capacity)


def cumulative_levels(distribution: Sequence[float]) -> list[float]:
    """pi_1, pi_1 + pi_2, ..., without the last (1): the quantile levels of M - 1 thresholds."""
    return list(itertools.accumulate(float(p) for p in distribution))[:-1]
