"""Routing statistics of a forward pass: Avg K overall, per MoE layer and per modality, and expert load."""

import torch


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
    counts = torch.stack([c.float() for c in expert_counts])  # (layers, B, L)
    real = torch.ones_like(counts[0], dtype=torch.bool) if token_mask is None else token_mask.bool()
    vision = torch.zeros_like(real) if vision_mask is None else vision_mask.bool() & real
    text = real & ~vision

    def mean_over(mask: torch.Tensor) -> float | None:
        return counts[:, mask].mean().item() if mask.any() else None

    stats = {
        "avg_k": mean_over(real),
        "avg_k_per_layer": [layer[real].mean().item() for layer in counts],
        "avg_k_text": mean_over(text),
        "avg_k_vision": mean_over(vision),
    }
    if expert_load:
        load = torch.stack([layer.float() for layer in expert_load])
        stats["expert_load"] = load.tolist()
        stats["load_cv"] = (load.std(-1, unbiased=False) / load.mean(-1).clamp(min=1e-9)).tolist()
    return stats
