"""MoE models with dynamic routing (Top-K, DARE, LTDR...): a text-only causal LM and MoE-LLaVA.

The decoders and vision towers are transformers' own classes (`AutoModel`'s for their config); the FFN of
every layer in `config.moe_layers` is replaced by an `MoEBlock` (`gate`: the router, `experts`: the experts on
transformers' experts interface, see `experts.py`). In both models the decoder is the base model's
`language_model`, as in transformers' LLaVA. The outer model opens a `RoutingContext` for each forward: the
blocks read this forward's token masks from it and leave their `Routing` in it, from which the model computes
the routing losses and statistics.
"""

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)

from ._compat import (
    ACTIVATION_CHECKPOINTING_ENABLE,
    CACHE_ARGUMENT,
    EXPERTS_INTERFACE_NAMES_KERNELS,
    image_features,
    output_cache,
    register_vision_model_level,
)
from .configuration_moe import MoECausalLMConfig, MoEConfigBase, MoELlavaConfig
from .experts import (
    HF_DARE_KERNELS,
    default_experts_implementation,
    sentinel_safe_routing,
    sorted_experts_forward,
    used_slots_forward,
)
from .model_card import GENERATED_MARKER, render_model_card
from .routers import TopKRouter  # noqa: F401  (imported by `configuration_moe`; see `_compat`)
from .routing import ROUTERS, RoutingContext, current_routing_context, routing_context
from .statistics import expert_load

register_vision_model_level(MoELlavaConfig.model_type)


@use_experts_implementation
class MoEExperts(nn.Module):
    """E gated FFN experts stored as 3-D parameters (transformers' layout, gate and up concatenated):
    `gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)."""

    def __init__(self, config):
        super().__init__()
        text_config = config.text_config
        self.num_experts = config.num_experts
        self.hidden_dim = text_config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[text_config.hidden_act]

    def expert(self, hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
        """One expert, given its weights (2I, H) and (H, I), on (N, H) -> (N, H)."""
        gate, up = F.linear(hidden_states, gate_up_proj).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, down_proj)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The `eager` implementation: `experts.sorted_experts_forward`."""
        return sorted_experts_forward(self, hidden_states, top_k_index, top_k_weights)


class MoEBlock(nn.Module):
    """The MoE layer that replaces a decoder layer's FFN: `gate` (the router) + `experts`, (B, L, H) -> (B, L, H).

    Inside a model's forward it reads the token masks from the active `RoutingContext`, computes its
    load-balancing loss when asked, and leaves its `Routing` there; called on its own it just routes.
    """

    # A DeepSpeed ZeRO-3 leaf module (DeepSpeed reads `_z3_leaf`): the block's parameters (router, experts) are
    # gathered together for its forward and backward, whatever experts this rank's tokens use. Without it ZeRO-3
    # hooks the router, whose output (a `Routing`) they cannot follow, and release its weight before its backward.
    _z3_leaf = True

    def __init__(self, config: MoEConfigBase, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.gate = ROUTERS[config.router_for(layer_idx)](config, layer_idx)
        self.experts = MoEExperts(config)

    def owns_experts(self) -> bool:
        """Whether `experts` is still an `MoEExperts` (PEFT's wrappers around it included), whose kernels skip
        the sentinel slots; not once a serving backend has put its own in its place (vLLM's transformers
        backend puts its fused MoE there when it leaves the routing to this block)."""
        experts = self.experts
        while not isinstance(experts, MoEExperts) and isinstance(getattr(experts, "base_layer", None), nn.Module):
            experts = experts.base_layer  # PEFT's LoRA wrappers of the expert parameters
        return isinstance(experts, MoEExperts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)
        context = current_routing_context()
        token_mask, vision_mask = context.masks_for(batch_size, seq_len) if context is not None else (None, None)
        routing = self.gate(flat, token_mask, vision_mask)
        if context is not None and context.with_aux_loss:
            routing.aux_loss = self.gate.balancing_loss(routing, token_mask, vision_mask)
            routing.router_loss = self.gate.router_loss(routing, token_mask, vision_mask)
        index, weights, num_experts = routing.expert_indices, routing.expert_weights, self.config.num_experts
        if self.owns_experts():
            index, weights = sentinel_safe_routing(index, weights, num_experts, self.config._experts_implementation)
            experts_input = flat if routing.expert_input_scale == 1.0 else flat * routing.expert_input_scale
            out = self.experts(experts_input, index, weights)
        else:  # a serving backend's experts, which compute every slot: the used ones only, no sentinel
            experts_input = flat if routing.expert_input_scale == 1.0 else flat * routing.expert_input_scale
            out = used_slots_forward(self.experts, experts_input, index, weights, num_experts)
        if routing.zero_computation_output is not None:  # MoE++'s zero / copy / constant experts
            out = out + routing.zero_computation_output
        if context is not None:
            context.add(self.gate, routing)
        return out.view(batch_size, seq_len, hidden_dim)


def install_moe_blocks(language_model: nn.Module, config: MoEConfigBase) -> None:
    """Replace the FFN (`mlp`) of each decoder layer in `config.moe_layers` by an `MoEBlock`."""
    layers = getattr(language_model, "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise ValueError(
            f"{type(language_model).__name__} has no `layers[i].mlp` to replace; "
            "supported decoders are those with that layout (Qwen2, Qwen3, StableLM, Llama, Mistral...)."
        )
    for layer_idx in config.moe_layers:
        layers[layer_idx].mlp = MoEBlock(config, layer_idx)


def checkpoint_routing_contexts():
    """`context_fn` of torch's non-reentrant checkpoint: the recomputation in the backward sees the masks of
    its forward (LTDR's routing depends on them) and records nothing a second time."""
    context = current_routing_context()
    if context is None:
        return nullcontext(), nullcontext()
    return nullcontext(), routing_context(dataclasses.replace(context, record=False, routings=[]))


def set_base_model_auto_map(model: nn.Module, config=None) -> None:
    """Add `auto_map["AutoModel"]` (the base model without the LM head, named by the class attribute
    `base_model_auto_class`) to `config` (default `model.config`) when the model's code is saved with it:
    vLLM's and SGLang's transformers backends build `AutoModel.from_config(config)` and add their own LM head."""
    name = getattr(type(model), "base_model_auto_class", None)
    if name is None or getattr(model, "_auto_class", None) is None:
        return
    config = model.config if config is None else config
    module = type(model).__module__.rsplit(".", 1)[-1]
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), "AutoModel": f"{module}.{name}"}


@dataclasses.dataclass
class MoEOutputWithPast(MoeCausalLMOutputWithPast):
    """transformers' MoE causal-LM output (`loss`, `aux_loss`, `logits`, `router_logits` per MoE layer when
    `output_router_logits=True`...) plus hf-dare's routing outputs.

    `loss` = `ce_loss` + share * (alpha * `difficulty_loss` + beta * `aux_loss`), share = this batch's text
    tokens / `num_items_in_batch` when that is given (the Trainer's), else 1. `aux_loss`: the MoE layers'
    load-balancing losses, the mean or the sum over each router's layers as its original does (`over_layers`).
    Per MoE layer (tuples in `config.moe_layers` order): `expert_counts` (B, L) experts used per token,
    `expert_load` (E,) fraction of routed slots per expert over real tokens; per DARE layer (in layer order):
    `difficulty` (B, L) the difficulty signal (the predictor's, or the `difficulty_proxy`'s). `token_mask` (B, L) marks real tokens,
    `vision_mask` (B, L) image tokens. `router_loss`: the routers' own weighted terms over the MoE layers (`over_layers`)
    (Top-p's dynamic loss, ReMoE's L1 penalty, DynMoE's regularisers; None for the others), added to the loss
    beside beta * `aux_loss` (share * (... + `router_loss`)).
    """

    ce_loss: torch.FloatTensor | None = None
    difficulty_loss: torch.FloatTensor | None = None
    expert_counts: tuple[torch.LongTensor, ...] | None = None
    expert_load: tuple[torch.FloatTensor, ...] | None = None
    difficulty: tuple[torch.FloatTensor, ...] | None = None
    token_mask: torch.BoolTensor | None = None
    vision_mask: torch.BoolTensor | None = None
    image_hidden_states: torch.FloatTensor | None = None
    router_loss: torch.FloatTensor | None = None


def next_token_labels(labels: torch.Tensor, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The label each position predicts, (B, L): `shift_labels` as given, else `labels` shifted left with -100
    at the end (what transformers' causal-LM loss does)."""
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def next_text_targets(
    input_ids: torch.Tensor, token_mask: torch.Tensor | None, vision_mask: torch.Tensor | None
) -> torch.Tensor:
    """(B, L): the next token's id at every position where this token and the next are real text tokens (not
    padding, not image tokens), -100 elsewhere (and at the last position)."""
    text = torch.ones_like(input_ids, dtype=torch.bool) if token_mask is None else token_mask.bool()
    if vision_mask is not None:
        text = text & ~vision_mask
    next_ids = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    next_is_text = F.pad(text[:, 1:], (0, 1), value=False)
    return next_ids.masked_fill(~(text & next_is_text), -100)


@torch.no_grad()
def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token NLL at every position, detached: (B, L, V), (B, L) next-token labels -> (B, L), 0 at -100."""
    vocab_size = logits.shape[-1]
    nll = F.cross_entropy(
        logits.reshape(-1, vocab_size).float(), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    return nll.view(targets.shape)


class MoEModelMixin:
    """What both MoE models share: weight init of the MoE modules, the routing context of a forward, the
    routing losses and statistics, and DARE's threshold updates."""

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        """The MoE blocks in layer order (found once)."""
        if getattr(self, "_moe_blocks", None) is None:
            self._moe_blocks = [module for module in self.modules() if isinstance(module, MoEBlock)]
        return self._moe_blocks

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, plus a model card (README.md) unless one not written by us is there."""
        set_base_model_auto_map(self)
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        card = Path(save_directory) / "README.md"
        if not card.exists() or GENERATED_MARKER in card.read_text(encoding="utf-8"):
            card.write_text(render_model_card(self.config, self._auto_class), encoding="utf-8")

    @torch.no_grad()
    def initialize_weights(self):
        # The MoE modules live inside the backbone, whose own `_init_weights` does not know them: initialise
        # them here first and mark them, then let transformers do the rest. `transformers.initialization`'s
        # functions skip the tensors that were loaded.
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        for block in self.moe_blocks:
            init.normal_(block.experts.gate_up_proj, mean=0.0, std=std)
            init.normal_(block.experts.down_proj, mean=0.0, std=std)
            block.gate.init_weights(std)
            for module in (*block.experts.modules(), *block.gate.modules()):
                module._is_hf_initialized = True
        super().initialize_weights()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
        """transformers' activation checkpointing, non-reentrant only: the MoE blocks hand their routing
        (load-balancing loss, DARE's predictions) to the model outside the decoder layers' outputs, which a
        reentrant checkpoint would cut from the graph (the predictors would silently stop learning). The
        recomputation in the backward runs in the routing context of its forward (`checkpoint_routing_contexts`)."""
        activation_checkpointing_kwargs = dict(activation_checkpointing_kwargs or {})
        if activation_checkpointing_kwargs.get("use_reentrant", False):
            raise ValueError(
                "use_reentrant=True is not supported by hf-dare's MoE models (the routing losses would get no "
                "gradient); use use_reentrant=False, the default."
            )
        activation_checkpointing_kwargs["use_reentrant"] = False
        activation_checkpointing_kwargs.setdefault("context_fn", checkpoint_routing_contexts)
        getattr(super(), ACTIVATION_CHECKPOINTING_ENABLE)(activation_checkpointing_kwargs, *args, **kwargs)

    if ACTIVATION_CHECKPOINTING_ENABLE == "gradient_checkpointing_enable":  # what the Trainer calls there

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, *args, **kwargs):
            self.activation_checkpointing_enable(gradient_checkpointing_kwargs, *args, **kwargs)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # The device default when none is asked for (see `experts.default_experts_implementation`). Before 5.7 the
        # causal LM's decoder, built on the same config, checks the name again against transformers' own list:
        # `eager` there, the same sort-based loop as `hf_dare` (both skip the sentinel slots).
        if requested_experts is None:
            requested_experts = default_experts_implementation() if EXPERTS_INTERFACE_NAMES_KERNELS else "eager"
        if requested_experts in HF_DARE_KERNELS:
            # Registered in transformers' experts interface, which transformers < 5.7 does not consult here.
            return requested_experts
        return super().get_correct_experts_implementation(requested_experts)

    def update_routing_state(self) -> dict[int, dict]:
        """Every router's per-step state, moved once per optimizer step on every rank (`Router.update_state`: DARE's
        thresholds, ReMoE's L1 coefficient; `hf_dare.training.RoutingCallback` calls it). Returns what moved by
        layer index: `{"thresholds": [...]}` (DARE), `{"l1_coef": ..., "gate_offset": ..., "sparsity": ...}`
        (ReMoE)."""
        updated = {}
        by_router: dict[str, list[MoEBlock]] = {}
        for block in self.moe_blocks:
            by_router.setdefault(block.gate.name, []).append(block)
        for name, blocks in by_router.items():
            states = ROUTERS[name].update_states([block.gate for block in blocks])
            updated.update({block.layer_idx: state for block, state in zip(blocks, states, strict=True) if state})
        return dict(sorted(updated.items()))

    def update_difficulty_thresholds(self) -> dict[int, list[float]]:
        """`update_routing_state` (every router's per-step update, DARE's thresholds and the others'), returning
        DARE's new thresholds by layer index. Call one of the two once per optimizer step."""
        return {i: state["thresholds"] for i, state in self.update_routing_state().items() if "thresholds" in state}

    def routing_context(
        self,
        attention_mask: torch.Tensor | None,
        seq_len: int,
        vision_mask: torch.Tensor | None,
        with_losses: bool,
        position_ids: torch.Tensor | None = None,
    ) -> RoutingContext:
        """A forward's routing context: its real-token mask (B, L) from a 2-D `attention_mask`, its image
        tokens, each token's position in its sequence (`position_ids` if given, else counted over the real
        tokens of the mask, so left padding does not shift them), whether the routers' losses are wanted
        (training, or labels given) and whether the routers keep what they see for their state updates
        (training)."""
        token_mask = positions = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq_len:].bool()
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
        if position_ids is not None and position_ids.dim() == 2:
            positions = position_ids
        return RoutingContext(
            token_mask, vision_mask, with_aux_loss=with_losses, observe=self.training, positions=positions
        )

    def forward_in_routing_context(self, forward, inputs: dict, vision_mask: torch.Tensor | None):
        """`forward(**inputs)` for a base model: inside the outer model's routing context when it has opened one;
        called on its own (`AutoModel`, which vLLM's and SGLang's transformers backends build), in one of its own
        with this forward's token masks, no routing loss and nothing recorded for the thresholds."""
        if current_routing_context() is not None:
            return forward(**inputs)
        ids = inputs["input_ids"] if inputs["input_ids"] is not None else inputs["inputs_embeds"]
        position_ids = inputs.get("position_ids")
        context = self.routing_context(inputs["attention_mask"], ids.shape[1], vision_mask, False, position_ids)
        with routing_context(context):
            return forward(**inputs)

    def moe_output(
        self, outputs, context: RoutingContext, labels, logits_to_keep, loss_kwargs: dict, input_ids=None, **extra
    ) -> MoEOutputWithPast:
        """The LM head on the decoder's output, then this forward's losses and routing statistics (`input_ids`
        give the routers' NLL targets at unlabelled text positions)."""
        hidden_states = outputs.last_hidden_state
        if labels is None:  # the loss and DARE's target need every position's logits
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            hidden_states = hidden_states[:, keep]
        logits = self.lm_head(hidden_states)
        batch_size, seq_len = outputs.last_hidden_state.shape[:2]
        routings = context.routings
        aux_loss = self.over_layers([(gate, r.aux_loss) for gate, r in zip(context.routers, routings, strict=True)])
        router_loss = self.over_layers(
            [(gate, r.router_loss) for gate, r in zip(context.routers, routings, strict=True)]
        )
        difficulty = tuple(r.difficulty.view(batch_size, seq_len) for r in routings if r.difficulty is not None)
        # Losses against the model's own next-token NLL (DARE's predictors; not its proxies without one).
        nll_routings = [(gate, r) for gate, r in zip(context.routers, routings, strict=True) if gate.uses_token_nll]
        losses = {}
        if labels is not None:
            text_targets = None
            if nll_routings and input_ids is not None:
                text_targets = next_text_targets(input_ids, context.token_mask, context.vision_mask)
            losses = self.routing_loss(
                logits,
                labels,
                nll_routings,
                aux_loss,
                router_loss=router_loss,
                text_targets=text_targets,
                **loss_kwargs,
            )
        # Off in generation unless asked for (`prepare_inputs_for_generation`): nobody reads them there.
        statistics = loss_kwargs.get("output_routing_statistics", True)
        router_logits = None
        if loss_kwargs.get("output_router_logits", getattr(self.config, "output_router_logits", False)):
            router_logits = tuple(r.router_logits for r in routings)
        output = MoEOutputWithPast(
            loss=losses.get("loss"),
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits,
            ce_loss=losses.get("ce_loss"),
            difficulty_loss=losses.get("difficulty_loss"),
            expert_counts=tuple(r.expert_counts.view(batch_size, seq_len) for r in routings) if statistics else None,
            expert_load=tuple(
                expert_load(r.expert_indices, self.config.num_experts, context.token_mask) for r in routings
            )
            if statistics
            else None,
            difficulty=difficulty or None,
            token_mask=context.token_mask,
            router_loss=router_loss,
            **{CACHE_ARGUMENT: output_cache(outputs)},
            **extra,
        )
        context.hand_over()  # the forward completed: the routers take what they observed
        return output

    def over_layers(self, losses: list) -> torch.Tensor | None:
        """The model's term of the layers' losses, (router, loss or None) pairs: the losses of each router's layers
        reduced as that router's original does (`Router.layer_loss_reduction`: mean or sum over its layers, or as
        `config.router_aux_loss_reduction` says for all), added up over the routers; None without any loss."""
        by_router: dict[str, list[torch.Tensor]] = {}
        for gate, loss in losses:
            if loss is not None:
                by_router.setdefault(gate.name, []).append(loss)
        if not by_router:
            return None
        terms = []
        for name, values in by_router.items():
            reduction = self.config.router_aux_loss_reduction or ROUTERS[name].layer_loss_reduction
            stacked = torch.stack(values)
            terms.append(stacked.sum() if reduction == "sum" else stacked.mean())
        return torch.stack(terms).sum()

    def routing_loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        nll_routings: list,
        aux_loss: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.Tensor | None = None,
        router_loss: torch.Tensor | None = None,
        text_targets: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """`loss` = CE + share * (alpha * L_diff + beta * L_lb + L_router), with its parts. CE is transformers'
        causal-LM loss (`self.loss_function`: `num_items_in_batch`, `shift_labels`); L_diff the mean over the
        `nll_routings` ((router, routing) pairs) of their `token_nll_loss` against the model's own next-token NLL,
        detached, at the positions each router learns from (`token_nll_targets`: "labels", those with a label;
        "text", also every other text position, whose next token `text_targets` (B, L) gives), each weighted by
        its router's `token_nll_loss_coef` (DARE's alpha); L_router the routers' own terms."""
        config = self.config
        targets = next_token_labels(labels, shift_labels)
        text = targets != -100
        text_tokens = text.sum()
        # Without `num_items_in_batch`: the mean over this batch's text tokens, 0 (not NaN) when it has none.
        count = text_tokens.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        ce_loss = self.loss_function(
            logits, labels, config.get_text_config().vocab_size, num_items_in_batch=count, shift_labels=shift_labels
        )
        routing_loss, difficulty_loss = 0.0, None
        if nll_routings:
            # Masked means (no boolean indexing) keep the host out of it and give 0 when there is no position.
            nll_targets = targets if text_targets is None else torch.where(text, targets, text_targets)
            weights = {"labels": text.reshape(-1).float(), "text": (nll_targets != -100).reshape(-1).float()}
            nll = token_nll(logits, nll_targets).reshape(-1)
            per_layer = [
                (gate, gate.token_nll_loss(routing, nll, weights[gate.token_nll_targets]))
                for gate, routing in nll_routings
            ]
            difficulty_loss = torch.stack([loss for _, loss in per_layer]).mean()
            routing_loss = torch.stack([gate.token_nll_loss_coef * loss for gate, loss in per_layer]).mean()
        if aux_loss is not None:
            routing_loss = routing_loss + config.router_aux_loss_coef * aux_loss
        if router_loss is not None:  # already weighted by the routers' own coefficients
            routing_loss = routing_loss + router_loss
        # `num_items_in_batch` (the Trainer's) counts the text tokens of the whole optimizer step: every
        # micro-batch of a gradient-accumulation step, on every rank. The routing terms are means over this
        # micro-batch, so they are weighted by its share of those tokens: summed over the step (as the
        # Trainer's scaling does) they give the token-weighted mean, and L_diff exactly what one device on one
        # batch gives. Without `num_items_in_batch` the share is 1.
        share = 1.0
        if num_items_in_batch is not None:
            share = text_tokens / torch.as_tensor(num_items_in_batch, device=text_tokens.device).clamp(min=1)
        return {
            "loss": ce_loss + share * routing_loss,
            "ce_loss": ce_loss,
            "difficulty_loss": difficulty_loss,
        }


LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "output_router_logits")


def pop_loss_kwargs(kwargs: dict) -> dict:
    """The forward's keyword arguments that concern the loss and outputs, not the decoder."""
    return {name: kwargs.pop(name) for name in LOSS_KWARGS if name in kwargs}


def experts_parallel_plans(layers: str) -> tuple[dict[str, str], dict[str, str]]:
    """Tensor- and expert-parallel plans of the MoE experts under `layers` (e.g. `model.layers`), as
    Qwen3-MoE's: the backbone's own plan (`text_config.base_model_tp_plan`) covers attention and the dense FFNs;
    gates and DARE's predictors are replicated."""
    tp_plan = {
        f"{layers}.*.mlp.experts.gate_up_proj": "packed_colwise",
        f"{layers}.*.mlp.experts.down_proj": "rowwise",
        f"{layers}.*.mlp.experts": "moe_tp_experts",
    }
    ep_plan = {
        f"{layers}.*.mlp.experts.gate_up_proj": "grouped_gemm",
        f"{layers}.*.mlp.experts.down_proj": "grouped_gemm",
        f"{layers}.*.mlp.experts": "ep_dispatch_experts",
    }
    return tp_plan, ep_plan


class RoutingStatisticsOffInGeneration:
    """For the generative models: transformers' inputs for a generation step, with the per-layer routing
    statistics (`expert_counts`, `expert_load`) off unless `generate(..., output_routing_statistics=True)`."""

    def prepare_inputs_for_generation(self, *args, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        model_inputs.setdefault("output_routing_statistics", False)
        return model_inputs


class MoEPreTrainedModel(MoEModelMixin, PreTrainedModel):
    config: MoECausalLMConfig
    config_class = MoECausalLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The default CPU kernel (`hf_dare`) breaks the graph once per MoE layer (data-dependent shapes); only
    # `hf_dare_grouped_mm` / `grouped_mm` compile to one graph.
    _can_compile_fullgraph = False
    # `auto_map["AutoModel"]` of saved checkpoints (see `set_base_model_auto_map`).
    base_model_auto_class = "MoEModel"


class MoEModel(MoEPreTrainedModel):
    """The base model of `MoEForCausalLM`, without the LM head (what `AutoModel` builds): the decoder
    (`language_model`, `AutoModel`'s class for `config.decoder_model_type`, built on this config) with MoE FFNs.

    Called on its own (vLLM's and SGLang's transformers backends build it) it opens its own routing context:
    no routing loss, nothing recorded for the thresholds."""

    def __init__(self, config: MoECausalLMConfig):
        super().__init__(config)
        # The decoder shares this config (flat): what is set on it (the attention implementation, which vLLM
        # sets to its own) reaches every decoder module.
        self.language_model = MODEL_MAPPING[CONFIG_MAPPING[config.decoder_model_type]](config)
        install_moe_blocks(self.language_model, config)
        self.post_init()

    @property
    def base_model(self) -> nn.Module:
        """The decoder: the parallel plans of the shared config are its own (under `language_model` here)."""
        return self.language_model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ):
        """The decoder's forward: (B, L) ids or (B, L, H) embeddings -> its output (`last_hidden_state` (B, L, H))."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        return self.forward_in_routing_context(self.language_model, inputs, vision_mask=None)


# Both models hold their decoder at `model.language_model`.
_EXPERTS_TP_PLAN, _EXPERTS_EP_PLAN = experts_parallel_plans("model.language_model.layers")


class MoEForCausalLM(RoutingStatisticsOffInGeneration, MoEPreTrainedModel, GenerationMixin):
    """A transformers decoder with MoE FFNs (`MoEModel`) and an LM head."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output", **_EXPERTS_TP_PLAN}
    _ep_plan = _EXPERTS_EP_PLAN
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MoECausalLMConfig):
        super().__init__(config)
        self.model = MoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, self.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_routing_statistics: bool = True,
        **kwargs,
    ) -> MoEOutputWithPast:
        """Like any transformers causal LM; with `labels`, `loss` = CE + alpha * L_diff + beta * L_lb.
        `output_routing_statistics=False` leaves out `expert_counts` / `expert_load` (generation does). The KV
        cache goes in `kwargs` under the installed transformers' name (`cache` from 5.25, `past_key_values`
        before), as `generate` passes it, and comes back in the output field of that name."""
        loss_kwargs = pop_loss_kwargs(kwargs) | {"output_routing_statistics": output_routing_statistics}
        seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        context = self.routing_context(
            attention_mask, seq_len, None, self.training or labels is not None, position_ids
        )
        with routing_context(context):
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        return self.moe_output(outputs, context, labels, logits_to_keep, loss_kwargs, input_ids=input_ids)


class MoELlavaPreTrainedModel(MoEModelMixin, LlavaPreTrainedModel):
    config: MoELlavaConfig
    config_class = MoELlavaConfig
    _can_compile_fullgraph = False  # see MoEPreTrainedModel
    # `auto_map["AutoModel"]` of saved checkpoints (see `set_base_model_auto_map`).
    base_model_auto_class = "MoELlavaModel"


class MoELlavaModel(MoELlavaPreTrainedModel, LlavaModel):
    """transformers' `LlavaModel` (vision tower, projector, language model, image-feature merging) with
    MoE FFNs in the language model."""

    def __init__(self, config: MoELlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        install_moe_blocks(self.language_model, config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ):
        """`LlavaModel.forward`. Called on its own (`AutoModel`, which vLLM's and SGLang's transformers backends
        build) it opens its own routing context: image tokens from `input_ids` (with only `inputs_embeds` no
        token counts as an image token, which changes LTDR's routing, not Top-K's or DARE's), no routing loss."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        vision_mask = None if input_ids is None else input_ids == self.config.image_token_id
        return self.forward_in_routing_context(super().forward, inputs, vision_mask)


class MoELlavaForConditionalGeneration(
    RoutingStatisticsOffInGeneration, MoELlavaPreTrainedModel, LlavaForConditionalGeneration
):
    """MoE-LLaVA: transformers' `LlavaForConditionalGeneration` whose language model has MoE FFNs.

    Image tokens (`config.image_token_id`) are routed like text but flagged as vision tokens, which LTDR
    and the per-modality statistics use; DARE's difficulty target covers text positions only.
    """

    _tp_plan = {"lm_head": "colwise_gather_output", **_EXPERTS_TP_PLAN}
    _ep_plan = _EXPERTS_EP_PLAN

    def __init__(self, config: MoELlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = MoELlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_routing_statistics: bool = True,
        **kwargs,
    ) -> MoEOutputWithPast:
        """Like transformers' `LlavaForConditionalGeneration.forward`; with `labels`, `loss` = CE +
        alpha * L_diff + beta * L_lb, and image-token positions should carry the label -100.
        `output_routing_statistics=False` leaves out `expert_counts` / `expert_load` (generation does). The KV
        cache goes in `kwargs` under the installed transformers' name, as in `MoEForCausalLM.forward`."""
        loss_kwargs = pop_loss_kwargs(kwargs) | {"output_routing_statistics": output_routing_statistics}
        if input_ids is not None:
            vision_mask = input_ids == self.config.image_token_id
        else:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            )
            vision_mask = (inputs_embeds == image_embedding).all(-1)
        context = self.routing_context(
            attention_mask, vision_mask.shape[1], vision_mask, self.training or labels is not None, position_ids
        )
        with routing_context(context):
            outputs = self.model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                **kwargs,
            )
        return self.moe_output(
            outputs,
            context,
            labels,
            logits_to_keep,
            loss_kwargs,
            input_ids=input_ids,
            vision_mask=vision_mask,
            image_hidden_states=image_features(outputs),
        )


def model_class_for(config: MoEConfigBase) -> type[PreTrainedModel]:
    """The model class of an MoE config: the causal LM, or MoE-LLaVA (a config with a vision tower)."""
    return MoELlavaForConditionalGeneration if isinstance(config, MoELlavaConfig) else MoEForCausalLM


__all__ = [
    "MoEBlock",
    "MoEExperts",
    "MoEForCausalLM",
    "MoEModel",
    "MoELlavaForConditionalGeneration",
    "MoELlavaModel",
    "MoEOutputWithPast",
    "MoEPreTrainedModel",
    "model_class_for",
]
