"""Routing statistics, the one place they are computed: the expert load (the f_i of the balancing loss),
Avg K per MoE layer and per modality, the summary of one forward (`routing_statistics`), and the record a model
keeps of its routing for its card (`statistics_record`, `config.routing_statistics`).

"Routing statistics" names those three alike: a forward's outputs (`expert_counts`, `expert_load`: what
`output_routing_statistics` turns on), their summary, and the record in the config.

The Avg K helpers work on sums (`avg_k_sums`) so that running totals over many forwards (training metrics,
an evaluation set) give the same numbers as one forward does.
"""

import torch

# Columns of `avg_k_sums`' (layers, 2) sums that each modality averages over.
MODALITY_COLUMNS = {"all": [0, 1], "text": [0], "vision": [1]}


def expert_load(
    expert_indices: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of the routed (token, expert) slots that go to each expert, over the tokens in `token_mask`.

    `expert_indices` (T, K), the sentinel `num_experts` in unused slots (not counted); `token_mask` (T,) or
    (B, L) with B * L = T (all tokens if None). Returns (E,) float32, summing to 1 (all 0 without a slot).
    """
    slots_per_token = expert_indices.shape[-1]
    if token_mask is None:
        weights = torch.ones(expert_indices.numel(), device=expert_indices.device)
    else:
        weights = token_mask.reshape(-1).float().repeat_interleave(slots_per_token)
    counts = torch.zeros(num_experts + 1, device=expert_indices.device)
    counts = counts.scatter_add_(0, expert_indices.reshape(-1), weights)[:num_experts]
    return counts / counts.sum().clamp(min=1.0)


def load_cv(load: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation of the expert load (..., E) -> (...): 0 when every expert gets the same share."""
    return load.std(-1, unbiased=False) / load.mean(-1).clamp(min=1e-9)


def avg_k_sums(
    expert_counts: tuple[torch.Tensor, ...] | list[torch.Tensor],
    token_mask: torch.Tensor | None = None,
    vision_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What Avg K is made of, per MoE layer and modality: the experts used summed over the tokens, and the tokens.

    `expert_counts`: per MoE layer (B, L) experts used per token; `token_mask` (B, L) real tokens (all if
    None); `vision_mask` (B, L) image tokens (none if None: every real token is text). Returns `k_sum` and
    `tokens`, both (layers, 2) float64 with columns [text, vision], on the device of the counts (no host sync).
    """
    counts = torch.stack([c.double() for c in expert_counts])  # (layers, B, L)
    real = torch.ones_like(counts[0], dtype=torch.bool) if token_mask is None else token_mask.to(counts.device).bool()
    vision = torch.zeros_like(real) if vision_mask is None else vision_mask.to(counts.device).bool() & real
    modalities = torch.stack([real & ~vision, vision], dim=-1).double()  # (B, L, 2)
    k_sum = (counts[..., None] * modalities).sum((1, 2))
    tokens = modalities.sum((0, 1)).expand_as(k_sum).clone()
    return k_sum, tokens


def _modality_sums(k_sum: torch.Tensor, tokens: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`avg_k_sums`' (layers, 2) sums -> the (layers,) sums over the tokens of `modality`."""
    if modality not in MODALITY_COLUMNS:
        raise ValueError(f"modality must be one of {tuple(MODALITY_COLUMNS)}, got {modality!r}")
    columns = MODALITY_COLUMNS[modality]
    return k_sum[:, columns].sum(-1), tokens[:, columns].sum(-1)


def avg_k(k_sum: torch.Tensor, tokens: torch.Tensor, modality: str = "all") -> float | None:
    """Avg K over every MoE layer of the `modality` tokens ("all", "text" or "vision"), from `avg_k_sums`'
    sums (layers, 2); None without such tokens."""
    k, n = (total.sum() for total in _modality_sums(k_sum, tokens, modality))
    return (k / n).item() if n > 0 else None


def avg_k_per_layer(k_sum: torch.Tensor, tokens: torch.Tensor, modality: str = "all") -> list[float | None]:
    """Avg K of each MoE layer over the `modality` tokens, from `avg_k_sums`' sums (layers, 2); None for a
    layer without such tokens."""
    k, n = _modality_sums(k_sum, tokens, modality)
    values = (k / n.clamp(min=1)).tolist()
    return [value if count > 0 else None for value, count in zip(values, n.tolist(), strict=True)]


def routing_statistics(
    expert_counts: tuple[torch.Tensor, ...],
    expert_load: tuple[torch.Tensor, ...] | None = None,
    token_mask: torch.Tensor | None = None,
    vision_mask: torch.Tensor | None = None,
) -> dict:
    """Summarise one forward's routing.

    `expert_counts`: per MoE layer (B, L) experts used per token; `expert_load`: per MoE layer (E,)
    fraction of routed slots per expert; `token_mask` (B, L) real tokens; `vision_mask` (B, L) image tokens.
    Returns plain Python numbers: `avg_k`, `avg_k_per_layer`, `avg_k_text`, `avg_k_vision` (None without
    such tokens), `expert_load` (per layer, per expert) and `load_cv` (per layer coefficient of variation).
    """
    if not expert_counts:
        return {}
    k_sum, tokens = avg_k_sums(expert_counts, token_mask, vision_mask)
    stats = {
        "avg_k": avg_k(k_sum, tokens),
        "avg_k_per_layer": avg_k_per_layer(k_sum, tokens),
        "avg_k_text": avg_k(k_sum, tokens, "text"),
        "avg_k_vision": avg_k(k_sum, tokens, "vision"),
    }
    if expert_load:
        load = torch.stack([layer.float() for layer in expert_load])
        stats["expert_load"] = load.tolist()
        stats["load_cv"] = load_cv(load).tolist()
    return stats


def statistics_record(
    avg_k: float | None,
    avg_k_text: float | None,
    avg_k_vision: float | None,
    avg_k_per_layer: list,
    load_cv: list | None = None,
    thresholds: dict | None = None,
) -> dict:
    """The routing record a model keeps in `config.routing_statistics` (what training logged last, or what
    calibration measured), shown in its model card: Avg K overall, per modality and per MoE layer, the expert-load
    coefficient of variation per layer, DARE's thresholds per layer. JSON-ready: as a saved config gives it back."""
    record = {
        "avg_k": avg_k,
        "avg_k_text": avg_k_text,
        "avg_k_vision": avg_k_vision,
        "avg_k_per_layer": list(avg_k_per_layer),
        "load_cv": None if load_cv is None else list(load_cv),
        "thresholds": {str(layer): list(values) for layer, values in (thresholds or {}).items()},
    }
    return record
