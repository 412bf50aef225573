"""Routers of the MoE layers: Top-K (MoE-LLaVA), DARE (difficulty-aware) and LTDR (long-tail vision tokens).

A router maps the tokens of one MoE layer, `hidden_states` (T, H), to a `Routing`: for each token the
experts it uses, padded to the router's widest case with the sentinel index `num_experts` (how
transformers' experts interface expresses "no expert in this slot"), and their weights, which sum to 1
over the experts used.
"""

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .statistics import expert_load


@dataclass
class Routing:
    """What a router decided for T tokens of one MoE layer (K = the router's widest case).

    - `router_logits` (T, E) and `router_probs` (T, E, float32, softmax over experts)
    - `expert_indices` (T, K) long, experts by descending probability, `num_experts` in unused slots
    - `expert_weights` (T, K), 0 in unused slots, sum 1 per token
    - `expert_counts` (T,) long: experts used per token
    - `difficulty` (T,): DARE's predicted difficulty, else None
    - `aux_loss`: the layer's load-balancing loss (scalar), once `router.aux_loss` has been asked for it
    """

    router_logits: torch.Tensor
    router_probs: torch.Tensor
    expert_indices: torch.Tensor
    expert_weights: torch.Tensor
    expert_counts: torch.Tensor
    difficulty: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class RoutingContext:
    """What the MoE blocks of one forward share, opened by the model around its decoder (`routing_context`).

    - `token_mask` (B, L): real (non-padding) tokens; `vision_mask` (B, L): image tokens; None: all / none.
    - `with_aux_loss`: the blocks compute their load-balancing loss (training, or labels given).
    - `observe`: DARE's routers keep their predictions for the next threshold update (training).
    - `routings`: filled by the blocks, in the order they ran; `record=False` (a gradient-checkpointing
      recomputation of a forward already recorded) leaves it alone.
    """

    token_mask: torch.Tensor | None = None
    vision_mask: torch.Tensor | None = None
    with_aux_loss: bool = False
    observe: bool = False
    record: bool = True
    routings: list[Routing] = field(default_factory=list)

    def masks_for(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This forward's (B, L) masks, or None where a mask does not fit the tokens the block sees."""
        shape = (batch_size, seq_len)
        fit = [m if m is not None and tuple(m.shape) == shape else None for m in (self.token_mask, self.vision_mask)]
        return fit[0], fit[1]


try:  # a ContextVar that `torch.compile` can trace (transformers >= 5.x)
    from transformers.utils.output_capturing import CompileableContextVar as _ContextVar
except ImportError:  # pragma: no cover - older transformers
    from contextvars import ContextVar

    def _ContextVar(name):  # noqa: N802
        return ContextVar(name, default=None)


_ACTIVE_ROUTING = _ContextVar("hf_dare_routing_context")


def current_routing_context() -> RoutingContext | None:
    """The routing context of the forward in progress on this thread, or None outside a model's forward."""
    return _ACTIVE_ROUTING.get()


@contextmanager
def routing_context(context: RoutingContext) -> Iterator[RoutingContext]:
    """Make `context` the one the MoE blocks see until the block exits (per thread, nestable)."""
    token = _ACTIVE_ROUTING.set(context)
    try:
        yield context
    finally:
        _ACTIVE_ROUTING.reset(token)


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
    if token_mask is None:
        weights = router_probs.new_ones(router_probs.shape[0])
    else:
        weights = token_mask.reshape(-1).to(router_probs.dtype)
    expert_fraction = expert_load(expert_indices, num_experts, token_mask).to(router_probs.dtype)
    mean_probs = (router_probs * weights[:, None]).sum(0) / weights.sum().clamp(min=1.0)
    return num_experts * (expert_fraction * mean_probs).sum()


def route_top_n(
    router_probs: torch.Tensor, expert_counts: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-`expert_counts[t]` experts by probability, weights renormalised over them.

    `router_probs` (T, E), `expert_counts` (T,) in 1..width. Returns `expert_indices` (T, width) with the
    sentinel E in unused slots and `expert_weights` (T, width) with 0 there.
    """
    num_experts = router_probs.shape[-1]
    top_probs, top_indices = torch.topk(router_probs, width, dim=-1)
    unused = torch.arange(width, device=router_probs.device)[None, :] >= expert_counts[:, None]
    top_probs = top_probs.masked_fill(unused, 0.0)
    expert_weights = top_probs / top_probs.sum(-1, keepdim=True)
    expert_indices = top_indices.masked_fill(unused, num_experts)
    return expert_indices, expert_weights


class TopKRouter(nn.Module):
    """MoE-LLaVA's router: softmax over E experts, top-k, weights renormalised over the k.

    The deterministic form of DeepSpeed's `top2gating`: no Gumbel noise on the second expert and no
    capacity-based token dropping.
    """

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.text_config.hidden_size))

    def router_probs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H) -> router logits and probabilities (T, E), float32 like DeepSpeed's gate, so low-precision
        models pick the same experts."""
        router_logits = F.linear(hidden_states.float(), self.weight.float())
        return router_logits, F.softmax(router_logits, dim=-1, dtype=torch.float32)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        """`hidden_states` (T, H), the B * L tokens of a batch; `token_mask` (B, L) real (non-padding) tokens and
        `vision_mask` (B, L) image tokens, or (T,) for one sample."""
        router_logits, router_probs = self.router_probs(hidden_states)
        expert_counts = torch.full_like(router_probs[:, 0], self.num_experts_per_tok, dtype=torch.long)
        return self.route(router_logits, router_probs, expert_counts, self.num_experts_per_tok, hidden_states.dtype)

    def route(
        self,
        router_logits: torch.Tensor,
        router_probs: torch.Tensor,
        expert_counts: torch.Tensor,
        width: int,
        dtype: torch.dtype,
        difficulty: torch.Tensor | None = None,
    ) -> Routing:
        """The `Routing` that sends each token to its top-`expert_counts[t]` experts, padded to `width`."""
        indices, weights = route_top_n(router_probs, expert_counts, width)
        return Routing(
            router_logits=router_logits,
            router_probs=router_probs,
            expert_indices=indices,
            expert_weights=weights.to(dtype),
            expert_counts=expert_counts,
            difficulty=difficulty,
        )

    def aux_loss(
        self, routing: Routing, token_mask: torch.Tensor | None = None, vision_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The load-balancing loss of `routing` over the tokens this router balances: all real tokens."""
        return load_balancing_loss(routing.router_probs, routing.expert_indices, token_mask)


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


class ThresholdTracker(nn.Module):
    """DARE's thresholds tau_1 < ... < tau_{M-1}: N_e(t) = 1 + #{j : d_hat_t >= tau_j}.

    In training it collects the predicted difficulties it sees (`observe`); `update` then moves each
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
        self.quantile_levels = list(itertools.accumulate(target_distribution))[:-1]
        self.register_buffer("thresholds", torch.tensor(initial_thresholds, dtype=torch.float32))
        self._observed: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would cast the thresholds too, and bf16 steps are too coarse for the EMA's
        # small moves: keep them float32 (devices move as usual).
        super()._apply(fn, recurse)
        self.thresholds = self.thresholds.float()
        return self

    def expert_counts(self, difficulty: torch.Tensor) -> torch.Tensor:
        """(T,) predicted difficulties -> (T,) experts per token, in 1..M."""
        return 1 + (difficulty.detach().float()[:, None] >= self.thresholds[None, :]).sum(-1)

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
        levels = torch.tensor(self.quantile_levels, device=observed.device)
        target = torch.quantile(_subsample(observed), levels)
        # Ties (e.g. an untrained predictor) must not leave equal thresholds.
        target = torch.cummax(target, 0).values
        new = target if self.mode == "per_batch" else self.momentum * self.thresholds + (1 - self.momentum) * target
        self.thresholds.copy_(new)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.thresholds, src=0)
        return self.thresholds


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


class DareRouter(TopKRouter):
    """DARE: a token's predicted difficulty decides how many of its top experts it uses (1..M)."""

    def __init__(self, config):
        super().__init__(config)
        self.max_experts = config.max_experts
        self.detach_input = config.difficulty_detach_input
        self.difficulty_predictor = DifficultyPredictor(
            config.text_config.hidden_size,
            config.difficulty_predictor_size,
            config.difficulty_predictor_dropout,
            eps=getattr(config.text_config, "rms_norm_eps", 1e-6),
        )
        self.threshold_tracker = ThresholdTracker(
            config.initial_thresholds, config.target_distribution, config.threshold_momentum, config.threshold_update
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        router_logits, router_probs = self.router_probs(hidden_states)
        difficulty = self.difficulty_predictor(hidden_states.detach() if self.detach_input else hidden_states)
        context = current_routing_context()
        if context is not None and context.observe and context.record:
            self.threshold_tracker.observe(difficulty, token_mask)
        expert_counts = self.threshold_tracker.expert_counts(difficulty)
        return self.route(
            router_logits, router_probs, expert_counts, self.max_experts, hidden_states.dtype, difficulty
        )


class LtdrRouter(TopKRouter):
    """LTDR: top-k routing, balanced on language tokens only; a vision token whose routing-probability
    variance (RPV) exceeds the mean RPV of its own sample's vision tokens is a tail token and uses top-a.

    The reference set is the sample's own vision tokens, never the batch's, so a sample routes the same
    whatever it is batched with (in training and inference alike)."""

    def __init__(self, config):
        super().__init__(config)
        self.tail_top_a = config.tail_top_a

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
        router_logits, router_probs = self.router_probs(hidden_states)
        tail = self.tail_tokens(router_probs, vision_mask, token_mask)
        expert_counts = torch.where(tail, self.tail_top_a, self.num_experts_per_tok)
        return self.route(router_logits, router_probs, expert_counts, self.tail_top_a, hidden_states.dtype)

    def aux_loss(
        self, routing: Routing, token_mask: torch.Tensor | None = None, vision_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The load-balancing loss over language tokens only: vision tokens get no balancing term."""
        language = token_mask
        if vision_mask is not None:
            language = ~vision_mask if token_mask is None else token_mask & ~vision_mask
        return load_balancing_loss(routing.router_probs, routing.expert_indices, language)


ROUTER_CLASSES = {"top_k": TopKRouter, "dare": DareRouter, "ltdr": LtdrRouter}
