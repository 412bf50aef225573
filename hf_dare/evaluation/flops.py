"""Activated parameters N_A and FLOPs per token of an MoE model, from the routing of a forward pass.

Convention (Kaplan et al. 2020, as the DARE paper's N_A): a token's activated parameters are the
language model's non-expert parameters (attention, norms, dense FFNs, routers, DARE predictors) plus, in
each MoE layer, Avg K of that layer times the parameters of one expert. Not counted: the input embeddings
(a table lookup), the vision tower and the projector (they run once per image, not per text token), and the
LM head, which is reported apart (`lm_head_params`) because it runs only where logits are needed.

FLOPs per token = 2 * N_A (one multiply-add per activated weight) + the attention term
4 * n_layers * n_heads * head_dim * context (QK^T and AV over the causal context, on average (L + 1) / 2
positions for a sequence of L real tokens), plus 2 * `lm_head_params` with `include_lm_head=True`.
"""

import torch
from torch import nn

from hf_dare.modeling import MoEOutputWithPast, avg_k_per_layer, avg_k_sums

MODALITIES = ("all", "text", "vision")


def _language_model(model: nn.Module) -> nn.Module:
    inner = model.model
    return getattr(inner, "language_model", inner)


def activated_parameters(model: nn.Module, outputs: MoEOutputWithPast, modality: str = "all") -> dict:
    """N_A of `model` (an MoE causal LM or MoE-LLaVA) on the tokens of the forward that gave `outputs`.

    `outputs.expert_counts` gives Avg K per MoE layer over the real tokens (`outputs.token_mask`), of one
    modality if asked (`"text"` / `"vision"`, from `outputs.vision_mask`). Returns `activated_params` (N_A),
    `non_expert_params`, `expert_params` (sum over layers of Avg K * `params_per_expert`), `avg_k` (mean
    over layers), `avg_k_per_layer`, `params_per_expert` (per layer), `lm_head_params`, `total_params`.
    """
    if outputs.expert_counts is None:
        raise ValueError("outputs.expert_counts is missing: pass the output of an hf_dare MoE model's forward")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if modality == "vision" and outputs.vision_mask is None:
        raise ValueError("modality='vision' needs `outputs.vision_mask` (an MoE-LLaVA forward)")
    k_sum, tokens = avg_k_sums(outputs.expert_counts, outputs.token_mask, outputs.vision_mask)
    by_layer = avg_k_per_layer(k_sum, tokens, modality)
    if None in by_layer:
        raise ValueError(f"no tokens selected (modality={modality!r}) to average the expert counts over")
    return activated_parameters_at(model, by_layer)


def activated_parameters_at(model: nn.Module, avg_k_per_layer: list[float]) -> dict:
    """N_A of `model` when its MoE layers use `avg_k_per_layer` experts per token on average (one value per
    MoE layer, in order), e.g. Avg K measured over a whole evaluation set. Same keys as `activated_parameters`."""
    blocks = model.moe_blocks
    if len(avg_k_per_layer) != len(blocks):
        raise ValueError(f"got Avg K for {len(avg_k_per_layer)} MoE layers but the model has {len(blocks)}")
    params_per_expert = [
        block.experts.gate_up_proj[0].numel() + block.experts.down_proj[0].numel() for block in blocks
    ]

    language_model = _language_model(model)
    skipped = {id(p) for block in blocks for p in block.experts.parameters()}
    skipped |= {id(p) for p in language_model.get_input_embeddings().parameters()}
    non_expert = sum(p.numel() for p in language_model.parameters() if id(p) not in skipped)
    expert = sum(k * n for k, n in zip(avg_k_per_layer, params_per_expert, strict=True))
    return {
        "activated_params": non_expert + expert,
        "non_expert_params": non_expert,
        "expert_params": expert,
        "avg_k": sum(avg_k_per_layer) / len(avg_k_per_layer) if avg_k_per_layer else 0.0,
        "avg_k_per_layer": avg_k_per_layer,
        "params_per_expert": params_per_expert,
        "lm_head_params": model.get_output_embeddings().weight.numel(),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def flops_per_token(
    model: nn.Module,
    outputs: MoEOutputWithPast,
    modality: str = "all",
    include_attention: bool = True,
    include_lm_head: bool = False,
) -> dict:
    """Forward FLOPs per token: 2 * N_A + attention term (+ 2 * LM head); see the module docstring.

    The context of the attention term is the mean over the sequences of (real length + 1) / 2, from
    `outputs.token_mask` (or the full length). Returns `flops_per_token`, `gflops_per_token`,
    `matmul_flops`, `attention_flops`, `lm_head_flops`, `context` and the `activated_parameters` dict.
    """
    params = activated_parameters(model, outputs, modality)
    lengths = outputs.token_mask.sum(-1).float() if outputs.token_mask is not None else None
    if lengths is None:
        lengths = torch.full((outputs.expert_counts[0].shape[0],), float(outputs.expert_counts[0].shape[1]))
    context = ((lengths + 1) / 2).mean().item()
    return _flops(model, params, context, include_attention, include_lm_head)


def flops_per_token_at(
    model: nn.Module,
    avg_k_per_layer: list[float],
    context: float,
    include_attention: bool = True,
    include_lm_head: bool = False,
) -> dict:
    """`flops_per_token` when the MoE layers use `avg_k_per_layer` experts per token (one value per MoE layer,
    e.g. measured over a whole evaluation set) and the attention sees `context` positions on average (for
    sequences of L real tokens, the mean of (L + 1) / 2). Same keys as `flops_per_token`."""
    return _flops(model, activated_parameters_at(model, avg_k_per_layer), context, include_attention, include_lm_head)


def _flops(model: nn.Module, params: dict, context: float, include_attention: bool, include_lm_head: bool) -> dict:
    text_config = model.config.get_text_config()
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    attention = (
        4 * text_config.num_hidden_layers * text_config.num_attention_heads * head_dim * context
        if include_attention
        else 0.0
    )
    matmul = 2 * params["activated_params"]
    lm_head = 2 * params["lm_head_params"] if include_lm_head else 0
    total = matmul + attention + lm_head
    return {
        "flops_per_token": total,
        "gflops_per_token": total / 1e9,
        "matmul_flops": matmul,
        "attention_flops": attention,
        "lm_head_flops": lm_head,
        "context": context,
        "activated_parameters": params,
    }


__all__ = ["activated_parameters", "activated_parameters_at", "flops_per_token", "flops_per_token_at"]
