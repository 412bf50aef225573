"""The routers: Top-K (MoE-LLaVA), DARE (difficulty-aware), LTDR (long-tail vision tokens), and the DARE paper's
baselines Top-p, ReMoE, DynMoE and MoE++. Each is one `Router` (see `routing.py` for the protocol), registered
under its config name by its class definition.
"""

import itertools
import math
import struct
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .routing import (
    Dial,
    Router,
    Routing,
    choice_setting,
    cumulative_levels,
    current_routing_context,
    flag_setting,
    integer_setting,
    list_setting,
    load_balancing_loss,
    masked_mean,
    number_setting,
    observing,
    route_slots,
    softmax_router,
    token_weights,
    top_k_choices,
    top_n_routing,
    within_capacity,
)

# The DARE paper's target distribution for Qwen2-1.5B with 4 experts.
DEFAULT_TARGET_DISTRIBUTION = (0.6, 0.3, 0.09, 0.01)


def is_distribution(values) -> bool:
    """Whether `values` are shares of tokens (Pi): at least one, each finite and >= 0, summing to 1 (within 1e-4)."""
    values = [float(v) for v in values]
    return bool(values) and all(math.isfinite(v) and v >= 0 for v in values) and abs(sum(values) - 1.0) <= 1e-4


def switch_balancing_loss(routing: Routing, aux_loss_fraction: str, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The Switch / GShard balancing loss of a softmax router over the tokens of `token_mask`, its f_i over every
    routed slot (`aux_loss_fraction="routed_slots"`) or over each token's top-1 expert (`"top1"`, DeepSpeed's:
    before any capacity drop)."""
    assignments = routing.expert_indices
    if aux_loss_fraction == "top1":
        assignments = routing.router_probs.argmax(-1, keepdim=True)
    return load_balancing_loss(routing.router_probs, assignments, token_mask)


class TopKRouter(Router, name="top_k"):
    """MoE-LLaVA's router: softmax over E experts, top-k, weights renormalised over the k (`norm_topk_prob`).

    By default the deterministic form of DeepSpeed's `top2gating`. Its training behaviour is optional:
    `second_expert_sampling` (experts 2..k by Gumbel-max sampling, training only), `capacity_factor` /
    `eval_capacity_factor` with `min_capacity` (slots over an expert's capacity are dropped, `within_capacity`)
    and `aux_loss_fraction="top1"` (f_i from the top-1 choices). DeepSpeed samples the 2nd expert at inference
    too; here inference stays deterministic.
    """

    summary = "softmax over the experts, each token's top-k (`num_experts_per_tok`), Switch load balancing"
    uses = ("num_experts_per_tok", "norm_topk_prob", "aux_loss_fraction")
    settings = (
        flag_setting(
            "second_expert_sampling", False, "DeepSpeed's top2gating: experts 2..k sampled (Gumbel-max), training only"
        ),
        number_setting(
            "capacity_factor",
            None,
            "training: an expert takes at most k * factor * T / E slots",
            0,
            low_open=True,
            optional=True,
        ),  # fmt: skip
        number_setting("eval_capacity_factor", None, "the same at inference", 0, low_open=True, optional=True),
        integer_setting("min_capacity", 0, "the least capacity of an expert, in slots"),
    )
    dial = Dial("integer", "num_experts_per_tok")
    layer_loss_reduction = "sum"  # MoE-LLaVA adds its layers' l_aux

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.num_experts_per_tok = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_fraction = config.aux_loss_fraction
        self.second_expert_sampling = config.second_expert_sampling
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.min_capacity = config.min_capacity
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.text_config.hidden_size))

    @classmethod
    def validate(cls, config, fail, used: bool) -> None:
        if used:
            return
        for name in ("second_expert_sampling", "capacity_factor", "eval_capacity_factor"):
            if getattr(config, name) not in (None, False):
                fail(name, f"set to {getattr(config, name)!r} but no MoE layer uses the 'top_k' router", "the default")

    @classmethod
    def width(cls, config) -> int:
        return config.num_experts_per_tok

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        """`hidden_states` (T, H), the B * L tokens of a batch; `token_mask` (B, L) real (non-padding) tokens and
        `vision_mask` (B, L) image tokens, or (T,) for one sample."""
        router_logits, router_probs = softmax_router(self.weight, hidden_states)
        k = self.num_experts_per_tok
        sample = self.training and self.second_expert_sampling
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if not sample and capacity_factor is None:
            expert_counts = torch.full_like(router_probs[:, 0], k, dtype=torch.long)
            return top_n_routing(
                router_logits, router_probs, expert_counts, k, hidden_states.dtype, self.norm_topk_prob
            )
        choices = top_k_choices(router_logits, router_probs, k, sample)
        used = torch.ones_like(choices, dtype=torch.bool)
        if capacity_factor is not None:
            used = within_capacity(choices, self.num_experts, capacity_factor, self.min_capacity, token_mask)
        indices, weights = route_slots(router_probs, choices, used, self.norm_topk_prob)
        return Routing(
            router_logits=router_logits,
            router_probs=router_probs,
            expert_indices=indices,
            expert_weights=weights.to(hidden_states.dtype),
            expert_counts=used.sum(-1),
        )

    def balancing_loss(self, routing, token_mask=None, vision_mask=None) -> torch.Tensor:
        """The Switch balancing loss over all real tokens."""
        return switch_balancing_loss(routing, self.aux_loss_fraction, token_mask)

    def set_dial(self, value: int) -> None:
        self.num_experts_per_tok = int(value)


# --- DARE -------------------------------------------------------------------------------------------------------


class DifficultyPredictor(nn.Module):
    """DARE's per-layer difficulty estimate: Softplus(W2 Dropout(SiLU(W1 RMSNorm(h)))), (T, H) -> (T,)."""

    def __init__(self, hidden_size: int, predictor_size: int = 256, dropout: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.up = nn.Linear(hidden_size, predictor_size)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(predictor_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.act(self.up(self.norm(hidden_states))))
        return F.softplus(self.down(hidden_states)).squeeze(-1)

    def init_weights(self, std: float) -> None:
        init.ones_(self.norm.weight)
        for linear in (self.up, self.down):
            init.normal_(linear.weight, mean=0.0, std=std)
            init.zeros_(linear.bias)


OBSERVED_LIMIT = 1 << 24  # predictions kept between updates (64 MB of float32)


def _subsample(values: torch.Tensor, limit: int = 1 << 22) -> torch.Tensor:
    # torch.quantile refuses inputs above 2**24 elements; an even stride keeps the distribution.
    return values if values.numel() <= limit else values[:: values.numel() // limit + 1]


def _gather_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank (identity without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    world = torch.distributed.get_world_size()
    length = torch.tensor([values.numel()], device=values.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    torch.distributed.all_gather(lengths, length)
    longest = int(max(n.item() for n in lengths))
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([g[: int(n.item())] for g, n in zip(gathered, lengths, strict=True)])


class ThresholdTracker(nn.Module):
    """DARE's thresholds tau_1 < ... < tau_{M-1}: N_e(t) = 1 + #{j : d_hat_t >= tau_j}.

    In training it collects the predicted difficulties it is given (`observe`); `update` then moves each
    tau_j toward the quantile of those predictions at the cumulative target probability pi_1 + ... + pi_j,
    by an EMA with momentum gamma (or straight to it, for the per-batch ablation). The thresholds are a
    persistent buffer: saved, loaded, and identical on every rank after `update`.
    """

    def __init__(self, initial_thresholds: list[float], target_distribution: list[float], momentum: float, mode: str):
        super().__init__()
        self.initial_thresholds = list(initial_thresholds)
        self.momentum = momentum
        self.mode = mode
        # Plain floats: models are built on the meta device when loaded, where tensors hold no data.
        self.quantile_levels = cumulative_levels(target_distribution)
        self.register_buffer("thresholds", torch.tensor(initial_thresholds, dtype=torch.float32))
        self._observed: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would cast the thresholds too, and bf16 steps are too coarse for the EMA's
        # small moves: keep them float32 (devices move as usual).
        super()._apply(fn, recurse)
        self.thresholds = self.thresholds.float()
        return self

    def expert_counts(self, difficulty: torch.Tensor, thresholds: torch.Tensor | None = None) -> torch.Tensor:
        """(T,) predicted difficulties -> (T,) experts per token, in 1..M, under `thresholds` (default: the
        tracked ones)."""
        thresholds = self.thresholds if thresholds is None else thresholds
        return 1 + (difficulty.detach().float()[:, None] >= thresholds[None, :]).sum(-1)

    @torch.no_grad()
    def quantiles(self, difficulty: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The thresholds a batch's own predictions give: their quantiles (over the real tokens of `mask`) at the
        cumulative target shares, increasing."""
        values = difficulty.detach().float().reshape(-1)
        if mask is not None:
            values = values[mask.reshape(-1).bool()]
        if values.numel() == 0:
            return self.thresholds
        levels = torch.tensor(self.quantile_levels, device=values.device)
        return torch.cummax(torch.quantile(_subsample(values), levels), 0).values

    def observe(self, difficulty: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Keep a detached copy of predictions (any shape; only where `mask`, if given) for the next `update`.
        Selecting waits for `update`, so a forward does not sync with the host. Without updates, what is kept
        is thinned out evenly past `OBSERVED_LIMIT` values, so memory stays bounded."""
        mask = None if mask is None else mask.detach().reshape(-1)
        self._observed.append((difficulty.detach().float().reshape(-1), mask))
        if sum(values.numel() for values, _ in self._observed) > OBSERVED_LIMIT:
            self._observed = [(_subsample(self._selected(), OBSERVED_LIMIT // 2), None)]

    def _selected(self) -> torch.Tensor:
        parts = [values if mask is None else values[mask] for values, mask in self._observed]
        return torch.cat(parts) if parts else self.thresholds.new_empty(0)

    @torch.no_grad()
    def update(self) -> torch.Tensor | None:
        """Move the thresholds toward the quantiles of everything observed since the last update, on
        every rank alike, and forget it. Returns the new thresholds, or None when nothing was observed."""
        local = self._selected()
        self._observed = []
        observed = _gather_across_ranks(local)
        if observed.numel() == 0:
            return None
        # Ties (e.g. an untrained predictor) must not leave equal thresholds: `quantiles` keeps them increasing.
        target = self.quantiles(observed)
        new = target if self.mode == "per_batch" else self.momentum * self.thresholds + (1 - self.momentum) * target
        self.thresholds.copy_(new)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.thresholds, src=0)
        return self.thresholds


HIDDEN_PROJECTION_SEED = 1234
_PROJECTION_DIRECTIONS: dict[tuple[int, torch.device], torch.Tensor] = {}


def hidden_projection_difficulty(hidden_states: torch.Tensor) -> torch.Tensor:
    """hf-dare 0.1's `random` proxy, kept as `hidden_projection`: a fixed function of the hidden state that is not
    trained toward difficulty, (T, H) -> (T,) in (0, 1): Phi(sqrt(H) * cos(h, u)), u a random unit direction drawn
    once from a CPU generator seeded with `HIDDEN_PROJECTION_SEED`. Not a content-free control: it correlates with
    what the hidden state holds (modality, token identity)."""
    hidden = hidden_states.detach().float()
    size = hidden.shape[-1]
    direction = _PROJECTION_DIRECTIONS.get((size, hidden.device))
    if direction is None:
        generator = torch.Generator().manual_seed(HIDDEN_PROJECTION_SEED)
        direction = torch.randn(size, generator=generator, dtype=torch.float64)
        direction = (direction / direction.norm()).float().to(hidden.device)
        _PROJECTION_DIRECTIONS[(size, hidden.device)] = direction
    z = F.normalize(hidden, dim=-1) @ direction * size**0.5
    return 0.5 * (1.0 + torch.erf(z / 2**0.5))


_MASK_64 = (1 << 64) - 1


def _as_int64(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    value &= _MASK_64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's `>>` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def position_uniforms(positions: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """(T,) positions -> (T,) float32 uniforms in [0, 1): SplitMix64 of (`seed`, `stream`, position), a fixed value
    per token position that no content can change, the same on every device, rank and batch."""
    x = positions.long() + _as_int64(seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03)
    x = x * _as_int64(0x9E3779B97F4A7C15)
    x = (x ^ _shift_right(x, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _as_int64(0x94D049BB133111EB)
    x = x ^ _shift_right(x, 31)
    return (_shift_right(x, 40).double() / float(1 << 24)).float()


def random_difficulty(num_tokens: int, device: torch.device, training: bool, seed: int, layer_idx: int):
    """DARE's `random` difficulty proxy, a control free of any content: (T,) uniform values in [0, 1). In training,
    drawn afresh for every token from torch's generator; at inference, a fixed value per token position
    (`position_uniforms` of the forward's positions, this layer's stream), so a request routes the same whatever
    it is batched with and on every call."""
    if training:
        return torch.rand(num_tokens, device=device)
    context = current_routing_context()
    positions = context.positions_for(num_tokens, device) if context is not None else torch.arange(num_tokens, device=device)  # fmt: skip
    return position_uniforms(positions, seed, layer_idx)


def router_entropy(router_probs: torch.Tensor) -> torch.Tensor:
    """DARE's `router_entropy` difficulty proxy: -sum_i P_i log P_i of each token's router probabilities,
    (T, E) -> (T,), detached (a routing signal, not trained)."""
    return torch.special.entr(router_probs.detach().float()).sum(-1)


class DareRouter(Router, name="dare"):
    """DARE: a token's difficulty decides how many of its top experts it uses (1..M).

    The difficulty is `difficulty_proxy`'s: `"nll"` the predictor's estimate of the token's next-token NLL
    (trained by `token_nll_loss`, the model's L_diff), `"random"` (`random_difficulty`) or `"router_entropy"`
    (`router_entropy`), which need no predictor. Every proxy goes through the same thresholds (quantiles of Pi,
    EMA or per batch)."""

    summary = (
        "a per-layer predictor estimates each token's difficulty (its next-token NLL); the token uses its top-N_e "
        "experts, N_e = 1 + #{j : d_hat >= tau_j}, thresholds tracking batch quantiles so the shares of 1..M "
        "experts follow the target distribution Pi"
    )
    uses = ("norm_topk_prob", "aux_loss_fraction")
    settings = (
        integer_setting("max_experts", None, "M, the most experts a token uses (default: len(Pi))", 1, optional=True),
        list_setting(
            "target_distribution",
            "Pi, the shares of tokens using 1..M experts (default 0.6/0.3/0.09/0.01 for M=4, else uniform)",
            "non-negative values that sum to 1",
        ),
        list_setting("initial_thresholds", "tau_1..tau_{M-1} at init (default 0, 1, 2...)", "increasing numbers"),
        number_setting("threshold_momentum", 0.9, "gamma of the thresholds' EMA", 0.0, 1.0, high_open=True),
        choice_setting("threshold_update", "ema", "EMA of batch quantiles, or each batch's own", ("ema", "per_batch")),
        integer_setting("difficulty_predictor_size", 256, "width of the predictor's hidden layer", 1),
        number_setting("difficulty_predictor_dropout", 0.1, "the predictor's dropout", 0.0, 1.0, high_open=True),
        flag_setting(
            "difficulty_detach_input",
            True,
            "L_diff trains the predictor only, not the backbone (the paper is silent; attached, DARE fails to learn "
            "hard tokens from scratch: docs/difficulty_benchmark)",
        ),
        number_setting("difficulty_loss_coef", 1.0, "alpha, the weight of the difficulty loss L_diff", 0.0),
        choice_setting(
            "difficulty_proxy",
            "nll",
            "the difficulty: the predictor trained toward the next-token NLL, a content-free random value, the "
            "router's entropy, or hf-dare 0.1's random projection of the hidden state",
            ("nll", "random", "router_entropy", "hidden_projection"),
        ),
        choice_setting(
            "difficulty_targets",
            "text",
            "positions L_diff trains the predictor on: every text token's next-token NLL, or labelled positions only",
            ("text", "labels"),
            legacy="labels",
        ),
        integer_setting("difficulty_random_seed", 1234, "seed of the `random` proxy's values at inference"),
    )
    dial = Dial("shares", "target_distribution")

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_fraction = config.aux_loss_fraction
        self.max_experts = config.max_experts
        self.detach_input = config.difficulty_detach_input
        self.difficulty_proxy = config.difficulty_proxy
        self.uses_token_nll = self.difficulty_proxy == "nll"
        self.token_nll_loss_coef = config.difficulty_loss_coef
        self.token_nll_targets = config.difficulty_targets
        self.random_seed = config.difficulty_random_seed
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.text_config.hidden_size))
        if self.difficulty_proxy == "nll":
            self.difficulty_predictor = DifficultyPredictor(
                config.text_config.hidden_size,
                config.difficulty_predictor_size,
                config.difficulty_predictor_dropout,
                eps=getattr(config.text_config, "rms_norm_eps", 1e-6),
            )
        self.threshold_tracker = ThresholdTracker(
            config.initial_thresholds, config.target_distribution, config.threshold_momentum, config.threshold_update
        )

    @classmethod
    def upgrade_config_dict(cls, config_dict: dict) -> None:
        super().upgrade_config_dict(config_dict)
        if config_dict.get("difficulty_proxy") == "random":  # 0.1's random proxy was the hidden-state projection
            config_dict["difficulty_proxy"] = "hidden_projection"

    @classmethod
    def resolve_settings(cls, config) -> None:
        if config.target_distribution is None:
            m = config.max_experts or min(len(DEFAULT_TARGET_DISTRIBUTION), config.num_experts)
            config.target_distribution = list(DEFAULT_TARGET_DISTRIBUTION) if m == 4 else [1.0 / m] * m
        config.target_distribution = [float(p) for p in config.target_distribution]
        if config.max_experts is None:
            config.max_experts = len(config.target_distribution)
        if config.initial_thresholds is None:
            config.initial_thresholds = [float(j) for j in range(config.max_experts - 1)]
        config.initial_thresholds = [float(t) for t in config.initial_thresholds]

    @classmethod
    def validate(cls, config, fail, used: bool) -> None:
        pi, m = config.target_distribution, config.max_experts
        if len(pi) != m:
            fail("target_distribution", f"has {len(pi)} entries but max_experts={m}", "one probability per expert count 1..max_experts")  # fmt: skip
        if not 1 <= m <= config.num_experts:
            fail("max_experts", f"got {m} with num_experts={config.num_experts}", f"1..{config.num_experts}")
        if not is_distribution(pi):
            fail("target_distribution", f"{pi} sums to {sum(pi):.6g}", "non-negative values that sum to 1")
        taus = config.initial_thresholds
        if len(taus) != m - 1:
            fail("initial_thresholds", f"has {len(taus)} entries but max_experts={m}", f"{m - 1} values (max_experts - 1)")  # fmt: skip
        if any(b <= a for a, b in itertools.pairwise(taus)):
            fail("initial_thresholds", f"{taus} is not strictly increasing", "strictly increasing values")

    @classmethod
    def width(cls, config) -> int:
        return config.max_experts

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        router_logits, router_probs = softmax_router(self.weight, hidden_states)
        difficulty = self.difficulty(hidden_states, router_probs)
        self.keep((difficulty.detach(), token_mask))
        thresholds = None
        if self.training and self.threshold_tracker.mode == "per_batch":  # the paper's ablation: this batch's own
            thresholds = self.threshold_tracker.quantiles(difficulty, token_mask)
        expert_counts = self.threshold_tracker.expert_counts(difficulty, thresholds)
        return top_n_routing(
            router_logits, router_probs, expert_counts, self.max_experts, hidden_states.dtype, self.norm_topk_prob,
            difficulty,
        )  # fmt: skip

    def difficulty(self, hidden_states: torch.Tensor, router_probs: torch.Tensor) -> torch.Tensor:
        """(T,) difficulty of each token under `difficulty_proxy`."""
        if self.difficulty_proxy == "random":
            return random_difficulty(hidden_states.shape[0], hidden_states.device, self.training, self.random_seed, self.layer_idx)  # fmt: skip
        if self.difficulty_proxy == "router_entropy":
            return router_entropy(router_probs)
        if self.difficulty_proxy == "hidden_projection":
            return hidden_projection_difficulty(hidden_states)
        return self.difficulty_predictor(hidden_states.detach() if self.detach_input else hidden_states)

    def balancing_loss(self, routing, token_mask=None, vision_mask=None) -> torch.Tensor:
        return switch_balancing_loss(routing, self.aux_loss_fraction, token_mask)

    def token_nll_loss(self, routing: Routing, nll: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """L_diff of this layer: the mean over the marked positions of (d_hat - NLL)^2 (0 without any)."""
        squared_errors = (routing.difficulty.float() - nll) ** 2
        return masked_mean(squared_errors, weight)

    def observe(self, observation) -> None:
        difficulty, token_mask = observation
        self.threshold_tracker.observe(difficulty, token_mask)

    def update_state(self) -> dict | None:
        thresholds = self.threshold_tracker.update()
        return None if thresholds is None else {"thresholds": thresholds.tolist()}

    def logged_state(self) -> dict[str, float]:
        taus = self.threshold_tracker.thresholds.tolist()
        return {f"threshold_layer_{self.layer_idx}_{j}": tau for j, tau in enumerate(taus, start=1)}

    def init_weights(self, std: float) -> None:
        init.normal_(self.weight, mean=0.0, std=std)
        if self.difficulty_proxy == "nll":
            self.difficulty_predictor.init_weights(std)
        init.copy_(self.threshold_tracker.thresholds, torch.tensor(self.threshold_tracker.initial_thresholds))

    def set_thresholds(self, thresholds: torch.Tensor, cumulative: Sequence[float]) -> None:
        tracker = self.threshold_tracker
        tracker.thresholds.copy_(thresholds.to(tracker.thresholds.device))
        tracker.quantile_levels = list(cumulative)  # further training follows the calibrated distribution


# --- LTDR -------------------------------------------------------------------------------------------------------


class LtdrRouter(Router, name="ltdr"):
    """LTDR: top-k routing, balanced on language tokens only; a vision token whose routing-probability
    variance (RPV) exceeds the mean RPV of its own sample's vision tokens is a tail token and uses top-a.

    The reference set is the sample's own vision tokens, never the batch's, so a sample routes the same
    whatever it is batched with (in training and inference alike)."""

    summary = (
        "top-k, load balancing on language tokens only; vision tokens whose routing-probability variance is above "
        "their sample's mean (tail tokens) use top-a (`tail_top_a`)"
    )
    uses = ("num_experts_per_tok", "norm_topk_prob", "aux_loss_fraction")
    settings = (
        integer_setting("tail_top_a", None, "experts a tail vision token uses (default: all E)", 1, optional=True),
    )

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.num_experts_per_tok = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_fraction = config.aux_loss_fraction
        self.tail_top_a = config.tail_top_a
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.text_config.hidden_size))

    @classmethod
    def resolve_settings(cls, config) -> None:
        if config.tail_top_a is None:
            config.tail_top_a = config.num_experts

    @classmethod
    def validate(cls, config, fail, used: bool) -> None:
        k, a, e = config.num_experts_per_tok, config.tail_top_a, config.num_experts
        if not k <= a <= e:
            fail("tail_top_a", f"got {a} with num_experts_per_tok={k}, num_experts={e}", f"num_experts_per_tok <= tail_top_a <= {e}")  # fmt: skip

    @classmethod
    def width(cls, config) -> int:
        return config.tail_top_a

    def tail_tokens(
        self, router_probs: torch.Tensor, vision_mask: torch.Tensor | None, token_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """(T,) bool: vision tokens whose RPV is above the mean RPV of the (non-padding) vision tokens of the
        same sample. `router_probs` (T, E); masks (B, L) with B * L = T, or (T,) for a single sample."""
        if vision_mask is None:
            return torch.zeros_like(router_probs[:, 0], dtype=torch.bool)
        vision = vision_mask if token_mask is None else vision_mask & token_mask
        vision = vision.reshape(-1, vision.shape[-1])  # (B, L)
        rpv = router_probs.var(dim=-1, unbiased=False).view(vision.shape)
        mean_rpv = (rpv * vision).sum(-1, keepdim=True) / vision.sum(-1, keepdim=True).clamp(min=1)
        return (vision & (rpv > mean_rpv)).reshape(-1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        router_logits, router_probs = softmax_router(self.weight, hidden_states)
        tail = self.tail_tokens(router_probs, vision_mask, token_mask)
        expert_counts = torch.where(tail, self.tail_top_a, self.num_experts_per_tok)
        return top_n_routing(
            router_logits, router_probs, expert_counts, self.tail_top_a, hidden_states.dtype, self.norm_topk_prob
        )

    def balancing_loss(self, routing, token_mask=None, vision_mask=None) -> torch.Tensor:
        """The load-balancing loss over language tokens only: vision tokens get no balancing term."""
        language = token_mask
        if vision_mask is not None:
            language = ~vision_mask if token_mask is None else token_mask & ~vision_mask
        return switch_balancing_loss(routing, self.aux_loss_fraction, language)


# --- The DARE paper's baselines (its Table 1): Top-p, ReMoE, DynMoE and MoE++ ----------------------------------


def top_p_counts(router_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """(T, E) probabilities -> (T,) long: the size of each token's set of most probable experts up to the first
    whose cumulative probability exceeds `threshold` (p), at least 1: an expert is kept when the experts ranked
    above it hold at most p (the original's `top_p_sampling_batched_all_sequence`)."""
    return ranked_top_p_counts(torch.sort(router_probs, dim=-1, descending=True).values, threshold)


def ranked_top_p_counts(ranked_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """`top_p_counts` of probabilities already sorted in descending order, (T, E) -> (T,) long."""
    above = F.pad(ranked_probs.cumsum(-1)[:, :-1], (1, 0))
    return (above <= threshold).sum(-1).clamp(min=1)


class TopPRouter(Router, name="top_p"):
    """Top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"; code
    ZhenweiAn/Dynamic_MoE).

    A token uses its most probable experts up to the first whose cumulative softmax probability exceeds
    `top_p_threshold` (p; at least one), each weighted by its probability, not renormalised, as the original
    (`top_p_normalize=True` renormalises them). The router loss is the dynamic loss, `top_p_dynamic_loss_coef` *
    the mean over real tokens of the entropy -sum_i P_i log P_i, which sharpens P so that fewer experts reach p;
    the load-balancing loss is Top-K's (the released code has neither loss: both are the paper's).
    """

    summary = (
        "each token's most probable experts up to the first whose cumulative probability exceeds p, weighted by "
        "their probabilities; dynamic (entropy) loss"
    )
    uses = ("aux_loss_fraction",)
    settings = (
        number_setting("top_p_threshold", 0.9999, "p (the DARE paper's setting: 0.9999)", 0.0, 1.0, low_open=True),
        number_setting("top_p_dynamic_loss_coef", 3e-7, "weight of the dynamic loss (mean router entropy)", 0.0),
        flag_setting(
            "top_p_normalize",
            False,
            "renormalise the kept experts' weights to sum 1 (the original keeps their probabilities)",
            legacy=True,
        ),
    )
    dial = Dial("scalar", "top_p_threshold", 0.0, 1.0)

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.normalize = config.top_p_normalize
        self.aux_loss_fraction = config.aux_loss_fraction
        self.threshold = config.top_p_threshold
        self.dynamic_loss_coef = config.top_p_dynamic_loss_coef
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.text_config.hidden_size))

    @classmethod
    def upgrade_config_dict(cls, config_dict: dict) -> None:
        # hf-dare 0.1 renormalised Top-p's weights when `norm_topk_prob` was on (its default).
        config_dict.setdefault("top_p_normalize", config_dict.get("norm_topk_prob", True))

    @classmethod
    def upcycling_note(cls, config) -> str:
        if config.top_p_normalize:
            return (
                "with identical experts and weights that sum to 1, the model computes exactly what the dense one did"
            )
        return (
            f"the kept experts' weights sum to at least p = {config.top_p_threshold:g}, so the model computes the "
            f"dense one's function scaled by that sum (within a factor {config.top_p_threshold:g}..1)"
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        router_logits, router_probs = softmax_router(self.weight, hidden_states)
        # One sort ranks the experts and gives each token's count. A sort, not a top-k: vLLM's transformers
        # backend takes a block whose router is top-k(softmax(linear)) of a `weight` alone for a fixed top-k and
        # routes it with its own top-`num_experts_per_tok`, which is not top-p.
        ranked_probs, ranked_experts = torch.sort(router_probs, dim=-1, descending=True)
        expert_counts = ranked_top_p_counts(ranked_probs, self.threshold)
        used = torch.arange(self.num_experts, device=router_probs.device)[None, :] < expert_counts[:, None]
        indices, weights = route_slots(router_probs, ranked_experts, used, self.normalize)
        return Routing(
            router_logits=router_logits,
            router_probs=router_probs,
            expert_indices=indices,
            expert_weights=weights.to(hidden_states.dtype),
            expert_counts=expert_counts,
        )

    def balancing_loss(self, routing, token_mask=None, vision_mask=None) -> torch.Tensor:
        return switch_balancing_loss(routing, self.aux_loss_fraction, token_mask)

    def router_loss(self, routing, token_mask=None, vision_mask=None) -> torch.Tensor:
        """`top_p_dynamic_loss_coef` * mean entropy of the router's probabilities over the real tokens."""
        log_probs = F.log_softmax(routing.router_logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return self.dynamic_loss_coef * masked_mean(entropy, token_weights(token_mask, entropy))

    def set_dial(self, value: float) -> None:
        self.threshold = float(value)


def as_float32(value: float) -> float:
    """`value` rounded to the nearest float32 (without a tensor: models are built on the meta device too)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # beyond float32's range: a bound no float32 lambda reaches
        return value


class ReMoERouter(Router, name="remoe"):
    """ReMoE (Wang et al. 2024, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing"; code
    thu-ml/ReMoE).

    G = ReLU(W h + b) (float32, the `router_logits` before the ReLU; b the gate offset below, 0 in the original); a
    token uses every expert with G_i > 0, output sum_i G_i E_i(h) (no renormalisation; a token with no positive gate
    uses no expert and its MoE output is 0).
    The router loss is the L1 penalty lambda * mean over real tokens of sum_i f_i G_i, with f_i = E / (k T) *
    #{tokens with G_i > 0} (detached, the paper's load-balanced L1; f_i = 1 with `remoe_load_balancing=False`),
    added up over the layers as the original does. ReMoE has no other load-balancing loss (`balancing_loss` is 0).

    lambda (`l1_coef`, a persistent float32 buffer in every ReMoE layer: saved, loaded, restored on resume) moves
    once per optimizer step (`update_states`), from the gates of every forward since the last update, summed over
    all ranks so it stays identical on every rank: lambda *= alpha if the sparsity (the share of zero gates) is
    below `remoe_target_sparsity` (default 1 - k/E), else lambda /= alpha (the original's rule: a tie divides),
    alpha = `remoe_l1_coef_multiplier`. As in the original, one lambda serves every ReMoE layer and follows their
    mean sparsity (`remoe_shared_l1_coef=False`: each layer its own, from its own sparsity). Unlike the original,
    lambda is moved in float64 and kept within [`remoe_l1_coef_min` (default: the initial lambda, a penalty too
    small to act), `remoe_l1_coef_max`]: divided on every step for hundreds of steps (after upcycling the model
    can be sparser than the target for long), a float32 lambda reaches the subnormals, where x1.2 rounds back to
    the same value, and could never grow again; from the floor it is back within a few dozen steps.

    The L1 penalty only pushes toward sparsity, and a gate that ReLU holds at 0 gets no gradient: once lambda has
    overshot (it grows x1.2 on every step the sparsity is a hair below the target) and killed gates, lowering
    lambda again cannot bring them back (after upcycling: Avg K 2.0 -> 1.1 for good, a third of the tokens on no
    expert). So below its floor the controller goes on as a gate offset b >= 0 added to every logit before the
    ReLU (`gate_offset`, a persistent float32 buffer beside lambda): on a step that would divide lambda already at
    its floor, b += `remoe_gate_offset_step`; on a step that would multiply lambda while b > 0, b -= the step
    (down to 0) instead. Raising every logit revives dead gates. b is 0 whenever lambda is above its floor and
    moves only while the model is sparser than its target with lambda at its floor, where the original can do
    nothing; elsewhere the rule is the original's. `remoe_gate_offset_step=0` is the original (no offset, no
    buffer; configs saved before it get 0).
    """

    summary = (
        "ReLU gates G = ReLU(W h), every expert with G_i > 0, load-balanced L1 penalty with an adaptive lambda (and a "
        "gate offset added to W h where lambda is at its floor)"
    )
    uses = ("num_experts_per_tok",)
    settings = (
        number_setting("remoe_initial_l1_coef", 1e-8, "lambda at init", 0.0, low_open=True),
        number_setting(
            "remoe_l1_coef_multiplier", 1.2, "alpha: lambda's step, once per optimizer step", 1.0, low_open=True
        ),  # fmt: skip
        number_setting(
            "remoe_target_sparsity",
            None,
            "the share of zero gates lambda steers to (default 1 - k/E)",
            0.0,
            1.0,
            high_open=True,
            optional=True,
        ),  # fmt: skip
        flag_setting(
            "remoe_load_balancing", True, "the paper's load-balanced L1 (f_i the expert's load), else f_i = 1"
        ),
        flag_setting(
            "remoe_shared_l1_coef",
            True,
            "one lambda for every ReMoE layer (the original), else one each",
            legacy=False,
        ),
        number_setting(
            "remoe_l1_coef_min",
            None,
            "the least lambda (default: its initial value; the original has no bound)",
            0.0,
            low_open=True,
            optional=True,
        ),  # fmt: skip
        number_setting("remoe_l1_coef_max", 1e3, "the largest lambda (the original has no bound)", 0.0, low_open=True),
        number_setting(
            "remoe_gate_offset_step",
            1e-2,
            "the step of the gate offset that takes over from lambda at its floor (0: the original, no offset)",
            0.0,
            legacy=0.0,
        ),
    )
    layer_loss_reduction = "sum"  # each layer's L1 enters the backward on its own in the original

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.initial_l1_coef = config.remoe_initial_l1_coef
        self.l1_coef_multiplier = config.remoe_l1_coef_multiplier
        target = config.remoe_target_sparsity
        self.target_sparsity = 1.0 - config.num_experts_per_tok / config.num_experts if target is None else target
        self.load_balancing = config.remoe_load_balancing
        self.shared_l1_coef = config.remoe_shared_l1_coef
        floor = config.remoe_initial_l1_coef if config.remoe_l1_coef_min is None else config.remoe_l1_coef_min
        # As float32 values, the buffer's: lambda clamped to its floor must compare equal to the floor.
        self.l1_coef_bounds = (as_float32(floor), as_float32(config.remoe_l1_coef_max))
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.text_config.hidden_size))
        self.register_buffer("l1_coef", torch.tensor(float(self.initial_l1_coef), dtype=torch.float32))
        self.gate_offset_step = config.remoe_gate_offset_step
        if self.gate_offset_step > 0:
            self.register_buffer("gate_offset", torch.zeros((), dtype=torch.float32))
        else:
            self.gate_offset = None
        # [active gates, gates] of the real tokens of each training forward since the last update (host-free).
        self._observed: list[torch.Tensor] = []

    @classmethod
    def validate(cls, config, fail, used: bool) -> None:
        low = config.remoe_initial_l1_coef if config.remoe_l1_coef_min is None else config.remoe_l1_coef_min
        if not low < config.remoe_l1_coef_max:
            fail("remoe_l1_coef_max", f"got {config.remoe_l1_coef_max} with a least lambda of {low}", "above remoe_l1_coef_min (default remoe_initial_l1_coef)")  # fmt: skip

    def _apply(self, fn, recurse=True):
        # Like DARE's thresholds: lambda's x1.2 steps stay exact in float32 whatever dtype the model is cast to.
        super()._apply(fn, recurse)
        self.l1_coef = self.l1_coef.float()
        if self.gate_offset is not None:
            self.gate_offset = self.gate_offset.float()
        return self

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        router_logits = F.linear(hidden_states.float(), self.weight.float())
        if self.gate_offset is not None:
            router_logits = router_logits + self.gate_offset
        gates = F.relu(router_logits)
        active = gates > 0
        top_gates, top_indices = torch.topk(gates, self.num_experts, dim=-1)
        unused = top_gates <= 0
        if observing():
            real = torch.ones_like(active[:, 0]) if token_mask is None else token_mask.reshape(-1).bool()
            self.keep(torch.stack([(active & real[:, None]).sum(), real.sum() * self.num_experts]))
        return Routing(
            router_logits=router_logits,
            expert_indices=top_indices.masked_fill(unused, self.num_experts),
            expert_weights=top_gates.masked_fill(unused, 0.0).to(hidden_states.dtype),
            expert_counts=active.sum(-1),
        )

    def observe(self, counts: torch.Tensor) -> None:
        """[active gates, gates] of a forward's real tokens, for the next update (no host sync)."""
        self._observed.append(counts.detach())
        if len(self._observed) > 64:  # many forwards without an update: keep their sum
            self._observed = [torch.stack(self._observed).sum(0)]

    def _take_observed(self) -> torch.Tensor:
        """This layer's [active gates, gates] since the last update, summed (2,) long; forgotten."""
        observed = torch.stack(self._observed).sum(0) if self._observed else torch.zeros(2, dtype=torch.long)
        self._observed = []
        return observed.to(self.l1_coef.device)

    def stepped(self, l1_coef: float, gate_offset: float, sparsity: float) -> tuple[float, float]:
        """(lambda, gate offset) after one step of the rule from `sparsity`: lambda within its bounds, the offset
        taking over below lambda's floor (in float64)."""
        floor, ceiling = self.l1_coef_bounds
        if sparsity < self.target_sparsity:  # too many active gates
            if gate_offset > 0:
                return l1_coef, max(gate_offset - self.gate_offset_step, 0.0)
            return min(max(l1_coef * self.l1_coef_multiplier, floor), ceiling), gate_offset
        if l1_coef <= floor:
            return floor, gate_offset + self.gate_offset_step
        return max(l1_coef / self.l1_coef_multiplier, floor), gate_offset

    def controller_state(self) -> tuple[float, float]:
        """(lambda, gate offset) as Python floats."""
        return self.l1_coef.item(), 0.0 if self.gate_offset is None else self.gate_offset.item()

    def set_controller_state(self, state: tuple[float, float]) -> None:
        self.l1_coef.fill_(state[0])
        if self.gate_offset is not None:
            self.gate_offset.fill_(state[1])

    @classmethod
    @torch.no_grad()
    def update_states(cls, routers: list["ReMoERouter"]) -> list[dict | None]:
        """Move lambda (or the gate offset, see the class docstring) one step toward the target sparsity from the
        gates observed since the last update (summed over all ranks: every rank must call it), and forget them:
        with `remoe_shared_l1_coef` one step for all the layers from their mean sparsity, else each layer from its
        own. Returns per layer its `l1_coef`, `gate_offset` and `sparsity`, or None when nothing was observed
        (nothing moved)."""
        observed = torch.stack([router._take_observed() for router in routers])  # (layers, 2)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(observed)
        active, gates = observed.double().unbind(-1)
        seen = gates > 0
        if not seen.any():
            return [None] * len(routers)
        sparsity = (1.0 - active / gates.clamp(min=1)).tolist()
        shared = routers[0].shared_l1_coef
        if shared:
            mean_sparsity = sum(s for s, ok in zip(sparsity, seen.tolist(), strict=True) if ok) / int(seen.sum())
            value = routers[0].stepped(*routers[0].controller_state(), mean_sparsity)
        states = []
        for router, layer_sparsity, ok in zip(routers, sparsity, seen.tolist(), strict=True):
            if not shared and not ok:
                states.append(None)
                continue
            router.set_controller_state(
                value if shared else router.stepped(*router.controller_state(), layer_sparsity)
            )
            l1_coef, gate_offset = router.controller_state()
            states.append({"l1_coef": l1_coef, "gate_offset": gate_offset, "sparsity": layer_sparsity})
        return states

    def logged_state(self) -> dict[str, float]:
        state = {f"l1_coef_layer_{self.layer_idx}": self.l1_coef.item()}
        if self.gate_offset is not None:
            state[f"gate_offset_layer_{self.layer_idx}"] = self.gate_offset.item()
        return state

    def balancing_loss(self, routing, token_mask=None, vision_mask=None) -> torch.Tensor:
        """0: ReMoE balances the load through its L1 penalty (`router_loss`)."""
        return routing.router_logits.new_zeros(())

    def router_loss(self, routing, token_mask=None, vision_mask=None) -> torch.Tensor:
        """lambda * mean over real tokens of sum_i f_i G_i (f_i = 1 without `remoe_load_balancing`)."""
        gates = F.relu(routing.router_logits)
        weights = token_weights(token_mask, gates)
        per_expert = gates
        if self.load_balancing:
            active = ((gates > 0).float() * weights[:, None]).sum(0)
            active_per_token = self.num_experts * (1.0 - self.target_sparsity)  # k
            load = self.num_experts / (active_per_token * weights.sum().clamp(min=1.0)) * active
            per_expert = gates * load.detach()
        return self.l1_coef * masked_mean(per_expert.sum(-1), weights)

    def init_weights(self, std: float) -> None:
        init.normal_(self.weight, mean=0.0, std=std)
        init.copy_(self.l1_coef, torch.tensor(float(self.initial_l1_coef)))
        if self.gate_offset is not None:
            init.zeros_(self.gate_offset)

    def init_upcycled(self, std: float) -> None:
        """The gates of an upcycled router sum to 1 per token in expectation, the nearest a ReLU router without a
        bias comes to the dense FFN's output (the experts are its copies): for an RMS-normed input h of norm
        sqrt(H), w_i ~ N(0, s^2) gives E[ReLU(w_i . h)] = s sqrt(H) / sqrt(2 pi), so s = sqrt(2 pi) / (E sqrt(H))."""
        hidden_size = self.weight.shape[1]
        self.init_weights(math.sqrt(2 * math.pi) / (self.num_experts * math.sqrt(hidden_size)))

    @classmethod
    def upcycling_note(cls, config) -> str:
        spread = math.sqrt(2 * math.pi * (0.5 - 1 / (2 * math.pi)) / config.num_experts)
        return (
            "ReLU gates do not sum to 1 per token: the router is drawn so that their sum is 1 in expectation, with a "
            f"spread of about {spread:.2f} (s.d., for inputs of norm sqrt(hidden size)), so the model computes the "
            "dense one's function scaled per token by that sum until the gates are trained"
        )


class DynMoERouter(Router, name="dynmoe"):
    """DynMoE's top-any gating (Guo et al. 2024, "Dynamic Mixture of Experts: An Auto-Tuning Approach for
    Efficient Transformer Models"; code LINs-lab/DynMoE, its DeepSpeed implementation).

    `weight` holds the experts' embeddings w_i; expert i is active for a token h when sigmoid(cos(h, w_i)) >
    sigmoid(theta_i), with trainable per-expert thresholds theta (`expert_thresholds`, 0 at init); the cosines
    are the `router_logits`. The active experts share the token equally (weights 1 / K), with DynMoE's
    straight-through gradient (each active weight carries the gradient of sigmoid(cos) - sigmoid(theta), so W and
    theta learn). A token with no active expert uses none in training, as the original (its MoE output is 0;
    `dynmoe_fallback_in_training=True`: its best one), and its best expert (highest cosine), weight 1, at
    inference. The load-balancing loss is the original's E * sum_i me_i ce_i over the real tokens with an active
    expert (me_i: mean of the gates normalised per token, ce_i: the share of those tokens using expert i); the
    router loss DynMoE's regularisers: `dynmoe_diversity_coef` * ||W_n W_n^T - I||_F (W_n: unit-norm embeddings) +
    `dynmoe_simplicity_coef` * mean_i ||w_i|| + `dynmoe_efficiency_coef` * mean over real tokens of the share of
    active experts. Both add up over the layers, as DynMoE's MoE-LLaVA does.
    """

    summary = (
        "expert i active when sigmoid(cos(h, w_i)) > sigmoid(theta_i) with trainable theta (top-any), the best expert "
        "when none is (at inference); diversity, simplicity and efficiency regularisers"
    )
    settings = (
        number_setting("dynmoe_diversity_coef", 0.01, "weight of ||W_n W_n^T - I||_F", 0.0),
        number_setting("dynmoe_simplicity_coef", 0.01, "weight of the mean embedding norm", 0.0),
        number_setting("dynmoe_efficiency_coef", 0.01, "weight of the mean share of active experts", 0.0),
        flag_setting(
            "dynmoe_fallback_in_training",
            False,
            "a training token with no active expert uses its best one (the original: none)",
            legacy=True,
        ),
    )
    layer_loss_reduction = "sum"  # DynMoE's MoE-LLaVA adds its layers' l_aux

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.text_config.hidden_size))
        self.expert_thresholds = nn.Parameter(torch.zeros(config.num_experts))
        self.diversity_coef = config.dynmoe_diversity_coef
        self.simplicity_coef = config.dynmoe_simplicity_coef
        self.efficiency_coef = config.dynmoe_efficiency_coef
        self.fallback_in_training = config.dynmoe_fallback_in_training

    def gates(self, cosine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From cos(h, w_i) (T, E): the straight-through gates of the active experts (1 forward), the chosen
        experts (the active ones; and the best one of a token with none, at inference or with the fallback) and
        their weights 1 / K, all (T, E)."""
        margin = torch.sigmoid(cosine) - torch.sigmoid(self.expert_thresholds.float())
        active = margin > 0
        straight_through = active.float() + (margin - margin.detach()) * active
        best = F.one_hot(cosine.argmax(-1), self.num_experts).bool() & ~active.any(-1, keepdim=True)
        if self.training and not self.fallback_in_training:
            best = torch.zeros_like(best)
        chosen = active | best
        weights = (straight_through + best.float()) / chosen.sum(-1, keepdim=True).clamp(min=1)
        return straight_through, chosen, weights

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        cosine = F.linear(F.normalize(hidden_states.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))
        _, chosen, weights = self.gates(cosine)
        ranked, indices = torch.topk(torch.sigmoid(cosine).masked_fill(~chosen, -1.0), self.num_experts, dim=-1)
        unused = ranked < 0
        return Routing(
            router_logits=cosine,
            expert_indices=indices.masked_fill(unused, self.num_experts),
            expert_weights=weights.gather(-1, indices).masked_fill(unused, 0.0).to(hidden_states.dtype),
            expert_counts=chosen.sum(-1),
        )

    def balancing_loss(self, routing, token_mask=None, vision_mask=None) -> torch.Tensor:
        """DynMoE's balancing term over the real tokens with an active expert: E * sum_i me_i ce_i, me_i the mean of
        the gates normalised per token (the normaliser carries gradient), ce_i the share of those tokens that use
        expert i."""
        straight_through, _, _ = self.gates(routing.router_logits)
        routed = token_weights(token_mask, straight_through) * (straight_through.detach().sum(-1) > 0)
        normalised = straight_through / straight_through.sum(-1, keepdim=True).clamp(min=1e-9)
        count = routed.sum().clamp(min=1.0)
        me = (normalised * routed[:, None]).sum(0) / count
        ce = ((straight_through.detach() > 0).float() * routed[:, None]).sum(0) / count
        return self.num_experts * (me * ce).sum()

    def router_loss(self, routing, token_mask=None, vision_mask=None) -> torch.Tensor:
        """DynMoE's diversity, simplicity and efficiency regularisers, weighted by their coefficients."""
        weight = self.weight.float()
        unit = F.normalize(weight, dim=-1)
        eye = torch.eye(self.num_experts, device=weight.device, dtype=weight.dtype)
        diversity = torch.linalg.matrix_norm(unit @ unit.T - eye)
        simplicity = weight.norm(dim=-1).mean()
        straight_through, _, _ = self.gates(routing.router_logits)
        efficiency = masked_mean(straight_through.mean(-1), token_weights(token_mask, straight_through))
        return self.diversity_coef * diversity + self.simplicity_coef * simplicity + self.efficiency_coef * efficiency

    def init_weights(self, std: float) -> None:
        init.orthogonal_(self.weight)  # DynMoE's init: orthonormal expert embeddings
        init.zeros_(self.expert_thresholds)


class MoEPlusPlusRouter(Router, name="moepp"):
    """MoE++ (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with Zero-Computation Experts"; code
    SkyworkAI/MoE-plus-plus).

    Beside the E FFN experts, `moepp_zero_experts` zero experts (output 0), `moepp_copy_experts` copy experts
    (output x) and `moepp_constant_experts` constant experts (output alpha_1 x + alpha_2 v, [alpha_1, alpha_2] =
    softmax(W_c x), v learned): routed experts E..E+Z-1 in that order. The gate is the original's two-layer
    Linear(H, 8N) -> Tanh -> Linear(8N, N) over all N = E + Z experts (`moepp_gate="linear"`: one linear layer);
    softmax, top-k (`num_experts_per_tok`); the zero experts' weights are set to 0 before the chosen weights are
    renormalised (`norm_topk_prob`), so {FFN, zero} gives the FFN expert weight 1, as the original
    (`moepp_zero_gate=False`: renormalised over all k). Every expert gets x = k * h, the original's default
    (`moepp_scale_expert_input=False`: h). The `Routing` names the FFN experts only (the sentinel E for the others),
    so only they go through the experts kernels; the others' weighted outputs are `zero_computation_output`, which
    the MoE block adds. Avg K counts FFN experts only.

    Gating residuals (`moepp_gating_residual`): a layer's logits add `residual_weight` (a learned (N, N) map,
    N(0, std) at init as the original's) applied to the logits of the previous MoE++ layer of the same forward (the
    routing context carries them); the first layer, or a call outside a model's forward, adds the map of zeros.
    Heterogeneous load balancing (the paper's Eq. 7, not in the released code): sum_i eta_i f_i P_i over all N
    experts, f_i the share of tokens that choose expert i, P_i its mean probability, eta_i = 1 for FFN experts and
    `moepp_tau` for the zero-computation ones.
    """

    summary = (
        "top-k over the FFN experts plus zero, copy and constant (zero-computation) experts, a two-layer tanh gate "
        "with gating residuals, heterogeneous load balancing"
    )
    uses = ("num_experts_per_tok", "norm_topk_prob", "aux_loss_fraction")
    settings = (
        integer_setting("moepp_zero_experts", 1, "zero experts (output 0)"),
        integer_setting("moepp_copy_experts", 1, "copy experts (output x)"),
        integer_setting("moepp_constant_experts", 2, "constant experts (output alpha_1 x + alpha_2 v)"),
        flag_setting("moepp_gating_residual", True, "logits add a learned map of the previous MoE++ layer's"),
        number_setting("moepp_tau", 0.75, "weight of the zero-computation experts in the balancing loss", 0.0),
        choice_setting(
            "moepp_gate",
            "mlp",
            "the gate: Linear(H, 8N) -> Tanh -> Linear(8N, N) (the original's default) or one linear layer",
            ("mlp", "linear"),
            legacy="linear",
        ),
        flag_setting(
            "moepp_zero_gate",
            True,
            "the zero experts' weights are 0 before renormalising (the original)",
            legacy=False,
        ),
        flag_setting(
            "moepp_scale_expert_input", True, "every expert gets k * h (the original's default), else h", legacy=False
        ),
    )

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        hidden_size = config.text_config.hidden_size
        self.num_experts_per_tok = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_fraction = config.aux_loss_fraction
        self.num_zero_experts = config.moepp_zero_experts
        self.num_copy_experts = config.moepp_copy_experts
        self.num_constant_experts = config.moepp_constant_experts
        self.num_routed_experts = (
            config.num_experts + self.num_zero_experts + self.num_copy_experts + self.num_constant_experts
        )
        self.tau = config.moepp_tau
        self.gating_residual = config.moepp_gating_residual
        self.zero_gate = config.moepp_zero_gate
        self.expert_input_scale = float(self.num_experts_per_tok) if config.moepp_scale_expert_input else 1.0
        self.mlp_gate = config.moepp_gate == "mlp"
        gate_input = hidden_size
        if self.mlp_gate:
            gate_input = 8 * self.num_routed_experts
            self.hidden_weight = nn.Parameter(torch.zeros(gate_input, hidden_size))
        self.weight = nn.Parameter(torch.zeros(self.num_routed_experts, gate_input))
        if self.gating_residual:
            self.residual_weight = nn.Parameter(torch.zeros(self.num_routed_experts, self.num_routed_experts))
        if self.num_constant_experts:
            self.constant_vectors = nn.Parameter(torch.zeros(self.num_constant_experts, hidden_size))
            # W_c of each constant expert: rows 2c and 2c + 1 give alpha_1 and alpha_2 of constant expert c.
            self.constant_gate = nn.Parameter(torch.zeros(2 * self.num_constant_experts, hidden_size))

    @classmethod
    def width(cls, config) -> int:
        return config.num_experts_per_tok  # FFN experts among its top-k

    def gate_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(T, H) -> (T, N) logits of the gate (before the gating residual), float32."""
        states = hidden_states.float()
        if self.mlp_gate:
            states = torch.tanh(F.linear(states, self.hidden_weight.float()))
        return F.linear(states, self.weight.float())

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        router_logits = self.gate_logits(hidden_states)
        if self.gating_residual:
            context = current_routing_context()
            previous = None if context is None else context.previous_router_logits
            if previous is None or previous.shape != router_logits.shape:
                # The first MoE++ layer adds the map of zeros: every parameter stays in the graph (DDP).
                previous = torch.zeros_like(router_logits)
            router_logits = router_logits + F.linear(previous, self.residual_weight.float())
            if context is not None:
                context.previous_router_logits = router_logits
        router_probs = F.softmax(router_logits, dim=-1)
        top_probs, top_indices = torch.topk(router_probs, self.num_experts_per_tok, dim=-1)
        if self.zero_gate:
            first_copy = self.num_experts + self.num_zero_experts
            zero = (top_indices >= self.num_experts) & (top_indices < first_copy)
            top_probs = top_probs.masked_fill(zero, 0.0)
        if self.norm_topk_prob:
            top_probs = top_probs / top_probs.sum(-1, keepdim=True).clamp(min=torch.finfo(top_probs.dtype).eps)
        ffn = top_indices < self.num_experts
        return Routing(
            router_logits=router_logits,
            router_probs=router_probs,
            expert_indices=top_indices.masked_fill(~ffn, self.num_experts),
            expert_weights=top_probs.masked_fill(~ffn, 0.0).to(hidden_states.dtype),
            expert_counts=ffn.sum(-1),
            zero_computation_output=self.zero_computation_output(
                hidden_states * self.expert_input_scale, top_indices, top_probs
            ),
            expert_input_scale=self.expert_input_scale,
        )

    def zero_computation_output(
        self, expert_input: torch.Tensor, top_indices: torch.Tensor, top_weights: torch.Tensor
    ) -> torch.Tensor:
        """(T, H): the weighted outputs of the zero (0), copy (x) and constant (alpha_1 x + alpha_2 v) experts each
        token chose among `top_indices` (T, k) with `top_weights` (T, k), on the experts' input x (T, H); 0 for a
        token that chose FFN experts only."""
        num_tokens = expert_input.shape[0]
        chosen = top_weights.new_zeros(num_tokens, self.num_routed_experts).scatter(-1, top_indices, top_weights)
        first_copy = self.num_experts + self.num_zero_experts
        first_constant = first_copy + self.num_copy_experts
        states = expert_input.float()
        scale = chosen[:, first_copy:first_constant].sum(-1)  # copy experts: x
        out = None
        if self.num_constant_experts:
            constant = chosen[:, first_constant:]  # (T, C)
            alpha = F.softmax(F.linear(states, self.constant_gate.float()).view(num_tokens, -1, 2), dim=-1)
            scale = scale + (constant * alpha[..., 0]).sum(-1)
            out = (constant * alpha[..., 1]) @ self.constant_vectors.float()
        out = scale[:, None] * states if out is None else scale[:, None] * states + out
        return out.to(expert_input.dtype)

    def balancing_loss(self, routing, token_mask=None, vision_mask=None) -> torch.Tensor:
        """MoE++'s heterogeneous load balancing (its paper's Eq. 7): sum_i eta_i f_i P_i over all N experts, f_i the
        share of the real tokens choosing expert i (its top-k; `aux_loss_fraction="top1"`: its first choice), P_i
        its mean probability, eta_i = 1 for FFN experts and tau for the zero-computation ones."""
        probs = routing.router_probs
        k = 1 if self.aux_loss_fraction == "top1" else self.num_experts_per_tok
        assignments = torch.topk(probs, k, dim=-1).indices
        weights = token_weights(token_mask, probs)
        count = weights.sum().clamp(min=1.0)
        chosen = torch.zeros_like(probs).scatter(-1, assignments, 1.0)
        share = (chosen * weights[:, None]).sum(0) / count
        mean_probs = (probs * weights[:, None]).sum(0) / count
        eta = torch.ones_like(mean_probs)
        eta[self.num_experts :] = self.tau
        return (eta * share * mean_probs).sum()

    def init_weights(self, std: float) -> None:
        init.normal_(self.weight, mean=0.0, std=std)
        if self.mlp_gate:
            init.normal_(self.hidden_weight, mean=0.0, std=std)
        if self.gating_residual:
            init.normal_(self.residual_weight, mean=0.0, std=std)
        if self.num_constant_experts:
            init.normal_(self.constant_vectors, mean=0.0, std=1.0)  # the original's v ~ N(0, 1)
            init.normal_(self.constant_gate, mean=0.0, std=std)

    @classmethod
    def upcycling_note(cls, config) -> str:
        scaled = " and every expert gets k * h (`moepp_scale_expert_input`)" if config.moepp_scale_expert_input else ""
        return (
            "tokens routed to zero, copy or constant experts get their outputs instead of the dense FFN's"
            + scaled
            + ", so the upcycled model does not compute what the dense one did until the router is trained"
        )


class HyperRouter(Router, name="hyperrouter"):
    """HyperRouter (Do et al. 2023, "HyperRouter: Towards Efficient Training and Inference of Sparse Mixture of
    Experts"; code giangdip2410/HyperRouter, `HyperRouterGate` in custom_gate.py).

    The router's weights are generated, not trained: W (E, H) and b (E) = H(e), a hypernetwork H = Linear(H, S) ->
    ReLU -> Linear(S, E * H + E) applied to a small trainable embedding e (1, H) per layer; logits = W h + b,
    each token's top-k (`num_experts_per_tok`), weights the softmax over the chosen logits (= the probabilities
    renormalised over the k: `norm_topk_prob`). The hypernetwork is fixed (random, never trained): its tensors are
    persistent buffers (`hyper_*`), saved with the checkpoint, so only e learns, a middle way between a trained
    router and a frozen random one (SMoE-Dropout). No load-balancing loss, as the original gate has none.
    Initialisation as the original's: e ~ N(0, 1), the hypernetwork's layers as PyTorch's `nn.Linear` (uniform
    within 1 / sqrt(fan in)). `hyperrouter_hidden_size` is S (the original's `hyper_size`: 64 for enwik8, 256 for
    WikiText-103).
    """

    summary = (
        "top-k over logits W h + b whose weights a fixed random hypernetwork generates from a small trainable "
        "embedding per layer"
    )
    uses = ("num_experts_per_tok", "norm_topk_prob")
    settings = (integer_setting("hyperrouter_hidden_size", 64, "S, the hypernetwork's hidden width", 1),)
    dial = Dial("integer", "num_experts_per_tok")

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        hidden_size, width = config.text_config.hidden_size, config.hyperrouter_hidden_size
        self.num_experts_per_tok = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.embedding = nn.Parameter(torch.zeros(1, hidden_size))
        generated = config.num_experts * hidden_size + config.num_experts
        self.register_buffer("hyper_in_weight", torch.zeros(width, hidden_size))
        self.register_buffer("hyper_in_bias", torch.zeros(width))
        self.register_buffer("hyper_out_weight", torch.zeros(generated, width))
        self.register_buffer("hyper_out_bias", torch.zeros(generated))

    @classmethod
    def width(cls, config) -> int:
        return config.num_experts_per_tok

    def generated_router(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The router weight (E, H) and bias (E,) the hypernetwork makes from the embedding, float32."""
        hidden = F.relu(F.linear(self.embedding.float(), self.hyper_in_weight.float(), self.hyper_in_bias.float()))
        generated = F.linear(hidden, self.hyper_out_weight.float(), self.hyper_out_bias.float())[0]
        weight_and_bias = generated.view(self.num_experts, -1)
        return weight_and_bias[:, :-1], weight_and_bias[:, -1]

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        weight, bias = self.generated_router()
        router_logits = F.linear(hidden_states.float(), weight, bias)
        router_probs = F.softmax(router_logits, dim=-1)
        counts = torch.full_like(router_probs[:, 0], self.num_experts_per_tok, dtype=torch.long)
        return top_n_routing(
            router_logits, router_probs, counts, self.num_experts_per_tok, hidden_states.dtype, self.norm_topk_prob
        )

    def init_weights(self, std: float) -> None:
        init.normal_(self.embedding, mean=0.0, std=1.0)
        for name in ("hyper_in", "hyper_out"):
            weight, bias = getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias")
            bound = 1.0 / math.sqrt(weight.shape[1])
            init.uniform_(weight, -bound, bound)
            init.uniform_(bias, -bound, bound)

    def set_dial(self, value) -> None:
        self.num_experts_per_tok = int(value)


__all__ = [
    "DareRouter",
    "HyperRouter",
    "DifficultyPredictor",
    "DynMoERouter",
    "LtdrRouter",
    "MoEPlusPlusRouter",
    "ReMoERouter",
    "ThresholdTracker",
    "TopKRouter",
    "TopPRouter",
]
