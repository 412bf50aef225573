"""Compute that matters: routers on a task whose per-token difficulty is known by construction.

    python examples/difficulty_benchmark.py --pilot --seeds 0 1 2                     # Top-1 vs Top-2 over N, pick N
    python examples/difficulty_benchmark.py --dare-settings --keys 64 --seeds 0 1 2    # DARE's settings
    python examples/difficulty_benchmark.py --keys 64 --jobs 2                         # the benchmark (5 seeds)
    python examples/difficulty_benchmark.py --quick --out /tmp/quick                   # seconds (tests)

The task (examples/difficulty_task.py): sequences of quadruples [a, b, table[a, b], SEP]; the token after a is
uniform noise (irreducible), the one after b a lookup over N x N pairs (hard: learnable, needs capacity), the one
after the table value is SEP (easy). A 2-layer MoE causal LM (`MoECausalLMConfig(text_config=Qwen2Config(...))`,
both layers MoE, 4 experts) is trained from scratch with AdamW in a plain torch loop that calls
`model.update_routing_state()` once per optimizer step, then measured on held-out sequences: accuracy and NLL per
token class, Avg K per class and layer, where the experts beyond the first go, DARE's Spearman(predicted
difficulty, NLL), FLOPs per token (`hf_dare.evaluation.flops`); every model with a dial is then calibrated
(`hf_dare.calibrate`) to a range of Avg K and measured again.

Modes:
- `--pilot`: Top-1 vs Top-2 over the table sizes `--keys`: does compute matter (Top-2 ahead on hard tokens)?
- `--dare-settings`: DARE from scratch under the settings that decide whether L_diff harms the backbone
  (`difficulty_detach_input`, `difficulty_loss_coef`), local loss-form experiments (targets NLL / log V, a
  "reducible difficulty" target), with gradient traces (CE vs L_diff at the backbone) and learning curves.
- default: the benchmark: every router at matched compute (Avg K ~1.4 where it has a knob), the oracle routers
  (experts by the true token class, or by position: the key's), Top-1 and DARE with unrenormalised weights p (the
  router then learns from the task loss on one-expert tokens), upcycled Top-2 and DARE, all paired by seed, plus
  the dial curves.

Variants marked LOCAL use a loss computed here rather than the model's L_diff (the model's coefficient is set to
0 and the loop adds the term): loss-form candidates, not hf_dare options.
"""

import argparse
import copy
import json
import math
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config

import hf_dare
import hf_dare.conversion
from hf_dare.evaluation.flops import flops_per_token_at
from hf_dare.modeling.routers import DareRouter, random_difficulty
from hf_dare.modeling.routing import ROUTERS

sys.path.insert(0, str(Path(__file__).parent))
from difficulty_task import CLASSES, POSITION_CLASSES, LookupTask, position_classes  # noqa: E402
from study_report import machine, stats  # noqa: E402

NUM_EXPERTS = 4


@dataclass(frozen=True)
class RunSize:
    """Model and training size (see `FULL` / `QUICK`)."""

    steps: int = 1500
    batch_size: int = 32
    seq_len: int = 48
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    hidden_size: int = 64
    expert_size: int = 32
    layers: int = 2
    heads: int = 4
    eval_sequences: int = 2560  # x 47 labelled positions = 120,320 held-out tokens
    trace_every: int = 100  # learning curve (and gradient traces with --dare-settings)
    trace_sequences: int = 256


FULL = RunSize()
QUICK = RunSize(steps=30, batch_size=8, seq_len=16, eval_sequences=64, trace_every=10, trace_sequences=32)
DIAL = (1.0, 1.2, 1.4, 1.6, 2.0)
QUICK_DIAL = (1.0, 2.0)
CALIBRATION_SEQUENCES = 256
EVAL_DATA_SEED = 10_000  # held-out sequences: the same for every run, drawn apart from training data
CALIBRATION_DATA_SEED = 20_000

# Pi for Avg K 1.40 (0.72 + 2 * 0.18 + 3 * 0.08 + 4 * 0.02), long-tailed as the paper's.
PI_1_4 = (0.72, 0.18, 0.08, 0.02)
# The oracle's Pi for Avg K 1.40 with every extra expert on the hard quarter of the tokens: 40% of the hard
# tokens get 2 experts, 60% get 3 (0.75 + 2 * 0.10 + 3 * 0.15).
ORACLE_PI_1_4 = (0.75, 0.10, 0.15, 0.0)
# The paper's Pi (Qwen2-1.5B): Avg K 1.51.
PAPER_PI = (0.6, 0.3, 0.09, 0.01)
# The benchmark's DARE predictors are 16 wide: the default 256 on a 64-wide model has 2.8x the parameters of an
# expert (the paper's 256 on Qwen2-1.5B: 1% of one), and hf_dare.evaluation.flops counts them. 16 learns the difficulty as
# well on this task (Spearman 0.84-0.86 either way on a 16 x 16 table).
SMALL_PREDICTOR = {"difficulty_predictor_size": 16}


@dataclass(frozen=True)
class Variant:
    """One model: `router` with the MoE config `settings`. LOCAL experiments: `local_target` names a difficulty
    target computed here instead of the model's L_diff ("nll_over_log_v", "reducible"), weighted `local_coef`;
    `detach_layers`: the MoE layers whose predictor input is detached (the others' L_diff reaches the backbone),
    overriding `difficulty_detach_input`; `switch_step`: from this step on, every DARE layer's detaching is
    flipped (attached -> detached or back); `drop_upcycling`: not from scratch but a dense model trained for half
    the steps, upcycled with `hf_dare.conversion.upcycle(drop_upcycling=r)` and trained for the other half at
    `UPCYCLED_LR`."""

    name: str
    router: str
    settings: dict = field(default_factory=dict)
    label: str = ""
    local_target: str | None = None
    local_coef: float = 1.0
    detach_layers: tuple[int, ...] | None = None
    switch_step: int | None = None
    drop_upcycling: float | None = None  # not None: upcycled from a dense model, re-initialising this fraction


PILOT_VARIANTS = (
    Variant("top1", "top_k", {"num_experts_per_tok": 1}, "Top-1"),
    Variant("top2", "top_k", {"num_experts_per_tok": 2}, "Top-2"),
)
BENCHMARK_VARIANTS = (
    *PILOT_VARIANTS,
    Variant(
        "dare",
        "dare",
        {"target_distribution": PI_1_4, "difficulty_detach_input": True, **SMALL_PREDICTOR},
        "DARE (Pi for Avg K 1.4, detached predictor input)",
    ),
    # The paper's settings as hf-dare 0.1 had them: L_diff reaches the backbone (no longer the default).
    Variant(
        "dare_paper_settings",
        "dare",
        {"target_distribution": PI_1_4, "difficulty_detach_input": False, **SMALL_PREDICTOR},
        "DARE (Pi for Avg K 1.4, L_diff reaches the backbone)",
    ),
    Variant("dare_random", "dare", {"target_distribution": PI_1_4, "difficulty_proxy": "random"}, "DARE, random"),
    # p tuned on seed 0 (p 0.5 -> Avg K 1.19, 0.55 -> 1.23, 0.6 -> 1.48, 0.7 -> 1.94).
    Variant("top_p", "top_p", {"top_p_threshold": 0.58}, "Top-p (p 0.58)"),
    Variant("remoe", "remoe", {"remoe_target_sparsity": 1 - 1.4 / NUM_EXPERTS}, "ReMoE (target Avg K 1.4)"),
    Variant("dynmoe", "dynmoe", {}, "DynMoE"),
    Variant("moepp", "moepp", {"num_experts_per_tok": 2}, "MoE++ (top-2 of 4 FFN + 4 zero-computation)"),
    Variant("hyperrouter", "hyperrouter", {"num_experts_per_tok": 2}, "HyperRouter (top-2)"),
    Variant(
        "oracle",
        "oracle",
        {"target_distribution": ORACLE_PI_1_4, "difficulty_proxy": "random"},
        "oracle (true class, Avg K 1.4)",
    ),
    Variant(
        "dare_reducible",
        "dare",
        {
            "target_distribution": PI_1_4,
            "difficulty_loss_coef": 0.0,
            "difficulty_detach_input": True,
            **SMALL_PREDICTOR,
        },
        "LOCAL: DARE, reducible difficulty NLL(1 expert) - NLL(2 experts)",
        local_target="reducible",
    ),
)
# Is the oracle's random split of hard tokens between 2 and 3 experts what costs it? Every hard token on 2.
ORACLE_HARD_2 = Variant(
    "oracle_hard2",
    "oracle",
    {"target_distribution": (0.75, 0.25, 0.0, 0.0), "difficulty_proxy": "random"},
    "oracle, every hard token on 2 experts (Avg K 1.25)",
)
# Do the extra experts help where the key is read rather than where the lookup is made? Every position holding a
# key `a` (predicting the noise b: "irreducible") on 2 experts, the other positions on 1 (Avg K 1.25).
ORACLE_KEY_2 = Variant(
    "oracle_key2",
    "oracle_key",
    {"target_distribution": (0.75, 0.25, 0.0, 0.0), "difficulty_proxy": "random"},
    "oracle, every key position (a) on 2 experts (Avg K 1.25)",
)
# Top-1 whose one weight is its router probability p (not p / p = 1): the router then learns from the task loss
# on every token, as Top-2's and the dynamic routers' do; with the renormalised weight only the balancing loss
# trains it.
TOP1_UNNORMALISED = Variant(
    "top1_unnormalised",
    "top_k",
    {"num_experts_per_tok": 1, "norm_topk_prob": False},
    "Top-1, weight p (not renormalised)",
)
# DARE the same way: a token's chosen experts weighted by their probabilities, not renormalised to sum 1.
DARE_UNNORMALISED = Variant(
    "dare_unnormalised",
    "dare",
    {"target_distribution": PI_1_4, "difficulty_detach_input": True, "norm_topk_prob": False, **SMALL_PREDICTOR},
    "DARE, weights p (not renormalised)",
)
# Upcycled beside from scratch (the same 1,500 steps in all: 750 dense, 750 MoE): Top-2 and DARE, experts exact
# copies of the dense FFN (r = 0) or with half of each expert's channels redrawn (Drop-Upcycling, r = 0.5).
UPCYCLED_VARIANTS = tuple(
    Variant(f"{name}_upcycled{suffix}", router, settings, f"{label}, upcycled (r = {r})", drop_upcycling=r)
    for name, router, settings, label in (
        ("top2", "top_k", {"num_experts_per_tok": 2}, "Top-2"),
        ("dare", "dare", {"target_distribution": PI_1_4, **SMALL_PREDICTOR}, "DARE (Pi for Avg K 1.4)"),
    )
    for r, suffix in ((0.0, ""), (0.5, "_drop"))
)
UPCYCLED_LR = 1e-3  # the MoE phase after upcycling, as fine-tuning after a dense phase is done (the pilot)
BENCHMARK_VARIANTS = (
    *BENCHMARK_VARIANTS,
    ORACLE_HARD_2,
    *UPCYCLED_VARIANTS,
    ORACLE_KEY_2,
    TOP1_UNNORMALISED,
    DARE_UNNORMALISED,
)

_PAPER = {"target_distribution": PAPER_PI, "difficulty_detach_input": False}
DARE_SETTINGS_VARIANTS = (
    *PILOT_VARIANTS,
    Variant("dare_defaults", "dare", _PAPER, "DARE defaults (alpha 1, L_diff reaches the backbone)"),
    Variant("dare_detach", "dare", {**_PAPER, "difficulty_detach_input": True}, "DARE, detached predictor input"),
    Variant("dare_alpha_0.1", "dare", {**_PAPER, "difficulty_loss_coef": 0.1}, "DARE, alpha 0.1"),
    Variant("dare_alpha_0.01", "dare", {**_PAPER, "difficulty_loss_coef": 0.01}, "DARE, alpha 0.01"),
    Variant("dare_alpha_0", "dare", {**_PAPER, "difficulty_loss_coef": 0.0}, "DARE, alpha 0 (untrained predictor)"),
    Variant("dare_random", "dare", {**_PAPER, "difficulty_proxy": "random"}, "DARE, random difficulty"),
    Variant(
        "dare_nll_over_log_v",
        "dare",
        {**_PAPER, "difficulty_loss_coef": 0.0},
        "LOCAL: DARE, targets NLL / log V",
        local_target="nll_over_log_v",
    ),
    Variant(
        "dare_reducible_detach",
        "dare",
        {**_PAPER, "difficulty_loss_coef": 0.0, "difficulty_detach_input": True},
        "LOCAL: DARE, target = NLL(1 expert) - NLL(2 experts), detached input",
        local_target="reducible",
    ),
)
# Where and when L_diff's gradient into the backbone does its harm (LOCAL: detaching switched per layer / in time).
MECHANISM_VARIANTS = (
    Variant(
        "dare_detach_l0_only", "dare", _PAPER, "LOCAL: layer 0's predictor detached, layer 1's not", detach_layers=(0,)
    ),
    Variant(
        "dare_detach_l1_only", "dare", _PAPER, "LOCAL: layer 1's predictor detached, layer 0's not", detach_layers=(1,)
    ),
    Variant("dare_detached_from_300", "dare", _PAPER, "LOCAL: defaults for 300 steps, then detached", switch_step=300),
    Variant(
        "dare_attached_from_300",
        "dare",
        {**_PAPER, "difficulty_detach_input": True},
        "LOCAL: detached for 300 steps, then defaults",
        switch_step=300,
    ),
)
QUICK_VARIANTS = ("top1", "top2", "dare", "oracle")


# The oracle router ---------------------------------------------------------------------------------------------

# Difficulty score of each class (CLASSES order: easy, hard, irreducible): hard > irreducible > easy.
ORACLE_SCORES = {"easy": 0.0, "hard": 2.0, "irreducible": 1.0}


class OracleRouter(DareRouter, name="oracle"):
    """The upper bound: DARE's thresholds over the true class of the token each position predicts (hard >
    irreducible > easy, from the flat token index: whole sequences of quadruples), plus DARE's deterministic
    `random` signal in (0, 1) to split a class between expert counts. Build it with `difficulty_proxy="random"`
    (no predictor, no L_diff)."""

    # Score of each position of a quadruple [a, b, table[a, b], SEP] (index mod 4).
    position_scores = tuple(ORACLE_SCORES[c] for c in POSITION_CLASSES)

    def difficulty(self, hidden_states: torch.Tensor, router_probs: torch.Tensor) -> torch.Tensor:
        num_tokens, device = hidden_states.shape[0], hidden_states.device
        scores = torch.tensor(self.position_scores, device=device)
        uniforms = random_difficulty(num_tokens, device, self.training, self.random_seed, self.layer_idx)
        return scores[torch.arange(num_tokens, device=device) % 4] + uniforms


class KeyOracleRouter(OracleRouter, name="oracle_key"):
    """The oracle with the key's position (a, which predicts the noise b) first, then the lookup's (b), then the
    rest."""

    position_scores = (2.0, 1.0, 0.0, 0.0)


def register_oracle_router() -> None:
    """Make `router="oracle"` buildable. Defining `OracleRouter` registers it (the router protocol's `name=`);
    this registers it again where a caller (a test) removed it since (idempotent)."""
    ROUTERS.setdefault("oracle", OracleRouter)
    ROUTERS.setdefault("oracle_key", KeyOracleRouter)


@contextmanager
def dialled_as_dare(model):
    """`hf_dare.calibrate` picks its dial by the config's router name; the oracle is a DARE router under another
    name, so it is dialled as `dare` (its thresholds), and its name is given back afterwards."""
    router = model.config.router
    if router == "oracle":
        model.config.router = "dare"
    try:
        yield
    finally:
        model.config.router = router


# Model, training ---------------------------------------------------------------------------------------------


def decoder_config(task: LookupTask, size: RunSize, intermediate_size: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=task.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=size.seq_len,
        tie_word_embeddings=False,
    )


def build_model(variant: Variant, task: LookupTask, size: RunSize, seed: int):
    """The MoE causal LM of `variant`, initialised from `seed`."""
    register_oracle_router()
    decoder = decoder_config(task, size, 2 * size.hidden_size)  # intermediate unused: every layer is MoE
    config = hf_dare.MoECausalLMConfig(
        text_config=decoder,
        router=variant.router,
        num_experts=NUM_EXPERTS,
        moe_layers=list(range(size.layers)),
        moe_intermediate_size=size.expert_size,
        **as_config_values(variant.settings),
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def as_config_values(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def upcycled_model(variant: Variant, task: LookupTask, size: RunSize, seed: int, folder: Path):
    """A dense Qwen2 causal LM (FFN width = one expert's) trained from `seed` for half of `size.steps` with the
    loop of `train`, then `hf_dare.conversion.upcycle`d into `variant` (router seeded by `seed`, Drop-Upcycling
    ratio `variant.drop_upcycling`); returns the MoE model and the dense phase's seconds."""
    torch.manual_seed(seed)
    dense = AutoModelForCausalLM.from_config(decoder_config(task, size, size.expert_size))
    started = time.perf_counter()
    run_training_loop(dense, task, replace(size, steps=size.steps // 2), torch.Generator().manual_seed(seed))
    dense.save_pretrained(folder / "dense")
    settings = as_config_values(variant.settings)
    top_k = settings.pop("num_experts_per_tok", 2)
    moe_dir = hf_dare.conversion.upcycle(
        folder / "dense", folder / "moe", num_experts=NUM_EXPERTS, router=variant.router, top_k=top_k,
        moe_layers=list(range(size.layers)), seed=seed, drop_upcycling=variant.drop_upcycling, **settings,
    )  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(moe_dir), time.perf_counter() - started


def run_training_loop(model, task: LookupTask, size: RunSize, generator: torch.Generator) -> None:
    """Plain CE training of a dense model (the upcycled variants' first phase)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.lr, weight_decay=size.weight_decay)
    for step in range(size.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, size)
        input_ids = task.sample(size.batch_size, generator, task.table)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def backbone_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Everything but DARE's difficulty predictors, by name."""
    return {n: p for n, p in model.named_parameters() if "difficulty_predictor." not in n and p.requires_grad}


def set_predictor_detaching(model, layers) -> None:
    """Detach the predictor input of the DARE layers in `layers`, attach the others' (LOCAL experiments)."""
    for block in model.moe_blocks:
        if hasattr(block.gate, "detach_input"):
            block.gate.detach_input = block.layer_idx in layers


@torch.no_grad()
def forced_count_nll(model, input_ids: torch.Tensor, experts: int) -> torch.Tensor:
    """(B, L) next-token NLL with every DARE layer forced to `experts` experts per token (thresholds moved for one
    forward in eval mode, so nothing is recorded for the threshold updates)."""
    trackers = [block.gate.threshold_tracker for block in model.moe_blocks]
    saved = [t.thresholds.clone() for t in trackers]
    was_training = model.training
    model.eval()
    try:
        for tracker in trackers:
            m = tracker.thresholds.numel()
            tracker.thresholds.copy_(torch.tensor([-math.inf] * (experts - 1) + [math.inf] * (m - experts + 1)))
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    finally:
        for tracker, thresholds in zip(trackers, saved, strict=True):
            tracker.thresholds.copy_(thresholds)
        model.train(was_training)
    return next_token_nll(logits, input_ids)


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) NLL of the next token at every position (0 at the last)."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return F.pad(nll, (0, 1))


def local_difficulty_loss(variant: Variant, model, outputs, input_ids: torch.Tensor, vocab_size: int):
    """LOCAL experiments: MSE of each DARE layer's prediction against the variant's target, over the labelled
    positions, averaged over layers."""
    with torch.no_grad():
        if variant.local_target == "nll_over_log_v":
            target = next_token_nll(outputs.logits, input_ids) / math.log(vocab_size)
        elif variant.local_target == "reducible":
            target = (forced_count_nll(model, input_ids, 1) - forced_count_nll(model, input_ids, 2)).clamp(min=0)
        else:
            raise ValueError(f"unknown local target {variant.local_target!r}")
    weight = torch.ones_like(input_ids, dtype=torch.float32)
    weight[:, -1] = 0
    errors = [((d.float() - target) ** 2 * weight).sum() / weight.sum() for d in outputs.difficulty]
    return variant.local_coef * torch.stack(errors).mean()


TENSOR_RATIO_STEPS = (1, 100, 300)  # steps whose gradient trace keeps the ratio of every parameter tensor


def learning_rate(step: int, size: RunSize) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step < size.warmup:
        return size.lr * (step + 1) / size.warmup
    progress = (step - size.warmup) / max(1, size.steps - size.warmup)
    return size.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def gradient_trace(model, terms: dict) -> dict:
    """Norms and cosine, at the backbone (all parameters but the predictors), of the gradients of the loss terms
    CE and the difficulty term (alpha * L_diff, or the LOCAL one), and the median over parameter tensors of their
    norm ratio (what Adam's per-parameter scaling sees)."""
    named = backbone_parameters(model)
    params = list(named.values())
    grads = {}
    for name in ("ce", "difficulty"):
        g = torch.autograd.grad(terms[name], params, retain_graph=True, allow_unused=True)
        grads[name] = [torch.zeros_like(p) if x is None else x for x, p in zip(g, params, strict=True)]
    flat = {name: torch.cat([x.reshape(-1) for x in g]) for name, g in grads.items()}
    ratios = torch.tensor(
        [d.norm() / c.norm().clamp(min=1e-12) for c, d in zip(grads["ce"], grads["difficulty"], strict=True)]
    )
    return {
        "grad_norm_ce": flat["ce"].norm().item(),
        "grad_norm_difficulty": flat["difficulty"].norm().item(),
        "grad_cosine": F.cosine_similarity(flat["ce"], flat["difficulty"], dim=0).item(),
        "grad_ratio_median": ratios.median().item(),
        "grad_ratio_by_tensor": {name: r.item() for name, r in zip(named, ratios, strict=True)},
    }


def train(variant: Variant, task: LookupTask, size: RunSize, seed: int, trace_gradients: bool = False):
    """Train from scratch (or upcycled: `Variant.drop_upcycling`); returns the model and its trace (learning curve,
    gradient traces, seconds)."""
    generator = torch.Generator().manual_seed(seed)
    dense_seconds = 0.0
    if variant.drop_upcycling is None:
        model = build_model(variant, task, size, seed)
    else:
        with tempfile.TemporaryDirectory() as folder:
            model, dense_seconds = upcycled_model(variant, task, size, seed, Path(folder))
        size = replace(size, steps=size.steps - size.steps // 2, lr=UPCYCLED_LR, warmup=0)
        generator.manual_seed(seed + 1)  # the MoE phase's data are not the dense phase's again
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.lr, weight_decay=size.weight_decay)
    table = task.table
    trace_ids = task.sample(size.trace_sequences, torch.Generator().manual_seed(EVAL_DATA_SEED + 1), table)
    has_difficulty_term = variant.local_target is not None or (
        variant.router == "dare" and variant.settings.get("difficulty_proxy", "nll") == "nll"
    )
    if variant.detach_layers is not None:
        set_predictor_detaching(model, variant.detach_layers)
    curve, started = [], time.perf_counter()
    for step in range(size.steps):
        if step == variant.switch_step:
            set_predictor_detaching(model, [b.layer_idx for b in model.moe_blocks if not b.gate.detach_input])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, size)
        input_ids = task.sample(size.batch_size, generator, table)
        outputs = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids)
        loss = outputs.loss
        terms = {"ce": outputs.ce_loss}
        if variant.local_target is not None:
            terms["difficulty"] = local_difficulty_loss(variant, model, outputs, input_ids, task.vocab_size)
            loss = loss + terms["difficulty"]
        elif outputs.difficulty_loss is not None:
            terms["difficulty"] = model.config.difficulty_loss_coef * outputs.difficulty_loss
        point = None
        if (step + 1) % size.trace_every == 0 or step == 0:
            point = {"step": step + 1, "ce": outputs.ce_loss.item()}
            if "difficulty" in terms:
                point["difficulty_term"] = terms["difficulty"].item()
            if trace_gradients and has_difficulty_term and terms["difficulty"].requires_grad:
                point.update(gradient_trace(model, terms))
                if step + 1 not in TENSOR_RATIO_STEPS:
                    del point["grad_ratio_by_tensor"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.update_routing_state()
        if point is not None:
            point.update(quick_metrics(model, trace_ids))
            curve.append(point)
    return model, {"curve": curve, "train_seconds": dense_seconds + time.perf_counter() - started}


@torch.no_grad()
def quick_metrics(model, input_ids: torch.Tensor) -> dict:
    """Accuracy per class and Avg K on a small held-out batch (the learning curve)."""
    was_training = model.training
    model.eval()
    with moe_inputs_at_hard_positions(model) as moe_inputs:
        outputs = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    model.train(was_training)
    classes = position_classes(input_ids.shape[1])[None, :-1].expand(input_ids.shape[0], -1)
    correct = (outputs.logits[:, :-1].argmax(-1) == input_ids[:, 1:]).float()
    point = {f"acc_{c}": correct[classes == i].mean().item() for i, c in enumerate(CLASSES)}
    point["avg_k"] = torch.stack([c.float() for c in outputs.expert_counts]).mean().item()
    point["participation_ratio_at_hard"] = [participation_ratio(x) for x in moe_inputs.stacked()]
    return point


# Evaluation ----------------------------------------------------------------------------------------------------


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties broken by order: continuous values)."""
    rx, ry = (v.argsort().argsort().double() for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx @ ry / (rx.norm() * ry.norm()).clamp(min=1e-12)).item()


@torch.no_grad()
def evaluate(model, task: LookupTask, size: RunSize, batch_size: int = 256) -> dict:
    """Metrics on the `size.eval_sequences` held-out sequences (labelled positions only: all but the last).

    Per class: accuracy, NLL, Avg K (mean over layers, and per layer), share of the experts beyond the first
    (how much of the extra compute the class gets); overall Avg K per layer and FLOPs per token; per layer with
    a difficulty signal: Spearman(signal, the token's NLL), its mean per class."""
    model.eval()
    eval_ids = task.sample(size.eval_sequences, torch.Generator().manual_seed(EVAL_DATA_SEED), task.table)
    labelled = position_classes(size.seq_len)[:-1]
    nll, correct, counts, difficulty, moe_inputs, first_choice = [], [], [], [], _Captured(), []
    for start in range(0, eval_ids.shape[0], batch_size):
        ids = eval_ids[start : start + batch_size]
        with moe_inputs_at_hard_positions(model, moe_inputs):
            outputs = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_router_logits=True)
        first_choice.append(
            torch.stack([r.view(*ids.shape, -1)[:, 1::4].argmax(-1).reshape(-1) for r in outputs.router_logits])
        )
        logits = outputs.logits[:, :-1].float()
        nll.append(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none"))
        correct.append((logits.argmax(-1) == ids[:, 1:]).float())
        counts.append(torch.stack([c[:, :-1].float() for c in outputs.expert_counts], dim=-1))  # (B, L-1, layers)
        if outputs.difficulty:
            difficulty.append(torch.stack([d[:, :-1].float() for d in outputs.difficulty], dim=-1))
    nll, correct, counts = torch.cat(nll), torch.cat(correct), torch.cat(counts)
    classes = labelled[None, :].expand_as(nll)
    layers = counts.shape[-1]
    extra = (counts - 1).clamp(min=0)
    metrics = {
        "tokens": nll.numel(),
        "accuracy": {c: correct[classes == i].mean().item() for i, c in enumerate(CLASSES)},
        "nll": {c: nll[classes == i].mean().item() for i, c in enumerate(CLASSES)},
        "avg_k": counts.mean().item(),
        "avg_k_per_layer": counts.mean((0, 1)).tolist(),
        "avg_k_by_class": {c: counts[classes == i].mean().item() for i, c in enumerate(CLASSES)},
        "avg_k_by_class_per_layer": {c: counts[classes == i].mean(0).tolist() for i, c in enumerate(CLASSES)},
        "extra_expert_share": {
            c: (extra[classes == i].sum() / extra.sum()).item() if extra.sum() > 0 else None
            for i, c in enumerate(CLASSES)
        },
        "class_share": {c: (classes == i).float().mean().item() for i, c in enumerate(CLASSES)},
    }
    # The MoE layers' inputs where the lookup happens (b positions): how many directions they spread over, and
    # whether a and b can be read from them (ridge probes).
    a, b = eval_ids[:, 0::4].reshape(-1), eval_ids[:, 1::4].reshape(-1) - task.keys
    metrics["moe_input_at_hard"] = [
        {
            "participation_ratio": participation_ratio(states),
            "probe_a": linear_probe(states, a, task.keys),
            "probe_b": linear_probe(states, b, task.keys),
        }
        for states in moe_inputs.stacked()
    ]
    # How many experts the hard tokens are spread over (their first choice: highest router logit), per layer.
    first_choice = torch.cat(first_choice, dim=1)
    shares = [torch.bincount(c, minlength=int(c.max()) + 1).double() / c.numel() for c in first_choice]
    metrics["first_expert_share_at_hard"] = [share.tolist() for share in shares]
    metrics["effective_experts_at_hard"] = [torch.special.entr(share).sum().exp().item() for share in shares]
    flops = flops_per_token_at(model, metrics["avg_k_per_layer"], context=(size.seq_len + 1) / 2)
    metrics["mflops_per_token"] = flops["flops_per_token"] / 1e6
    if difficulty:
        difficulty = torch.cat(difficulty)
        metrics["spearman_difficulty_nll"] = [
            spearman(difficulty[..., j].reshape(-1), nll.reshape(-1)) for j in range(difficulty.shape[-1])
        ]
        metrics["difficulty_by_class"] = {c: difficulty[classes == i].mean(0).tolist() for i, c in enumerate(CLASSES)}
    assert layers == len(model.moe_blocks)
    return metrics


class _Captured(list):
    def stacked(self) -> list[torch.Tensor]:
        """Per MoE layer, (N, H): the captured inputs of every forward, concatenated."""
        layers = len(self[0])
        return [torch.cat([forward[j] for forward in self]) for j in range(layers)]


@contextmanager
def moe_inputs_at_hard_positions(model, captured: _Captured | None = None):
    """Capture, per forward, each MoE layer's input at the b positions (whose next token is the hard one):
    a list per forward of (B * L / 4, H) float tensors, one per MoE layer. Reuse `captured` to gather several
    forwards."""
    captured = _Captured() if captured is None else captured
    current: list[torch.Tensor] = []

    def hook(module, args):
        states = args[0].detach()
        current.append(states[:, 1::4].reshape(-1, states.shape[-1]).float())
        if len(current) == len(model.moe_blocks):
            captured.append(list(current))
            current.clear()

    handles = [block.register_forward_pre_hook(hook) for block in model.moe_blocks]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def participation_ratio(states: torch.Tensor) -> float:
    """(sum of the covariance eigenvalues)^2 / sum of their squares: how many directions the (N, H) states
    spread over (H when evenly, 1 when along one)."""
    centred = states.double() - states.double().mean(0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / states.shape[0]).clamp(min=0)
    return (eigenvalues.sum() ** 2 / (eigenvalues**2).sum().clamp(min=1e-300)).item()


def linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, ridge: float = 1e-2) -> float:
    """Held-out accuracy of a ridge-regression probe (one-hot targets) fitted on the first two thirds of the rows,
    tested on the last third."""
    split = 2 * features.shape[0] // 3
    x = torch.cat([features, torch.ones_like(features[:, :1])], dim=-1).double()
    x = (x - torch.cat([x[:split, :-1].mean(0), torch.zeros(1, dtype=x.dtype)])) / torch.cat(
        [x[:split, :-1].std(0).clamp(min=1e-6), torch.ones(1, dtype=x.dtype)]
    )
    y = F.one_hot(labels, classes).double()
    gram = x[:split].T @ x[:split] + ridge * split * torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(gram, x[:split].T @ y[:split])
    return ((x[split:] @ weights).argmax(-1) == labels[split:]).double().mean().item()


def calibration_batches(task: LookupTask, size: RunSize) -> list[dict]:
    """Training-distribution sequences (not the held-out ones) for `hf_dare.calibrate`."""
    ids = task.sample(CALIBRATION_SEQUENCES, torch.Generator().manual_seed(CALIBRATION_DATA_SEED), task.table)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids.split(64)]


DIALLED = {"top_k", "hyperrouter", "dare", "top_p", "oracle"}


def dial_curve(model, task: LookupTask, size: RunSize, points) -> list[dict]:
    """Copies of the trained model calibrated to each Avg K of `points` and measured; a point the router's dial
    cannot reach (Top-K, HyperRouter: integers only) is left out."""
    if model.config.router not in DIALLED:
        return []
    batches = calibration_batches(task, size)
    curve = []
    for target in points:
        if ROUTERS[model.config.router].dial.kind == "integer" and float(target) != int(target):
            continue
        dialled = copy.deepcopy(model)
        with dialled_as_dare(dialled):
            record = hf_dare.calibrate(dialled, batches, avg_k=target, data_description="calibration sequences")
        metrics = evaluate(dialled, task, size)
        curve.append({"target_avg_k": target, "calibration_avg_k": record["achieved_avg_k"], **metrics})
    return curve


def run_variant(variant: Variant, keys: int, seed: int, size: RunSize, dial_points=(), trace_gradients=False):
    """Train `variant` on the task with table size `keys` from seed `seed`, evaluate, dial. Runs in a worker
    process with `--jobs`."""
    torch.set_num_threads(1)
    task = LookupTask(keys=keys, seq_len=size.seq_len)
    model, trace = train(variant, task, size, seed, trace_gradients)
    started = time.perf_counter()
    metrics = evaluate(model, task, size)
    dial = dial_curve(model, task, size, dial_points) if dial_points else []
    return {
        "variant": variant.name,
        "keys": keys,
        "seed": seed,
        "metrics": metrics,
        "dial": dial,
        "trace": trace["curve"],
        "train_seconds": trace["train_seconds"],
        "eval_seconds": time.perf_counter() - started,
    }


def run_all(tasks: list[tuple], jobs: int) -> list[dict]:
    """`run_variant(*task)` for every task, `jobs` at a time in worker processes, results in task order."""
    if jobs <= 1:
        results = []
        for task in tasks:
            result = run_variant(*task)
            print(progress(result), flush=True)
            results.append(result)
        return results
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_variant, *task) for task in tasks]
        results = []
        for future in futures:
            results.append(future.result())
            print(progress(results[-1]), flush=True)
        return results


def progress(run: dict) -> str:
    m = run["metrics"]
    return (
        f"{run['variant']} N={run['keys']} seed={run['seed']}: hard acc {m['accuracy']['hard']:.3f}, Avg K "
        f"{m['avg_k']:.2f} (easy {m['avg_k_by_class']['easy']:.2f}, hard {m['avg_k_by_class']['hard']:.2f}, "
        f"irreducible {m['avg_k_by_class']['irreducible']:.2f}), {run['train_seconds']:.0f} s"
    )


# Aggregation and reports ---------------------------------------------------------------------------------------


def metric(run: dict, path: str):
    """A metric of a run by dotted path: `accuracy.hard`, `avg_k`, `spearman_difficulty_nll.0`."""
    value = run["metrics"]
    for part in path.split("."):
        if value is None:
            return None
        value = value[int(part)] if isinstance(value, list) else value.get(part)
    return value


def paired(runs: list[dict], name: str, baseline: str, path: str, keys: int | None = None) -> list[float]:
    """`path` of `name` minus that of `baseline` from the same seed (and table size)."""
    base = {(r["keys"], r["seed"]): metric(r, path) for r in runs if r["variant"] == baseline}
    return [
        metric(r, path) - base[(r["keys"], r["seed"])]
        for r in runs
        if r["variant"] == name and (r["keys"], r["seed"]) in base and (keys is None or r["keys"] == keys)
    ]


def pm(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def signed(stat: dict, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{stat['mean']:+.{digits}f}"
    return f"{text} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else text


def of(runs: list[dict], name: str, keys: int, path: str) -> dict:
    return stats([metric(r, path) for r in runs if r["variant"] == name and r["keys"] == keys])


def seed_list(runs: list[dict], name: str, keys: int) -> str:
    return " ".join(str(r["seed"]) for r in runs if r["variant"] == name and r["keys"] == keys)


def pilot_markdown(results: dict) -> str:
    runs = results["runs"]
    lines = [
        "## Pilot: Top-1 vs Top-2 on hard tokens, by table size N",
        "",
        "Accuracy on the held-out tokens of each class (mean ± sample sd over seeds); Δ: Top-2 minus Top-1 with the "
        "same seed (paired), mean ± sd.",
        "",
        "| N | seeds | Top-1 hard acc | Top-2 hard acc | Δ hard (Top-2 − Top-1) | Top-1 per seed | Top-2 per seed "
        "| Top-1 hard NLL | Top-2 hard NLL | easy acc (both) | irreducible NLL (both; log N) |",
        "|" + " --- |" * 11,
    ]
    for keys in results["keys"]:
        per_seed = {
            name: " / ".join(
                f"{metric(r, 'accuracy.hard'):.3f}" for r in runs if r["variant"] == name and r["keys"] == keys
            )
            for name in ("top1", "top2")
        }
        easy = stats([metric(r, "accuracy.easy") for r in runs if r["keys"] == keys])
        irreducible = stats([metric(r, "nll.irreducible") for r in runs if r["keys"] == keys])
        lines.append(
            f"| {keys} | {seed_list(runs, 'top1', keys)} | {pm(of(runs, 'top1', keys, 'accuracy.hard'))} | "
            f"{pm(of(runs, 'top2', keys, 'accuracy.hard'))} | "
            f"{signed(stats(paired(runs, 'top2', 'top1', 'accuracy.hard', keys)))} | {per_seed['top1']} | "
            f"{per_seed['top2']} | {pm(of(runs, 'top1', keys, 'nll.hard'), 2)} | "
            f"{pm(of(runs, 'top2', keys, 'nll.hard'), 2)} | {pm(easy)} | {pm(irreducible, 3)} ({math.log(keys):.3f}) |"
        )
    return "\n".join(lines)


def settings_markdown(results: dict, names: list[str]) -> str:
    runs = results["runs"]
    keys = results["keys"][0]
    lines = [
        f"## DARE settings, trained from scratch (N = {keys})",
        "",
        "Hard / easy accuracy, hard NLL and irreducible NLL on the held-out tokens (mean ± sd over seeds); Δ vs "
        "Top-1: paired by seed. Avg K by class: experts per token (mean over both layers) for the token predicted "
        "at easy / hard / irreducible positions; extra → irr.: share of the experts beyond the first that go to "
        "irreducible positions (they are half of all positions). Spearman: predicted difficulty vs the token's "
        "NLL (layer 0 / layer 1).",
        "",
        "| variant | seeds | hard acc | per seed | Δ vs Top-1 | easy acc | hard NLL | irr. NLL | Avg K | "
        "Avg K easy / hard / irr. | extra → irr. | extra → hard | Spearman (L0 / L1) |",
        "|" + " --- |" * 13,
    ]
    for name in names:
        chosen = [r for r in runs if r["variant"] == name and r["keys"] == keys]
        if not chosen:
            continue
        per_seed = " / ".join(f"{metric(r, 'accuracy.hard'):.3f}" for r in chosen)
        by_class = " / ".join(pm(of(runs, name, keys, f"avg_k_by_class.{c}"), 2) for c in CLASSES_ORDER)
        spearman_text = " / ".join(
            pm(of(runs, name, keys, f"spearman_difficulty_nll.{j}"), 2)
            for j in range(len(chosen[0]["metrics"]["avg_k_per_layer"]))
        )
        if of(runs, name, keys, "spearman_difficulty_nll.0")["mean"] is None:
            spearman_text = "-"
        lines.append(
            f"| `{name}` | {seed_list(runs, name, keys)} | {pm(of(runs, name, keys, 'accuracy.hard'))} | {per_seed} | "
            f"{signed(stats(paired(runs, name, 'top1', 'accuracy.hard', keys)))} | "
            f"{pm(of(runs, name, keys, 'accuracy.easy'))} | {pm(of(runs, name, keys, 'nll.hard'), 2)} | "
            f"{pm(of(runs, name, keys, 'nll.irreducible'), 3)} | {pm(of(runs, name, keys, 'avg_k'), 2)} | {by_class} | "
            f"{pm(of(runs, name, keys, 'extra_expert_share.irreducible'), 2)} | "
            f"{pm(of(runs, name, keys, 'extra_expert_share.hard'), 2)} | {spearman_text} |"
        )
    return "\n".join(lines)


CLASSES_ORDER = ("easy", "hard", "irreducible")


def representation_markdown(results: dict, names: list[str]) -> str:
    """The MoE layers' inputs at the hard positions: spread (participation ratio) and what probes read there."""
    runs, keys = results["runs"], results["keys"][0]
    lines = [
        "## The MoE inputs where the lookup happens (b positions)",
        "",
        "Participation ratio (PR) of each MoE layer's input at the positions whose next token is the hard one: "
        "(sum of covariance eigenvalues)^2 / sum of their squares, 64 = spread evenly over the hidden size, 1 = one "
        "direction; at steps 100 / 300 / end of training (256 held-out sequences) and on the held-out set. Probe a / "
        "b: held-out accuracy of a ridge probe reading the key a (from the previous position) or b (the current "
        "token) from that input (layer 0 / layer 1). Experts of hard tokens: exp(entropy) of the distribution of the "
        "hard tokens' first choice (highest router logit) over the experts, 4 = spread evenly, 1 = all on one. "
        "Mean ± sd over seeds.",
        "",
        "| variant | hard acc | PR L0 (step 100 / 300 / end) | PR L1 (step 100 / 300 / end) | PR L0 / L1 held-out | "
        "probe a L0 / L1 | probe b L0 / L1 | experts of hard tokens L0 / L1 |",
        "|" + " --- |" * 8,
    ]
    for name in names:
        chosen = [r for r in runs if r["variant"] == name and r["keys"] == keys]
        if not chosen or "moe_input_at_hard" not in chosen[0]["metrics"]:
            continue

        def curve(layer, chosen=chosen):
            cells = []
            for step in (100, 300, None):
                values = [
                    (r["trace"][-1] if step is None else next((p for p in r["trace"] if p["step"] == step), {})).get(
                        "participation_ratio_at_hard", [None, None]
                    )[layer]
                    for r in chosen
                ]
                cells.append(pm(stats(values), 1))
            return " / ".join(cells)

        def held_out(key, digits, chosen=chosen):
            return " / ".join(
                pm(stats([r["metrics"]["moe_input_at_hard"][j][key] for r in chosen]), digits)
                for j in range(len(chosen[0]["metrics"]["moe_input_at_hard"]))
            )

        spread = "-"
        if "effective_experts_at_hard" in chosen[0]["metrics"]:
            spread = " / ".join(pm(of(runs, name, keys, f"effective_experts_at_hard.{j}"), 2) for j in range(2))
        lines.append(
            f"| `{name}` | {pm(of(runs, name, keys, 'accuracy.hard'))} | {curve(0)} | {curve(1)} | "
            f"{held_out('participation_ratio', 1)} | {held_out('probe_a', 2)} | {held_out('probe_b', 2)} | "
            f"{spread} |"
        )
    return "\n".join(lines)


def gradient_markdown(results: dict, names: list[str]) -> str:
    """Gradient traces: CE vs the difficulty term at the backbone, over training (mean over seeds)."""
    runs = results["runs"]
    lines = [
        "## Gradients at the backbone: CE vs the difficulty term",
        "",
        "Norm of the gradient of CE and of the difficulty term (alpha * L_diff, or the LOCAL one) over all "
        "parameters but the predictors, their cosine, and the median over parameter tensors of the norm ratio "
        "(difficulty / CE: what Adam's per-parameter scaling sees); mean over seeds at each step. Hard acc: the "
        "learning curve on 256 held-out sequences.",
        "",
        "| variant | step | CE | difficulty term | ‖g_CE‖ | ‖g_diff‖ | cos | median ratio | hard acc |",
        "|" + " --- |" * 9,
    ]
    for name in names:
        chosen = [r for r in runs if r["variant"] == name]
        if not chosen or "grad_norm_ce" not in (chosen[0]["trace"][-1] if chosen[0]["trace"] else {}):
            continue
        steps = [p["step"] for p in chosen[0]["trace"]]
        shown = [s for s in steps if s in (1, 100, 200, 300, 500, 800, 1000, 1500) or s == steps[-1]]
        for s in sorted(set(shown)):
            points = [p for r in chosen for p in r["trace"] if p["step"] == s]

            def mean(key, points=points):
                values = [p[key] for p in points if key in p]
                return sum(values) / len(values) if values else float("nan")

            lines.append(
                f"| `{name}` | {s} | {mean('ce'):.3f} | {mean('difficulty_term'):.3f} | {mean('grad_norm_ce'):.3g} | "
                f"{mean('grad_norm_difficulty'):.3g} | {mean('grad_cosine'):+.3f} | {mean('grad_ratio_median'):.3g} | "
                f"{mean('acc_hard'):.3f} |"
            )
    return "\n".join(lines)


def main_markdown(results: dict) -> str:
    runs, keys = results["runs"], results["keys"][0]
    names = list(dict.fromkeys(r["variant"] for r in runs))
    lines = [
        f"## Routers at matched compute (N = {keys})",
        "",
        "Held-out accuracy / NLL per class (mean ± sd over seeds); Δ: paired by seed. MFLOPs/token: `hf_dare.evaluation.flops` "
        "(2 N_A + attention, LM head excluded).",
        "",
        "| variant | seeds | hard acc | Δ vs Top-1 | Δ vs Top-2 | easy acc | hard NLL | irr. NLL | Avg K | "
        "Avg K easy / hard / irr. | MFLOPs/token | Spearman (L0 / L1) |",
        "|" + " --- |" * 12,
    ]
    for name in names:
        chosen = [r for r in runs if r["variant"] == name]
        by_class = " / ".join(pm(of(runs, name, keys, f"avg_k_by_class.{c}"), 2) for c in CLASSES_ORDER)
        spearman_text = "-"
        if of(runs, name, keys, "spearman_difficulty_nll.0")["mean"] is not None:
            spearman_text = " / ".join(
                pm(of(runs, name, keys, f"spearman_difficulty_nll.{j}"), 2)
                for j in range(len(chosen[0]["metrics"]["avg_k_per_layer"]))
            )
        lines.append(
            f"| `{name}` | {seed_list(runs, name, keys)} | {pm(of(runs, name, keys, 'accuracy.hard'))} | "
            f"{signed(stats(paired(runs, name, 'top1', 'accuracy.hard')))} | "
            f"{signed(stats(paired(runs, name, 'top2', 'accuracy.hard')))} | {pm(of(runs, name, keys, 'accuracy.easy'))} | "
            f"{pm(of(runs, name, keys, 'nll.hard'), 2)} | {pm(of(runs, name, keys, 'nll.irreducible'), 3)} | "
            f"{pm(of(runs, name, keys, 'avg_k'), 2)} | {by_class} | {pm(of(runs, name, keys, 'mflops_per_token'), 3)} | "
            f"{spearman_text} |"
        )
    dialled = [r for r in runs if r["dial"]]
    if dialled:
        lines += [
            "",
            "## Compute dial (`hf_dare.calibrate` on 256 training-distribution sequences, no training)",
            "",
            "| variant | target Avg K | Avg K (held-out) | hard acc | easy acc | Avg K hard | MFLOPs/token |",
            "|" + " --- |" * 7,
        ]
        for name in names:
            targets = sorted({p["target_avg_k"] for r in dialled if r["variant"] == name for p in r["dial"]})
            for target in targets:
                points = [p for r in dialled if r["variant"] == name for p in r["dial"] if p["target_avg_k"] == target]

                def s(path, points=points):
                    return stats([metric({"metrics": p}, path) for p in points])

                lines.append(
                    f"| `{name}` | {target:.1f} | {pm(s('avg_k'), 2)} | {pm(s('accuracy.hard'))} | "
                    f"{pm(s('accuracy.easy'))} | {pm(s('avg_k_by_class.hard'), 2)} | {pm(s('mflops_per_token'), 3)} |"
                )
    return "\n".join(lines)


def plot_frontier(results: dict, path: Path) -> Path:
    """Hard-token accuracy vs MFLOPs per token: every variant (error bars: sd over seeds) and its dial curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, keys = results["runs"], results["keys"][0]
    names = list(dict.fromkeys(r["variant"] for r in runs))
    labels = {v["name"]: v["label"] or v["name"] for v in results["variants"]}
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>ph*"
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for i, name in enumerate(names):
        color = colors[i % len(colors)]
        x, y = of(runs, name, keys, "mflops_per_token"), of(runs, name, keys, "accuracy.hard")
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt=markers[i % len(markers)], color=color, capsize=3,
                    markersize=7, label=labels.get(name, name))  # fmt: skip
        dialled = [r for r in runs if r["variant"] == name and r["dial"]]
        targets = sorted({p["target_avg_k"] for r in dialled for p in r["dial"]})
        if len(targets) > 1:
            curve = []
            for target in targets:
                points = [{"metrics": p} for r in dialled for p in r["dial"] if p["target_avg_k"] == target]
                curve.append(
                    (
                        stats([metric(p, "mflops_per_token") for p in points]),
                        stats([metric(p, "accuracy.hard") for p in points]),
                    )
                )
            ax.errorbar([c[0]["mean"] for c in curve], [c[1]["mean"] for c in curve], yerr=[c[1]["std"] for c in curve],
                        fmt="--", color=color, alpha=0.6, capsize=2, label=f"{labels.get(name, name)}, dialled")  # fmt: skip
    ax.set(xlabel="MFLOPs per token (hf_dare.evaluation.flops)", ylabel="accuracy on hard tokens (held-out)")
    ax.set_title(f"Hard-token accuracy vs compute, table size N = {keys} (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def header(results: dict) -> str:
    size = results["size"]
    return (
        f"Command: `{results['command']}`. Runtime {results['seconds'] / 60:.1f} min on {results['machine']}, "
        f"{results['jobs']} job(s) at once, 1 torch thread each. Model: 2-layer Qwen2 decoder (hidden "
        f"{size['hidden_size']}, {size['heads']} heads), both layers MoE with {NUM_EXPERTS} experts of width "
        f"{size['expert_size']}; trained from scratch, AdamW lr {size['lr']} (warmup {size['warmup']}, cosine to 10%), "
        f"weight decay {size['weight_decay']}, clip 1.0, {size['steps']} steps of {size['batch_size']} x "
        f"{size['seq_len']} tokens; `update_routing_state()` once per step. Evaluated on {size['eval_sequences']} "
        f"held-out sequences ({size['eval_sequences'] * (size['seq_len'] - 1):,} labelled tokens, a quarter of them "
        "hard)."
    )


def rounded(value, digits: int = 5):
    """`value` with every float rounded to `digits` significant digits (the results JSON stays small)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def write_report(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    mode = results["mode"]
    (out / f"{mode}.json").write_text(json.dumps(rounded(results)))
    names = [v["name"] for v in results["variants"]]
    if mode == "pilot":
        body = pilot_markdown(results)
    elif mode == "dare_settings":
        body = "\n\n".join(
            [
                settings_markdown(results, names),
                representation_markdown(results, names),
                gradient_markdown(results, names),
            ]
        )
    else:
        body = main_markdown(results)
    (out / f"{mode}.md").write_text(f"# Difficulty benchmark: {mode}\n\n{header(results)}\n\n{body}\n")
    written = [out / f"{mode}.json", out / f"{mode}.md"]
    if mode == "benchmark":
        written.append(plot_frontier(results, out / "frontier.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--pilot", action="store_true", help="Top-1 vs Top-2 over the table sizes --keys")
    mode.add_argument("--dare-settings", action="store_true", help="DARE's settings from scratch, gradient traces")
    parser.add_argument("--quick", action="store_true", help="a few steps on a tiny table (seconds; tests)")
    parser.add_argument("--keys", type=int, nargs="+", default=None,
                        help="table sizes N (default: pilot 48 64 96 128; else 64; --quick 8)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 3 4 (--quick: 0)")
    parser.add_argument("--variants", default=None, help="comma-separated variant names (default: the mode's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (override)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, in worker processes")
    parser.add_argument("--include-runs", type=Path, default=None,
                        help="a results JSON of an earlier run whose runs of the same variants, N and seeds are "
                             "taken as they are instead of training them again (same code, same seeds)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default docs/difficulty_benchmark; --quick: runs/difficulty_quick)")  # fmt: skip
    parser.add_argument("--report", type=Path, default=None,
                        help="only write the report of this results JSON again (into --out or its folder)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.report:
        for path in write_report(json.loads(args.report.read_text()), args.out or args.report.parent):
            print(f"wrote {path}")
        return 0
    torch.set_num_threads(1)
    started = time.perf_counter()

    size = QUICK if args.quick else FULL
    if args.steps:
        size = replace(size, steps=args.steps)
    if args.pilot:
        mode, variants, dial = "pilot", PILOT_VARIANTS, ()
    elif args.dare_settings:
        mode, variants, dial = "dare_settings", DARE_SETTINGS_VARIANTS, ()
    else:
        mode, variants, dial = "benchmark", BENCHMARK_VARIANTS, (QUICK_DIAL if args.quick else DIAL)
        if args.quick and not args.variants:
            variants = [v for v in variants if v.name in QUICK_VARIANTS]
    if args.variants:
        wanted = args.variants.split(",")
        known = {v.name: v for v in (*BENCHMARK_VARIANTS, *DARE_SETTINGS_VARIANTS, *MECHANISM_VARIANTS)}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            parser.error(f"unknown variants {unknown}; known: {', '.join(known)}")
        variants = [known[w] for w in wanted]
    keys = args.keys or ([8] if args.quick else [48, 64, 96, 128] if args.pilot else [64])
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2, 3, 4])
    out = args.out or (Path("runs/difficulty_quick") if args.quick else Path("docs/difficulty_benchmark"))
    trace = mode == "dare_settings"
    tasks = [(v, n, s, size, dial, trace) for n in keys for v in variants for s in seeds]
    earlier = {}
    if args.include_runs:
        previous = json.loads(args.include_runs.read_text())
        if previous["size"] == asdict(size):
            routers = {v["name"]: v["router"] for v in previous["variants"]}
            earlier = {
                (r["variant"], r["keys"], r["seed"]): r
                for r in previous["runs"]
                if not dial or r["dial"] or routers[r["variant"]] not in DIALLED  # dialled where it can be
            }
    new_runs = iter(run_all([t for t in tasks if (t[0].name, t[1], t[2]) not in earlier], args.jobs))
    runs = [earlier.get((t[0].name, t[1], t[2])) or next(new_runs) for t in tasks]
    results = {
        "mode": mode,
        "command": "python examples/difficulty_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "jobs": args.jobs,
        "size": asdict(size),
        "keys": keys,
        "seeds": seeds,
        "variants": [{**asdict(v), "settings": dict(v.settings)} for v in variants],
        "runs": runs,
    }
    results["seconds"] = time.perf_counter() - started
    for path in write_report(results, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
