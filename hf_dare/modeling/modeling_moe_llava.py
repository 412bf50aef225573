"""MoE models with Top-K / DARE / LTDR routing: a text-only causal LM and MoE-LLaVA.

The decoders and vision towers are transformers' own classes built with `AutoModel.from_config`; the FFN
of every layer in `config.moe_layers` is replaced by an `MoEBlock` (router + experts). The experts run
through transformers' experts interface (`eager`, `batched_mm`, `grouped_mm`), where a token that uses
fewer experts than the widest case fills the spare slots with the sentinel index `num_experts`.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.integrations import use_experts_implementation
from transformers.modeling_outputs import ModelOutput
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)

from .configuration_moe_llava import MoECausalLMConfig, MoEConfigBase, MoELlavaConfig
from .model_card import GENERATED_MARKER, render_model_card
from .routing import ROUTER_CLASSES, Routing, ThresholdTracker, TopKRouter

# At most this many tokens take the per-token decode path on CPU (see `MoEBlock.forward`).
DECODE_PATH_MAX_TOKENS = 4


@use_experts_implementation
class MoEExperts(nn.Module):
    """E gated-SiLU FFN experts stored as 3-D parameters (transformers' layout, gate and up concatenated):
    `gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)."""

    def __init__(self, config: MoEConfigBase):
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
        """The `eager` implementation. (T, H), (T, K) with sentinel `num_experts`, (T, K) -> (T, H).

        Slots are sorted by expert and gathered once, so each expert runs one matmul over a contiguous
        block of its tokens; sentinel slots sort last and are dropped. One host sync (the per-expert counts)
        per call. `split` and `unbind` (not slicing / indexing per expert) keep the backward to one gradient
        buffer for the gathered tokens and one per weight tensor, instead of a full-size one per expert.
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

    @torch.no_grad()
    def decode_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Inference on a handful of tokens (decoding): a plain loop over each token's chosen experts, so
        the cost is exactly the weights read, with no sort, gather or scatter. Same shapes as `forward`."""
        rows = []
        for token, experts, weights in zip(hidden_states, top_k_index.tolist(), top_k_weights.tolist(), strict=True):
            token = token[None]
            out = None
            for expert_idx, weight in zip(experts, weights, strict=True):
                if expert_idx < self.num_experts:
                    y = self.expert(token, self.gate_up_proj[expert_idx], self.down_proj[expert_idx])
                    if out is None:
                        out = y if weight == 1.0 else y.mul_(weight)
                    else:
                        out.add_(y, alpha=weight)
            rows.append(out if out is not None else torch.zeros_like(token))
        return torch.cat(rows).to(hidden_states.dtype)


class MoEBlock(nn.Module):
    """The MoE layer that replaces a decoder layer's FFN: router + experts, (B, L, H) -> (B, L, H).

    The decoder layer only passes hidden states, so the model sets the per-token masks of the current
    forward on the block (`token_mask`: real tokens, `vision_mask`: image tokens, both (B, L)) and whether a
    load-balancing loss is wanted (`with_aux_loss`), and reads back the `Routing` it made (`pop_routing`).
    """

    def __init__(self, config: MoEConfigBase, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.router = ROUTER_CLASSES[config.router](config)
        self.experts = MoEExperts(config)
        if config.router != "top_k":
            # transformers' batched_mm / grouped_mm mask sentinel slots only in this mode; a variable
            # number of experts per token produces the same sentinels, so they need the same masking.
            self.experts._is_expert_parallel = True
        self.token_mask: torch.Tensor | None = None
        self.vision_mask: torch.Tensor | None = None
        self.with_aux_loss = True
        self.routing: Routing | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden_dim)
        token_mask, vision_mask = self.token_mask, self.vision_mask
        routing = self.router(flat, token_mask, vision_mask)
        if self.with_aux_loss:
            routing.aux_loss = self.router.aux_loss(routing, token_mask, vision_mask)
        # `isinstance`: wrapped experts (PEFT's LoRA `ParamWrapper` on the 3-D weights) go through their own forward,
        # which applies the adapters; `decode_forward` reads the raw weights.
        if (
            isinstance(self.experts, MoEExperts)
            and flat.device.type == "cpu"
            and flat.shape[0] <= DECODE_PATH_MAX_TOKENS
            and not torch.is_grad_enabled()
        ):
            out = self.experts.decode_forward(flat, routing.expert_indices, routing.expert_weights)
        else:
            out = self.experts(flat, routing.expert_indices, routing.expert_weights)
        self.routing = routing
        return out.view(batch_size, seq_len, hidden_dim)

    def pop_routing(self) -> Routing:
        routing, self.routing = self.routing, None
        return routing


def install_moe_blocks(language_model: nn.Module, config: MoEConfigBase) -> None:
    """Replace the FFN (`mlp`) of each decoder layer in `config.moe_layers` by an `MoEBlock`."""
    layers = getattr(language_model, "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise ValueError(
            f"{type(language_model).__name__} ({config.text_config.model_type}) has no `layers[i].mlp` to replace; "
            "supported decoders are those with that layout (Qwen2, Qwen3, StableLM, Llama, Mistral...)."
        )
    for layer_idx in config.moe_layers:
        layers[layer_idx].mlp = MoEBlock(config, layer_idx)


@dataclass
class MoEOutputWithPast(ModelOutput):
    """Output of the MoE models. `loss` = `ce_loss` + share * (alpha * `difficulty_loss` + beta * `aux_loss`),
    share = this batch's text tokens / `num_items_in_batch` when that is given (the Trainer's), else 1.

    Per MoE layer (tuples in `config.moe_layers` order): `expert_counts` (B, L) experts used per token,
    `expert_load` (E,) fraction of routed slots per expert over real tokens, `difficulty` (B, L) DARE's
    predictions (DARE only). `token_mask` (B, L) marks real tokens, `vision_mask` (B, L) image tokens.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    ce_loss: torch.FloatTensor | None = None
    difficulty_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    expert_counts: tuple[torch.LongTensor, ...] | None = None
    expert_load: tuple[torch.FloatTensor, ...] | None = None
    difficulty: tuple[torch.FloatTensor, ...] | None = None
    token_mask: torch.BoolTensor | None = None
    vision_mask: torch.BoolTensor | None = None
    image_hidden_states: torch.FloatTensor | None = None


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token NLL at every position: (B, L, V), (B, L) -> (B, L-1), 0 where the label is -100."""
    vocab_size = logits.shape[-1]
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab_size).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    )
    return nll.view(labels.shape[0], -1)


class MoEModelMixin:
    """What both MoE models share: weight init of the MoE modules, passing token masks to the MoE blocks,
    the routing losses and statistics, and DARE's threshold updates."""

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        """The MoE blocks in layer order (found once: the model walks them on every forward)."""
        if getattr(self, "_moe_blocks", None) is None:
            self._moe_blocks = [module for module in self.modules() if isinstance(module, MoEBlock)]
        return self._moe_blocks

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, plus a model card (README.md) unless one not written by us is there."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        card = Path(save_directory) / "README.md"
        if not card.exists() or GENERATED_MARKER in card.read_text(encoding="utf-8"):
            auto_class = self._auto_class or (
                "AutoModelForImageTextToText" if hasattr(self.config, "vision_config") else "AutoModelForCausalLM"
            )
            card.write_text(render_model_card(self.config, auto_class), encoding="utf-8")

    @torch.no_grad()
    def initialize_weights(self):
        # The MoE modules live inside the backbone, whose own `_init_weights` does not know them: initialise
        # them here first (only what is not loaded) and mark them, then let transformers do the rest.
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        for module in self.modules():
            if getattr(module, "_is_hf_initialized", False):
                continue
            if isinstance(module, MoEExperts):
                init.normal_(module.gate_up_proj, mean=0.0, std=std)
                init.normal_(module.down_proj, mean=0.0, std=std)
            elif isinstance(module, TopKRouter):
                init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, ThresholdTracker):
                init.copy_(module.thresholds, torch.tensor(module.initial_thresholds))
            else:
                continue
            module._is_hf_initialized = True
        super().initialize_weights()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
        """transformers' activation checkpointing, non-reentrant only: the MoE blocks hand their routing
        (load-balancing loss, DARE's predictions) to the model outside the decoder layers' outputs, which a
        reentrant checkpoint would cut from the graph (the predictors would silently stop learning)."""
        activation_checkpointing_kwargs = dict(activation_checkpointing_kwargs or {})
        if activation_checkpointing_kwargs.get("use_reentrant", False):
            raise ValueError(
                "use_reentrant=True is not supported by hf-dare's MoE models (the routing losses would get no "
                "gradient); use use_reentrant=False, the default."
            )
        activation_checkpointing_kwargs["use_reentrant"] = False
        super().activation_checkpointing_enable(activation_checkpointing_kwargs, *args, **kwargs)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # transformers defaults to grouped_mm, which on CPU is about 2x slower than our sort-based eager loop
        # (benchmarks/moe_layer.py); keep grouped_mm wherever CUDA is present.
        if requested_experts is None and not torch.cuda.is_available():
            return "eager"
        return super().get_correct_experts_implementation(requested_experts)

    def update_difficulty_thresholds(self) -> dict[int, list[float]]:
        """Move every DARE layer's thresholds toward the quantiles of the difficulties predicted since the
        last call (once per optimizer step; `hf_dare.training.DareCallback` calls it). Returns the new
        thresholds by layer index."""
        updated = {}
        for block in self.moe_blocks:
            # Duck-typed, not isinstance: PEFT's `modules_to_save` wraps the router (ModulesToSaveWrapper), which
            # forwards attribute access to the trained copy.
            if hasattr(block.router, "threshold_tracker"):
                thresholds = block.router.threshold_tracker.update()
                if thresholds is not None:
                    updated[block.layer_idx] = thresholds.tolist()
        return updated

    def _prepare_moe_blocks(
        self, attention_mask: torch.Tensor | None, seq_len: int, vision_mask: torch.Tensor | None, with_losses: bool
    ) -> torch.Tensor | None:
        """Hand every MoE block this forward's token masks; returns the (B, L) real-token mask or None.
        The load-balancing loss is only computed when it can be used (training, or labels given)."""
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq_len:].bool()
        for block in self.moe_blocks:
            block.token_mask, block.vision_mask = token_mask, vision_mask
            block.with_aux_loss = with_losses
        return token_mask

    def _moe_output(
        self, outputs, labels, token_mask, num_items_in_batch, logits_to_keep, **extra
    ) -> MoEOutputWithPast:
        """The LM head on the decoder's output, then this forward's losses and routing statistics."""
        hidden_states = outputs.last_hidden_state
        if labels is None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        batch_size, seq_len = outputs.last_hidden_state.shape[:2]
        routing = self._routing_outputs(logits, labels, token_mask, num_items_in_batch, batch_size, seq_len)
        return MoEOutputWithPast(
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **routing,
            **extra,
        )

    def _routing_outputs(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None,
        batch_size: int,
        seq_len: int,
    ) -> dict:
        """Losses and routing statistics of the forward that just ran."""
        config = self.config
        routings = [block.pop_routing() for block in self.moe_blocks]
        aux_losses = [r.aux_loss for r in routings if r.aux_loss is not None]
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else None
        dare = [r.difficulty.view(batch_size, seq_len) for r in routings if r.difficulty is not None]
        if self.training and dare:
            for block, difficulty in zip(
                [b for b in self.moe_blocks if hasattr(b.router, "threshold_tracker")], dare, strict=True
            ):
                block.router.threshold_tracker.observe(difficulty, token_mask)

        ce_loss = difficulty_loss = loss = None
        if labels is not None:
            nll = token_nll(logits, labels)
            text = labels[:, 1:] != -100
            text_tokens = text.sum()
            count = torch.as_tensor(num_items_in_batch if num_items_in_batch is not None else text_tokens)
            count = count.to(nll.device).clamp(min=1)
            ce_loss = nll.sum() / count
            routing_loss = 0.0
            if dare:
                # DARE's target: the model's own next-token NLL, detached, on text positions only. Masked sums
                # (no boolean indexing) keep the host out of it and give 0 when there is no text label.
                target, weight = nll.detach(), text.float()
                squared_errors = torch.stack([((d[:, :-1].float() - target) ** 2 * weight).sum() for d in dare])
                difficulty_loss = squared_errors.mean() / text_tokens.clamp(min=1)
                routing_loss = routing_loss + config.difficulty_loss_coef * difficulty_loss
            if aux_loss is not None:
                routing_loss = routing_loss + config.router_aux_loss_coef * aux_loss
            # `num_items_in_batch` (the Trainer's) counts the text tokens of the whole optimizer step: every
            # micro-batch of a gradient-accumulation step, on every rank. The routing terms are means over this
            # micro-batch, so they are weighted by its share of those tokens: summed over the step (as the
            # Trainer's scaling does) they give the token-weighted mean, and L_diff exactly what one device on
            # one batch gives. Without `num_items_in_batch` the share is 1.
            share = text_tokens / count if num_items_in_batch is not None else 1.0
            loss = ce_loss + share * routing_loss

        expert_load = []
        for r in routings:
            real = (
                r.expert_indices.new_ones(r.expert_indices.shape[0]) if token_mask is None else token_mask.reshape(-1)
            )
            slot_weights = real.float()[:, None].expand(r.expert_indices.shape).reshape(-1)
            counts = torch.zeros(config.num_experts + 1, device=slot_weights.device)
            counts = counts.scatter_add_(0, r.expert_indices.reshape(-1), slot_weights)[: config.num_experts]
            expert_load.append(counts / counts.sum().clamp(min=1))
        return {
            "loss": loss,
            "ce_loss": ce_loss,
            "difficulty_loss": difficulty_loss,
            "aux_loss": aux_loss,
            "expert_counts": tuple(r.expert_counts.view(batch_size, seq_len) for r in routings),
            "expert_load": tuple(expert_load),
            "difficulty": tuple(dare) if dare else None,
            "token_mask": token_mask,
        }


class MoEPreTrainedModel(MoEModelMixin, PreTrainedModel):
    config: MoECausalLMConfig
    config_class = MoECausalLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class MoEForCausalLM(MoEPreTrainedModel, GenerationMixin):
    """A transformers decoder (`AutoModel.from_config(config.text_config)`) with MoE FFNs and an LM head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoECausalLMConfig):
        super().__init__(config)
        self.model = AutoModel.from_config(config.text_config)
        install_moe_blocks(self.model, config)
        self.vocab_size = config.text_config.vocab_size
        self.lm_head = nn.Linear(config.text_config.hidden_size, self.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoEOutputWithPast:
        """Like any transformers causal LM; with `labels`, `loss` = CE + alpha * L_diff + beta * L_lb."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        token_mask = self._prepare_moe_blocks(attention_mask, seq_len, None, self.training or labels is not None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return self._moe_output(outputs, labels, token_mask, num_items_in_batch, logits_to_keep)


class MoELlavaPreTrainedModel(MoEModelMixin, LlavaPreTrainedModel):
    config: MoELlavaConfig
    config_class = MoELlavaConfig


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


class MoELlavaForConditionalGeneration(MoELlavaPreTrainedModel, LlavaForConditionalGeneration):
    """MoE-LLaVA: transformers' `LlavaForConditionalGeneration` whose language model has MoE FFNs.

    Image tokens (`config.image_token_id`) are routed like text but flagged as vision tokens, which LTDR
    and the per-modality statistics use; DARE's difficulty target covers text positions only.
    """

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
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoEOutputWithPast:
        """Like transformers' `LlavaForConditionalGeneration.forward`; with `labels`, `loss` = CE +
        alpha * L_diff + beta * L_lb, and image-token positions should carry the label -100."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if input_ids is not None:
            vision_mask = input_ids == self.config.image_token_id
        else:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            )
            vision_mask = (inputs_embeds == image_embedding).all(-1)
        with_losses = self.training or labels is not None
        token_mask = self._prepare_moe_blocks(attention_mask, vision_mask.shape[1], vision_mask, with_losses)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return self._moe_output(
            outputs,
            labels,
            token_mask,
            num_items_in_batch,
            logits_to_keep,
            vision_mask=vision_mask,
            image_hidden_states=outputs.image_hidden_states,
        )


__all__ = [
    "MoEBlock",
    "MoEExperts",
    "MoEForCausalLM",
    "MoELlavaForConditionalGeneration",
    "MoELlavaModel",
    "MoEOutputWithPast",
    "MoEPreTrainedModel",
]
