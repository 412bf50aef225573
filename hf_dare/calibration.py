"""An inference-time compute dial: `calibrate` sets a trained model's routing so that it uses a requested Avg K
(or requested shares of tokens using 1..M experts) on calibration data, without training.

What moves is the routers' `Dial` (`hf_dare.modeling.routing.Dial`), by its kind:

- `shares` (DARE): each layer's thresholds tau_1 < ... < tau_{M-1} become quantiles of that layer's own
  difficulty signal on the calibration data, at the cumulative shares pi_1, pi_1 + pi_2, ... of the target
  distribution. Layers are calibrated in order, each on signals computed with the layers before it already
  calibrated (a layer's input depends on the routing of the layers below it, so one pass per layer gives every
  layer its exact shares). An Avg K is turned into a target distribution first (`distribution_for_avg_k`), and
  the config's distribution becomes the calibrated one, so training further keeps the dial.
- `scalar` (Top-p's p): the one value of the model is searched by bisection so that those layers' Avg K on the
  calibration data is the requested one (Avg K only: one number sets no shares).
- `integer` (Top-K's k): the value becomes the requested Avg K, which must be an integer. In a model that mixes
  such layers with layers of another dial, only the latter are dialled: the integer ones keep their value.
- A router without a dial (LTDR, ReMoE, DynMoE, MoE++) is refused, as are two kinds of non-integer dial in one
  model.

The model runs in inference mode (`model.eval()`, no gradients: DARE's predictor dropout is off) and is left in
the mode it came in. The calibration is recorded in `config.training_stages` (and the measured routing in
`config.routing_statistics`), so the model card of a saved calibrated model shows it.
"""

import contextlib
import itertools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .data import calibration_batches
from .errors import InputError, existing_model_folder
from .modeling import MoEConfigError, model_class_for
from .modeling.routers import is_distribution
from .modeling.routing import ROUTERS, Dial, cumulative_levels
from .modeling.statistics import avg_k, avg_k_per_layer, avg_k_sums, load_cv, statistics_record

ZERO_SHARE = 1e-9  # cumulative shares this close to 0 or 1 leave no token below / above their threshold
MODEL_INPUTS_DROPPED = ("labels", "num_items_in_batch", "shift_labels")


class _StopForward(Exception):
    """Raised by a hook once the MoE layer it waits for has routed: nothing after it is needed."""


def distribution_for_avg_k(avg_k: float, base: Sequence[float]) -> list[float]:
    """The distribution over 1..M experts (M = len(`base`)) with mean `avg_k` that is closest to `base` (the
    trained Pi) in KL divergence: the exponential tilting pi_k ∝ base_k * exp(lambda * k), lambda found by
    bisection. With a uniform `base` this is the maximum-entropy distribution with that mean. When `avg_k` is
    outside the range `base`'s support can reach (a base with zeros), the uniform base is used. Avg K = 1 or M
    give all tokens 1 or M experts."""
    m = len(base)
    if not 1.0 <= avg_k <= m:
        raise InputError(f"avg_k: got {avg_k}; allowed: 1 <= avg_k <= {m} (max_experts)")
    if avg_k <= 1.0 or m == 1:
        return [1.0] + [0.0] * (m - 1)
    if avg_k >= m:
        return [0.0] * (m - 1) + [1.0]
    weights = torch.tensor([float(p) for p in base], dtype=torch.float64)
    support = (weights > 0).nonzero().flatten() + 1
    if not support.min() < avg_k < support.max():
        weights = torch.ones(m, dtype=torch.float64)
    log_base = weights.clamp(min=1e-300).log().masked_fill(weights <= 0, float("-inf"))
    ks = torch.arange(1, m + 1, dtype=torch.float64)

    def tilted(lam: float) -> torch.Tensor:
        return torch.softmax(log_base + lam * ks, dim=0)

    low, high = -1.0, 1.0
    while (tilted(low) * ks).sum() > avg_k:
        low *= 2
    while (tilted(high) * ks).sum() < avg_k:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if (tilted(mid) * ks).sum() < avg_k:
            low = mid
        else:
            high = mid
    return tilted((low + high) / 2).tolist()


def thresholds_for_shares(
    values: torch.Tensor, cumulative: Sequence[float], balance_total: bool = False
) -> torch.Tensor:
    """Strictly increasing float32 thresholds tau_1 < ... < tau_{M-1} such that the share of `values` below tau_j
    is as close as the values allow to `cumulative[j]` (N_e = 1 + #{j : value >= tau_j}, as DARE counts).

    Equal values cannot be split by a threshold: each tau_j is placed in the gap between two consecutive distinct
    values (at its midpoint) whose count below is nearest to the target count, never below the previous one.
    With `balance_total`, each target count also carries the rounding errors of the thresholds before it, so
    that their total, hence the Avg K, is as close as possible (what an Avg K target wants). Thresholds that fall
    in the same gap are spread inside it; below every value they step down from the smallest, above every value
    they step up from the largest. A share of 0 holds for every token, not only for the calibration data: a
    threshold at level 1 (no token may reach it: the shares above it are 0) is put out of reach of any value,
    one at level 0 (every token must reach it) below any value (+-float32 max, halved per further threshold)."""
    sorted_values = values.detach().float().flatten().sort().values
    n = sorted_values.numel()
    if n == 0:
        raise InputError("no calibration tokens: the data gave no real token to this layer")
    distinct, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    # achievable[i] = number of values below distinct[i] (i < U), and n above every value (i = U).
    achievable = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).double()
    gaps, carry, previous = [], 0.0, 0
    for level in cumulative:
        target = level * n + (carry if balance_total else 0.0)
        i = int(torch.searchsorted(achievable, torch.tensor([target], dtype=torch.float64)).item())
        candidates = [c for c in (i - 1, i) if previous <= c < len(achievable)] or [previous]
        best = min(candidates, key=lambda c: (abs(achievable[c].item() - target), c))
        carry = target - achievable[best].item()
        gaps.append(best)
        previous = best

    spread = (sorted_values[-1] - sorted_values[0]).item()
    step = spread / n if spread > 0 else max(abs(sorted_values[0].item()) * 1e-3, 1e-3)
    thresholds = []
    for gap, group in itertools.groupby(gaps):
        count = len(list(group))
        if gap == 0:  # every value at or above: the last threshold at the smallest value
            top = distinct[0].item()
            thresholds += [top - step * (count - 1 - r) for r in range(count)]
        elif gap == len(distinct):  # every value below
            bottom = distinct[-1].item()
            thresholds += [bottom + step * (r + 1) for r in range(count)]
        else:
            low, high = distinct[gap - 1].item(), distinct[gap].item()
            thresholds += [low + (high - low) * (r + 1) / (count + 1) for r in range(count)]
    taus = torch.tensor(thresholds, dtype=torch.float32)
    # float32 rounding may put a threshold on the value below its gap (which would count it as above): step over.
    for j, gap in enumerate(gaps):
        if 0 < gap < len(distinct) and taus[j] <= distinct[gap - 1]:
            taus[j] = torch.nextafter(distinct[gap - 1], torch.tensor(math.inf))
    for j in range(1, len(taus)):  # strictly increasing, whatever rounding did
        if taus[j] <= taus[j - 1]:
            taus[j] = torch.nextafter(taus[j - 1], torch.tensor(math.inf))
    # Out of reach, finite (a threshold EMA with momentum 0 must not compute 0 * inf), still strictly increasing.
    unreachable = torch.finfo(torch.float32).max
    above = [j for j, level in enumerate(cumulative) if level >= 1.0 - ZERO_SHARE]
    below = [j for j, level in enumerate(cumulative) if level <= ZERO_SHARE]
    for r, j in enumerate(reversed(above)):
        taus[j] = unreachable / 2**r
    for r, j in enumerate(below):
        taus[j] = -unreachable / 2**r
    return taus


def _moe_blocks(model: nn.Module) -> list:
    blocks = getattr(model, "moe_blocks", None)
    if not blocks:
        raise InputError(f"{type(model).__name__} has no MoE layers to calibrate (an hf-dare MoE model is needed)")
    return blocks


def _router_names(model: nn.Module) -> dict[int, str]:
    config = model.config
    return {block.layer_idx: config.router_for(block.layer_idx) for block in model.moe_blocks}


def _model_inputs(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
        if k not in MODEL_INPUTS_DROPPED
    }


@torch.no_grad()
def _collect(model: nn.Module, batches: list[dict], blocks: list, record) -> None:
    """Run `batches` through `model`; after each of `blocks` routes, `record(block, routing, token_mask)`. The
    forward stops after the last of `blocks`."""
    last = blocks[-1]

    def hook_for(block):
        def hook(module, args, kwargs, routing):
            token_mask = args[1] if len(args) > 1 else kwargs.get("token_mask")
            record(block, routing, token_mask)
            if block is last:
                raise _StopForward

        return hook

    handles = [block.gate.register_forward_hook(hook_for(block), with_kwargs=True) for block in blocks]
    try:
        for batch in batches:
            with contextlib.suppress(_StopForward):
                model(**_model_inputs(batch, model.device))
    finally:
        for handle in handles:
            handle.remove()


def _real(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    return values if token_mask is None else values[token_mask.reshape(-1).to(values.device).bool()]


@torch.no_grad()
def _measure(model: nn.Module, batches: list[dict], layers: Sequence[int]) -> dict:
    """Routing of the calibrated model on the batches: Avg K over `layers` (all tokens, text, vision), per MoE
    layer, and per layer the shares of tokens using 0..W experts."""
    blocks = model.moe_blocks
    width = max(int(model.config.max_experts_per_token), model.config.num_experts)
    k_sum = tokens = load_sum = None
    hist = torch.zeros(len(blocks), width + 1, dtype=torch.float64)
    for batch in batches:
        outputs = model(**_model_inputs(batch, model.device))
        counts = outputs.expert_counts
        sums = avg_k_sums(counts, outputs.token_mask, getattr(outputs, "vision_mask", None))
        k_sum, tokens = (
            (sums[0].cpu(), sums[1].cpu()) if k_sum is None else (k_sum + sums[0].cpu(), tokens + sums[1].cpu())
        )
        for i, layer_counts in enumerate(counts):
            real = _real(layer_counts.reshape(-1), outputs.token_mask).cpu()
            hist[i] += torch.bincount(real.clamp(max=width), minlength=width + 1).double()
        load = torch.stack([layer_load.cpu().double() for layer_load in outputs.expert_load])
        load_sum = load if load_sum is None else load_sum + load
    index = [i for i, block in enumerate(blocks) if block.layer_idx in layers]
    selected = (k_sum[index], tokens[index])
    shares = (hist / hist.sum(-1, keepdim=True).clamp(min=1)).tolist()
    return {
        "avg_k": avg_k(*selected),
        "avg_k_text": avg_k(*selected, "text"),
        "avg_k_vision": avg_k(*selected, "vision"),
        "avg_k_all_layers": avg_k(k_sum, tokens),
        "avg_k_per_layer": dict(zip([b.layer_idx for b in blocks], avg_k_per_layer(k_sum, tokens), strict=True)),
        "shares_per_layer": {block.layer_idx: shares[i] for i, block in enumerate(blocks)},
        "load_cv_per_layer": load_cv(load_sum / len(batches)).tolist(),
        "tokens": int(tokens[0].sum().item()),
    }


def _check_target(avg_k: float | None, target_distribution: Sequence[float] | None) -> None:
    if (avg_k is None) == (target_distribution is None):
        raise InputError("calibrate: give exactly one of avg_k and target_distribution")
    if avg_k is not None and not (isinstance(avg_k, (int, float)) and math.isfinite(avg_k)):
        raise InputError(f"avg_k: got {avg_k!r}; allowed: a finite number")
    if target_distribution is not None and not is_distribution(target_distribution):
        raise InputError(
            f"target_distribution: {list(target_distribution)} sums to {sum(map(float, target_distribution)):.6g}; "
            "allowed: non-negative shares of tokens using 1..M experts that sum to 1"
        )


def _dialled_routers(routers: dict[int, str]) -> tuple[str, list[int]]:
    """The router the dial moves and its layers; refuses routers without a dial and two non-integer dials."""
    no_dial = sorted({name for name in routers.values() if ROUTERS[name].dial is None})
    if no_dial:
        with_dial = [name for name, router in ROUTERS.items() if router.dial is not None]
        raise InputError(
            f"calibrate: the {', '.join(repr(n) for n in no_dial)} router has no compute dial (layers "
            f"{[i for i, n in routers.items() if n in no_dial]}); allowed: {', '.join(repr(n) for n in with_dial)}"
        )
    names = list(dict.fromkeys(routers.values()))
    finer = [name for name in names if ROUTERS[name].dial.kind != "integer"]
    if len(finer) > 1:
        raise InputError(
            f"calibrate: a model with {' and '.join(repr(n) for n in finer)} layers has {len(finer)} dials; "
            "calibrate one kind"
        )
    integer_settings = {ROUTERS[name].dial.setting for name in names}
    if not finer and len(integer_settings) > 1:
        raise InputError(f"calibrate: the routers {names} have dials on different settings; calibrate one kind")
    chosen = finer or names
    return ROUTERS[chosen[0]].dial, [i for i, name in routers.items() if name in chosen]


def _signals(model, batches, block) -> torch.Tensor:
    """The difficulty signal at `block` (`Routing.difficulty`) for every real token of the batches, (N,) on the
    CPU."""
    seen: list[torch.Tensor] = []
    _collect(model, batches, [block], lambda b, routing, mask: seen.append(_real(routing.difficulty, mask).cpu()))
    return torch.cat(seen)


def _calibrate_shares(model, batches, layers, avg_k, target_distribution, dial: Dial) -> dict:
    config = model.config
    blocks = [block for block in model.moe_blocks if block.layer_idx in layers]
    m = config.experts_per_token_of(config.router_for(layers[0]))
    if target_distribution is not None:
        if len(target_distribution) != m:
            raise InputError(
                f"target_distribution: has {len(target_distribution)} entries but max_experts={m}; allowed: one "
                "share per expert count 1..max_experts"
            )
        pi = [float(p) / sum(target_distribution) for p in target_distribution]
        how = "the requested shares"
    else:
        if not 1.0 <= avg_k <= m:
            raise InputError(f"avg_k: got {avg_k}, outside 1..{m}; allowed: 1 <= avg_k <= max_experts ({m})")
        trained = getattr(config, dial.setting)
        pi = distribution_for_avg_k(avg_k, trained)
        how = f"the trained Pi {[round(p, 4) for p in trained]} tilted to mean {avg_k}"
    cumulative = cumulative_levels(pi)
    thresholds = {}
    for block in blocks:  # in layer order: each layer sees the layers below it calibrated
        taus = thresholds_for_shares(_signals(model, batches, block), cumulative, balance_total=avg_k is not None)
        block.gate.set_thresholds(taus, cumulative)
        thresholds[block.layer_idx] = taus.tolist()
    setattr(config, dial.setting, [float(p) for p in pi])
    return {"distribution": [float(p) for p in pi], "distribution_from": how, "thresholds": thresholds}


def _calibrate_scalar(model, batches, layers, avg_k, dial: Dial, iterations: int = 40) -> dict:
    config = model.config
    e = config.num_experts
    if not 1.0 <= avg_k <= e:
        raise InputError(f"avg_k: got {avg_k}, outside 1..{e}; allowed: 1 <= avg_k <= num_experts ({e})")
    blocks = [block for block in model.moe_blocks if block.layer_idx in layers]

    def avg_k_at(value: float) -> float:
        for block in blocks:
            block.gate.set_dial(value)
        totals = torch.zeros(2, dtype=torch.float64)

        def record(block, routing, mask):
            counts = _real(routing.expert_counts, mask)
            totals.add_(torch.tensor([counts.sum().item(), counts.numel()], dtype=torch.float64))

        _collect(model, batches, blocks, record)
        return (totals[0] / totals[1].clamp(min=1)).item()

    low, high = dial.low, dial.high
    best = (abs(avg_k_at(high) - avg_k), high)
    for _ in range(iterations):
        if best[0] <= 1e-4:
            break
        mid = (low + high) / 2
        achieved = avg_k_at(mid)
        best = min(best, (abs(achieved - avg_k), mid))
        if achieved < avg_k:
            low = mid
        else:
            high = mid
    value = best[1]
    for block in blocks:
        block.gate.set_dial(value)
    _set_config(config, dial.setting, value)
    return {dial.setting: value}


def _calibrate_integer(model, layers, avg_k, target_distribution, dial: Dial) -> dict:
    config = model.config
    e = config.num_experts
    if target_distribution is not None:
        nonzero = [k + 1 for k, p in enumerate(target_distribution) if p > 0]
        if len(nonzero) != 1:
            raise InputError(
                f"target_distribution: {list(target_distribution)} for a router that gives every token k experts; "
                "allowed: all tokens on one expert count (e.g. 0 1 0 0 for k=2), or an integer avg_k"
            )
        avg_k = nonzero[0]
    if not 1 <= avg_k <= e:
        raise InputError(f"avg_k: got {avg_k}, outside 1..{e}; allowed: 1 <= avg_k <= num_experts ({e})")
    if float(avg_k) != int(avg_k):
        raise InputError(
            f"avg_k: got {avg_k} for a router whose dial is k (experts per token); allowed: an integer 1..{e}"
        )
    k = int(avg_k)
    _set_config(config, dial.setting, k)
    for block in model.moe_blocks:
        if block.layer_idx in layers:
            block.gate.set_dial(k)
    return {dial.setting: k}


def _set_config(config, field: str, value) -> None:
    """Set the dialled config field, refusing a value the config's other settings do not allow."""
    before = getattr(config, field)
    setattr(config, field, value)
    try:
        config.validate_moe_settings()
    except MoEConfigError as error:
        setattr(config, field, before)
        raise InputError(f"calibrate: {error}") from error


def calibrate(
    model: nn.Module,
    dataloader: Iterable[dict],
    avg_k: float | None = None,
    target_distribution: Sequence[float] | None = None,
    data_description: str | None = None,
    max_batches: int | None = None,
) -> dict:
    """Dial `model`'s compute on calibration data, without training: afterwards it uses `avg_k` experts per token
    on average, or the shares `target_distribution` of tokens using 1..M experts, on that data (see the module
    docstring for what moves per router).

    `dataloader`: batches of model inputs (dicts of tensors, e.g. a torch `DataLoader` with
    `LlavaDataCollator` or `DataCollatorForLanguageModeling`); it is read once (at most `max_batches`) and kept in
    memory, `labels` are ignored, and only real tokens (`attention_mask`) count, image tokens included.
    `data_description` says in the record what the data was.

    Raises `InputError` (a `ValueError`) naming the problem for an Avg K outside 1..M, a distribution that does not fit the router,
    or a router without a dial (`ltdr`, `remoe`, `dynmoe`, `moepp`). Returns the record appended to
    `config.training_stages` (target, distribution, what was set, achieved Avg K and shares per layer)."""
    _check_target(avg_k, target_distribution)
    _moe_blocks(model)
    dial, layers = _dialled_routers(_router_names(model))
    kind = model.config.router_for(layers[0])
    if dial.kind == "scalar" and target_distribution is not None:
        raise InputError(
            f"target_distribution: the {kind!r} router's one dial ({dial.setting}) sets the Avg K, not the shares of "
            "1..M experts; allowed: avg_k"
        )
    batches = list(itertools.islice(dataloader, max_batches))
    if not batches:
        raise InputError("calibrate: the dataloader gave no batch")
    was_training = model.training
    model.eval()
    try:
        if dial.kind == "integer":
            setting = _calibrate_integer(model, layers, avg_k, target_distribution, dial)
        elif dial.kind == "shares":
            setting = _calibrate_shares(model, batches, layers, avg_k, target_distribution, dial)
        else:
            setting = _calibrate_scalar(model, batches, layers, avg_k, dial)
        achieved = _measure(model, batches, layers)
    finally:
        model.train(was_training)

    target = (
        {"avg_k": avg_k} if avg_k is not None else {"target_distribution": [float(p) for p in target_distribution]}
    )
    requested = f"Avg K {avg_k}" if avg_k is not None else f"shares {[float(p) for p in target_distribution]}"
    set_text = f"{dial.setting} {setting.get(dial.setting)}"
    if dial.kind == "shares":
        set_text = f"thresholds of layers {layers} set per layer at the quantiles of their own predictions"
    description = (
        f"calibrated {kind} ({set_text}, no training) for {requested}: Avg K {achieved['avg_k']:.4f} achieved on "
        f"{data_description or 'the calibration data'} ({achieved['tokens']} tokens)"
    )
    record = {
        "name": "calibrate",
        "description": description,
        "router": kind,
        "layers": layers,
        "data": data_description,
        "target": target,
        **setting,
        "achieved_avg_k": achieved["avg_k"],
        "achieved": achieved,
    }
    record = _json_ready(record)
    config = model.config
    config.training_stages = [*(getattr(config, "training_stages", None) or []), record]
    config.routing_statistics = statistics_record(
        achieved["avg_k_all_layers"],
        achieved["avg_k_text"],
        achieved["avg_k_vision"],
        list(achieved["avg_k_per_layer"].values()),
        achieved["load_cv_per_layer"],
        setting.get("thresholds", {}),
    )
    return record


def _json_ready(value):
    """Dict keys as strings (config.json's), floats as floats: what a saved config gives back."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def calibrate_checkpoint(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    avg_k: float | None = None,
    target_distribution: Sequence[float] | None = None,
    images: str | Path | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    max_length: int = 512,
    overwrite: bool = False,
) -> Path:
    """`hf-dare calibrate`: load the MoE checkpoint `model_dir`, `calibrate` it on `data` (see
    `calibration_batches`) and write the calibrated checkpoint to `out` with the tokenizer / processor files of
    `model_dir`, atomically: on any error nothing is left behind. Returns `out`."""
    from transformers import AutoConfig

    from .conversion.checkpoint import copy_side_files
    from .conversion.writer import check_output_folder, staged_output

    out = check_output_folder(out, overwrite)
    _check_target(avg_k, target_distribution)
    config = AutoConfig.from_pretrained(existing_model_folder(model_dir))
    model = model_class_for(config).from_pretrained(model_dir)
    batches, description = calibration_batches(model_dir, model, data, images, batch_size, max_samples, max_length)
    calibrate(model, batches, avg_k=avg_k, target_distribution=target_distribution, data_description=description)
    with staged_output(out, overwrite) as staging:
        model.save_pretrained(staging)
        copy_side_files(Path(model_dir), staging)
    return out


__all__ = [
    "calibrate",
    "calibrate_checkpoint",
    "calibration_batches",
    "distribution_for_avg_k",
    "thresholds_for_shares",
]
