"""Greedy decoding tokens/s of a small MoE causal LM (random weights): Top-2 vs DARE (same weights otherwise),
measured as the median of per-pair ratios over interleaved repetitions, against the ideal for the Avg K that
DARE actually realised while decoding.

    python benchmarks/generate.py                        # Qwen2 backbone, hidden 1024, 8 layers, 4 experts every other
                                                         # layer (FFN 5.5x hidden, 2 KV heads: Qwen2-1.5B's proportions,
                                                         # the DARE paper's backbone, scaled to 375M parameters); batch 1
    python benchmarks/generate.py --batch-sizes 1 4 16 64  # + tokens/s by batch size, against weights-read and FLOPs ideals
    python benchmarks/generate.py --breakdown            # + where one decode step's time goes, Top-2 and DARE
    python benchmarks/generate.py --bookkeeping          # + hf-dare's Top-2 vs a plain Top-2 loop of the same experts
    python benchmarks/generate.py --routing pinned       # DARE's predictor output replaced by a fixed schedule
    python benchmarks/generate.py --quick                # tiny model, runs in well under a minute (smoke run)

Timing. Each repetition runs both models' `generate` once, alternating the order (Top-2 first, then DARE first,
...), so a slow phase of a shared machine hits both alike; the reported ratio is the median over the repetitions
of DARE tokens/s / Top-2 tokens/s within the same repetition, with its min-max and interquartile range. The
repetitions take `--prompts` different prompts (random tokens) in turn. "Decode tokens/s" excludes the prompt:
batch x (N - 1) new tokens over the time from the start of the first decoding forward (the one after the
prompt's) to `generate`'s return, so it includes generate's own per-step work. The prompt's forward is timed
apart (prefill: from the `generate` call to the first decoding forward), against its own ideal, and so is the
whole call (prefill + decode, what a user times), against the ideal of the two together. The
same ratio on this process's CPU time is printed too: on a shared machine it is far steadier, being blind to
the time other jobs hold the cores. Busy machines also inflate every op that opens an OpenMP parallel region
(sdpa, sin / cos in the rotary embedding...): with 2 threads, each such op waits for its second thread to be
scheduled, so compare breakdowns taken on a quiet machine, or with `--threads 1`.

Avg K and the ideals. Hooks on each MoE block's experts (`block.experts`) record the experts every decoded token uses, so the Avg K and the experts read
per layer are the ones realised in the timed runs. Weights-read ideal: the bytes a decoding step must read, per
decoded token: every non-expert weight (attention, norms, dense FFNs, routers, DARE's predictors, LM head; not
the input embedding, of which one row is read) + Avg K x one expert's weights per MoE layer + the KV cache; ideal
speedup = Top-2 bytes / DARE bytes. With a batch, each expert that any token of the step uses in a layer is read
once (the union per layer and step). FLOPs ideal: 2 x (non-expert weights + Avg K x expert weights per MoE layer)
+ attention over the cache, per token. Share of the ideal saving realised: (1 - 1/speedup) / (1 - 1/ideal).

Prefill ideals: the weights read (non-expert weights + every expert any prompt token uses, per layer) and the
FLOPs (every prompt token through Avg K experts, the LM head on the last position); at 16-32 prompt tokens both
routers read nearly every expert, so the prefill's ideal is the larger of the two, in practice the FLOPs one.

DARE's routing (`--routing`). `real` (the default): DARE's predictor decides, through thresholds set by
`hf_dare.calibrate` (shares 2 - avg_k / avg_k - 1 / 0 / ... of tokens on 1 / 2 / 3... experts) on the model's
own greedy-decoded tokens after the timed prompts (`calibrate_on_decoded`: a random-weights model's decoded
tokens change with its routing, so it decodes and calibrates in rounds until the Avg K of what it decodes is
within 0.03 of `--avg-k`; it prints each round, and the Avg K on prompts it did not calibrate on). The Avg K
realised (decode and prompt) is printed and the ideals are taken at it. `pinned`: each DARE layer's predictor
still runs (its cost counts), but its output is replaced by a fixed schedule: an evenly spread fraction
`avg_k - 1` of the tokens is "hard" (2 experts), the rest "easy" (1 expert), which pins Avg K at `--avg-k` on
every sequence.

Breakdown (`--breakdown`): forward pre/post hooks timed with `time.perf_counter` on the attention and FFN of
every decoder layer, the MoE experts, the router (the child of each MoE block that is not `experts`) and DARE's
predictor, the decoder and its embedding / rotary / final norm, the LM head and the whole model; the rest is
derived by difference (norms and residuals, the MoE block's own glue, the decoder's masks and Python, the routing
statistics and losses the model's forward builds after the LM head, and generate's own per-step work = step
time - model forward); the same parts for the prompt's forward. Then the gap to the weights-read ideal, split
into those parts, and micro-timings (taken between the runs) of the bare expert matmuls and of the router +
predictor fused into one matmul.
"""

import argparse
import copy
import math
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from _common import DTYPES, keep_freed_memory, setup_threads, spread
from transformers import Qwen2Config

from hf_dare import MoECausalLMConfig, MoEForCausalLM, calibrate
from hf_dare.modeling._compat import CACHE_ARGUMENT
from hf_dare.modeling.routing import top_n_routing


def build_models(args, dtype) -> tuple[MoEForCausalLM, MoEForCausalLM]:
    text_config = Qwen2Config(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
    )
    common = dict(text_config=text_config, num_experts=args.experts)
    torch.manual_seed(0)
    top2 = MoEForCausalLM(MoECausalLMConfig(router="top_k", num_experts_per_tok=2, **common))
    dare = MoEForCausalLM(MoECausalLMConfig(router="dare", **common))
    missing = dare.load_state_dict(top2.state_dict(), strict=False).missing_keys
    assert all("difficulty_predictor" in key or "threshold_tracker" in key for key in missing), missing
    models = []
    for model in (top2, dare):
        model = model.to(dtype).eval()
        if args.impl:
            model.set_experts_implementation(args.impl)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        models.append(model)
    return models[0], models[1]


# ---------------------------------------------------------------------------------------------------------------
# The model's parts, found by structure (so a rename of the router module does not break the benchmark)


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE blocks in layer order (the model's `moe_blocks`, else the modules with an `experts` child)."""
    blocks = getattr(model, "moe_blocks", None)
    if blocks is None:
        blocks = [m for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)]
    return list(blocks)


def router_of(block: torch.nn.Module) -> torch.nn.Module:
    """The router of an MoE block: its child that is not `experts` (named `router` or `gate`)."""
    children = [module for name, module in block.named_children() if name != "experts"]
    if len(children) != 1:
        children = [m for m in children if hasattr(m, "weight") or hasattr(m, "difficulty_predictor")]
    if len(children) != 1:
        raise RuntimeError(f"cannot tell the router among the children of {type(block).__name__}: {children}")
    return children[0]


def decoder_layers(model: MoEForCausalLM) -> list[torch.nn.Module]:
    return list(model.get_decoder().layers)


class ScheduledDifficulty(torch.nn.Module):
    """Runs DARE's real predictor, then replaces its output (T,) by a schedule: of the tokens seen so far, an
    evenly spread fraction `hard_fraction` gets difficulty 1, the others 0 (sliced from a precomputed table, so
    the schedule itself costs next to nothing)."""

    def __init__(self, predictor: torch.nn.Module, hard_fraction: float, length: int = 1 << 16):
        super().__init__()
        self.predictor = predictor
        self.hard_fraction = hard_fraction
        self.seen = 0
        self.schedule = self._hard(0, length)

    def _hard(self, start: int, stop: int) -> torch.Tensor:
        f = self.hard_fraction
        return torch.tensor([float(math.floor((i + 1) * f) > math.floor(i * f)) for i in range(start, stop)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        predicted = self.predictor(hidden_states)
        start, self.seen = self.seen, self.seen + predicted.shape[0]
        if self.seen > self.schedule.numel():
            self.schedule = torch.cat([self.schedule, self._hard(self.schedule.numel(), 2 * self.seen)])
        return self.schedule[start : self.seen].to(predicted.dtype)


def schedule_dare(model: MoEForCausalLM, avg_k: float) -> None:
    """Pin DARE's Avg K at `avg_k` (in [1, 2]): tokens use 2 experts on a fixed schedule, 1 otherwise."""
    if not 1.0 <= avg_k <= 2.0:
        raise ValueError(f"avg_k must be in [1, 2] (tokens use 1 or 2 experts), got {avg_k}")
    for block in moe_blocks(model):
        router = router_of(block)
        router.difficulty_predictor = ScheduledDifficulty(router.difficulty_predictor, avg_k - 1.0)
        taus = router.threshold_tracker.thresholds
        taus.copy_(torch.tensor([0.5] + [2.0 + j for j in range(taus.numel() - 1)], dtype=taus.dtype))


class PromptCache:
    """While attached, every forward of `model` gets a fresh copy of `cache` (the prompt's KV cache): `calibrate`
    then routes the tokens of its batch after the prompt, as the decoding steps did, each time it runs them."""

    def __init__(self, model: MoEForCausalLM, cache):
        self.cache = cache
        self.handle = model.register_forward_pre_hook(self._hand_over, with_kwargs=True)

    def _hand_over(self, module, args, kwargs):
        return args, {**kwargs, CACHE_ARGUMENT: copy.deepcopy(self.cache)}

    def remove(self) -> None:
        self.handle.remove()


def decoded_tokens_batch(model: MoEForCausalLM, input_ids: torch.Tensor, new_tokens: int) -> tuple[dict, torch.Tensor]:
    """Greedy-decode `new_tokens` after `input_ids` (B, P); returns the batch of the tokens the decoding steps
    routed (the first N - 1 generated ones, fed back one per step) with the prompt's KV cache under the model's
    routing now, and the N generated tokens (B, N)."""
    with torch.no_grad():
        generated = generate(model, input_ids, new_tokens)[:, input_ids.shape[1] :]
        cache = output_cache_of(model(input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True))
    fed = generated[:, :-1]
    attention_mask = torch.ones(fed.shape[0], input_ids.shape[1] + fed.shape[1], dtype=torch.long)
    return {"input_ids": fed, "attention_mask": attention_mask, CACHE_ARGUMENT: cache}, generated


def output_cache_of(outputs):
    return getattr(outputs, CACHE_ARGUMENT)


def shares_of(model: MoEForCausalLM, batch: dict) -> torch.Tensor:
    """Shares of the batch's (token, MoE layer) pairs using 1, 2, ... experts under the model's routing now."""
    with torch.no_grad():
        out = model(**{**batch, CACHE_ARGUMENT: copy.deepcopy(batch[CACHE_ARGUMENT])})
    counts = torch.cat([c.reshape(-1) for c in out.expert_counts])
    return torch.bincount(counts, minlength=model.config.max_experts + 1)[1:].double() / counts.numel()


def avg_k_of(shares: torch.Tensor) -> float:
    return float((shares * torch.arange(1, shares.numel() + 1)).sum())


def calibrate_on_decoded(args, dare: MoEForCausalLM, prompts: torch.Tensor, tolerance: float = 0.03) -> dict:
    """DARE's real path: thresholds set by `hf_dare.calibrate` on the model's own greedy-decoded tokens, at the
    shares (2 - avg_k, avg_k - 1, 0, ...) of tokens using 1, 2, ... experts.

    The calibration data are the tokens decoded after `prompts` (N, P) (the prompts the timed runs take in
    turn), each routed after its prompt's KV cache as the decoding steps route it; the prompts themselves are
    not calibration data. The greedy tokens of a random-weights model change with its routing, so thresholds
    fitted to one decode meet other tokens in the next: each round decodes with the thresholds so far and
    measures the Avg K of what it decoded; within `tolerance` of the target it stops (the timed runs decode
    those tokens), else it calibrates on the tokens of every decode so far (so the thresholds settle instead of
    chasing the last decode), for at most `--calibration-rounds` decodes. Then the same is
    measured on the tokens decoded after `--held-out-prompts` other prompts (how far the thresholds carry)."""
    m = dare.config.max_experts
    if not 1.0 <= args.avg_k <= 2.0 or m < 2:
        raise ValueError(f"--avg-k must be in [1, 2] and DARE's max_experts >= 2, got {args.avg_k} and {m}")
    shares = [2.0 - args.avg_k, args.avg_k - 1.0] + [0.0] * (m - 2)
    print(
        f"\n## DARE's thresholds: calibrated on its own greedy-decoded tokens (hf_dare.calibrate, target shares "
        f"{' / '.join(f'{p:g}' for p in shares)} of tokens on 1..{m} experts; {prompts.shape[0]} prompts of "
        f"{prompts.shape[1]} tokens, {args.new_tokens - 1} decoded tokens each routed after its prompt)"
    )
    header = f"shares of {' / '.join(str(k) for k in range(1, m + 1))} experts"
    width = max(len(header), 8 * m - 3)
    print(
        f"| round | decoded tokens changed | Avg K of them | {header:<{width}} | calibrated on all decodes so far: Avg K | tau_1 by MoE layer |"
    )
    print(
        f"|------:|-----------------------:|--------------:|{'-' * (width + 2)}|----------------------------------------:|--------------------|"
    )
    previous, rounds, pool = None, [], []
    for rnd in range(1, args.calibration_rounds + 1):
        batch, generated = decoded_tokens_batch(dare, prompts, args.new_tokens)
        changed = generated.numel() if previous is None else int((generated != previous).sum())
        found = shares_of(dare, batch)
        row = f"| {rnd:>5} | {changed:>22} | {avg_k_of(found):>13.3f} | {' / '.join(f'{p:.3f}' for p in found.tolist()):<{width}} |"
        rounds.append({"changed": changed, "avg_k": avg_k_of(found)})
        if abs(avg_k_of(found) - args.avg_k) <= tolerance or rnd == args.calibration_rounds:
            print(f"{row} {'(the tokens timed)':>39} | |")
            break
        cache = PromptCache(dare, batch.pop(CACHE_ARGUMENT))  # the prompts' cache under the routing now
        pool.append(batch)
        try:
            record = calibrate(dare, pool, target_distribution=shares, data_description="decoded tokens")
        finally:
            cache.remove()
        taus = " ".join(f"{taus[0]:.4f}" for taus in record["thresholds"].values())
        print(f"{row} {record['achieved_avg_k']:>39.3f} | {taus} |")
        previous = generated
    converged = abs(rounds[-1]["avg_k"] - args.avg_k) <= tolerance
    print(
        f"{'' if converged else 'not '}within {tolerance} of the target after {len(rounds)} decodes"
        + (
            ""
            if converged
            else f" (--calibration-rounds {args.calibration_rounds}): the timed runs decode at Avg K {rounds[-1]['avg_k']:.3f}"
        )
    )
    held_out = []
    for seed in range(1000, 1000 + args.held_out_prompts):
        other = torch.randint(1, args.vocab, prompts[:1].shape, generator=torch.Generator().manual_seed(seed))
        held_out.append(shares_of(dare, decoded_tokens_batch(dare, other, args.new_tokens)[0]))
    if held_out:
        print(
            f"tokens decoded after {len(held_out)} other prompts (not calibrated on), one each: Avg K "
            + ", ".join(f"{avg_k_of(h):.3f} (shares {' / '.join(f'{p:.3f}' for p in h.tolist())})" for h in held_out)
        )
    return {"rounds": rounds, "held_out": [avg_k_of(h) for h in held_out]}


# ---------------------------------------------------------------------------------------------------------------
# Hooks: decoding steps, experts used, and (for the breakdown) time per module


class DecodeProbe:
    """Hooks on one model, for the `generate` calls run while it is attached:

    - the whole model's forward: counts forwards, tells decoding steps (one new token per sequence) from the
      prompt's forward, notes when the first decoding step starts and sums the decoding forwards' time;
    - each MoE block's experts (forward hooks): the experts (T, K) each token of every decoding step uses,
      sentinel E in the slots it does not use;
    - with `timing`, the modules of the breakdown: inclusive seconds per category on decoding steps.
    """

    def __init__(self, model: MoEForCausalLM, timing: bool = False):
        self.model = model
        self.blocks = moe_blocks(model)
        self.num_experts = self.blocks[0].experts.num_experts if self.blocks else None
        self.handles = []
        self.decoding = False
        self.reset()
        self.handles.append(model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._model_post))
        for position, block in enumerate(self.blocks):
            self._watch_experts(block.experts, position, timing)
        if timing:
            self._add_timers()

    def reset(self) -> None:
        self.forwards = 0
        self.decode_start = None
        self.decode_start_cpu = 0.0
        self.decode_seconds = self.decode_cpu_seconds = float("nan")
        self.prefill_seconds = self.prefill_cpu_seconds = float("nan")
        self.decode_steps = 0
        self.seconds = defaultdict(float)
        self.prefill_seconds_by = defaultdict(float)  # the same categories on the prompt's forward
        self.indices = []  # (forward number, MoE block position, (T, K) expert indices)
        self.prefill_indices = []  # (MoE block position, (T, K) expert indices) of the prompt's forward
        self._forward_start = 0.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _model_pre(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            input_ids = kwargs["inputs_embeds"]
        self.forwards += 1
        self.decoding = self.forwards > 1 and input_ids.shape[1] == 1
        if self.decoding:
            self.decode_steps += 1
        self._forward_start = time.perf_counter()
        if self.decoding and self.decode_start is None:
            self.decode_start, self.decode_start_cpu = self._forward_start, time.process_time()

    def _model_post(self, module, args, output):
        self._add("forward", time.perf_counter() - self._forward_start)

    def _add(self, category: str, elapsed: float) -> None:
        if self.decoding:
            self.seconds[category] += elapsed
        elif self.forwards == 1:
            self.prefill_seconds_by[category] += elapsed

    def _watch_experts(self, experts: torch.nn.Module, position: int, timing: bool) -> None:
        started = [0.0]

        def pre(module, args, kwargs):
            values = {**dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args, strict=False)), **kwargs}
            started[0] = time.perf_counter()
            if self.decoding or self.forwards == 1:
                # A slot is used when it names an expert with a nonzero weight: kernels that cannot skip the
                # sentinel get it as a weight-0 slot of an expert the token uses.
                index, weights = values["top_k_index"], values["top_k_weights"]
                used = torch.where((index < self.num_experts) & (weights != 0), index, self.num_experts)
                if self.decoding:
                    self.indices.append((self.forwards, position, used))
                else:  # the prompt's forward
                    self.prefill_indices.append((position, used))

        def post(module, args, kwargs, output):
            if timing:
                self._add("experts", time.perf_counter() - started[0])

        self.handles.append(experts.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(experts.register_forward_hook(post, with_kwargs=True))

    def _time(self, module: torch.nn.Module, category: str) -> None:
        starts = []

        def pre(*_):
            starts.append(time.perf_counter())

        def post(*_):
            self._add(category, time.perf_counter() - starts.pop())

        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(post))

    def _add_timers(self) -> None:
        model = self.model
        decoder = model.get_decoder()
        self._time(decoder, "decoder")
        self._time(model.lm_head, "lm_head")
        for name in ("embed_tokens", "rotary_emb", "norm"):  # the decoder's own modules, where it has them
            if isinstance(getattr(decoder, name, None), torch.nn.Module):
                self._time(getattr(decoder, name), name)
        blocks = {id(block) for block in self.blocks}
        for layer in decoder_layers(model):
            self._time(layer, "layers")
            self._time(layer.self_attn, "attention")
            self._time(layer.mlp, "moe_block" if id(layer.mlp) in blocks else "dense_ffn")
        for block in self.blocks:
            router = router_of(block)
            self._time(router, "router")
            predictor = getattr(router, "difficulty_predictor", None)
            if predictor is not None:
                self._time(predictor, "predictor_wrapper")
                self._time(getattr(predictor, "predictor", predictor), "predictor")

    # what was recorded -----------------------------------------------------------------------------------------

    def decode_records(self) -> list[tuple[int, int, torch.Tensor]]:
        if self.decode_steps and not self.indices:
            raise RuntimeError(
                "no expert routing recorded on decoding steps: the MoE blocks call their experts some other way "
                "than `experts(...)`; update DecodeProbe"
            )
        return self.indices

    def expert_counts(self) -> torch.Tensor:
        """Experts used by every (decoded token, MoE layer) recorded."""
        return torch.cat([(idx < self.num_experts).sum(-1).reshape(-1) for _, _, idx in self.decode_records()])

    def avg_k(self) -> float:
        return self.expert_counts().float().mean().item()

    def avg_k_per_layer(self) -> list[float]:
        counts = defaultdict(list)
        for _, position, idx in self.decode_records():
            counts[position].append((idx < self.num_experts).sum(-1).reshape(-1))
        return [torch.cat(counts[p]).float().mean().item() for p in sorted(counts)]

    def prefill_avg_k(self) -> float:
        """Avg K of the prompt's tokens (all MoE layers)."""
        counts = [(idx < self.num_experts).sum(-1).reshape(-1) for _, idx in self.prefill_indices]
        return torch.cat(counts).float().mean().item()

    def prefill_experts_read(self) -> float:
        """Experts the prompt's forward reads, summed over MoE layers (each expert any prompt token uses, once)."""
        return float(sum(int(torch.unique(idx[idx < self.num_experts]).numel()) for _, idx in self.prefill_indices))

    def experts_read_per_step(self) -> float:
        """Mean over decoding steps of the experts read per step, summed over MoE layers: in each layer every
        expert that any token of the step uses, once."""
        per_step = defaultdict(int)
        for step, _, idx in self.decode_records():
            per_step[step] += int(torch.unique(idx[idx < self.num_experts]).numel())
        return statistics.fmean(per_step.values())


# ---------------------------------------------------------------------------------------------------------------
# Ideals


def weights_model(model: MoEForCausalLM) -> dict:
    """Sizes (bytes and parameters) behind the ideals: non-expert weights read per step (all but the experts and
    the input embedding; the LM head included, once if tied), one expert of one layer, KV cache per context token."""
    blocks = moe_blocks(model)
    expert_params = {id(p) for block in blocks for p in block.experts.parameters()}
    embed = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings().weight
    non_expert_bytes = non_expert_params = 0
    for param in model.parameters():
        if id(param) in expert_params or (param is embed and param is not lm_head):
            continue
        non_expert_bytes += param.numel() * param.element_size()
        non_expert_params += param.numel()
    experts = blocks[0].experts
    per_expert = [p.numel() // experts.num_experts for p in experts.parameters()]
    element_size = next(experts.parameters()).element_size()
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {
        "non_expert_bytes": non_expert_bytes,
        "non_expert_params": non_expert_params,
        "lm_head_params": lm_head.numel(),
        "expert_bytes": sum(per_expert) * element_size,
        "expert_params": sum(per_expert),
        "moe_layers": len(blocks),
        "kv_bytes_per_context": 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * element_size,
        "attention_flops_per_context": 4 * text.num_hidden_layers * text.num_attention_heads * head_dim,
    }


def bytes_per_step(sizes: dict, experts_read: float, batch: int, context: float) -> float:
    """Bytes one decoding step reads: non-expert weights, the experts read (summed over layers), the KV cache."""
    return (
        sizes["non_expert_bytes"]
        + experts_read * sizes["expert_bytes"]
        + batch * context * sizes["kv_bytes_per_context"]
    )


def flops_per_token(sizes: dict, avg_k: float, context: float) -> float:
    params = sizes["non_expert_params"] + avg_k * sizes["moe_layers"] * sizes["expert_params"]
    return 2 * params + sizes["attention_flops_per_context"] * context


def prefill_flops(sizes: dict, avg_k: float, batch: int, prompt_len: int) -> float:
    """FLOPs of the prompt's forward: every prompt token through the decoder (Avg K experts per MoE layer),
    attention over its causal context, and the LM head on the last position only (generate keeps one logit row)."""
    decoder = (
        sizes["non_expert_params"] - sizes["lm_head_params"] + avg_k * sizes["moe_layers"] * sizes["expert_params"]
    )
    attention = sizes["attention_flops_per_context"] * (prompt_len + 1) / 2
    return batch * (prompt_len * (2 * decoder + attention) + 2 * sizes["lm_head_params"])


def share_of_ideal(speedup: float, ideal: float) -> float:
    """(1 - 1/speedup) / (1 - 1/ideal): the fraction of the ideal saving in time per token realised."""
    return (1 - 1 / speedup) / (1 - 1 / ideal) if ideal > 1 else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Timing


def generate(model: MoEForCausalLM, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        use_cache=True,
    )


def timed_generate(model, probe: DecodeProbe, input_ids: torch.Tensor, new_tokens: int) -> float:
    """Decode tokens/s of one `generate` (the prompt's forward excluded; see the module docstring). The probe
    keeps the decode time and the prefill time (from the call to the first decoding forward) apart."""
    probe.reset()
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = generate(model, input_ids, new_tokens)
    probe.decode_seconds = time.perf_counter() - probe.decode_start
    probe.decode_cpu_seconds = time.process_time() - probe.decode_start_cpu
    probe.prefill_seconds = probe.decode_start - start
    probe.prefill_cpu_seconds = probe.decode_start_cpu - start_cpu
    assert out.shape[1] == input_ids.shape[1] + new_tokens, out.shape
    assert probe.decode_steps == new_tokens - 1, (probe.decode_steps, new_tokens)
    return input_ids.shape[0] * (new_tokens - 1) / probe.decode_seconds


def interleaved(models: dict, probes: dict, inputs, new_tokens: int, repeats: int, on_run=None) -> dict:
    """Tokens/s of each model per repetition, the two run back to back in alternating order, repetition r on
    the prompts `inputs[r % len(inputs)]` (`inputs`: one (B, P) tensor or a list of them); `on_run(name,
    probe)` after each timed run (to collect what the hooks recorded). Also, under `cpu/<name>`, tokens per
    second of this process's CPU time: blind to the time other jobs take the cores from it (not to their
    sharing of memory bandwidth), but it counts the time the intra-op threads spin while waiting. Under
    `prefill_s/<name>` the seconds from the `generate` call to the first decoding forward (the prompt's forward
    and generate's setup), under `total_s/<name>` the whole call's."""
    names = list(models)
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    for name in names:  # warm-up: allocations, one-time dispatch
        timed_generate(models[name], probes[name], inputs[0], min(new_tokens, 4))
    keys = ("", "cpu/", "prefill_s/", "prefill_cpu_s/", "total_s/")
    tokens_per_s = {f"{key}{name}": [] for name in names for key in keys}
    for rep in range(repeats):
        input_ids = inputs[rep % len(inputs)]
        for name in names if rep % 2 == 0 else names[::-1]:
            tokens_per_s[name].append(timed_generate(models[name], probes[name], input_ids, new_tokens))
            probe = probes[name]
            decoded = input_ids.shape[0] * (new_tokens - 1)
            tokens_per_s[f"cpu/{name}"].append(decoded / probe.decode_cpu_seconds)
            tokens_per_s[f"prefill_s/{name}"].append(probe.prefill_seconds)
            tokens_per_s[f"prefill_cpu_s/{name}"].append(probe.prefill_cpu_seconds)
            tokens_per_s[f"total_s/{name}"].append(probe.prefill_seconds + probe.decode_seconds)
            if on_run is not None:
                on_run(name, probes[name])
    return tokens_per_s


class Collector:
    """What the probes saw over the timed runs of each model: Avg K and experts read per step."""

    def __init__(self):
        self.counts = defaultdict(list)
        self.per_layer = defaultdict(list)
        self.experts_read = defaultdict(list)
        self.prefill_avg_k = defaultdict(list)
        self.prefill_read = defaultdict(list)

    def __call__(self, name: str, probe: DecodeProbe) -> None:
        self.counts[name].append(probe.expert_counts())
        self.per_layer[name].append(probe.avg_k_per_layer())
        self.experts_read[name].append(probe.experts_read_per_step())
        self.prefill_avg_k[name].append(probe.prefill_avg_k())
        self.prefill_read[name].append(probe.prefill_experts_read())

    def avg_k(self, name: str) -> float:
        return torch.cat(self.counts[name]).float().mean().item()

    def avg_k_per_layer(self, name: str) -> list[float]:
        return [statistics.fmean(values) for values in zip(*self.per_layer[name], strict=True)]

    def experts_read_per_step(self, name: str) -> float:
        return statistics.fmean(self.experts_read[name])


def prompt(args, batch: int, prompt_len: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(1, args.vocab, (batch, prompt_len), generator=generator)


def prompts(args, batch: int, count: int) -> list[torch.Tensor]:
    """`count` different prompts (B, P) of random tokens, `prompt`'s first: the timed repetitions take them in
    turn, so a router whose cost depends on the tokens (DARE's real path) is timed on several sequences."""
    generator = torch.Generator().manual_seed(10_000 + batch)
    others = [torch.randint(1, args.vocab, (batch, args.prompt_len), generator=generator) for _ in range(count - 1)]
    return [prompt(args, batch, args.prompt_len), *others]


# ---------------------------------------------------------------------------------------------------------------
# 1. the headline: DARE / Top-2 at one batch size


def headline(args, models, probes, sizes) -> dict:
    inputs = prompts(args, args.batch_size, args.prompts)
    collector = Collector()
    tokens_per_s = interleaved(models, probes, inputs, args.new_tokens, args.repeats, collector)
    ratios = [d / t for d, t in zip(tokens_per_s["dare"], tokens_per_s["top2"], strict=True)]
    ratio = spread(ratios)
    cpu_ratio = spread([d / t for d, t in zip(tokens_per_s["cpu/dare"], tokens_per_s["cpu/top2"], strict=True)])
    avg_k = {name: collector.avg_k(name) for name in models}
    context = args.prompt_len + args.new_tokens / 2
    moe = sizes["top2"]["moe_layers"]
    # At batch 1 the experts read per step are the token's: Avg K per MoE layer.
    read = {name: collector.experts_read_per_step(name) for name in models}
    nbytes = {name: bytes_per_step(sizes[name], read[name], args.batch_size, context) for name in models}
    ideal = nbytes["top2"] / nbytes["dare"]
    share = share_of_ideal(ratio["median"], ideal)

    print(
        f"\n## decode, batch {args.batch_size}: {args.repeats} interleaved repetitions, {args.new_tokens} new tokens"
    )
    print(
        f"| {'router':<6} | {'Avg K (decode)':>14} | {'decode tok/s, median':>20} | {'min - max':>15} | {'MB read / token':>15} |"
    )
    print(f"|{'-' * 8}|{'-' * 16}|{'-' * 22}|{'-' * 17}|{'-' * 17}|")
    for name in models:
        s = spread(tokens_per_s[name])
        print(
            f"| {name:<6} | {avg_k[name]:>14.3f} | {s['median']:>20.2f} | {s['min']:>6.2f} - {s['max']:<6.2f} "
            f"| {nbytes[name] / 1e6 / args.batch_size:>15.1f} |"
        )
    per_layer = " ".join(f"{k:.3f}" for k in collector.avg_k_per_layer("dare"))
    print(f"\nper-pair ratios DARE / Top-2: {' '.join(f'{r:.3f}' for r in ratios)}")
    print(
        f"DARE / Top-2 decode tokens/s, median of {len(ratios)} per-pair ratios: {ratio['median']:.3f} "
        f"(min {ratio['min']:.3f}, max {ratio['max']:.3f}; interquartile range {ratio['q1']:.3f} - {ratio['q3']:.3f})"
    )
    print(
        f"the same on this process's CPU time (blind to other jobs taking the cores): {cpu_ratio['median']:.3f} "
        f"(min {cpu_ratio['min']:.3f}, max {cpu_ratio['max']:.3f}; interquartile range {cpu_ratio['q1']:.3f} - "
        f"{cpu_ratio['q3']:.3f})"
    )
    print(
        f"Avg K realised while decoding (DARE): {avg_k['dare']:.3f} (per MoE layer: {per_layer}); Top-2: {avg_k['top2']:.3f}"
    )
    print(
        f"weights-read ideal at that Avg K: {ideal:.3f} (Top-2 {nbytes['top2'] / 1e6:.1f} MB, DARE "
        f"{nbytes['dare'] / 1e6:.1f} MB read per step: non-expert weights incl. LM head "
        f"{sizes['top2']['non_expert_bytes'] / 1e6:.1f} / {sizes['dare']['non_expert_bytes'] / 1e6:.1f} MB, one "
        f"expert {sizes['top2']['expert_bytes'] / 1e6:.1f} MB x {moe} MoE layers x experts read per layer "
        f"{read['top2'] / moe:.2f} / {read['dare'] / moe:.2f}, KV cache)"
    )
    print(f"share of the ideal saving realised: {share:.1%}  ((1 - 1/{ratio['median']:.3f}) / (1 - 1/{ideal:.3f}))")
    prefill = prefill_report(args, tokens_per_s, collector, sizes, ideal)
    print(
        f"RESULT ratio={ratio['median']:.4f} ratio_min={ratio['min']:.4f} ratio_max={ratio['max']:.4f} "
        f"ratio_q1={ratio['q1']:.4f} ratio_q3={ratio['q3']:.4f} avg_k={avg_k['dare']:.4f} ideal={ideal:.4f} "
        f"share={share:.4f} cpu_ratio={cpu_ratio['median']:.4f} prefill_ratio={prefill['ratio']['median']:.4f} "
        f"prefill_ideal={prefill['ideal']:.4f} prompt_avg_k={prefill['avg_k']:.4f} "
        f"total_ratio={prefill['total']['median']:.4f} total_ideal={prefill['total_ideal']:.4f}"
    )
    return {"ratio": ratio, "avg_k": avg_k, "ideal": ideal, "tokens_per_s": tokens_per_s, "collector": collector}


def prefill_report(args, times: dict, collector: "Collector", sizes: dict, decode_ideal: float) -> dict:
    """The prompt's forward, apart: DARE / Top-2 speed (Top-2's seconds over DARE's, per pair), its ideals, and
    the whole `generate` call (prefill + decode, what a user times) against the ideal of the two together."""
    batch, prompt_len = args.batch_size, args.prompt_len
    pairs = list(zip(times["prefill_s/top2"], times["prefill_s/dare"], strict=True))
    ratio = spread([t / d for t, d in pairs])
    cpu = spread([t / d for t, d in zip(times["prefill_cpu_s/top2"], times["prefill_cpu_s/dare"], strict=True)])
    total = spread([t / d for t, d in zip(times["total_s/top2"], times["total_s/dare"], strict=True)])
    prompt_k = {name: statistics.fmean(collector.prefill_avg_k[name]) for name in ("top2", "dare")}
    read = {name: statistics.fmean(collector.prefill_read[name]) for name in ("top2", "dare")}
    moe = sizes["top2"]["moe_layers"]
    prefill_bytes = {name: bytes_per_step(sizes[name], read[name], 0, 0) for name in ("top2", "dare")}
    weights_ideal = prefill_bytes["top2"] / prefill_bytes["dare"]
    flops_ideal = prefill_flops(sizes["top2"], prompt_k["top2"], batch, prompt_len) / prefill_flops(
        sizes["dare"], prompt_k["dare"], batch, prompt_len
    )
    ideal = max(weights_ideal, flops_ideal)
    prefill_top2 = statistics.median(times["prefill_s/top2"])
    decode_top2 = statistics.median(times["total_s/top2"]) - prefill_top2
    total_ideal = (prefill_top2 + decode_top2) / (prefill_top2 / ideal + decode_top2 / decode_ideal)
    print(
        f"\n### the prompt's forward (prefill: {batch} x {prompt_len} tokens; from the `generate` call to the first "
        "decoding forward), and the whole call"
    )
    print(
        f"prefill ms, median: Top-2 {prefill_top2 * 1e3:.1f}, DARE {statistics.median(times['prefill_s/dare']) * 1e3:.1f}; "
        f"DARE / Top-2 speed, median of {len(pairs)} pairs: {ratio['median']:.3f} (min {ratio['min']:.3f}, max "
        f"{ratio['max']:.3f}; interquartile range {ratio['q1']:.3f} - {ratio['q3']:.3f}); on CPU time {cpu['median']:.3f}"
    )
    print(
        f"Avg K on the prompt (DARE): {prompt_k['dare']:.3f}; experts read per MoE layer, Top-2 / DARE: "
        f"{read['top2'] / moe:.2f} / {read['dare'] / moe:.2f}; ideal: weights read {weights_ideal:.3f}, FLOPs "
        f"{flops_ideal:.3f} (the prefill's ideal: the larger, {ideal:.3f}); share of its saving realised: "
        f"{share_of_ideal(ratio['median'], ideal):.1%}"
    )
    print(
        f"whole call (prefill + {args.new_tokens - 1} decoding steps), DARE / Top-2 speed: {total['median']:.3f} (min "
        f"{total['min']:.3f}, max {total['max']:.3f}; interquartile range {total['q1']:.3f} - {total['q3']:.3f}); "
        f"prefill {prefill_top2 / (prefill_top2 + decode_top2):.1%} of Top-2's call; ideal of the two together "
        f"{total_ideal:.3f}; share of its saving realised: {share_of_ideal(total['median'], total_ideal):.1%}"
    )
    return {"ratio": ratio, "ideal": ideal, "avg_k": prompt_k["dare"], "total": total, "total_ideal": total_ideal}


# ---------------------------------------------------------------------------------------------------------------
# 2. by batch size


def by_batch_size(args, models, probes, sizes, first: dict) -> None:
    """`first`: the headline's measurement, reused for its batch size."""
    rows = []
    for batch in args.batch_sizes:
        # Fewer repetitions, new tokens and prompt tokens for large batches (a step costs ~ batch x FLOPs there).
        if batch in (1, args.batch_size):
            repeats, new_tokens, prompt_len = args.repeats, args.new_tokens, args.prompt_len
        elif batch <= 4:
            repeats, new_tokens, prompt_len = max(3, args.repeats // 2), max(8, args.new_tokens // 2), args.prompt_len
        else:
            repeats = 3
            new_tokens = max(8, args.new_tokens // (2 if batch <= 16 else 4))
            prompt_len = max(4, args.prompt_len // 4)
        if batch == args.batch_size:  # the headline's
            collector, tokens_per_s = first["collector"], first["tokens_per_s"]
        else:
            input_ids = prompt(args, batch, prompt_len)
            collector = Collector()
            tokens_per_s = interleaved(models, probes, input_ids, new_tokens, repeats, collector)
        ratios = [d / t for d, t in zip(tokens_per_s["dare"], tokens_per_s["top2"], strict=True)]
        context = prompt_len + new_tokens / 2
        avg_k = {name: collector.avg_k(name) for name in models}
        read = {name: collector.experts_read_per_step(name) for name in models}
        step_bytes = {name: bytes_per_step(sizes[name], read[name], batch, context) for name in models}
        flops = {name: flops_per_token(sizes[name], avg_k[name], context) for name in models}
        rows.append(
            dict(
                batch=batch,
                repeats=repeats,
                new_tokens=new_tokens,
                prompt=prompt_len,
                top2=statistics.median(tokens_per_s["top2"]),
                dare=statistics.median(tokens_per_s["dare"]),
                ratio=spread(ratios),
                avg_k=avg_k["dare"],
                read_top2=read["top2"] / sizes["top2"]["moe_layers"],
                read_dare=read["dare"] / sizes["dare"]["moe_layers"],
                weights_ideal=step_bytes["top2"] / step_bytes["dare"],
                flops_ideal=flops["top2"] / flops["dare"],
            )
        )
        print(
            f"  batch {batch}: done ({repeats} repetitions, prompt {prompt_len}, {new_tokens} new tokens)", flush=True
        )

    print("\n## decode tokens/s by batch size (medians; ratio = median of per-pair ratios, [min - max])")
    print(
        "| batch | Top-2 tok/s | DARE tok/s | DARE / Top-2          | Avg K | experts read / layer, Top-2 / DARE "
        "| weights ideal | FLOPs ideal | share of weights / FLOPs ideal |"
    )
    print(
        f"|------:|------------:|-----------:|{'-' * 23}|------:|{'-' * 36}|--------------:|------------:|{'-' * 32}|"
    )
    for r in rows:
        ratio = r["ratio"]
        shares = " / ".join(
            f"{value:6.1%}" if math.isfinite(value) else f"{'n/a':>6}"
            for value in (share_of_ideal(ratio["median"], r[key]) for key in ("weights_ideal", "flops_ideal"))
        )
        print(
            f"| {r['batch']:>5} | {r['top2']:>11.2f} | {r['dare']:>10.2f} | "
            f"{ratio['median']:.3f} [{ratio['min']:.3f} - {ratio['max']:.3f}] | {r['avg_k']:.3f} | "
            f"{r['read_top2']:>15.2f} / {r['read_dare']:<16.2f} | {r['weights_ideal']:>13.3f} | "
            f"{r['flops_ideal']:>11.3f} | {shares:>30} |"
        )
    print(
        "(weights ideal: every expert any token of the step uses in a layer is read once; FLOPs ideal: Avg K x expert "
        "FLOPs + the rest, per token. Larger batches run fewer repetitions and new tokens, and above 4 a shorter "
        "prompt: see the lines above the table.)"
    )


# ---------------------------------------------------------------------------------------------------------------
# 3. breakdown of one decode step


ROWS = (
    ("attention", "attention (self_attn, all layers)"),
    ("norms", "norms + residuals (decoder layers - attention - FFN)"),
    ("dense_ffn", "dense FFNs (non-MoE layers)"),
    ("experts", "MoE experts"),
    ("router", "router (gate linear, softmax, top-k, thresholds)"),
    ("predictor", "DARE difficulty predictor"),
    ("schedule", "difficulty schedule (benchmark only)"),
    ("block_glue", "MoE block glue (block - router - experts)"),
    ("embedding", "input embedding"),
    ("rotary", "rotary embedding (cos / sin)"),
    ("final_norm", "final norm"),
    ("decoder_other", "decoder's other work (masks, cache, Python)"),
    ("lm_head", "LM head"),
    ("bookkeeping", "routing statistics / losses in the output"),
    ("generate", "generate's own per-step work"),
)


def parts_table(med: dict, total: dict, unit: str = "step") -> tuple[float, float]:
    """Print the rows of `ROWS` for Top-2 and DARE (ms, share of `total`); returns the sums of the rows."""
    print(f"| {'part':<52} | {'Top-2 ms':>8} | {'share':>6} | {'DARE ms':>8} | {'share':>6} | {'DARE - Top-2':>12} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 8}|{'-' * 10}|{'-' * 8}|{'-' * 14}|")
    for key, label in ROWS:
        t, d = med["top2"][key], med["dare"][key]
        print(
            f"| {label:<52} | {t:8.2f} | {t / total['top2']:6.1%} | {d:8.2f} | {d / total['dare']:6.1%} | {d - t:+12.2f} |"
        )
    t_sum, d_sum = sum(med["top2"].values()), sum(med["dare"].values())
    for label, t, d in (
        (f"{unit} (sum of the rows)", t_sum, d_sum),
        (f"{unit} (measured)", total["top2"], total["dare"]),
    ):
        print(f"| {label:<52} | {t:8.2f} | {'':6} | {d:8.2f} | {'':6} | {d - t:+12.2f} |")
    return t_sum, d_sum


def derive(seconds: dict, step: float) -> dict:
    """Exclusive ms per row from the inclusive seconds the hooks summed (all per decoding step)."""
    s = defaultdict(float, seconds)
    predictor_wrapper = s["predictor_wrapper"]
    rows = {
        "attention": s["attention"],
        "norms": s["layers"] - s["attention"] - s["dense_ffn"] - s["moe_block"],
        "dense_ffn": s["dense_ffn"],
        "experts": s["experts"],
        "router": s["router"] - predictor_wrapper,
        "predictor": s["predictor"],
        "schedule": predictor_wrapper - s["predictor"],
        "block_glue": s["moe_block"] - s["router"] - s["experts"],
        "embedding": s["embed_tokens"],
        "rotary": s["rotary_emb"],
        "final_norm": s["norm"],
        "decoder_other": s["decoder"] - s["layers"] - s["embed_tokens"] - s["rotary_emb"] - s["norm"],
        "lm_head": s["lm_head"],
        "bookkeeping": s["forward"] - s["decoder"] - s["lm_head"],
        "generate": step - s["forward"],
    }
    return {name: value * 1e3 for name, value in rows.items()}


def bench(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class MicroTimings:
    """What a leaner batch-1 decode path would cost, timed between the breakdown's runs (so a busy machine
    slows them alike), in ms per decoding step over all MoE layers:

    - `expert`: one expert's two matmuls on one token, bare (no routing, no Python loop), cycling over every
      expert of every MoE layer so the weights come from memory as in decoding;
    - `router_now`: a DARE router as it runs now, with its real predictor (not the benchmark's schedule);
    - `router_fused`: the same decision with the router and the predictor's first layer as one matmul on the
      shared input (RMSNorm's weight folded into that layer, the per-token 1/rms applied after the matmul).
    """

    def __init__(self, dare: MoEForCausalLM, repeats: int = 1):
        self.blocks = moe_blocks(dare)
        self.repeats = repeats
        self.samples = defaultdict(list)
        first = self.blocks[0].experts
        self.dtype = first.gate_up_proj.dtype
        self.hidden = torch.randn(1, first.gate_up_proj.shape[-1], dtype=self.dtype)
        self.weights = [
            (b.experts.gate_up_proj[e], b.experts.down_proj[e]) for b in self.blocks for e in range(first.num_experts)
        ]
        self.position = 0
        self.router = router_of(self.blocks[0])
        self.scheduled = self.router.difficulty_predictor
        self.predictor = getattr(self.scheduled, "predictor", self.scheduled)
        self.fused_weight = torch.cat(
            [self.router.weight.float(), (self.predictor.up.weight * self.predictor.norm.weight).float()]
        )
        self.router_ok = self.check_fused()

    def one_expert(self) -> None:
        gate_up, down = self.weights[self.position % len(self.weights)]
        self.position += 1
        gate, up = F.linear(self.hidden, gate_up).chunk(2, dim=-1)
        F.linear(F.silu(gate) * up, down)

    def router_now(self):
        self.router.difficulty_predictor = self.predictor
        try:
            return self.router(self.hidden)
        finally:
            self.router.difficulty_predictor = self.scheduled

    def router_fused(self):
        router, predictor = self.router, self.predictor
        num_experts = router.weight.shape[0]
        x = self.hidden.float()
        both = x @ self.fused_weight.t()
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + (predictor.norm.eps or torch.finfo(self.dtype).eps))
        logits = both[:, :num_experts]
        up = torch.addcmul(predictor.up.bias, both[:, num_experts:], scale)
        difficulty = F.softplus(predictor.down(F.silu(up))).squeeze(-1)
        counts = 1 + (difficulty[:, None] >= router.threshold_tracker.thresholds[None, :]).sum(-1)
        width = router.max_experts
        probs = F.softmax(logits, dim=-1)
        return top_n_routing(logits, probs, counts, width, self.dtype, router.norm_topk_prob, difficulty)

    def check_fused(self) -> bool:
        try:
            with torch.no_grad():
                now, fused = self.router_now(), self.router_fused()
            torch.testing.assert_close(fused.difficulty, now.difficulty, rtol=1e-4, atol=1e-5)
            return True
        except Exception as error:  # the router's interface changed: skip these micro-timings
            print(f"(router micro-timings skipped: {type(error).__name__}: {error})")
            return False

    def sample(self) -> None:
        layers = len(self.blocks)
        with torch.no_grad():
            self.samples["expert"].append(bench(self.one_expert, self.repeats * len(self.weights)) * 1e3)
            if self.router_ok:
                self.samples["router_now"].append(bench(self.router_now, self.repeats * 10) * 1e3 * layers)
                self.samples["router_fused"].append(bench(self.router_fused, self.repeats * 10) * 1e3 * layers)

    def median(self, key: str) -> float:
        return statistics.median(self.samples[key])


def breakdown(args, models, sizes) -> None:
    input_ids = prompts(args, 1, args.prompts)
    probes = {name: DecodeProbe(model, timing=True) for name, model in models.items()}
    ms = {name: defaultdict(list) for name in models}
    steps = {name: [] for name in models}
    prefill_ms = {name: defaultdict(list) for name in models}
    prefills = {name: [] for name in models}

    def on_run(name, probe):
        step = probe.decode_seconds / probe.decode_steps
        per_step = {key: value / probe.decode_steps for key, value in probe.seconds.items()}
        for key, value in derive(per_step, step).items():
            ms[name][key].append(value)
        steps[name].append(step * 1e3)
        for key, value in derive(probe.prefill_seconds_by, probe.prefill_seconds).items():
            prefill_ms[name][key].append(value)
        prefills[name].append(probe.prefill_seconds * 1e3)

    collector = Collector()
    micro = MicroTimings(models["dare"])

    def collect(name, probe):
        on_run(name, probe)
        collector(name, probe)
        micro.sample()

    interleaved(models, probes, input_ids, args.new_tokens, args.breakdown_repeats, collect)
    for probe in probes.values():
        probe.remove()
    avg_k = collector.avg_k("dare")
    med = {name: {key: statistics.median(values) for key, values in ms[name].items()} for name in models}
    step = {name: statistics.median(steps[name]) for name in models}
    print(
        f"\n## where one decode step's time goes (batch 1, medians of {args.breakdown_repeats} interleaved runs of "
        f"{args.new_tokens - 1} decoding steps, hooks attached; DARE Avg K {avg_k:.3f})"
    )
    t_sum, d_sum = parts_table(med, step)
    prefill_med = {name: {k: statistics.median(v) for k, v in prefill_ms[name].items()} for name in models}
    prefill = {name: statistics.median(prefills[name]) for name in models}
    prompt_k = statistics.fmean(collector.prefill_avg_k["dare"])
    print(
        f"\n## where the prompt's forward goes (prefill, {args.prompt_len} tokens, from the `generate` call to the "
        f"first decoding forward; same runs; DARE Avg K on the prompt {prompt_k:.3f})"
    )
    parts_table(prefill_med, prefill, unit="prefill")

    # Where the gap between the realised and the weights-read ideal goes.
    context = args.prompt_len + args.new_tokens / 2
    moe = sizes["top2"]["moe_layers"]
    nbytes = {name: bytes_per_step(sizes[name], k * moe, 1, context) for name, k in (("top2", 2.0), ("dare", avg_k))}
    ideal = nbytes["top2"] / nbytes["dare"]
    t_step, d_step = step["top2"], step["dare"]
    ideal_dare = t_step / ideal
    t_exp, d_exp = med["top2"]["experts"], med["dare"]["experts"]
    proportional_exp = t_exp * avg_k / 2
    time_ideal = t_step - (t_exp - proportional_exp)
    speedup = t_step / d_step
    print(
        f"\n### gap to the weights-read ideal (this run: speedup {speedup:.3f}, ideal {ideal:.3f}, "
        f"{share_of_ideal(speedup, ideal):.0%} of the ideal saving)"
    )
    print(
        f"ideal DARE step = Top-2 step / ideal = {t_step:.2f} / {ideal:.3f} = {ideal_dare:.2f} ms; measured {d_step:.2f} ms; gap {d_step - ideal_dare:+.2f} ms:"
    )
    gap_rows = [
        (
            "dilution: Top-2's non-expert time is above its bytes' share",
            time_ideal - ideal_dare,
            f"non-expert {t_step - t_exp:.2f} ms = {(t_step - t_exp) / t_step:.0%} of the step, bytes say "
            f"{1 - 2 * moe * sizes['top2']['expert_bytes'] / nbytes['top2']:.0%}",
        ),
        (
            "experts: DARE's experts vs Avg K/2 x Top-2's",
            d_exp - proportional_exp,
            f"{d_exp:.2f} ms vs {avg_k:.3f}/2 x {t_exp:.2f} = {proportional_exp:.2f} ms",
        ),
    ]
    for key, label in ROWS:
        if key != "experts":
            gap_rows.append((f"{label}: DARE - Top-2", med["dare"][key] - med["top2"][key], ""))
    gap_rows.append(("timing noise (measured step - sum of the rows)", (d_step - d_sum) - (t_step - t_sum), ""))
    for label, value, note in gap_rows:
        print(f"  {value:+7.2f} ms  {label}{'  (' + note + ')' if note else ''}")
    print(
        f"time-based ideal (Top-2's step with its expert time scaled by Avg K/2): {time_ideal:.2f} ms, speedup "
        f"{t_step / time_ideal:.3f}; realised {share_of_ideal(speedup, t_step / time_ideal):.0%} of that saving"
    )

    moe_layers = len(micro.blocks)
    print("\n### micro-timings for a leaner decode path (ms per decoding step, all MoE layers, batch 1)")
    print(
        f"bare expert matmuls at Avg K {avg_k:.3f}: {micro.median('expert') * avg_k * moe_layers:.2f} ms (DARE's "
        f"experts took {d_exp:.2f} ms); at K = 2: {micro.median('expert') * 2 * moe_layers:.2f} ms (Top-2's took "
        f"{t_exp:.2f} ms)"
    )
    if micro.router_ok:
        print(
            f"router with DARE's predictor as now (no schedule): {micro.median('router_now'):.2f} ms; router and "
            f"predictor fused into one matmul on the shared input: {micro.median('router_fused'):.2f} ms"
        )


# ---------------------------------------------------------------------------------------------------------------
# 4. bookkeeping: hf-dare's Top-2 against a plain Top-2 loop of the same experts


class PlainTop2Block(torch.nn.Module):
    """The textbook Top-2 MoE block (Mixtral's loop), on an MoE block's own router weight and experts: softmax in
    float32, top-2, renormalised, one gated FFN per expert used, `index_add_` of the weighted outputs. No routing
    object, no context, no masks, no statistics: what an MoE block costs without hf-dare's bookkeeping."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.weight = router_of(block).weight
        self.gate_up_proj = block.experts.gate_up_proj
        self.down_proj = block.experts.down_proj
        self.act_fn = block.experts.act_fn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        probs = F.linear(flat, self.weight).softmax(dim=-1, dtype=torch.float32)
        weights, index = probs.topk(2, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(flat.dtype)
        out = torch.zeros_like(flat)
        for expert in index.unique().tolist():
            token, slot = torch.where(index == expert)
            gate, up = F.linear(flat[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out.index_add_(0, token, expert_out * weights[token, slot, None])
        return out.view(hidden_states.shape)


def with_plain_top2_blocks(top2: MoEForCausalLM) -> MoEForCausalLM:
    """A copy of the Top-2 model whose MoE blocks are `PlainTop2Block`s over the same (copied) weights."""
    plain = copy.deepcopy(top2)
    blocks = moe_blocks(plain)
    for layer in decoder_layers(plain):
        if layer.mlp in blocks:
            layer.mlp = PlainTop2Block(layer.mlp)
    plain._moe_blocks = None  # the model's cached list of its MoE blocks: now none
    return plain


def bookkeeping(args, top2: MoEForCausalLM) -> None:
    """Decode time per token of hf-dare's Top-2 model (routing statistics off, as in generation) over the same
    model with plain Top-2 loops for MoE blocks: the cost of routing objects, context, masks and the kernel's
    sorting. The target is <= 1.03."""
    plain = with_plain_top2_blocks(top2)
    input_ids = prompt(args, args.batch_size, args.prompt_len)
    with torch.no_grad():
        same = torch.equal(generate(top2, input_ids, args.new_tokens), generate(plain, input_ids, args.new_tokens))
    models = {"hf_dare": top2, "plain": plain}
    probes = {name: DecodeProbe(model) for name, model in models.items()}
    tokens_per_s = interleaved(models, probes, input_ids, args.new_tokens, args.repeats)
    for probe in probes.values():
        probe.remove()
    cost = spread([p / h for p, h in zip(tokens_per_s["plain"], tokens_per_s["hf_dare"], strict=True)])
    cpu = spread([p / h for p, h in zip(tokens_per_s["cpu/plain"], tokens_per_s["cpu/hf_dare"], strict=True)])
    print(
        f"\n## bookkeeping: hf-dare Top-2 (routing statistics off) vs the same experts in a plain Top-2 loop "
        f"(batch {args.batch_size}, {args.repeats} interleaved repetitions)"
    )
    print(f"generated tokens identical: {same}")
    print(
        f"hf-dare time per token / plain loop's, median of {args.repeats} per-pair ratios: {cost['median']:.3f} "
        f"(min {cost['min']:.3f}, max {cost['max']:.3f}; interquartile range {cost['q1']:.3f} - {cost['q3']:.3f}); "
        f"on CPU time {cpu['median']:.3f} (interquartile range {cpu['q1']:.3f} - {cpu['q3']:.3f}); target <= 1.03"
    )
    print(
        f"RESULT bookkeeping={cost['median']:.4f} bookkeeping_q1={cost['q1']:.4f} bookkeeping_q3={cost['q3']:.4f} "
        f"bookkeeping_cpu={cpu['median']:.4f} same_tokens={int(same)}"
    )


# ---------------------------------------------------------------------------------------------------------------


QUICK = dict(
    hidden=256,
    intermediate=1408,
    layers=4,
    heads=4,
    kv_heads=2,
    vocab=1024,
    prompt_len=16,
    new_tokens=16,
    repeats=10,
    breakdown_repeats=2,
)


def routing_description(args) -> str:
    if args.routing == "pinned":
        return f"pinned at Avg K {args.avg_k} (real predictor, its output replaced by a fixed schedule)"
    return (
        f"on its real path (predictor and thresholds calibrated on its own decoded tokens, target Avg K {args.avg_k})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=1, help="batch of the headline measurement")
    parser.add_argument(
        "--routing",
        choices=("real", "pinned"),
        default="real",
        help="DARE's routing: its predictor and thresholds calibrated on its own decoded tokens (real), or the "
        "predictor's output replaced by a fixed schedule (pinned)",
    )
    parser.add_argument("--avg-k", type=float, default=1.2, help="DARE's target Avg K while decoding (1..2)")
    parser.add_argument(
        "--calibration-rounds", type=int, default=6, help="real routing: at most this many decode-calibrate rounds"
    )
    parser.add_argument(
        "--prompts",
        type=int,
        default=10,
        help="different prompts the timed repetitions take in turn; real routing: the calibration data are the "
        "tokens decoded after them",
    )
    parser.add_argument(
        "--held-out-prompts",
        type=int,
        default=2,
        help="real routing: also report the Avg K of the tokens decoded after this many other prompts",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--impl", default=None, help="experts implementation (default: the model's default)")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved repetitions (pairs) of the headline")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --quick: 1)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="also decode tokens/s at these batch sizes"
    )
    parser.add_argument("--breakdown", action="store_true", help="also where one decode step's time goes")
    parser.add_argument("--breakdown-repeats", type=int, default=3)
    parser.add_argument(
        "--bookkeeping",
        action="store_true",
        help="also hf-dare's Top-2 against the same experts in a plain Top-2 loop (target: <= 3%% more per token)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny model (hidden 256, 4 layers, vocab 1024), 16 new tokens, 10 repetitions, 1 thread: well under a minute",
    )
    if parser.parse_known_args()[0].quick:  # the tiny model's settings, unless given on the command line
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if not args.quick:  # the tiny model's activations are too small for page faults to matter
        keep_freed_memory()
    if args.new_tokens < 3:
        parser.error("--new-tokens must be at least 3")

    started = time.perf_counter()
    print(f"# generation benchmark: {setup_threads(args.threads)}, {args.dtype}")
    top2, dare = build_models(args, DTYPES[args.dtype])
    total = sum(p.numel() for p in top2.parameters())
    print(
        f"Qwen2 backbone: hidden {args.hidden}, {args.layers} layers ({len(moe_blocks(top2))} MoE, {args.experts} "
        f"experts, intermediate {args.intermediate}), {args.heads} heads, {args.kv_heads} KV heads, vocab {args.vocab}: "
        f"{total / 1e6:.0f}M parameters; experts implementation {top2.config._experts_implementation}; prompt "
        f"{args.prompt_len}; DARE {routing_description(args)}"
    )
    if args.routing == "pinned":
        schedule_dare(dare, args.avg_k)
    else:
        calibrate_on_decoded(args, dare, torch.cat(prompts(args, args.batch_size, args.prompts)))
    models = {"top2": top2, "dare": dare}
    sizes = {name: weights_model(model) for name, model in models.items()}
    probes = {name: DecodeProbe(model) for name, model in models.items()}

    first = headline(args, models, probes, sizes)
    if args.batch_sizes:
        print("\n## by batch size", flush=True)
        by_batch_size(args, models, probes, sizes, first)
    for probe in probes.values():
        probe.remove()
    if args.breakdown:
        breakdown(args, models, sizes)
    if args.bookkeeping:
        bookkeeping(args, top2)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
