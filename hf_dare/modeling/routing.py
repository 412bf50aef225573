"""Routers of the MoE layers: Top-K (MoE-LLaVA), DARE (difficulty-aware) and LTDR (long-tail vision tokens), and
the DARE paper's baselines Top-p, ReMoE, DynMoE and MoE++.

A router maps the tokens of one MoE layer, `hidden_states` (T, H), to a `Routing`: for each token the
experts it uses, padded to the router's widest case with the sentinel index `num_experts` (how
transformers' experts interface expresses "no expert in this slot"), and their weights, which sum to 1
over the experts used (ReMoE's ReLU gates excepted).
"""

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ._compat import context_var
from .statistics import expert_load


@dataclass
class Routing:
    """What a router decided for T tokens of one MoE layer (K = the router's widest case).

    - `router_logits` (T, E) and `router_probs` (T, E, float32, softmax over experts)
    - `expert_indices` (T, K) long, experts by descending probability, `num_experts` in unused slots
    - `expert_weights` (T, K), 0 in unused slots, sum 1 per token (with `norm_topk_prob`; 0 for a token whose
      every slot went over capacity)
    - `expert_counts` (T,) long: experts used per token
    - `difficulty` (T,): DARE's difficulty signal, else None; `predicted_difficulty`: it comes from a predictor
      trained toward the next-token NLL (the model's L_diff covers it), not from a proxy without a loss
    - `aux_loss`: the layer's load-balancing loss (scalar), once `router.aux_loss` has been asked for it
    - `router_loss`: the router's own training terms (scalar, already weighted by their coefficients: Top-p's
      dynamic loss, ReMoE's L1 penalty, DynMoE's regularisers), once `router.router_loss` has been asked for it
    - `zero_computation_output` (T, H): MoE++'s zero / copy / constant experts' weighted outputs, which the MoE
      block adds to the FFN experts' (`expert_indices` names FFN experts only), else None

    The baseline routers read some fields their own way: `router_probs` is ReMoE's ReLU gates and DynMoE's
    sigmoid(cos) scores (with cos as `router_logits`); MoE++'s logits and probabilities cover its E FFN experts
    and then its zero-computation experts. ReMoE's weights do not sum to 1, and a ReMoE token may use no expert
    (`expert_counts` 0); MoE++'s `expert_counts` count the FFN experts among the token's choices.
    """

    router_logits: torch.Tensor
    router_probs: torch.Tensor
    expert_indices: torch.Tensor
    expert_weights: torch.Tensor
    expert_counts: torch.Tensor
    difficulty: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    predicted_difficulty: bool = False
    router_loss: torch.Tensor | None = None
    zero_computation_output: torch.Tensor | None = None


@dataclass
class RoutingContext:
    """What the MoE blocks of one forward share, opened by the model around its decoder (`routing_context`).

    - `token_mask` (B, L): real (non-padding) tokens; `vision_mask` (B, L): image tokens; None: all / none.
    - `with_aux_loss`: the blocks compute their load-balancing loss (training, or labels given).
    - `observe`: DARE's routers keep their predictions for the next threshold update, ReMoE's their gate counts
      for the next L1-coefficient update (training).
    - `routings`: filled by the blocks, in the order they ran; `record=False` (a gradient-checkpointing
      recomputation of a forward already recorded) leaves it alone.
    - `previous_router_logits` (T, E'): MoE++'s gating residual, the router logits of the MoE++ layer that ran
      last in this forward (None before the first).
    """

    token_mask: torch.Tensor | None = None
    vision_mask: torch.Tensor | None = None
    with_aux_loss: bool = False
    observe: bool = False
    record: bool = True
    routings: list[Routing] = field(default_factory=list)
    previous_router_logits: torch.Tensor | None = None

    def masks_for(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This forward's (B, L) masks, or None where a mask does not fit the tokens the block sees."""
        shape = (batch_size, seq_len)
        fit = [m if m is not None and tuple(m.shape) == shape else None for m in (self.token_mask, self.vision_mask)]
        return fit[0], fit[1]


_ACTIVE_ROUTING = context_var("hf_dare_routing_context")


def current_routing_context() -> RoutingContext | None:
    """The routing context of the forward in progress on this thread, or None outside a model's forward."""
    return _ACTIVE_ROUTING.get()


def observing() -> bool:
    """Whether the forward in progress asks the routers to keep what they see for their per-step state update
    (DARE's difficulties, ReMoE's gate counts): in training, and not in an activation-checkpoint recomputation."""
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


class TopKRouter(nn.Module):
    """MoE-LLaVA's router: softmax over E experts, top-k, weights renormalised over the k (`norm_topk_prob`).

    By default the deterministic form of DeepSpeed's `top2gating`. Its training behaviour is optional:
    `second_expert_sampling` (experts 2..k by Gumbel-max sampling, training only), `capacity_factor` /
    `eval_capacity_factor` with `min_capacity` (slots over an expert's capacity are dropped, `within_capacity`)
    and `aux_loss_fraction="top1"` (f_i from the top-1 choices). DeepSpeed samples the 2nd expert at inference
    too; here inference stays deterministic.
    """

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.second_expert_sampling = config.second_expert_sampling
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.min_capacity = config.min_capacity
        self.aux_loss_fraction = config.aux_loss_fraction
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
        k = self.num_experts_per_tok
        sample = self.training and self.second_expert_sampling
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if not sample and capacity_factor is None:
            expert_counts = torch.full_like(router_probs[:, 0], k, dtype=torch.long)
            return self.route(router_logits, router_probs, expert_counts, k, hidden_states.dtype)
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
        indices, weights = route_top_n(router_probs, expert_counts, width, self.norm_topk_prob)
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
        return load_balancing_loss(routing.router_probs, self.balanced_assignments(routing), token_mask)

    def balanced_assignments(self, routing: Routing) -> torch.Tensor:
        """The assignments whose shares are the f_i of the balancing loss: every routed slot, or each token's
        top-1 expert (`aux_loss_fraction="top1"`, DeepSpeed's: before any capacity drop), (T, K) or (T, 1)."""
        if self.aux_loss_fraction == "top1":
            return routing.router_probs.argmax(-1, keepdim=True)
        return routing.expert_indices


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


RANDOM_PROXY_SEED = 1234
_RANDOM_DIRECTIONS: dict[tuple[int, torch.device], torch.Tensor] = {}


def random_difficulty(hidden_states: torch.Tensor) -> torch.Tensor:
    """DARE's `random` difficulty proxy, (T, H) -> (T,) in (0, 1): a signal unrelated to difficulty that is
    still a fixed function of the token's hidden state, so inference stays deterministic and batch-invariant
    (i.i.d. noise would give a token other experts at every forward, and differ between ranks and batches).

    Phi(sqrt(H) * cos(h, u)): u a random unit direction drawn once from a CPU generator seeded with
    `RANDOM_PROXY_SEED` (the same in every process, on every rank and device), Phi the normal CDF, so the values
    spread over (0, 1). No parameter, nothing to train: the thresholds follow its quantiles like any other."""
    hidden = hidden_states.detach().float()
    size = hidden.shape[-1]
    direction = _RANDOM_DIRECTIONS.get((size, hidden.device))
    if direction is None:
        generator = torch.Generator().manual_seed(RANDOM_PROXY_SEED)
        direction = torch.randn(size, generator=generator, dtype=torch.float64)
        direction = (direction / direction.norm()).float().to(hidden.device)
        _RANDOM_DIRECTIONS[(size, hidden.device)] = direction
    z = F.normalize(hidden, dim=-1) @ direction * size**0.5
    return 0.5 * (1.0 + torch.erf(z / 2**0.5))


def router_entropy(router_probs: torch.Tensor) -> torch.Tensor:
    """DARE's `router_entropy` difficulty proxy: -sum_i P_i log P_i of each token's router probabilities,
    (T, E) -> (T,), detached (a routing signal, not trained)."""
    return torch.special.entr(router_probs.detach().float()).sum(-1)


class DareRouter(TopKRouter):
    """DARE: a token's difficulty decides how many of its top experts it uses (1..M).

    The difficulty is `difficulty_proxy`'s: `"nll"` the predictor's estimate of the token's next-token NLL
    (trained by the model's L_diff), `"random"` (`random_difficulty`) or `"router_entropy"` (`router_entropy`),
    which need no predictor. Every proxy goes through the same thresholds (quantiles of Pi, EMA or per batch)."""

    def __init__(self, config):
        super().__init__(config)
        self.max_experts = config.max_experts
        self.detach_input = config.difficulty_detach_input
        self.difficulty_proxy = config.difficulty_proxy
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

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        router_logits, router_probs = self.router_probs(hidden_states)
        difficulty = self.difficulty(hidden_states, router_probs)
        if observing():
            self.threshold_tracker.observe(difficulty, token_mask)
        expert_counts = self.threshold_tracker.expert_counts(difficulty)
        routing = self.route(
            router_logits, router_probs, expert_counts, self.max_experts, hidden_states.dtype, difficulty
        )
        routing.predicted_difficulty = self.difficulty_proxy == "nll"
        return routing

    def difficulty(self, hidden_states: torch.Tensor, router_probs: torch.Tensor) -> torch.Tensor:
        """(T,) difficulty of each token under `difficulty_proxy`."""
        if self.difficulty_proxy == "random":
            return random_difficulty(hidden_states)
        if self.difficulty_proxy == "router_entropy":
            return router_entropy(router_probs)
        return self.difficulty_predictor(hidden_states.detach() if self.detach_input else hidden_states)


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
        return load_balancing_loss(routing.router_probs, self.balanced_assignments(routing), language)


# The DARE paper's baseline routers (its Table 1): Top-p, ReMoE, DynMoE and MoE++.


def _token_weights(token_mask: torch.Tensor | None, reference: torch.Tensor) -> torch.Tensor:
    """(T,) float32: 1 for the real tokens of `token_mask` ((T,) or (B, L)), every token of `reference` (T, ...)
    without a mask."""
    if token_mask is None:
        return reference.new_ones(reference.shape[0], dtype=torch.float32)
    return token_mask.reshape(-1).float()


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (T,) over the tokens with weight 1 (0 when there is none)."""
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def top_p_counts(router_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """(T, E) probabilities -> (T,) long: the size of each token's smallest set of most probable experts whose
    probabilities add up to `threshold` (p), at least 1. An expert is kept when the experts ranked above it
    hold less than p."""
    ranked = torch.sort(router_probs, dim=-1, descending=True).values
    above = F.pad(ranked.cumsum(-1)[:, :-1], (1, 0))
    return (above < threshold).sum(-1).clamp(min=1)


class TopPRouter(TopKRouter):
    """Top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models").

    A token uses the smallest set of its most probable experts whose softmax probabilities reach
    `top_p_threshold` (p; at least one), weights renormalised over them (`norm_topk_prob`). The router loss
    is the dynamic loss, `top_p_dynamic_loss_coef` * the mean over real tokens of the entropy -sum_i P_i log P_i,
    which sharpens P so that fewer experts reach p; the load-balancing loss is Top-K's.
    """

    def __init__(self, config):
        super().__init__(config)
        self.threshold = config.top_p_threshold
        self.dynamic_loss_coef = config.top_p_dynamic_loss_coef

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        router_logits, router_probs = self.router_probs(hidden_states)
        expert_counts = top_p_counts(router_probs, self.threshold)
        return self.route(router_logits, router_probs, expert_counts, self.num_experts, hidden_states.dtype)

    def router_loss(
        self, routing: Routing, token_mask: torch.Tensor | None = None, vision_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`top_p_dynamic_loss_coef` * mean entropy of the router's probabilities over the real tokens."""
        log_probs = F.log_softmax(routing.router_logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return self.dynamic_loss_coef * _masked_mean(entropy, _token_weights(token_mask, entropy))

    def init_router_weights(self, std: float) -> None:
        init.normal_(self.weight, mean=0.0, std=std)


class ReMoERouter(TopKRouter):
    """ReMoE (Wang et al. 2024, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing").

    G = ReLU(W h) (float32); a token uses every expert with G_i > 0, output sum_i G_i E_i(h) (no
    renormalisation; a token with no positive gate uses no expert and its MoE output is 0). The router loss is
    the L1 penalty lambda * mean over real tokens of sum_i f_i G_i, with f_i = E / (k T) * #{tokens with
    G_i > 0} (detached, the paper's load-balanced L1; f_i = 1 with `remoe_load_balancing=False`). ReMoE has
    no separate load-balancing loss (`aux_loss` is 0).

    lambda (`l1_coef`, a persistent float32 buffer: saved, loaded, restored on resume) adapts once per optimizer
    step (`update_routing_state`, called by `hf_dare.training.DareCallback` through the model's
    `update_routing_state`): lambda <- lambda * alpha^sign(target - sparsity), alpha =
    `remoe_l1_coef_multiplier`, target = `remoe_target_sparsity` (default 1 - k / E), sparsity = the share of
    zero gates over the real tokens of every forward since the last update, summed over all ranks, so lambda
    stays identical on every rank.
    """

    def __init__(self, config):
        super().__init__(config)
        self.initial_l1_coef = config.remoe_initial_l1_coef
        self.l1_coef_multiplier = config.remoe_l1_coef_multiplier
        target = config.remoe_target_sparsity
        self.target_sparsity = 1.0 - config.num_experts_per_tok / config.num_experts if target is None else target
        self.load_balancing = config.remoe_load_balancing
        self.register_buffer("l1_coef", torch.tensor(float(self.initial_l1_coef), dtype=torch.float32))
        # [active gates, gates] of the real tokens of each training forward since the last update (host-free).
        self._observed: list[torch.Tensor] = []

    def _apply(self, fn, recurse=True):
        # Like DARE's thresholds: lambda's x1.2 steps stay exact in float32 whatever dtype the model is cast to.
        super()._apply(fn, recurse)
        self.l1_coef = self.l1_coef.float()
        return self

    def router_probs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H) -> router logits W h and ReLU gates G, (T, E) float32."""
        router_logits = F.linear(hidden_states.float(), self.weight.float())
        return router_logits, F.relu(router_logits)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        router_logits, gates = self.router_probs(hidden_states)
        active = gates > 0
        top_gates, top_indices = torch.topk(gates, self.num_experts, dim=-1)
        unused = top_gates <= 0
        if observing():
            self.observe(active, token_mask)
        return Routing(
            router_logits=router_logits,
            router_probs=gates,
            expert_indices=top_indices.masked_fill(unused, self.num_experts),
            expert_weights=top_gates.masked_fill(unused, 0.0).to(hidden_states.dtype),
            expert_counts=active.sum(-1),
        )

    @torch.no_grad()
    def observe(self, active: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Count the active gates (T, E) of the real tokens for the next `update_routing_state` (no host sync)."""
        real = torch.ones_like(active[:, 0]) if token_mask is None else token_mask.reshape(-1).bool()
        counts = torch.stack([(active & real[:, None]).sum(), real.sum() * self.num_experts])
        self._observed.append(counts)
        if len(self._observed) > 64:  # many forwards without an update: keep their sum
            self._observed = [torch.stack(self._observed).sum(0)]

    @torch.no_grad()
    def update_routing_state(self) -> dict[str, float] | None:
        """Move lambda one step toward the target sparsity from the gates observed since the last call, on every
        rank alike (every rank must call it: the counts are summed across ranks), and forget them. Returns the
        new `l1_coef` and the measured `sparsity`, or None when nothing was observed (lambda unchanged)."""
        device = self.l1_coef.device
        if self._observed:
            observed = torch.stack(self._observed).sum(0).to(device)
        else:
            observed = torch.zeros(2, dtype=torch.long, device=device)
        self._observed = []
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.all_reduce(observed)
        active, gates = observed.tolist()
        if gates == 0:
            return None
        sparsity = 1.0 - active / gates
        if sparsity < self.target_sparsity:  # too many active experts: penalise more
            self.l1_coef.mul_(self.l1_coef_multiplier)
        elif sparsity > self.target_sparsity:
            self.l1_coef.div_(self.l1_coef_multiplier)
        if distributed:
            torch.distributed.broadcast(self.l1_coef, src=0)
        return {"l1_coef": self.l1_coef.item(), "sparsity": sparsity}

    def aux_loss(
        self, routing: Routing, token_mask: torch.Tensor | None = None, vision_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """0: ReMoE balances the load through its L1 penalty (`router_loss`)."""
        return routing.router_logits.new_zeros(())

    def router_loss(
        self, routing: Routing, token_mask: torch.Tensor | None = None, vision_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """lambda * mean over real tokens of sum_i f_i G_i (f_i = 1 without `remoe_load_balancing`)."""
        gates = routing.router_probs
        weights = _token_weights(token_mask, gates)
        per_expert = gates
        if self.load_balancing:
            active = ((gates > 0).float() * weights[:, None]).sum(0)
            active_per_token = self.num_experts * (1.0 - self.target_sparsity)  # k
            load = self.num_experts / (active_per_token * weights.sum().clamp(min=1.0)) * active
            per_expert = gates * load.detach()
        return self.l1_coef * _masked_mean(per_expert.sum(-1), weights)

    def init_router_weights(self, std: float) -> None:
        init.normal_(self.weight, mean=0.0, std=std)
        init.copy_(self.l1_coef, torch.tensor(float(self.initial_l1_coef)))


class DynMoERouter(TopKRouter):
    """DynMoE's top-any gating (Guo et al. 2024, "Dynamic Mixture of Experts: An Auto-Tuning Approach for
    Efficient Transformer Models").

    `weight` holds the experts' embeddings w_i; expert i is active for a token h when sigmoid(cos(h, w_i)) >
    sigmoid(theta_i), with trainable per-expert thresholds theta (`expert_thresholds`, 0 at init). The active
    experts share the token equally (weights 1 / K, as DynMoE's code combines them), with DynMoE's
    straight-through gradient (each active weight carries the gradient of sigmoid(cos) - sigmoid(theta), so W and
    theta learn); a token with no active expert takes its best one (highest cosine), weight 1. The load-balancing
    loss is Top-K's on those weights over the tokens with an active expert; the router loss is DynMoE's
    regularisers: `dynmoe_diversity_coef` * ||W_n W_n^T - I||_F (W_n: unit-norm embeddings) +
    `dynmoe_simplicity_coef` * mean_i ||w_i|| + `dynmoe_efficiency_coef` * mean over real tokens of the share of
    active experts.
    """

    def __init__(self, config):
        super().__init__(config)
        self.expert_thresholds = nn.Parameter(torch.zeros(config.num_experts))
        self.diversity_coef = config.dynmoe_diversity_coef
        self.simplicity_coef = config.dynmoe_simplicity_coef
        self.efficiency_coef = config.dynmoe_efficiency_coef

    def router_probs(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H) -> cos(h, w_i) and sigmoid(cos(h, w_i)), (T, E) float32."""
        cosine = F.linear(F.normalize(hidden_states.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))
        return cosine, torch.sigmoid(cosine)

    def gates(self, cosine: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From cos and sigmoid(cos) (T, E): the straight-through gates of the active experts (1 forward), the
        chosen experts (active, or the best one of a token with none) and their weights 1 / K, all (T, E)."""
        margin = scores - torch.sigmoid(self.expert_thresholds.float())
        active = margin > 0
        straight_through = active.float() + (margin - margin.detach()) * active
        best = F.one_hot(cosine.argmax(-1), self.num_experts).bool() & ~active.any(-1, keepdim=True)
        chosen = active | best
        weights = (straight_through + best.float()) / chosen.sum(-1, keepdim=True)
        return straight_through, chosen, weights

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        cosine, scores = self.router_probs(hidden_states)
        _, chosen, weights = self.gates(cosine, scores)
        ranked, indices = torch.topk(scores.masked_fill(~chosen, -1.0), self.num_experts, dim=-1)
        unused = ranked < 0
        return Routing(
            router_logits=cosine,
            router_probs=scores,
            expert_indices=indices.masked_fill(unused, self.num_experts),
            expert_weights=weights.gather(-1, indices).masked_fill(unused, 0.0).to(hidden_states.dtype),
            expert_counts=chosen.sum(-1),
        )

    def aux_loss(
        self, routing: Routing, token_mask: torch.Tensor | None = None, vision_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The load-balancing loss on the gate weights, over the real tokens that have an active expert."""
        straight_through, _, weights = self.gates(routing.router_logits, routing.router_probs)
        routed = _token_weights(token_mask, weights) * (straight_through.detach().sum(-1) > 0)
        return load_balancing_loss(weights, routing.expert_indices, routed)

    def router_loss(
        self, routing: Routing, token_mask: torch.Tensor | None = None, vision_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """DynMoE's diversity, simplicity and efficiency regularisers, weighted by their coefficients."""
        weight = self.weight.float()
        unit = F.normalize(weight, dim=-1)
        eye = torch.eye(self.num_experts, device=weight.device, dtype=weight.dtype)
        diversity = torch.linalg.matrix_norm(unit @ unit.T - eye)
        simplicity = weight.norm(dim=-1).mean()
        straight_through, _, _ = self.gates(routing.router_logits, routing.router_probs)
        efficiency = _masked_mean(straight_through.mean(-1), _token_weights(token_mask, straight_through))
        return self.diversity_coef * diversity + self.simplicity_coef * simplicity + self.efficiency_coef * efficiency

    def init_router_weights(self, std: float) -> None:
        init.orthogonal_(self.weight)  # DynMoE's init: orthonormal expert embeddings
        init.zeros_(self.expert_thresholds)


class MoEPlusPlusRouter(TopKRouter):
    """MoE++ (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with Zero-Computation Experts").

    Beside the E FFN experts, `moepp_zero_experts` zero experts (output 0), `moepp_copy_experts` copy experts
    (output h) and `moepp_constant_experts` constant experts (output alpha_1 h + alpha_2 v, [alpha_1, alpha_2] =
    softmax(W_c h), v learned): routed experts E..E+Z-1 in that order. Softmax over all E + Z experts, top-k
    (`num_experts_per_tok`), weights renormalised over the k (`norm_topk_prob`). The `Routing` names the FFN
    experts only (the sentinel E for the others), so only they go through the experts kernels; the others'
    weighted outputs are `zero_computation_output`, which the MoE block adds. Avg K counts FFN experts only.

    Gating residuals (`moepp_gating_residual`): a layer's logits add `residual_weight` (a learned (E+Z, E+Z)
    map, 0 at init) applied to the logits of the previous MoE++ layer of the same forward (the routing context
    carries them); the first layer, or a call outside a model's forward, adds the map of zeros. Heterogeneous
    load balancing: (E + Z) * sum_i eta_i f_i Pbar_i over all E + Z experts, eta_i = 1 for FFN experts and
    `moepp_tau` for the zero-computation ones.
    """

    def __init__(self, config):
        super().__init__(config)
        hidden_size = config.text_config.hidden_size
        self.num_zero_experts = config.moepp_zero_experts
        self.num_copy_experts = config.moepp_copy_experts
        self.num_constant_experts = config.moepp_constant_experts
        self.num_routed_experts = (
            config.num_experts + self.num_zero_experts + self.num_copy_experts + self.num_constant_experts
        )
        self.tau = config.moepp_tau
        self.gating_residual = config.moepp_gating_residual
        self.weight = nn.Parameter(torch.zeros(self.num_routed_experts, hidden_size))
        if self.gating_residual:
            self.residual_weight = nn.Parameter(torch.zeros(self.num_routed_experts, self.num_routed_experts))
        if self.num_constant_experts:
            self.constant_vectors = nn.Parameter(torch.zeros(self.num_constant_experts, hidden_size))
            # W_c of each constant expert: rows 2c and 2c + 1 give alpha_1 and alpha_2 of constant expert c.
            self.constant_gate = nn.Parameter(torch.zeros(2 * self.num_constant_experts, hidden_size))

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> Routing:
        router_logits = F.linear(hidden_states.float(), self.weight.float())
        if self.gating_residual:
            context = current_routing_context()
            previous = None if context is None else context.previous_router_logits
            if previous is None or previous.shape != router_logits.shape:
                previous = torch.zeros_like(router_logits)
            router_logits = router_logits + F.linear(previous, self.residual_weight.float())
            if context is not None:
                context.previous_router_logits = router_logits
        router_probs = F.softmax(router_logits, dim=-1)
        top_probs, top_indices = torch.topk(router_probs, self.num_experts_per_tok, dim=-1)
        if self.norm_topk_prob:
            top_probs = top_probs / top_probs.sum(-1, keepdim=True)
        ffn = top_indices < self.num_experts
        return Routing(
            router_logits=router_logits,
            router_probs=router_probs,
            expert_indices=top_indices.masked_fill(~ffn, self.num_experts),
            expert_weights=top_probs.masked_fill(~ffn, 0.0).to(hidden_states.dtype),
            expert_counts=ffn.sum(-1),
            zero_computation_output=self.zero_computation_output(hidden_states, top_indices, top_probs),
        )

    def zero_computation_output(
        self, hidden_states: torch.Tensor, top_indices: torch.Tensor, top_weights: torch.Tensor
    ) -> torch.Tensor:
        """(T, H): the weighted outputs of the zero (0), copy (h) and constant (alpha_1 h + alpha_2 v) experts each
        token chose among `top_indices` (T, k) with `top_weights` (T, k); 0 for a token that chose FFN experts only."""
        num_tokens = hidden_states.shape[0]
        chosen = top_weights.new_zeros(num_tokens, self.num_routed_experts).scatter(-1, top_indices, top_weights)
        first_copy = self.num_experts + self.num_zero_experts
        first_constant = first_copy + self.num_copy_experts
        states = hidden_states.float()
        scale = chosen[:, first_copy:first_constant].sum(-1)  # copy experts: h
        out = None
        if self.num_constant_experts:
            constant = chosen[:, first_constant:]  # (T, C)
            alpha = F.softmax(F.linear(states, self.constant_gate.float()).view(num_tokens, -1, 2), dim=-1)
            scale = scale + (constant * alpha[..., 0]).sum(-1)
            out = (constant * alpha[..., 1]) @ self.constant_vectors.float()
        out = scale[:, None] * states if out is None else scale[:, None] * states + out
        return out.to(hidden_states.dtype)

    def aux_loss(
        self, routing: Routing, token_mask: torch.Tensor | None = None, vision_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MoE++'s heterogeneous load balancing over all E + Z experts (FFN experts weighted 1, the others tau)."""
        probs = routing.router_probs
        if self.aux_loss_fraction == "top1":
            assignments = probs.argmax(-1, keepdim=True)
        else:
            assignments = torch.topk(probs, self.num_experts_per_tok, dim=-1).indices
        weights = _token_weights(token_mask, probs)
        load = expert_load(assignments, self.num_routed_experts, token_mask)
        mean_probs = (probs * weights[:, None]).sum(0) / weights.sum().clamp(min=1.0)
        eta = torch.ones_like(mean_probs)
        eta[self.num_experts :] = self.tau
        return self.num_routed_experts * (eta * load * mean_probs).sum()

    def init_router_weights(self, std: float) -> None:
        init.normal_(self.weight, mean=0.0, std=std)
        if self.gating_residual:
            init.zeros_(self.residual_weight)
        if self.num_constant_experts:
            init.normal_(self.constant_vectors, mean=0.0, std=std)
            init.normal_(self.constant_gate, mean=0.0, std=std)


ROUTER_CLASSES = {
    "top_k": TopKRouter,
    "dare": DareRouter,
    "ltdr": LtdrRouter,
    "top_p": TopPRouter,
    "remoe": ReMoERouter,
    "dynmoe": DynMoERouter,
    "moepp": MoEPlusPlusRouter,
}
