"""Long-tailed loss reweighting over answer tokens: DQRoute's difficulty-aware class weights and CCAR's class- and
confidence-aware sample weights, as a training option of both models.

The "classes" are answer tokens: the target ids at the labelled positions (the next-token labels, as the causal-LM
loss shifts them). Each method keeps per-class running statistics (`AnswerReweighting`), turns them into a weight
per labelled token (`token_weights`, (B, L)) and updates them once per optimizer step (`update`), from what every
rank observed in that step (summed across ranks: the statistics are identical on every rank).

- DQRoute (Wei, Ouyang, Ye, "Divide, Weight, and Route", arXiv 2508.19630): a class's difficulty
  d_c = H_c / H_max + lambda (1 - A_c / A_max) from its mean prediction entropy H_c and its exponentially smoothed
  accuracy A_c; difficulty weights w_c <- w_c exp(gamma d_c) / sum_j w_j exp(gamma d_j); the loss weight of class c
  is w_c times a frequency prior f_c^-beta, normalised to mean 1 under the label frequencies. (Its inference-time
  fusion of expert classifiers by OOD detectors is for classification ensembles, not for this model.)
- CCAR (Jagati et al., "Class Confidence Aware Reweighting for Long Tailed Learning", arXiv 2601.15924): a token's
  weight Omega(p_t, f_c) = exp(kappa (omega - p_t)), kappa = -ln f'_c, f'_c = f_c below the confidence pivot omega
  and 1 - f_c at or above it: lower confidence in the true token and a rarer token give a larger weight, a confident
  head token a smaller one, Omega = 1 at the pivot.

The weighted CE keeps the model's normalisation: sum_t w_t nll_t / num_items_in_batch (the labelled tokens of the
whole optimizer step, all micro-batches and ranks), so any gradient accumulation and world size give the same
update; within a step the weights come from the statistics of before the step (`update` runs at its end).
`reweighted_loss` adds sum_t (w_t - 1) nll_t / num_items_in_batch to the model's loss, which keeps its routing terms.
"""

import math

import torch
import torch.nn.functional as F

from hf_dare.modeling.modeling_moe import next_token_labels


class AnswerReweighting:
    """Per-class running statistics over answer tokens and the loss weights they give (one subclass per method).

    `statistics`: the running statistics, float64 tensors (C,) over the C classes (the vocabulary, sized from the
    logits on first use); `counts` (labelled tokens of each class so far, all ranks: running sums, so f_c =
    counts_c / sum counts is the empirical label frequency of what was trained on, the paper's N_c / N) is shared.
    `observed`: the per-class sums one optimizer step collects (`observe`), summed across ranks by `update`.
    A class never seen yet gets weight 1. `max_weight` (optional) clamps every weight to [1 / max_weight, max_weight].
    """

    method = ""
    statistics: tuple[str, ...] = ("counts",)
    observed: tuple[str, ...] = ("tokens",)

    def __init__(self, max_weight: float | None = None):
        if max_weight is not None and max_weight < 1:
            raise ValueError(f"max_weight must be >= 1 (or None), got {max_weight}")
        self.max_weight = max_weight
        self.num_classes: int | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self.step_sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def options(self) -> dict:
        """The constructor's keyword arguments (JSON-able): what recreates this method's settings."""
        return {"max_weight": self.max_weight}

    # ---- statistics ----

    def _ensure(self, num_classes: int, device: torch.device | str) -> None:
        """Create the statistics for `num_classes` classes on first use; keep them on `device`."""
        if self.num_classes is None:
            self.num_classes = num_classes
            self.stats = {
                name: torch.zeros(num_classes, dtype=torch.float64, device=device) for name in self.statistics
            }
        elif num_classes != self.num_classes:
            raise ValueError(f"{type(self).__name__} has statistics for {self.num_classes} classes, got {num_classes}")
        if self.stats["counts"].device != torch.device(device):
            self.stats = {name: value.to(device) for name, value in self.stats.items()}
            self.step_sums = {name: value.to(device) for name, value in self.step_sums.items()}

    @property
    def counts(self) -> torch.Tensor:
        """(C,) labelled tokens of each class so far."""
        return self.stats["counts"]

    def frequencies(self) -> torch.Tensor:
        """(C,) f_c = counts_c / sum counts: the label frequency of each class so far."""
        return self.counts / self.counts.sum().clamp(min=1)

    @torch.no_grad()
    def observe(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one training forward's labelled tokens to this optimizer step's per-class sums: (B, L, V) logits and
        (B, L) next-token targets (-100 where unlabelled)."""
        self._ensure(logits.shape[-1], logits.device)
        labelled = targets != -100
        classes = targets[labelled]
        per_token = self._per_token_observations(logits[labelled].float(), classes)
        for name in self.observed:
            if name not in self.step_sums:
                self.step_sums[name] = torch.zeros(self.num_classes, dtype=torch.float64, device=logits.device)
            self.step_sums[name].index_add_(0, classes, per_token[name].double())

    def _per_token_observations(self, logits: torch.Tensor, classes: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, V) logits and (N,) classes of the labelled tokens -> {observed name: (N,) value per token}."""
        return {"tokens": torch.ones_like(classes, dtype=torch.float64)}

    @torch.no_grad()
    def update(self) -> dict[str, float]:
        """Fold this optimizer step's observations (summed across ranks under torch.distributed: every rank must
        call it, once per optimizer step) into the running statistics, identically on every rank. Returns a
        summary: `classes` seen so far, `tokens` in the step."""
        if self.num_classes is None:  # nothing observed nor loaded yet
            return {}
        device = self.counts.device
        zeros = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        step = torch.stack([self.step_sums.get(name, zeros) for name in self.observed])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(step)
        step = dict(zip(self.observed, step, strict=True))
        self.step_sums = {}
        self._fold(step)
        self.steps += 1
        return {"classes": int((self.counts > 0).sum()), "tokens": float(step["tokens"].sum())}

    def _fold(self, step: dict[str, torch.Tensor]) -> None:
        """Update the running statistics from one step's per-class sums (all ranks)."""
        self.stats["counts"] += step["tokens"]

    # ---- weights ----

    @torch.no_grad()
    def token_weights(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, L, V) logits, (B, L) next-token targets (-100 where unlabelled) -> (B, L) float64 loss weights of the
        labelled tokens (0 elsewhere), from the statistics as they are (not this forward's observations)."""
        self._ensure(logits.shape[-1], logits.device)
        labelled = targets != -100
        classes = targets.clamp(min=0)
        weights = self._token_weights(logits, classes)
        weights = torch.where(self.counts[classes] > 0, weights, torch.ones_like(weights))
        if self.max_weight is not None:
            weights = weights.clamp(1 / self.max_weight, self.max_weight)
        return torch.where(labelled, weights, torch.zeros_like(weights))

    def _token_weights(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B, L, V) logits and (B, L) classes -> (B, L) float64 weights (those of unseen classes are replaced by 1)."""
        raise NotImplementedError

    # ---- checkpointing ----

    def state_dict(self) -> dict:
        """The running statistics of the classes seen so far, JSON-able (float64 values round-trip exactly)."""
        if self.num_classes is None:
            return {"method": self.method, "num_classes": None, "steps": self.steps}
        seen = torch.nonzero(self.counts > 0).flatten()
        return {
            "method": self.method,
            "num_classes": self.num_classes,
            "steps": self.steps,
            "classes": seen.tolist(),
            **{name: self.stats[name][seen].tolist() for name in self.statistics},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned: the statistics continue from there."""
        if state.get("method") != self.method:
            raise ValueError(f"statistics of {state.get('method')!r} cannot be loaded into {self.method!r}")
        device = self.counts.device if self.stats else "cpu"
        self.num_classes, self.stats, self.step_sums = None, {}, {}
        self.steps = state.get("steps", 0)
        if state.get("num_classes") is None:
            return
        self._ensure(state["num_classes"], device)
        seen = torch.tensor(state["classes"], dtype=torch.long, device=device)
        for name in self.statistics:
            self.stats[name][seen] = torch.tensor(state[name], dtype=torch.float64, device=device)


class DQRouteWeights(AnswerReweighting):
    """DQRoute's difficulty-aware class weights (arXiv 2508.19630), over answer tokens.

    Statistics (all ranks, updated once per optimizer step from that step's tokens of each class): `entropy`
    H_c, the mean entropy -sum_v p_v log p_v of the predictions at the class's tokens, and `accuracy` A_c, the share of
    them whose argmax is the class, each an EMA over steps (momentum `momentum`; a class's first step sets it):
    the paper smooths the accuracy exponentially; the entropy gets the same EMA, so that both follow the model as it
    trains. Difficulty d_c = H_c / H_max + `balance` (lambda) (1 - A_c / A_max), maxima over the classes seen.
    Difficulty weights (`log_weights` = ln w_c): after each step's statistics, w_c <- w_c exp(gamma d_c) /
    sum_j w_j exp(gamma d_j) over the classes seen (`sharpness` = gamma; a newly seen class starts at the mean of
    the others). The paper updates once per epoch; here once per optimizer step (a Trainer may run one epoch), so
    gamma is per step.

    Loss weight of class c: f_c^-beta w_c / sum_j f_j f_j^-beta w_j, i.e. the difficulty weight times a frequency
    prior (`frequency_exponent` = beta; the paper combines the two, the form is ours), normalised to mean 1 under the
    label frequencies (constant within a step: accumulation-invariant, unlike a mean over the step's tokens), then
    clamped to [1 / max_weight, max_weight]: the multiplicative update is unbounded over a long run.
    """

    method = "dqroute"
    statistics = ("counts", "entropy", "accuracy", "log_weights")
    observed = ("tokens", "entropy", "correct")

    def __init__(
        self,
        momentum: float = 0.9,
        balance: float = 1.0,
        sharpness: float = 0.01,
        frequency_exponent: float = 0.5,
        max_weight: float | None = 10.0,
    ):
        super().__init__(max_weight)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.balance = balance
        self.sharpness = sharpness
        self.frequency_exponent = frequency_exponent

    def options(self) -> dict:
        return {
            "momentum": self.momentum,
            "balance": self.balance,
            "sharpness": self.sharpness,
            "frequency_exponent": self.frequency_exponent,
            **super().options(),
        }

    def _per_token_observations(self, logits, classes):
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        correct = (log_probs.argmax(-1) == classes).double()
        return {"tokens": torch.ones_like(entropy, dtype=torch.float64), "entropy": entropy, "correct": correct}

    def class_difficulty(self) -> torch.Tensor:
        """(C,) d_c = H_c / H_max + lambda (1 - A_c / A_max) of the classes seen (0 for the others)."""
        seen = self.counts > 0
        if not seen.any():
            return torch.zeros_like(self.counts)
        entropy, accuracy = self.stats["entropy"], self.stats["accuracy"]
        tiny = torch.finfo(torch.float64).tiny
        entropy_term = entropy / entropy[seen].max().clamp(min=tiny)
        accuracy_max = accuracy[seen].max()
        accuracy_term = 1 - (accuracy / accuracy_max if accuracy_max > 0 else torch.zeros_like(accuracy))
        return torch.where(seen, entropy_term + self.balance * accuracy_term, torch.zeros_like(entropy))

    def _fold(self, step):
        present = step["tokens"] > 0
        first = present & (self.counts == 0)
        seen_before = self.counts > 0
        tokens = step["tokens"].clamp(min=1)
        m = self.momentum
        for name, total in (("entropy", step["entropy"]), ("accuracy", step["correct"])):
            mean, stat = total / tokens, self.stats[name]
            self.stats[name] = torch.where(first, mean, torch.where(present, m * stat + (1 - m) * mean, stat))
        self.stats["counts"] = self.counts + step["tokens"]

        log_weights, seen = self.stats["log_weights"], self.counts > 0
        if first.any():
            start = log_weights.new_zeros(())  # the first classes: uniform
            if seen_before.any():  # the mean difficulty weight of the classes seen before
                start = torch.logsumexp(log_weights[seen_before], 0) - math.log(int(seen_before.sum()))
            log_weights = torch.where(first, start, log_weights)
        log_weights = log_weights + self.sharpness * self.class_difficulty()
        log_weights = log_weights - torch.logsumexp(log_weights[seen], 0)
        self.stats["log_weights"] = torch.where(seen, log_weights, torch.zeros_like(log_weights))

    def class_weights(self) -> torch.Tensor:
        """(C,) the loss weight of each class (1 for the classes not seen yet), before `max_weight`."""
        seen = self.counts > 0
        if not seen.any():
            return torch.ones_like(self.counts)
        frequencies = self.frequencies()
        prior = torch.where(seen, frequencies, torch.ones_like(frequencies)).pow(-self.frequency_exponent)
        raw = prior * self.stats["log_weights"].exp()
        normaliser = (frequencies * raw)[seen].sum()
        return torch.where(seen, raw / normaliser, torch.ones_like(raw))

    def _token_weights(self, logits, classes):
        return self.class_weights()[classes]


class CCARWeights(AnswerReweighting):
    """CCAR's class- and confidence-aware weights (arXiv 2601.15924), over answer tokens.

    Omega(p_t, f_c) = exp(kappa (omega - p_t)) = f'_c ** (p_t - omega), kappa = -ln f'_c (the adaptive capacity),
    f'_c = f_c if p_t < omega (exploration) else 1 - f_c (consolidation), where p_t is the model's probability of
    the token's class (softmax over the vocabulary, at the current weights) and f_c the class's label frequency so
    far. Below the pivot a token weighs more the less confident the model is and the rarer its class; above it a
    confident token weighs less, a head class's most. Omega = 1 at p_t = omega for every class (continuity at the
    pivot). What we could read of the paper gives f'_c, the pivot (omega = 0.75), the exponential (maximum-entropy)
    form and the continuity at the pivot, not the capacity's formula: kappa = -ln f'_c is our reading.
    The weight multiplies the token's NLL as a constant (no gradient through p_t); no normalisation (Omega = 1 at
    the pivot sets the scale); `max_weight` (default None, as the paper) bounds it, useful with a large vocabulary
    where f_c can be tiny (the largest weight of a class is f_c ** -omega).
    """

    method = "ccar"

    def __init__(self, pivot: float = 0.75, max_weight: float | None = None):
        super().__init__(max_weight)
        if not 0 < pivot <= 1:
            raise ValueError(f"pivot must be in (0, 1], got {pivot}")
        self.pivot = pivot

    def options(self) -> dict:
        return {"pivot": self.pivot, **super().options()}

    def omega(self, p_true: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
        """Omega(p_t, f_c) elementwise: f'_c ** (p_t - omega) (0 ** 0 = 1 at the pivot)."""
        dual_frequency = torch.where(p_true < self.pivot, frequency, 1 - frequency)
        return dual_frequency.pow(p_true - self.pivot)

    def _token_weights(self, logits, classes):
        logits = logits.float()
        log_p = logits.gather(-1, classes.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return self.omega(log_p.double().exp(), self.frequencies()[classes])


REWEIGHTING_METHODS = {cls.method: cls for cls in (DQRouteWeights, CCARWeights)}


def answer_reweighting(method: str, **options) -> AnswerReweighting:
    """The weights of `method` (`dqroute` or `ccar`) with its options (see `DQRouteWeights` / `CCARWeights`)."""
    if method not in REWEIGHTING_METHODS:
        raise ValueError(f"answer_reweighting must be one of {sorted(REWEIGHTING_METHODS)}, got {method!r}")
    return REWEIGHTING_METHODS[method](**options)


def reweighted_loss(
    loss: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    reweighting: AnswerReweighting,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    observe: bool = True,
) -> torch.Tensor:
    """The model's `loss` with its CE reweighted: loss + sum_t (w_t - 1) nll_t / N, where N = `num_items_in_batch`
    (the Trainer's: labelled tokens of the optimizer step, all micro-batches and ranks) or this batch's labelled
    tokens, as the model normalised its CE (transformers' causal-LM loss, hf-dare's models included). The CE part
    becomes sum_t w_t nll_t / N; the rest of the loss (routing terms) is unchanged. `labels` as given to the model
    (shifted here, or `shift_labels`); with `observe` the tokens are recorded for the next `update()`.

    In a custom loop: `loss = reweighted_loss(out.loss, out.logits, batch["labels"], weights)`, then
    `weights.update()` after each `optimizer.step()`.
    """
    targets = next_token_labels(labels, shift_labels)
    detached = logits.detach()
    weights = reweighting.token_weights(detached, targets)
    if observe:
        reweighting.observe(detached, targets)
    vocab_size = logits.shape[-1]
    nll = F.cross_entropy(
        logits.float().reshape(-1, vocab_size), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    if num_items_in_batch is None:
        count = (targets != -100).sum().clamp(min=1)
    else:
        count = torch.as_tensor(num_items_in_batch, device=nll.device)
    return loss + ((weights - 1).to(nll.dtype) * nll).sum() / count


__all__ = [
    "REWEIGHTING_METHODS",
    "AnswerReweighting",
    "CCARWeights",
    "DQRouteWeights",
    "answer_reweighting",
    "reweighted_loss",
]
