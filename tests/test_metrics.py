"""Each metric against an independent computation: scikit-learn, a hand-computed example, or a
brute-force definition; hypothesis for the invariants."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from stardomain import metrics as M
from stardomain.errors import UserError


def random_probs(n, c, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * sharp
    return logits.softmax(1), torch.randint(0, c, (n,), generator=g)


# ---------- hand-computed example ----------

HAND_P = torch.tensor([[0.9, 0.1, 0.0],
                       [0.2, 0.7, 0.1],
                       [0.6, 0.3, 0.1],
                       [0.0, 0.0, 1.0]], dtype=torch.float64)
HAND_Y = torch.tensor([0, 1, 1, 2])


def test_hand_example():
    m = M.classification_metrics(HAND_P, HAND_Y, n_bins=15)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.7) + math.log(0.3) + math.log(1.0)) / 4)
    brier = ((0.1 ** 2 + 0.1 ** 2) + (0.2 ** 2 + 0.3 ** 2 + 0.1 ** 2) + (0.6 ** 2 + 0.7 ** 2 + 0.1 ** 2) + 0) / 4
    assert m["brier"] == pytest.approx(brier)
    # confidences 0.9 (ok), 0.7 (ok), 0.6 (wrong), 1.0 (ok); 15 right-closed bins of width 1/15:
    # 0.9 -> bin 13 (0.8667, 0.9333], 0.7 -> bin 10 (0.6667, 0.7333], 0.6 -> bin 8 (0.5333, 0.6], 1.0 -> bin 14
    ece = (abs(1 - 0.9) + abs(1 - 0.7) + abs(0 - 0.6) + 0) / 4
    assert m["ece"] == pytest.approx(ece)
    # ACE with 2 equal-mass bins: {0.6 wrong, 0.7 ok} and {0.9 ok, 1.0 ok}
    ace2 = 0.5 * abs(0.5 - 0.65) + 0.5 * abs(1 - 0.95)
    assert M.adaptive_ece(HAND_P, HAND_Y, n_bins=2) == pytest.approx(ace2)
    # misclassification AUROC: positives (correct) scores {0.9, 0.7, 1.0}, negative {0.6}: all above -> 1
    assert m["auroc_misclassification"] == pytest.approx(1.0)


def test_ece_bin_edges_are_right_closed():
    # confidence exactly 0.6 = 9/15 belongs to bin (8/15, 9/15], together with 0.55, not with 0.61
    p = torch.tensor([[0.6, 0.4], [0.55, 0.45], [0.61, 0.39]], dtype=torch.float64)
    bins = M.calibration_bins(p, torch.tensor([0, 1, 0]), 15)
    assert bins["count"][8] == 2 and bins["count"][9] == 1
    assert bins["confidence"][8] == pytest.approx(0.575)
    assert bins["accuracy"][8] == pytest.approx(0.5)


def test_ece_against_brute_force():
    p, y = random_probs(500, 7, seed=1)
    conf, pred = p.max(1)
    correct = (pred == y).double()
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.double().mean() * abs(correct[m].mean() - conf[m].mean())
    assert M.ece(p, y) == pytest.approx(float(total), abs=1e-12)


def test_ace_equal_mass_bins():
    p, y = random_probs(100, 4, seed=2)
    bins = M.calibration_bins(p, y, 15, adaptive=True)
    assert sum(bins["count"]) == 100
    assert max(bins["count"]) - min(bins["count"]) <= 1
    # bins are ordered by confidence and do not overlap
    for b in range(14):
        assert bins["high"][b] <= bins["low"][b + 1]
    # one bin -> |accuracy - mean confidence|
    conf, pred = p.max(1)
    assert M.adaptive_ece(p, y, 1) == pytest.approx(abs(float((pred == y).double().mean() - conf.mean())))


# ---------- against scikit-learn ----------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nll_matches_sklearn(seed):
    p, y = random_probs(300, 5, seed=seed)
    assert M.nll(p, y) == pytest.approx(log_loss(y.numpy(), p.numpy(), labels=list(range(5))), rel=1e-10)


def test_nll_clips_zero_probability_like_sklearn():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([1, 1, 0])  # first sample: probability exactly 0 on the true class
    ours = M.nll(p, y)
    assert math.isfinite(ours)
    assert ours == pytest.approx((-math.log(M.EPS) + 0 + math.log(2)) / 3)
    assert ours == pytest.approx(log_loss(y.numpy(), p.numpy(), labels=[0, 1]), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 3])
def test_brier_matches_sklearn_multiclass(seed):
    p, y = random_probs(200, 6, seed=seed)
    assert M.brier(p, y) == pytest.approx(brier_score_loss(y.numpy(), p.numpy(), labels=list(range(6))), rel=1e-10)


def test_brier_binary_is_twice_sklearn_binary():
    p, y = random_probs(200, 2, seed=4)
    sk = brier_score_loss(y.numpy(), p[:, 1].numpy())  # binary convention: mean (p1 - y)^2
    assert M.brier(p, y) == pytest.approx(2 * sk, rel=1e-10)
    assert M.brier(p, y) == pytest.approx(float(((p[:, 1] - y.double()) ** 2).mean() * 2), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 5])
def test_misclassification_auroc_matches_sklearn(seed):
    p, y = random_probs(400, 4, seed=seed, sharp=1.0)
    m = M.classification_metrics(p, y)
    correct = (p.argmax(1) == y).numpy()
    assert m["auroc_misclassification"] == pytest.approx(roc_auc_score(correct, p.max(1).values.numpy()))
    ent = -(p * p.log()).sum(1)
    assert m["auroc_misclassification_entropy"] == pytest.approx(roc_auc_score(correct, -ent.numpy()))


def test_auroc_ties_half_credit_like_sklearn():
    scores = torch.tensor([0.5, 0.5, 0.5, 0.8, 0.2, 0.8])
    pos = torch.tensor([1, 0, 1, 0, 0, 1])
    # pairs (pos, neg): pos {0.5, 0.5, 0.8} vs neg {0.5, 0.8, 0.2}:
    # 0.5: tie, lose, win -> 1.5; twice -> 3; 0.8: win, tie, win -> 2.5; total 5.5 / 9
    assert M.auroc(scores, pos) == pytest.approx(5.5 / 9)
    assert M.auroc(scores, pos) == pytest.approx(roc_auc_score(pos.numpy(), scores.numpy()))
    assert M.auroc(torch.ones(6), pos) == pytest.approx(0.5)


def test_all_correct_gives_nan_auroc():
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=torch.float64)
    m = M.classification_metrics(p, torch.tensor([0, 1, 0]))
    assert m["accuracy"] == 1.0
    assert math.isnan(m["auroc_misclassification"]) and math.isnan(m["auroc_misclassification_entropy"])


def test_class_never_predicted():
    # class 2 exists in the labels but is never the arg-max; metrics stay finite and correct
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.4, 0.35, 0.25]], dtype=torch.float64)
    y = torch.tensor([2, 1, 2])
    m = M.classification_metrics(p, y)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["nll"] == pytest.approx(log_loss(y.numpy(), p.numpy(), labels=[0, 1, 2]))
    assert m["brier"] == pytest.approx(brier_score_loss(y.numpy(), p.numpy(), labels=[0, 1, 2]))
    assert all(math.isfinite(v) for v in m.values())


def test_one_hot_entropy_is_zero():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.equal(M.entropy(p), torch.zeros(2, dtype=torch.float64))
    assert M.entropy(torch.full((1, 4), 0.25)).item() == pytest.approx(math.log(4))


def test_ood_auroc_matches_sklearn():
    p_in, _ = random_probs(150, 5, seed=6, sharp=4.0)
    p_out, _ = random_probs(100, 5, seed=7, sharp=1.0)
    labels = np.r_[np.ones(150), np.zeros(100)]
    mp = torch.cat([p_in, p_out]).max(1).values.numpy()
    assert M.ood_auroc(p_in, p_out) == pytest.approx(roc_auc_score(labels, mp))
    ent = M.entropy(torch.cat([p_in, p_out])).numpy()
    assert M.ood_auroc(p_in, p_out, "entropy") == pytest.approx(roc_auc_score(labels, -ent))
    assert M.ood_auroc(p_in, p_in) == pytest.approx(0.5)


def test_bad_input_is_user_error():
    with pytest.raises(UserError):
        M.classification_metrics(torch.tensor([[0.5, 0.6]]), torch.tensor([0]))  # row sums to 1.1
    with pytest.raises(UserError):
        M.classification_metrics(torch.tensor([[0.5, 0.5]]), torch.tensor([2]))  # label out of range
    with pytest.raises(UserError):
        M.classification_metrics(torch.tensor([[float("nan"), 0.5]]), torch.tensor([0]))
    with pytest.raises(UserError):
        M.ood_auroc(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.5]]), score="margin")


# ---------- properties ----------

prob_rows = st.integers(2, 6).flatmap(lambda c: st.lists(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=c, max_size=c).filter(lambda r: sum(r) > 1e-3),
    min_size=1, max_size=40))


def _normalise(rows):
    p = torch.tensor(rows, dtype=torch.float64)
    return p / p.sum(1, keepdim=True)


@settings(max_examples=60, deadline=None)
@given(rows=prob_rows, data=st.data())
def test_metric_ranges_and_sklearn_agreement(rows, data):
    p = _normalise(rows)
    n, c = p.shape
    y = torch.tensor(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    m = M.classification_metrics(p, y)
    assert 0 <= m["accuracy"] <= 1
    assert 0 <= m["nll"] <= -math.log(M.EPS) + 1e-9
    assert 0 <= m["brier"] <= 2 + 1e-12
    assert 0 <= m["ece"] <= 1 and 0 <= m["ace"] <= 1
    assert m["nll"] == pytest.approx(log_loss(y.numpy(), p.numpy(), labels=list(range(c))), rel=1e-7, abs=1e-9)
    assert m["brier"] == pytest.approx(
        float(((p - torch.nn.functional.one_hot(y, c).double()) ** 2).sum(1).mean()), abs=1e-12)
    correct = (p.argmax(1) == y).numpy()
    if 0 < correct.sum() < n:
        assert m["auroc_misclassification"] == pytest.approx(roc_auc_score(correct, p.max(1).values.numpy()))
    else:
        assert math.isnan(m["auroc_misclassification"])


@settings(max_examples=60, deadline=None)
@given(scores=st.lists(st.integers(0, 4), min_size=2, max_size=30), data=st.data())
def test_auroc_is_mann_whitney_with_ties(scores, data):
    pos = data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores)))
    s = torch.tensor(scores, dtype=torch.float64)
    b = torch.tensor(pos)
    got = M.auroc(s, b)
    if all(pos) or not any(pos):
        assert math.isnan(got)
        return
    # brute force over all pairs
    wins = sum((1.0 if sp > sn else 0.5 if sp == sn else 0.0)
               for sp, p_ in zip(scores, pos) if p_ for sn, q in zip(scores, pos) if not q)
    assert got == pytest.approx(wins / (sum(pos) * (len(pos) - sum(pos))))
    # invariant: swapping the classes and negating the scores leaves AUROC unchanged
    assert M.auroc(-s, ~b) == pytest.approx(got)
    # strictly increasing transform of the scores leaves it unchanged
    assert M.auroc(torch.exp(s), b) == pytest.approx(got)


@settings(max_examples=40, deadline=None)
@given(rows=prob_rows, data=st.data())
def test_permuting_samples_changes_nothing(rows, data):
    p = _normalise(rows)
    n, c = p.shape
    y = torch.tensor(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    perm = torch.tensor(data.draw(st.permutations(list(range(n)))), dtype=torch.long)
    a, b = M.classification_metrics(p, y), M.classification_metrics(p[perm], y[perm])
    for k in a:
        if k == "ace":  # equal-mass bins can split tied confidences differently
            continue
        if math.isnan(a[k]):
            assert math.isnan(b[k])
        else:
            assert b[k] == pytest.approx(a[k], abs=1e-12)
