"""Pure-torch references for the DARE paper's baseline routers, transcribed from the originals' public code.

Independent of hf_dare (torch only). Every function returns DENSE per-token weights, (T, E) (or (T, N) over all
routed experts for MoE++), so comparisons do not depend on slot order. Citations are `repo@commit:path:line`.

Commits read (the `fetch` snapshots):
  thu-ml/ReMoE                 463c6af38ffaa841941ea834470ee09f8d515652
  SkyworkAI/MoE-plus-plus      7f439675dd015fa307a31443544f76fa3525ba92
  LINs-lab/DynMoE              49272326e794b24bbebe3a9c6df3c079b3dd887b
  ZhenweiAn/Dynamic_MoE        f56bc20db176f22ab51cb56b7dcb96403fb2cd8a
  PKU-YuanGroup/MoE-LLaVA      6cb5f66e12d69e57c584a0062f7943d391540676
  microsoft/DeepSpeed          tag v0.9.5 = fc9e1ee00e673b2ce2a433c4e34c5440e76c9f3e (MoE-LLaVA pins deepspeed==0.9.5,
                               MoE-LLaVA pyproject.toml:27)

Where an original's released code has no training loss (MoE++, Top-p), the paper's formula is given and marked so.
"""

import math

import torch
import torch.nn.functional as F

REMOE = "thu-ml/ReMoE@463c6af"
MOEPP = "SkyworkAI/MoE-plus-plus@7f43967"
DYNMOE = "LINs-lab/DynMoE@4927232"
TOPP = "ZhenweiAn/Dynamic_MoE@f56bc20"
MOELLAVA = "PKU-YuanGroup/MoE-LLaVA@6cb5f66"
DEEPSPEED = "microsoft/DeepSpeed@v0.9.5"


# ----------------------------------------------------------------------------------------------------------------
# ReMoE
# ----------------------------------------------------------------------------------------------------------------


def remoe_reference(hidden: torch.Tensor, weight: torch.Tensor, l1_coef: float, k: int, training: bool = True) -> dict:
    """ReMoE's ReLU router and its load-balanced L1 loss for ONE layer and one micro-batch.

    Transcribes thu-ml/ReMoE@463c6af:
      - megatron/core/transformer/moe/router.py:39-44 (weight (E, H), `config.init_method` = N(0, init_method_std),
        default 0.02, transformer_config.py:127-138; the ReMoE scripts use 0.01, scripts/train_llama_182m_remoe.sh:100)
      - router.py:59 logits = h @ W^T (in the model's dtype; no float32 cast)
      - router.py:353-354 probs = relu(logits); routing_map = probs > 0 (the weights are NOT renormalised; they
        multiply the expert outputs directly, token_dispatcher.py:215-218 (allgather) and 579-585 (alltoall, `unpermute(..., probs=self.probs)`))
      - router.py:355-361 only `if self.training and torch.is_grad_enabled()`: l1 and sparsity
      - router.py:386-395 + moe_utils.py:11-56 l1 = switch_load_balancing_loss_func(probs, n, topk, coef)
            = coef * E / (T^2 k) * sum_i (sum_t G_ti) * n_i,   n_i = #{t : G_ti > 0}   (n_i has no gradient)
            = coef * sum_i f_i * mean_t G_ti,                  f_i = E n_i / (k T)
      - router.py:360 sparsity = 1 - #{G > 0} / (T E)   (accumulated into config.moe_relu_sparsity)
      - router.py:404 the l1 is attached by MoEAuxLossAutoScaler (moe_utils.py:110-153): its gradient is added as if
        l1 were a term of the loss, per layer -> the layers' l1 terms are SUMMED (see `remoe_total_l1`).

    hidden (T, H), weight (E, H). Returns dict(combine (T, E) = G, active (T, E) bool, l1_loss (scalar, 0 when not
    training), sparsity (python float or None), counts (E,)).
    """
    logits = F.linear(hidden, weight)
    probs = torch.relu(logits)
    routing_map = probs > 0
    num_tokens, num_experts = probs.shape
    out = {"combine": probs, "active": routing_map, "logits": logits, "counts": routing_map.sum(0)}
    if training and torch.is_grad_enabled():
        tokens_per_expert = routing_map.sum(dim=0)
        aggregated = probs.sum(dim=0)
        out["l1_loss"] = torch.sum(aggregated * tokens_per_expert) * (
            num_experts * l1_coef / (num_tokens * num_tokens * k)
        )
        out["sparsity"] = float(1 - routing_map.sum().float() / routing_map.numel())
    else:
        out["l1_loss"] = probs.new_zeros(())
        out["sparsity"] = None
    return out


def remoe_total_l1(per_layer_l1: list[torch.Tensor]) -> torch.Tensor:
    """The model's L1 term: the SUM over MoE layers (each layer's l1 is attached to its own activation by
    MoEAuxLossAutoScaler, router.py:404, moe_utils.py:129-143, with the main loss's scale 1/num_microbatches,
    schedules.py:302-313). thu-ml/ReMoE@463c6af."""
    return torch.stack(list(per_layer_l1)).sum()


def remoe_update_l1_coef(
    l1_coef: float,
    sparsities: list[float],
    num_layers: int,
    num_microbatches: int,
    k: int,
    num_experts: int,
    multiplier: float = 1.2,
) -> tuple[float, float]:
    """ReMoE's per-step update of lambda (ONE lambda for the whole model), thu-ml/ReMoE@463c6af
    megatron/training/training.py:1476-1508 and gpt_model.py:168-173:

      sparsity_accum is zeroed before each train_step (1477-1478); every ReLU router of every micro-batch adds its
      own sparsity (router.py:360-361); after the step: s = sparsity_accum / (num_layers * num_microbatches)
      (1495; `num_layers` = config.num_layers, ALL decoder layers), averaged over data-parallel ranks (1497-1498),
      summed over pipeline ranks (1500);
      target = 1 - topk / num_moe_experts (1502, not configurable);
      lambda *= multiplier if s < target else lambda /= multiplier (1503-1506; s == target divides).
      lambda_0 = moe_relu_l1_reg_coeff_init = 1e-8, multiplier 1.2 (transformer_config.py:335-339), a float32
      buffer of the GPT model (gpt_model.py:168-171), no bounds, no warm-up.

    `sparsities`: every router's sparsity of every micro-batch of this step (one rank). Returns (new lambda, s)."""
    s = sum(sparsities) / (num_layers * num_microbatches)
    target = 1 - k / num_experts
    if s < target:
        l1_coef = l1_coef * multiplier
    else:
        l1_coef = l1_coef / multiplier
    return l1_coef, s


# ----------------------------------------------------------------------------------------------------------------
# MoE++
# ----------------------------------------------------------------------------------------------------------------

MOEPP_TOP_K = 2  # moe_plus_plus_layer.py:19
MOEPP_CONSTANT = 2  # moe_plus_plus_layer.py:20


def moepp_reference(
    hidden: torch.Tensor,
    gate_weights: tuple[torch.Tensor, ...],
    constant_vectors: torch.Tensor,
    constant_wg: torch.Tensor,
    gate_map: torch.Tensor | None = None,
    gate_residual: torch.Tensor | None = None,
    mixtral_gating: bool = False,
    feature_no_mul_topk: bool = False,
    top_k: int = MOEPP_TOP_K,
) -> dict:
    """MoE++'s router and zero-computation experts for one layer, SkyworkAI/MoE-plus-plus@7f43967 `MoE++/`.

    Expert order of the original (moe_plus_plus_layer.py:142-145): N_ffn = N - 2 - Constant FFN experts, then the
    `Constant` (=2, line 20) constant experts, then ONE copy expert, then ONE zero expert (index N - 1).

    - Gate (lines 101-107, default `moe_2layer_gate=True`, configuration_moe_plus_plus.py:42):
      logits = W2 tanh(W1 h), W1: H -> 8N, W2: 8N -> N, no bias, float32; else (one tensor given) logits = W h.
      `gate_weights` = (W1 (8N, H), W2 (N, 8N)) or (W (N, H),).
    - Gating residual (lines 109, 129-131, 135): logits += gate_map(prev) with gate_map = Linear(N, N, bias=False)
      (so + prev @ gate_map^T), prev = the previous layer's logits AFTER its own residual (in-place +=, returned);
      none for the first layer (modeling_moe_plus_plus.py:661, 689-697). Init of gate_map and W1/W2 and the
      constant experts' wg: `_init_weights` N(0, initializer_range=0.02) (modeling_moe_plus_plus.py:524-529);
      constant vectors N(0, 1) (moe_plus_plus_layer.py:44-46, not touched by _init_weights).
    - Top-k weights (gating(), lines 59-80), default `moe_use_mixtral_gating=False`:
      P = softmax(logits); (g, idx) = top-2 of P; g[idx == N-1] = 0 (the zero expert's gate); g /= sum(g).
      So {FFN a, zero} gives FFN a weight 1; {a, b} without the zero expert gives p_a / (p_a + p_b).
      mixtral_gating: (g, idx) = top-2 of logits; g = softmax(g) (no zeroing).
    - Expert input (lines 172-173): unless mixtral gating or `moe_feature_no_mul_topk` (default False,
      configuration_moe_plus_plus.py:45), EVERY expert gets MOE_TOP_K * h = 2h (the gate saw h).
    - Zero expert: 0 (lines 32-38). Copy: its input (23-29). Constant c (41-56): a = softmax(wg_c x) (wg_c: (2, H),
      no bias), out = a_0 x + a_1 v_c, with x the expert input (2h by default).
    - Combine (lines 174-180): out = sum over the chosen experts of g * E(x).

    constant_vectors (C, H), constant_wg (C, 2, H). Returns dict(logits (T, N) to pass on as the next layer's
    `gate_residual`, probs (T, N) (None with mixtral gating), combine (T, N) dense weights over all N experts,
    expert_input_scale, zc_output (T, H) = the zero/copy/constant experts' weighted outputs, ffn_input (T, H))."""
    x32 = hidden.float()
    if len(gate_weights) == 2:
        w1, w2 = gate_weights
        logits = F.linear(torch.tanh(F.linear(x32, w1.float())), w2.float())
    else:
        (w,) = gate_weights
        logits = F.linear(x32, w.float())
    if gate_residual is not None:
        logits = logits + F.linear(gate_residual.to(gate_map.dtype), gate_map)
    num_experts = logits.shape[1]
    probs = None
    if mixtral_gating:
        gates, indices = torch.topk(logits, k=top_k, dim=1)
        gates = F.softmax(gates, dim=1)
    else:
        probs = F.softmax(logits, dim=1)
        gates, indices = torch.topk(probs, k=top_k, dim=1)
        gates = torch.where(indices == (num_experts - 1), torch.zeros_like(gates), gates)
        gates = gates / torch.sum(gates, dim=1, keepdim=True)
    combine = torch.zeros_like(logits).scatter(1, indices, gates)
    scale = 1 if (mixtral_gating or feature_no_mul_topk) else MOEPP_TOP_K
    x = hidden * scale
    num_constant = constant_vectors.shape[0]
    num_ffn = num_experts - 2 - num_constant
    zc = torch.zeros_like(x, dtype=combine.dtype)
    for c in range(num_constant):
        a = F.softmax(F.linear(x, constant_wg[c]), dim=-1)
        out_c = a[:, :1] * x + a[:, 1:] * constant_vectors[c][None, :]
        zc = zc + combine[:, num_ffn + c : num_ffn + c + 1] * out_c
    zc = zc + combine[:, num_experts - 2 : num_experts - 1] * x  # copy expert; the zero expert adds 0
    return {
        "logits": logits,
        "probs": probs,
        "combine": combine,
        "indices": indices,
        "expert_input_scale": scale,
        "ffn_input": x,
        "zc_output": zc,
        "num_ffn": num_ffn,
    }


def moepp_heterogeneous_balance_loss(
    probs: torch.Tensor, indices: torch.Tensor, num_ffn: int, tau: float = 0.75
) -> torch.Tensor:
    """PAPER ONLY (the released code, SkyworkAI/MoE-plus-plus@7f43967, is inference code with no balancing loss:
    modeling_moe_plus_plus.py:796-807 computes the LM loss only). MoE++ paper (arXiv 2410.07348) Eq. 7:

        L_b = sum_{i=1}^{N} eta_i f_i P_i,  eta_i = 1 (FFN) or tau (zero-computation),
        f_i = (1/T) sum_t 1(token t selects expert i),  P_i = (1/T) sum_t softmax(G(x_t))_i

    (no factor N; f_i sums to top-k over i). Eq. 9: L = L_ce + beta L_b, beta = 0.01 (App. B.2); tau = 0.75 by
    default (Sec. 4.3). The paper does not say how the layers' L_b are reduced (Megatron-based training, Sec. 4.1).
    probs (T, N), indices (T, k)."""
    num_tokens, num_experts = probs.shape
    selected = torch.zeros_like(probs).scatter(1, indices, 1.0)
    f = selected.sum(0) / num_tokens
    p = probs.mean(0)
    eta = torch.ones(num_experts, dtype=probs.dtype, device=probs.device)
    eta[num_ffn:] = tau
    return (eta * f * p).sum()


# ----------------------------------------------------------------------------------------------------------------
# DynMoE (DeepSpeed-0.9.5 implementation used by its MoE-LLaVA experiments)
# ----------------------------------------------------------------------------------------------------------------


class _SignStraightThrough(torch.autograd.Function):
    """GAMoEGateBackward, LINs-lab/DynMoE@4927232 DeepSpeed-0.9.5/deepspeed/moe/sharded_moe.py:485-495:
    forward sign(x), backward identity."""

    @staticmethod
    def forward(ctx, scores):
        return torch.sign(scores)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def dynmoe_regularisers(sim_matrix: torch.Tensor, experts_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diverse_and_simple_gate_loss, LINs-lab/DynMoE@4927232 DeepSpeed-0.9.5/deepspeed/moe/loss.py:4-15:
    W_n = W normalised per column (expert); sims = W_n^T W_n; m = experts_mask;
    diversity = || sims * (m m^T) - I * (m m^T) ||_F;  simplicity = mean over ALL max_E columns of ||w_i||_2.
    Returns (diversity, simplicity); the original adds them with weight 1 each."""
    unit = F.normalize(sim_matrix, dim=0)
    sims = torch.matmul(unit.T, unit)
    targets = torch.eye(sims.shape[0], device=sims.device)
    sim_mask = torch.matmul(experts_mask.unsqueeze(0).T, experts_mask.unsqueeze(0))
    diversity = torch.norm(sims * sim_mask - targets * sim_mask)
    simplicity = torch.mean(torch.norm(sim_matrix, dim=0))
    return diversity, simplicity


def dynmoe_reference(
    hidden: torch.Tensor,
    sim_matrix: torch.Tensor,
    thresholds: torch.Tensor,
    experts_mask: torch.Tensor,
    training: bool,
    log_temperature: float = 0.0,
) -> dict:
    """DynMoE top-any gating + topanygating_opt + its l_aux for ONE layer, LINs-lab/DynMoE@4927232
    DeepSpeed-0.9.5/deepspeed/moe/sharded_moe.py (the "recommended" DeepSpeed implementation, README; used by the
    repo's MoE-LLaVA experiments):

    GAMoEGateT (500-554), fp32 (TopKGate passes fp32_gate=True, 602):
      sim_matrix (H, max_E) = orthogonal_(empty(max_E, H)).T (504); thresholds `gates` = 0 (506);
      experts_mask[:num_global_experts] = 1 else 0 (507, 513); temperature = log(1/init_t) = 0, frozen (508),
      logit_scale = exp(min(temperature, log 100)) = 1 (509, 528).
      s = sigmoid(cos(h, w_i) * scale) * mask (529-531); g = sigmoid(theta * scale) (532).
      training (534-538): G = SignST(relu(s - g)) (1 forward, straight-through gradient of relu(s - g));
        K = #active; a token with no active expert keeps NONE (its MoE output is 0).
      eval (540-552): the same, then a token with none active gets one_hot(argmax s); K = max(K, 1).
    topanygating_opt (434-481), the gate used for GAMoEGateT (693-695), dropless (capacity = max count, 441-443):
      non_zero = tokens with an active expert; ng = G[nz] / sum_j G[nz]_j (differentiable denominator, 457);
      me = mean_nz ng; ce = mean_nz 1[G > 0]; load_balance = mean_i(me_i ce_i) * E^2 = E * sum_i me_i ce_i (458-460),
        E = max_E (gates.shape[1], incl. masked experts); 0 when no token has an active expert (461-462);
      efficiency = mean over all T tokens and all max_E experts of G (463);
      l_aux = diversity + simplicity + load_balance + efficiency (465-466; all weights 1; loss.py:4-15);
      combine = G / clamp(K, min=1) (474) -> each active expert 1/K (value), gradient of relu(s - g) / K.
    The model adds router_aux_loss_coef (0.01) * SUM over MoE layers of l_aux (DynMoE MoE-LLaVA
    moellava/model/language_model/llava_stablelm_moe.py:390-401; scripts/v1/*/finetune_dynmoe.sh:10).

    hidden (T, H), sim_matrix (H, max_E), thresholds (max_E,), experts_mask (max_E,).
    Returns dict(combine (T, max_E), counts (T,), scores s (T, max_E), l_aux, diversity, simplicity,
    load_balance, efficiency)."""
    x = hidden.float()
    sim = sim_matrix.float()
    clamp_max = math.log(1.0 / 0.01)
    logit_scale = torch.clamp(torch.tensor(log_temperature), max=clamp_max).exp()
    scores = torch.sigmoid(torch.matmul(F.normalize(x, dim=1), F.normalize(sim, dim=0)) * logit_scale)
    scores = scores * experts_mask
    thr = torch.sigmoid(thresholds.float() * logit_scale)
    if training:
        logits = _SignStraightThrough.apply(F.relu(scores - thr))
        top_k = torch.sum(logits > 0, dim=1).to(torch.int)
    else:
        new_logits = _SignStraightThrough.apply(F.relu(scores - thr))
        top_k = torch.sum(new_logits > 0, dim=1).to(torch.int)
        none = (torch.sum(new_logits, dim=1) == 0).to(torch.int).repeat(scores.shape[1]).reshape(scores.shape[1], -1).T
        one_hot = F.one_hot(torch.argmax(scores, dim=1), num_classes=scores.shape[1])
        logits = none * one_hot + new_logits
        top_k = torch.max(top_k, torch.ones(top_k.shape).to(top_k.device)).to(torch.int)
    gates = logits
    mask = gates.int()
    num_experts = int(gates.shape[1])
    non_zero = torch.sum(gates, dim=1) > 0
    if non_zero.sum() != 0:
        ng = gates[non_zero]
        ng = ng / torch.sum(ng, dim=1, keepdim=True)
        me = torch.mean(ng, dim=0)
        ce = torch.mean(mask[non_zero].float(), dim=0)
        load_balance = torch.mean(me * ce) * num_experts * num_experts
    else:
        load_balance = gates.new_zeros(())
    efficiency = torch.mean(gates)
    diversity, simplicity = dynmoe_regularisers(sim, experts_mask)
    l_aux = diversity + simplicity + load_balance + efficiency
    combine = gates / torch.clamp(top_k, min=1).unsqueeze(1)
    return {
        "combine": combine,
        "counts": top_k,
        "scores": scores,
        "l_aux": l_aux,
        "diversity": diversity,
        "simplicity": simplicity,
        "load_balance": load_balance,
        "efficiency": efficiency,
        "avg_k_nonzero": mask[non_zero].float().sum(1).mean() if non_zero.any() else None,
    }


def dynmoe_should_record(forward_count: int) -> tuple[bool, bool]:
    """DynMoE's adaptive expert schedule (DynMoE@4927232 DeepSpeed-0.9.5/deepspeed/moe/layer.py:145-187): per MoE
    layer, counted in training forwards; recording starts at forward_count % 300 == 0 and (fc // 300) % 3 == 1,
    experts are removed (never routed in the window) and one added (the first inactive slot, embedding = normalised
    sum of the unrouted tokens' inputs, threshold 0; sharded_moe.py:766-808) at (fc // 300) % 3 == 2.
    In the MoE-LLaVA experiments a layer starts with num_experts // 2 active of max_expert_num = num_experts
    (llava_stablelm_moe.py:495-507). Returns (begin_record, update)."""
    begin = forward_count % 300 == 0 and (forward_count // 300) % 3 == 1
    update = forward_count % 300 == 0 and (forward_count // 300) % 3 == 2
    return begin, update


# ----------------------------------------------------------------------------------------------------------------
# Top-p ("Harder Tasks Need More Experts")
# ----------------------------------------------------------------------------------------------------------------


def top_p_reference(hidden: torch.Tensor, weight: torch.Tensor, top_p: float) -> dict:
    """Top-p routing, ZhenweiAn/Dynamic_MoE@f56bc20 modeling/modeling_moe.py:
      - 198: router = Linear(H, E, bias=False), init N(0, initializer_range=0.02) (_init_weights 424-433)
      - 215-216: P = softmax(router(h)) (model dtype, no float32 cast)
      - 157-186 top_p_sampling_batched_all_sequence: sort P descending; c_j = cumsum; mask = c_j > p; the first
        index with c_j > p is kept (threshold_indices = argmax(mask), 180-183); so expert j (in rank order) is kept
        iff c_{j-1} <= p (c_{-1} = 0); if no c_j > p (p >= 1) every expert is kept (argmax of all-False is 0).
      - 185: the kept weights are the raw probabilities P_j, NOT renormalised; 227-231 output = sum P_j E_j(h).
    Config default p = 0.4 (configuration_moe.py:113). The released code has no training loss (only the LM loss,
    modeling_moe.py:771-782); see `top_p_dynamic_loss`.
    Returns dict(combine (T, E), counts (T,), probs (T, E))."""
    probs = F.softmax(F.linear(hidden, weight), dim=-1)
    sorted_probs, sorted_indices = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    mask = cumulative > top_p
    threshold_indices = mask.long().argmax(dim=-1)
    threshold_mask = F.one_hot(threshold_indices, num_classes=sorted_indices.size(-1)).bool()
    mask = mask & ~threshold_mask
    kept_probs = torch.where(mask, 0.0, sorted_probs)
    combine = torch.zeros_like(probs).scatter(-1, sorted_indices, kept_probs)
    return {"combine": combine, "counts": (~mask).sum(-1), "probs": probs}


def top_p_dynamic_loss(probs: torch.Tensor) -> torch.Tensor:
    """PAPER ONLY (not in ZhenweiAn/Dynamic_MoE's released code): the dynamic loss L_d = -sum_i P_i log P_i, taken
    here as the mean over tokens; the DARE paper's setting is a coefficient of 3e-7 (shared/METHODS.md). The
    reduction over tokens and layers could not be checked against the paper's text in this session."""
    return -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(-1).mean()


# ----------------------------------------------------------------------------------------------------------------
# MoE-LLaVA's DeepSpeed top-2 gating
# ----------------------------------------------------------------------------------------------------------------


def deepspeed_top2gating_reference(
    logits: torch.Tensor, capacity_factor: float, min_capacity: int, noise: torch.Tensor
) -> dict:
    """DeepSpeed v0.9.5 `top2gating`, microsoft/DeepSpeed@v0.9.5 deepspeed/moe/sharded_moe.py:277-340, as MoE-LLaVA
    calls it (TopKGate.forward 388-417: logits = wg(h.float()) in float32, wg = Linear(H, E, bias=False) with
    PyTorch's default init (376), capacity_factor if training else eval_capacity_factor (410)).

      gates = softmax(logits) (280); capacity = max(ceil(T / E * 2 * cf), min_capacity) (282, _capacity 156-166);
      1st = argmax(gates) (285-287); 2nd = argmax(logits + Gumbel noise) over the others (291-295) -- the noise is
      drawn IN TRAINING AND AT EVAL (no `self.training` test in top2gating or TopKGate);
      locations: 1st choices in token order, then 2nd choices (298-301);
      l_aux = mean_i(me_i * ce_i) * E^2 = E * sum_i me_i ce_i, me = mean gates, ce = share of tokens whose 1st
      choice is i, before any drop (307-309);
      drop the slots at location >= capacity (312-313);
      weights renormalised over the kept choices, denominator clamped at eps (322-328) -- always (v0.9.5 has no
      option; later DeepSpeed adds `top2_2nd_expert_sampling` and `drop_tokens`, DeepSpeed@38327e0
      sharded_moe.py:290-345);
      combine_weights (T, E, C) (330-337) -> here summed over C: (T, E).
    T counts every token given to the layer (padding included: MoE-LLaVA passes no mask).
    MoE-LLaVA settings: capacity_factor 1.5 (scripts/v1/*/finetune_moe.sh:12), eval_capacity_factor 2.0 and
    min_capacity 0 (moellava/train/train.py:94-96), router_aux_loss_coef 0.01 (train.py:98), loss +=
    0.01 * SUM over MoE layers of l_aux (llava_qwen1_5_moe.py:423-434; see `moe_llava_total_aux`).

    logits (T, E) float32, noise (T, E) (Gumbel(0, 1) samples). Returns dict(l_aux, combine (T, E), kept (T, 2)
    bool, capacity)."""
    num_tokens, num_experts = logits.shape
    gates = F.softmax(logits, dim=1)
    capacity = max(math.ceil(num_tokens / num_experts * capacity_factor * 2), min_capacity)
    mask1 = F.one_hot(gates.argmax(1), num_experts)
    mask2 = F.one_hot((logits + noise).masked_fill(mask1.bool(), float("-inf")).argmax(1), num_experts)
    locations1 = mask1.cumsum(0) - 1
    locations2 = mask2.cumsum(0) - 1 + mask1.sum(0, keepdim=True)
    l_aux = (gates.mean(0) * mask1.float().mean(0)).mean() * num_experts * num_experts
    mask1 = mask1 * (locations1 < capacity)
    mask2 = mask2 * (locations2 < capacity)
    gate1, gate2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
    denom = (gate1 + gate2).clamp(min=torch.finfo(gates.dtype).eps)
    combine = (gate1 / denom)[:, None] * mask1 + (gate2 / denom)[:, None] * mask2
    kept = torch.stack([mask1.sum(1) > 0, mask2.sum(1) > 0], dim=1)
    return {"l_aux": l_aux, "combine": combine, "kept": kept, "capacity": capacity}


def moe_llava_total_aux(per_layer_l_aux: list[torch.Tensor], coef: float = 0.01) -> torch.Tensor:
    """MoE-LLaVA: moe_loss = router_aux_loss_coef * sum(moe_losses), added to the CE loss,
    PKU-YuanGroup/MoE-LLaVA@6cb5f66 moellava/model/language_model/llava_qwen1_5_moe.py:423-434 (the same in every
    llava_*_moe.py). The same reduction (sum, 0.01) is used by DynMoE's MoE-LLaVA fork."""
    return coef * sum(per_layer_l_aux)


def gumbel_noise(shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel(0, 1) samples (-log(-log U)), for `deepspeed_top2gating_reference`'s `noise`."""
    u = torch.rand(shape, generator=generator).clamp(min=1e-20, max=1 - 1e-7)
    return -torch.log(-torch.log(u))
