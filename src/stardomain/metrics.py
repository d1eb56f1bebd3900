"""Uncertainty metrics for classifiers, from predicted probabilities and labels.

All metrics are computed in float64 from `probs` (N x C, rows summing to 1) and integer `labels` (N).
Conventions, chosen so each number is exactly what its name says and matches scikit-learn where it has
the same metric:

- **accuracy**: fraction of samples whose arg-max class equals the label (ties in the arg-max go to the
  lowest class index, as `torch.argmax` does).
- **nll**: mean of -log p[label], with p clipped to [eps, 1], eps = float64 machine epsilon
  (2.2e-16): a probability of exactly 0 on the true class costs -log(eps) = 36.04 instead of infinity.
  This is scikit-learn's `log_loss` convention for float64 input.
- **brier**: mean over samples of the sum over classes of (p_c - 1[c = label])^2, in [0, 2]. This is the
  multi-class Brier score (scikit-learn's `brier_score_loss` for more than two classes). For two classes
  it is TWICE the binary Brier score `mean((p_1 - y)^2)` that `brier_score_loss` returns for binary
  input (scikit-learn halves it, `scale_by_half`); we never halve, so the number means the same for any C.
- **ece**: expected calibration error of the top-label confidence with `n_bins` (15) equal-width bins
  over [0, 1], right-closed like Guo et al. 2017: bin b holds confidences in (b/B, (b+1)/B].
  ECE = sum_b |b|/N * |acc_b - conf_b|.
- **ace**: adaptive (equal-mass) ECE: samples sorted by confidence and cut into `n_bins` bins of (nearly)
  equal count (sizes differ by at most one, like numpy.array_split); same formula.
- **auroc_misclassification**: AUROC of the max probability as a score for "the prediction is correct"
  (correct = positive class). **auroc_misclassification_entropy**: the same with minus the predictive
  entropy as the score. AUROC is the Mann-Whitney statistic with ties getting half credit (identical to
  `sklearn.metrics.roc_auc_score`). When every prediction is correct (or every one wrong) AUROC is
  undefined and we return NaN rather than a made-up 0.5.
- **ood_auroc**: AUROC for telling in-distribution inputs (positives) from shifted ones, with max
  probability (or minus entropy) as the score: 1 = perfectly separated, 0.5 = chance.
- Entropy uses 0 * log 0 = 0, so one-hot predictions have entropy exactly 0.

`METRICS` lists them as descriptors (name, label, direction, function), the one place that results,
reports, plots and tables read: adding a metric is one entry there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import UserError

EPS = float(np.finfo(np.float64).eps)


def _as_probs(probs, labels=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    p = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    if p.dim() != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise UserError(f"probabilities must be an N x C array with N >= 1 and C >= 2 (got shape {tuple(p.shape)})")
    if not torch.isfinite(p).all():
        raise UserError("probabilities contain NaN or infinity")
    if (p < 0).any() or (p > 1 + 1e-6).any():
        raise UserError("probabilities must lie in [0, 1]")
    if ((p.sum(1) - 1).abs() > 1e-3).any():
        raise UserError("each row of probabilities must sum to 1 (apply softmax to logits first)")
    if labels is None:
        return p, None
    y = torch.as_tensor(labels).detach().to("cpu")
    if y.dim() != 1 or len(y) != len(p):
        raise UserError(f"labels must be a vector of length {len(p)} (got shape {tuple(y.shape)})")
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise UserError("labels must be integers")
    y = y.long()
    if (y < 0).any() or (y >= p.shape[1]).any():
        raise UserError(f"labels must lie in 0..{p.shape[1] - 1}")
    return p, y


def entropy(probs) -> torch.Tensor:
    """Predictive entropy (nats) per row, with 0 log 0 = 0."""
    p, _ = _as_probs(probs)
    return -torch.special.xlogy(p, p).sum(1)


def auroc(scores, positive) -> float:
    """Area under the ROC curve of `scores` for the boolean `positive`: the probability that a random
    positive scores higher than a random negative, ties counted one half (Mann-Whitney U / (n+ n-)).
    NaN when either class is empty."""
    s = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten()
    pos = torch.as_tensor(positive).detach().to("cpu").flatten().bool()
    if len(s) != len(pos):
        raise UserError("scores and labels must have the same length")
    if torch.isnan(s).any():
        raise UserError("scores contain NaN")
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s, stable=True)
    s_sorted = s[order]
    _, counts = torch.unique_consecutive(s_sorted, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each tie group
    ranks = torch.empty_like(s)
    ranks[order] = torch.repeat_interleave(avg_rank, counts)
    u = ranks[pos].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def calibration_bins(probs, labels, n_bins: int = 15, adaptive: bool = False) -> dict[str, list]:
    """Per-bin mean confidence, accuracy and count of the top-label prediction (reliability diagram).
    Equal-width right-closed bins (b/B, (b+1)/B], or equal-mass bins when `adaptive`. Empty bins have
    count 0 and NaN confidence/accuracy. Also returns the bin edges (equal-width) or bin boundaries
    (adaptive: the lowest and highest confidence in each bin)."""
    if n_bins < 1:
        raise UserError("n_bins must be at least 1")
    p, y = _as_probs(probs, labels)
    conf, pred = p.max(1)
    correct = (pred == y).double()
    n = len(conf)
    if adaptive:
        order = torch.argsort(conf, stable=True)
        groups = [g for g in np.array_split(order.numpy(), n_bins)]
        idx = torch.empty(n, dtype=torch.long)
        for b, g in enumerate(groups):
            idx[torch.from_numpy(g)] = b
    else:
        idx = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    with np.errstate(invalid="ignore"):
        mean_conf = (conf_sum / count).tolist()
        mean_acc = (acc_sum / count).tolist()
    out = {"confidence": mean_conf, "accuracy": mean_acc, "count": [int(c) for c in count.tolist()]}
    if adaptive:
        lo = torch.full((n_bins,), float("nan"), dtype=torch.float64)
        hi = lo.clone()
        for b in range(n_bins):
            m = idx == b
            if m.any():
                lo[b], hi[b] = conf[m].min(), conf[m].max()
        out["low"], out["high"] = lo.tolist(), hi.tolist()
    else:
        out["edges"] = [b / n_bins for b in range(n_bins + 1)]
    return out


def _ece_from_bins(bins: dict, n: int) -> float:
    total = 0.0
    for c, a, k in zip(bins["confidence"], bins["accuracy"], bins["count"]):
        if k:
            total += k / n * abs(a - c)
    return total


def ece(probs, labels, n_bins: int = 15) -> float:
    """Expected calibration error, equal-width bins (see the module docstring)."""
    return _ece_from_bins(calibration_bins(probs, labels, n_bins), len(labels))


def adaptive_ece(probs, labels, n_bins: int = 15) -> float:
    """Expected calibration error, equal-mass bins (see the module docstring)."""
    return _ece_from_bins(calibration_bins(probs, labels, n_bins, adaptive=True), len(labels))


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of the labels, probabilities clipped to [EPS, 1]."""
    p, y = _as_probs(probs, labels)
    return float(-torch.log(p[torch.arange(len(y)), y].clamp(EPS, 1.0)).mean())


def brier(probs, labels) -> float:
    """Multi-class Brier score: mean over samples of sum over classes of squared error (range [0, 2])."""
    p, y = _as_probs(probs, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(1).mean())


def accuracy(probs, labels) -> float:
    p, y = _as_probs(probs, labels)
    return float((p.argmax(1) == y).double().mean())


def _correct(p: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-label confidence, whether the top label is right) per sample."""
    conf, pred = p.max(1)
    return conf, pred == y


@dataclass(frozen=True)
class Metric:
    """A metric as results, the report, the plot and the CLI table read it: `name` (its key in results),
    `label` (short column title), `higher_is_better`, and either `fn(probs, labels, n_bins) -> float`
    (probabilities and labels already validated, float64) or, for the OOD metrics, `ood_score` (the score
    that separates in-distribution from shifted inputs, "maxprob" or "entropy"; `ood_auroc`)."""

    name: str
    label: str
    higher_is_better: bool
    fn: Callable[[torch.Tensor, torch.Tensor, int], float] | None = None
    ood_score: str | None = None


# Adding a metric is one entry here (or `register_metric`): results, report, plot and table read this list.
METRICS: list[Metric] = [
    Metric("accuracy", "acc", True, lambda p, y, b: float(_correct(p, y)[1].double().mean())),
    Metric("nll", "NLL", False, lambda p, y, b: nll(p, y)),
    Metric("brier", "Brier", False, lambda p, y, b: brier(p, y)),
    Metric("ece", "ECE", False, lambda p, y, b: ece(p, y, b)),
    Metric("ace", "ACE", False, lambda p, y, b: adaptive_ece(p, y, b)),
    Metric("auroc_misclassification", "AUROC mis (max-p)", True, lambda p, y, b: auroc(*_correct(p, y))),
    Metric("auroc_misclassification_entropy", "AUROC mis (entropy)", True,
           lambda p, y, b: auroc(-entropy(p), _correct(p, y)[1])),
    Metric("ood_auroc", "OOD AUROC (max-p)", True, ood_score="maxprob"),
    Metric("ood_auroc_entropy", "OOD AUROC (entropy)", True, ood_score="entropy"),
]


def register_metric(metric: Metric) -> Metric:
    """Add (or replace, by name) a metric; every predictor is scored with it from then on."""
    METRICS[:] = [m for m in METRICS if m.name != metric.name] + [metric]
    return metric


def metric(name: str) -> Metric | None:
    """The descriptor of a metric name (None for names that are not metrics: seconds, std, ...)."""
    return next((m for m in METRICS if m.name == name), None)


def classification_metrics(probs, labels, n_bins: int = 15) -> dict[str, float]:
    """Every metric of METRICS that scores probabilities against labels (accuracy, nll, brier, ece, ace,
    auroc_misclassification with the max-prob score, auroc_misclassification_entropy with minus the
    entropy, and any registered one), as plain floats."""
    p, y = _as_probs(probs, labels)
    return {m.name: m.fn(p, y, n_bins) for m in METRICS if m.fn is not None}


def ood_auroc(probs_in, probs_out, score: str = "maxprob") -> float:
    """AUROC for separating in-distribution (positive) from out-of-distribution inputs, scored by the
    max probability ("maxprob") or minus the predictive entropy ("entropy")."""
    if score not in ("maxprob", "entropy"):
        raise UserError(f"score must be 'maxprob' or 'entropy' (got {score!r})")
    p_in, _ = _as_probs(probs_in)
    p_out, _ = _as_probs(probs_out)
    if p_in.shape[1] != p_out.shape[1]:
        raise UserError("in- and out-of-distribution probabilities have different numbers of classes")

    def s(p):
        return p.max(1).values if score == "maxprob" else -entropy(p)

    scores = torch.cat([s(p_in), s(p_out)])
    pos = torch.cat([torch.ones(len(p_in), dtype=torch.bool), torch.zeros(len(p_out), dtype=torch.bool)])
    return auroc(scores, pos)


def is_nan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)
