"""hf-dare's experts kernels, registered in transformers' experts interface (`MoEExperts` is the module).

A router that gives tokens a variable number of experts pads each token's slots with the sentinel index
`num_experts`. Every kernel here skips sentinel slots, so the cost follows the experts actually used:

- `eager` (`MoEExperts.forward`, `sorted_experts_forward`): slots sorted by expert, one matmul per expert on
  a contiguous block.
- `hf_dare_token_loop`: a plain loop over each token's chosen experts (no sort, gather or scatter): the cost
  of a handful of tokens (decoding) is the weights read.
- `hf_dare`: `hf_dare_token_loop` for at most `TOKEN_LOOP_MAX_TOKENS` tokens without gradients on CPU,
  `eager` otherwise. The default where CUDA is absent.
- `hf_dare_grouped_mm`: one grouped matmul per projection (`torch.nn.functional.grouped_mm`) over the slots
  sorted by expert, sentinel slots past the last group. The default with CUDA.

transformers' own `grouped_mm` / `batched_mm` work too, and so does an experts module that replaced ours (vLLM's
fused MoE in its transformers backend): they get each sentinel slot as a weight-0 slot of an expert the token
already uses (`padded_routing`; exact, but computed, so they cost as many rows as the widest routing, and no
other expert's weights).
"""

import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface

from ._compat import grouped_mm

# At most this many tokens take the token loop in `hf_dare` (decoding: one token per sequence per step).
TOKEN_LOOP_MAX_TOKENS = 4


def sorted_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """(T, H), (T, K) with sentinel `num_experts`, (T, K) -> (T, H).

    Slots are sorted by expert and gathered once, so each expert runs one matmul over a contiguous block of
    its tokens; sentinel slots sort last and are dropped. One host sync (the per-expert counts) per call.
    `split` and `unbind` (not slicing / indexing per expert) keep the backward to one gradient buffer for
    the gathered tokens and one per weight tensor, instead of a full-size one per expert.
    """
    width = top_k_index.shape[-1]
    slots = top_k_index.reshape(-1)
    counts = torch.bincount(slots, minlength=self.num_experts + 1).tolist()
    used = slots.numel() - counts[self.num_experts]
    order = torch.argsort(slots, stable=True)[:used]
    tokens = order // width
    states = hidden_states.index_select(0, tokens)
    gate_up_proj, down_proj = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
    outputs = [
        self.expert(chunk, gate_up_proj[expert_idx], down_proj[expert_idx])
        for expert_idx, chunk in enumerate(states.split(counts[: self.num_experts]))
        if chunk.shape[0]
    ]
    output = torch.zeros_like(hidden_states)
    if outputs:
        weighted = torch.cat(outputs) * top_k_weights.reshape(-1)[order, None]
        output.index_add_(0, tokens, weighted.to(output.dtype))
    return output


def token_loop_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`hf_dare_token_loop`: each token through its chosen experts in turn, (T, H), (T, K), (T, K) -> (T, H).
    One host sync for the routing (and, without gradients, the weights); meant for a handful of tokens."""
    weights = top_k_weights if torch.is_grad_enabled() else top_k_weights.tolist()
    rows = []
    for t, experts in enumerate(top_k_index.tolist()):
        token, out = hidden_states[t : t + 1], None
        for slot, expert_idx in enumerate(experts):
            if expert_idx < self.num_experts:
                y = self.expert(token, self.gate_up_proj[expert_idx], self.down_proj[expert_idx]) * weights[t][slot]
                out = y if out is None else out + y
        rows.append(torch.zeros_like(token) if out is None else out)
    return torch.cat(rows).to(hidden_states.dtype)


def hf_dare_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`hf_dare`: the token loop for decoding-size inference on CPU, the sort-based kernel otherwise."""
    few_tokens = hidden_states.shape[0] <= TOKEN_LOOP_MAX_TOKENS
    if few_tokens and hidden_states.device.type == "cpu" and not torch.is_grad_enabled():
        return token_loop_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return sorted_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def grouped_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`hf_dare_grouped_mm`: (T, H), (T, K), (T, K) -> (T, H) with two grouped matmuls and no host sync.

    Slots sorted by expert; sentinel slots sort past the last group, which `grouped_mm` does not compute,
    and are zeroed before and after each matmul (the kernel leaves those rows uninitialised, forward and
    backward)."""
    if grouped_mm is None:  # torch < 2.10
        return sorted_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    width = top_k_index.shape[-1]
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    sentinel = (expert_ids >= self.num_experts)[:, None]
    counts = torch.histc(expert_ids.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    states = hidden_states[order // width].masked_fill(sentinel, 0.0)
    dtype = self.gate_up_proj.dtype
    projected = grouped_mm(states.to(dtype), self.gate_up_proj.transpose(-2, -1), offs=offsets)
    gate, up = projected.masked_fill(sentinel, 0.0).chunk(2, dim=-1)
    out = grouped_mm(self.act_fn(gate) * up, self.down_proj.transpose(-2, -1), offs=offsets)
    out = out.masked_fill(sentinel, 0.0) * top_k_weights.reshape(-1)[order, None]
    unsorted = torch.empty_like(out).index_copy_(0, order, out)
    return unsorted.view(-1, width, out.shape[-1]).sum(1).to(hidden_states.dtype)


HF_DARE_KERNELS = {
    "hf_dare": hf_dare_experts_forward,
    "hf_dare_token_loop": token_loop_experts_forward,
    "hf_dare_grouped_mm": grouped_mm_experts_forward,
}
SENTINEL_KERNELS = {"eager", *HF_DARE_KERNELS}
"""Implementations that skip sentinel slots; the others get them as weight-0 slots (`padded_routing`)."""

for _name, _kernel in HF_DARE_KERNELS.items():
    ExpertsInterface.register(_name, _kernel)


def default_experts_implementation() -> str:
    """The kernel used when none is asked for: `hf_dare_grouped_mm` with CUDA, `hf_dare` without (transformers'
    `grouped_mm` is about 2x slower than the sort-based loop on CPU, benchmarks/moe_layer.py)."""
    return "hf_dare_grouped_mm" if torch.cuda.is_available() else "hf_dare"


def padded_routing(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing (T, K), (T, K) without sentinels, for kernels that compute every slot: each sentinel slot
    names the token's first used expert (expert 0 for a token that uses none: ReMoE, MoE++) with weight 0 and
    no gradient. The output is the same; a kernel that works expert by expert (vLLM's fused MoE) reads no other
    expert's weights for it, only one more row of one it already runs (vLLM's own zero-expert router pads
    with expert 0, which costs a second expert's weights when the token does not use expert 0)."""
    sentinel = top_k_index >= num_experts
    first_used = torch.argmin(sentinel.int(), dim=-1, keepdim=True)  # the first slot that is not a sentinel
    own = top_k_index.gather(-1, first_used)
    own = own.masked_fill(own >= num_experts, 0)
    return torch.where(sentinel, own, top_k_index), top_k_weights.masked_fill(sentinel, 0.0)


def used_slots_forward(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
) -> torch.Tensor:
    """Another library's experts module, which computes every slot it is given (vLLM's fused MoE), on the used
    slots only: one row per used slot (width 1), summed back per token, so it computes T x Avg K rows, not T x K.
    Data-dependent shapes and one host sync: eager only; compiled or in a CUDA graph capture, `padded_routing`.
    (T, H), (T, K) with the sentinel `num_experts`, (T, K) -> (T, H)."""
    capturing = hidden_states.is_cuda and torch.cuda.is_current_stream_capturing()
    if torch.compiler.is_compiling() or capturing:
        return experts(hidden_states, *padded_routing(top_k_index, top_k_weights, num_experts))
    tokens, slots = (top_k_index < num_experts).nonzero(as_tuple=True)
    out = torch.zeros_like(hidden_states)
    if tokens.numel():
        rows = experts(hidden_states[tokens], top_k_index[tokens, slots, None], top_k_weights[tokens, slots, None])
        out.index_add_(0, tokens, rows.to(out.dtype))
    return out


def sentinel_safe_routing(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, implementation: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing (T, K), (T, K) as the kernel `implementation` can take it: with sentinels for ours; for the
    others (any name but ours and `eager`), `padded_routing`."""
    if implementation in SENTINEL_KERNELS or implementation is None:
        return top_k_index, top_k_weights
    return padded_routing(top_k_index, top_k_weights, num_experts)
