"""Routing statistics accumulated over the forwards of a logging interval: losses, Avg K (per layer and per
modality), the distribution of experts per token and the expert load balance."""

import torch
from torch import nn

from hf_dare.modeling import MoEBlock, avg_k, avg_k_per_layer, avg_k_sums, load_cv

# Logged name -> output field of the routing losses.
ROUTING_LOSSES = {"difficulty": "difficulty_loss", "aux": "aux_loss", "router": "router_loss"}


class RoutingMetrics:
    """Running sums over the forwards since the last `compute()`, kept on the device (no host sync per step)
    and summed across ranks in `compute()` (every rank must call it together).

    Keys of `compute()`: `loss/ce`, `loss/difficulty`, `loss/aux`, `loss/router` (the baseline routers' own
    weighted terms), each weighted by each forward's text tokens (as the model's loss weights them under the
    Trainer; plain means over forwards that had no text token);
    `routing/avg_k`, `routing/avg_k_layer_{i}`, `routing/avg_k_text`, `routing/avg_k_vision`,
    `routing/avg_k_{text|vision}_layer_{i}`,
    `routing/frac_{n}_experts` (share of tokens using n experts, n = 0..width, all layers: 0 only for routers
    that can leave a token without FFN expert, ReMoE and MoE++, and `top_k` dropping slots over capacity),
    `routing/load_cv_layer_{i}` (coefficient of variation of the mean `expert_load`: 0 = balanced).
    """

    def __init__(self, layer_indices: list[int], num_experts: int, width: int):
        self.layer_indices = list(layer_indices)
        self.num_experts = num_experts
        self.width = width
        num_layers = len(self.layer_indices)
        self._shapes = {
            "ce_nll": (1,),
            "ce_tokens": (1,),
            # The routing losses: sums weighted by the forward's text tokens (as the loss weights them), plain
            # sums and forward counts (for forwards without text labels).
            **{f"{name}{part}": (1,) for name in ROUTING_LOSSES for part in ("", "_weight", "_plain", "_forwards")},
            "k_sum": (num_layers, 2),  # [text, vision]
            "k_tokens": (num_layers, 2),
            "k_hist": (num_layers, width + 1),
            "load": (num_layers, num_experts),
            "load_forwards": (1,),
        }
        self.sums: dict[str, torch.Tensor] = {}
        self.reset()

    @classmethod
    def for_model(cls, model: nn.Module) -> "RoutingMetrics":
        """Sized for `model`'s MoE layers (none for a dense model: then only the losses are tracked)."""
        blocks = getattr(model, "moe_blocks", [])
        config = getattr(model, "config", None)
        if not blocks or config is None:
            return cls([], 1, 1)
        return cls([b.layer_idx for b in blocks], config.num_experts, config.max_experts_per_token)

    def reset(self, device: torch.device | str = "cpu") -> None:
        self.sums = {
            name: torch.zeros(shape, dtype=torch.float64, device=device) for name, shape in self._shapes.items()
        }

    @torch.no_grad()
    def update(self, outputs, labels: torch.Tensor | None = None, num_items_in_batch=None) -> None:
        """Add one forward's `MoEOutputWithPast` (anything without its fields is skipped). `labels` (B, L) and
        the `num_items_in_batch` the model normalised its CE by give the token-weighted CE."""
        get = outputs.get if isinstance(outputs, dict) else lambda key: getattr(outputs, key, None)
        sums = self._on_device(get("logits"))
        ce_loss = get("ce_loss")
        text_tokens = None if labels is None else (labels[:, 1:] != -100).sum().to(sums["ce_nll"].device)
        if ce_loss is not None and text_tokens is not None:
            count = text_tokens if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
            sums["ce_nll"] += ce_loss.detach().double() * count.to(sums["ce_nll"].device).clamp(min=1)
            sums["ce_tokens"] += text_tokens
        for name, key in ROUTING_LOSSES.items():
            value = get(key)
            if value is not None:
                value = value.detach().double()
                weight = 1.0 if text_tokens is None else text_tokens.double()
                sums[name] += value * weight
                sums[f"{name}_weight"] += weight
                sums[f"{name}_plain"] += value
                sums[f"{name}_forwards"] += 1

        expert_counts = get("expert_counts")
        if not expert_counts or len(expert_counts) != len(self.layer_indices):
            return
        token_mask = get("token_mask")
        k_sum, tokens = avg_k_sums(expert_counts, token_mask, get("vision_mask"))
        sums["k_sum"] += k_sum
        sums["k_tokens"] += tokens
        real = torch.ones_like(expert_counts[0], dtype=torch.bool) if token_mask is None else token_mask
        for i, counts in enumerate(expert_counts):
            sums["k_hist"][i] += torch.bincount(counts[real].clamp(max=self.width), minlength=self.width + 1).double()
        sums["load"] += torch.stack([load.detach().double() for load in get("expert_load")])
        sums["load_forwards"] += 1

    def _on_device(self, reference: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if reference is not None and self.sums["ce_nll"].device != reference.device:
            self.sums = {name: value.to(reference.device) for name, value in self.sums.items()}
        return self.sums

    def compute(self, device: torch.device | str | None = None) -> dict[str, float]:
        """The averages since the last call (summed across ranks under torch.distributed), then reset."""
        device = device if device is not None else self.sums["ce_nll"].device
        names = list(self._shapes)
        flat = torch.cat([self.sums[name].to(device).flatten() for name in names])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat)
        sums, offset = {}, 0
        for name in names:
            size = self.sums[name].numel()
            sums[name] = flat[offset : offset + size].view(self._shapes[name]).cpu()
            offset += size
        self.reset(device)

        metrics = {}
        if sums["ce_tokens"].item() > 0:
            metrics["loss/ce"] = (sums["ce_nll"] / sums["ce_tokens"]).item()
        for name in ROUTING_LOSSES:
            if sums[f"{name}_forwards"].item() > 0:
                weight = sums[f"{name}_weight"].item()
                value = sums[name] / weight if weight > 0 else sums[f"{name}_plain"] / sums[f"{name}_forwards"]
                metrics[f"loss/{name}"] = value.item()
        if not self.layer_indices or sums["k_tokens"].sum().item() == 0:
            return metrics
        metrics.update(self._avg_k_metrics(sums["k_sum"], sums["k_tokens"]))
        hist = sums["k_hist"].sum(0)
        for n in range(self.width + 1):
            metrics[f"routing/frac_{n}_experts"] = (hist[n] / hist.sum().clamp(min=1)).item()
        cv = load_cv(sums["load"] / sums["load_forwards"].clamp(min=1)).tolist()
        metrics.update({f"routing/load_cv_layer_{i}": value for i, value in zip(self.layer_indices, cv, strict=True)})
        return metrics

    def _avg_k_metrics(self, k_sum: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
        """`routing/avg_k{_text|_vision}` and `routing/avg_k{_text|_vision}_layer_{i}` from the (layers, 2)
        sums; a modality without tokens has no entry."""
        metrics = {}
        for modality, suffix in (("all", ""), ("text", "_text"), ("vision", "_vision")):
            metrics[f"routing/avg_k{suffix}"] = avg_k(k_sum, tokens, modality)
            by_layer = avg_k_per_layer(k_sum, tokens, modality)
            for layer_idx, value in zip(self.layer_indices, by_layer, strict=True):
                metrics[f"routing/avg_k{suffix}_layer_{layer_idx}"] = value
        return {name: value for name, value in metrics.items() if value is not None}

    def mean_expert_load(self) -> torch.Tensor:
        """(layers, E) mean `expert_load` of the forwards since the last `compute()` on this rank ((0, E)
        before any); read it before `compute()`, which resets the sums."""
        forwards = self.sums["load_forwards"].item()
        if forwards == 0:
            return self.sums["load"].new_empty(0, self.num_experts).cpu()
        return (self.sums["load"] / forwards).cpu()


def values_by_layer(metrics: dict[str, float], prefix: str) -> dict[int, float]:
    """`{prefix}{i}` entries of `compute()`'s output (e.g. prefix `routing/avg_k_layer_`) -> {i: value}, by layer."""
    values = {int(k.removeprefix(prefix)): v for k, v in metrics.items() if k.startswith(prefix)}
    return dict(sorted(values.items()))


def threshold_metrics(model: nn.Module) -> dict[str, float]:
    """The routers' per-step state under `routing/` (`Router.logged_state`): `routing/threshold_layer_{i}_{j}`, tau_j
    (j = 1..M-1) of every DARE layer, `routing/l1_coef_layer_{i}` and `routing/gate_offset_layer_{i}`, lambda and the
    gate offset of every ReMoE layer..."""
    return {
        f"routing/{name}": value
        for module in model.modules()
        if isinstance(module, MoEBlock)
        for name, value in module.gate.logged_state().items()
    }
