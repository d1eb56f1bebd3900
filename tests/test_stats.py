"""Design-aware statistics (stardomain.stats) against independent computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from stardomain import stats


# ---------------------------------------------------------------- cluster bootstrap

STAR = np.array([0.1, 0.3])
REG = np.array([[0.4, 0.8],  # source 0 to held-outs 0, 1
                [0.6, 1.0]])  # source 1


def test_resample_by_hand():
    # sources (0, 0), held-outs (1, 1): the star mean is star[1], the regular mean is regular[0, 1]
    sm, rm = stats.resampled_means(STAR, REG, np.array([[0, 0]]), np.array([[1, 1]]))
    assert sm[0] == pytest.approx(0.3) and rm[0] == pytest.approx(0.8)
    # sources (1, 0), held-outs (0, 1): the full table, reordered
    sm, rm = stats.resampled_means(STAR, REG, np.array([[1, 0]]), np.array([[0, 1]]))
    assert sm[0] == pytest.approx(0.2) and rm[0] == pytest.approx(0.7)
    # sources (1, 1), held-outs (0, 0): star 0.1, regular 0.6 -> ratio 1/6
    sm, rm = stats.resampled_means(STAR, REG, np.array([[1, 1]]), np.array([[0, 0]]))
    assert sm[0] / rm[0] == pytest.approx(1 / 6)


def _enumerated_ratios():
    """All 16 equally likely two-way resamples of the 2x2 table, computed with plain loops."""
    out = []
    for s in itertools.product(range(2), repeat=2):
        for h in itertools.product(range(2), repeat=2):
            star_m = sum(STAR[j] for j in h) / 2
            reg_m = sum(REG[i][j] for i in s for j in h) / 4
            out.append(star_m / reg_m)
    return np.array(out)


def test_cluster_bootstrap_matches_enumeration_on_2x2():
    exact = _enumerated_ratios()
    res = stats.cluster_bootstrap(STAR, REG, n_boot=40000, seed=1)
    assert res["ratio"]["estimate"] == pytest.approx(0.2 / 0.7)
    assert res["difference"]["estimate"] == pytest.approx(0.2 - 0.7)
    # the bootstrap distribution puts ~1/16 on each outcome: its percentiles are the enumeration's
    lo, hi = res["ratio"]["ci95"]
    assert lo == pytest.approx(exact.min()) and hi == pytest.approx(exact.max())
    # an independent loop over the same draws gives the same means
    rng = np.random.default_rng(1)
    h_idx = rng.integers(0, 2, size=(40000, 2))
    s_idx = rng.integers(0, 2, size=(40000, 2))
    loop = np.array([np.mean(STAR[h]) / np.mean([REG[i][j] for i in s for j in h]) for s, h in zip(s_idx[:500],
                                                                                                   h_idx[:500])])
    sm, rm = stats.resampled_means(STAR, REG, s_idx[:500], h_idx[:500])
    np.testing.assert_allclose(sm / rm, loop)
    # every enumerated outcome occurs with its enumerated frequency (multiplicity / 16)
    all_sm, all_rm = stats.resampled_means(STAR, REG, s_idx, h_idx)
    got = dict(zip(*np.unique(np.round(all_sm / all_rm, 12), return_counts=True)))
    want = dict(zip(*np.unique(np.round(exact, 12), return_counts=True)))
    assert set(got) == set(want)
    for v, c in want.items():
        assert got[v] / 40000 == pytest.approx(c / 16, abs=0.01)


def test_cluster_bootstrap_is_wider_than_pairwise_when_models_share_effects():
    """A strong per-held-out effect shared by every pair: resampling pairs ignores it, resampling models not."""
    rng = np.random.default_rng(0)
    S, H = 10, 5
    h_eff = rng.normal(0, 0.3, H)
    reg = 1.0 + h_eff[None, :] + rng.normal(0, 0.02, (S, H))
    star = 0.5 + h_eff + rng.normal(0, 0.02, H)
    res = stats.cluster_bootstrap(star, reg, n_boot=4000, seed=0)
    naive = reg.reshape(-1)[rng.integers(0, S * H, (4000, S * H))].mean(1)
    naive_width = np.subtract(*np.percentile(naive, [97.5, 2.5]))
    reg_draws = stats.resampled_means(star, reg, rng.integers(0, S, (4000, S)), rng.integers(0, H, (4000, H)))[1]
    assert np.subtract(*np.percentile(reg_draws, [97.5, 2.5])) > 2 * naive_width
    assert res["difference"]["ci95"][0] < -0.5 < res["difference"]["ci95"][1]


# ---------------------------------------------------------------- sign-flip test

def test_sign_flip_exact_by_enumeration():
    d = np.array([-0.3, -0.1, 0.2, -0.4])
    obs = d.mean()
    pats = [np.mean(np.array(s) * np.abs(d)) for s in itertools.product((1, -1), repeat=4)]
    ref = np.mean([p <= obs + 1e-15 for p in pats])
    r = stats.sign_flip_test(d)
    assert r["exact"] and r["p_value"] == pytest.approx(ref) and r["min_p"] == 1 / 16
    assert stats.sign_flip_test([-1.0, -2.0, -3.0, -4.0, -5.0])["p_value"] == pytest.approx(1 / 32)
    assert stats.sign_flip_test([1.0, 2.0])["p_value"] == 1.0


def test_sign_flip_monte_carlo_agrees_with_exact():
    d = np.random.default_rng(3).normal(-0.2, 1.0, 18)
    mc = stats.sign_flip_test(d, n_mc=200000, seed=0)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=18)))
    exact = np.mean(signs @ np.abs(d) / 18 <= d.mean() + 1e-12)
    assert not mc["exact"] and mc["p_value"] == pytest.approx(exact, abs=0.005)


def test_pairwise_significant_but_design_aware_test_cannot_be():
    """3 held-outs, 10 sources: 30 regular pairs against 3 star pairs. Mann–Whitney over pairs calls it
    significant; the per-held-out sign-flip test can never go below 1/8."""
    S, H = 10, 3
    reg = np.array([[1.0 + 0.01 * s + 0.1 * h for h in range(H)] for s in range(S)])
    star = np.array([0.5, 0.6, 0.7])
    mw = stats.mann_whitney_less(star, reg.reshape(-1))
    assert mw["p_value"] < 0.05
    ref = sps.mannwhitneyu(star, reg.reshape(-1), alternative="less")
    assert mw["p_value"] == pytest.approx(ref.pvalue)
    hl = stats.headline(star, reg, alpha=0.05, n_boot=2000)
    assert hl["min_p"] == 1 / 8 and hl["p_value"] == pytest.approx(1 / 8)
    assert not hl["p_value"] < 0.05


def test_headline_no_interval_with_two_heldouts():
    hl = stats.headline([0.1, 0.2], [[1.0, 1.1], [0.9, 1.2], [1.0, 1.0]], n_boot=500)
    assert hl["ratio"]["ci95"] == [None, None] and hl["difference"]["ci95"] == [None, None]
    assert hl["ratio"]["estimate"] == pytest.approx(0.15 / np.mean([1.0, 1.1, 0.9, 1.2, 1.0, 1.0]))
    assert hl["min_p"] == 0.25


# ---------------------------------------------------------------- summaries

@pytest.mark.parametrize("xs", [[], [1.0], [1.0, 3.0]])
def test_summary_has_no_spread_below_three_values(xs):
    s = stats.summarize(xs)
    assert s["std"] is None and s["ci95"] == [None, None] and s["n"] == len(xs)
    if xs:
        assert s["mean"] == pytest.approx(np.mean(xs))


# ---------------------------------------------------------------- trends

def test_power_law_exponent_recovered():
    rng = np.random.default_rng(0)
    widths = [4, 8, 16, 32, 64, 128]
    tables = [3.0 * w ** -0.5 * np.exp(rng.normal(0, 0.1, 5)) for w in widths]
    fit = stats.trend_fit(widths, tables, log_x=True, log_y=True, n_boot=3000, seed=0)
    assert fit["slope"] == pytest.approx(-0.5, abs=0.05)
    assert 10 ** fit["intercept"] == pytest.approx(3.0, rel=0.15)
    lo, hi = fit["ci95"]
    assert lo < -0.5 < hi and hi < -0.4 and lo > -1.0  # excludes the paper's assumed 1/width
    assert stats.classify_trend(fit) == "falls"
    # against numpy's polyfit on the same means
    ref = np.polyfit(np.log10(widths), np.log10([t.mean() for t in tables]), 1)
    assert fit["slope"] == pytest.approx(ref[0]) and fit["intercept"] == pytest.approx(ref[1])


def test_power_law_with_source_by_heldout_tables():
    rng = np.random.default_rng(1)
    widths = [8, 16, 32, 64]
    tables = [2.0 * w ** -1.0 * np.exp(rng.normal(0, 0.05, (4, 5))) for w in widths]
    fit = stats.trend_fit(widths, tables, log_x=True, log_y=True, n_boot=2000, seed=0)
    assert fit["slope"] == pytest.approx(-1.0, abs=0.05) and fit["ci95"][0] < -1.0 < fit["ci95"][1]


def test_trend_classification_and_shared_heldouts():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 0.05, 5)  # held-out effects shared across |Z| rows
    falling = [0.4 + base, 0.25 + base + rng.normal(0, 0.01, 5), 0.1 + base + rng.normal(0, 0.01, 5)]
    fit = stats.trend_fit([1, 3, 10], falling, log_x=True, shared_heldouts=True, n_boot=2000)
    assert stats.classify_trend(fit) == "falls" and fit["monotone"]
    rising = [t[::-1] for t in falling][::-1]
    assert stats.classify_trend(stats.trend_fit([1, 3, 10], rising, log_x=True, n_boot=2000)) == "rises"
    flat = [0.3 + rng.normal(0, 0.1, 5) for _ in range(3)]
    fit = stats.trend_fit([1, 3, 10], flat, log_x=True, shared_heldouts=True, n_boot=2000)
    assert stats.classify_trend(fit) == "no clear trend"
    # the example: 0.104, 0.134, 0.068 over |Z| = 1, 3, 10 with a spread of 0.05 per held-out.
    # The endpoints fall; the fit's interval does not exclude 0, and the means are not monotone.
    noise = np.array([-0.06, -0.03, 0.0, 0.03, 0.06])
    zz = stats.trend_fit([1, 3, 10], [0.104 + noise, 0.134 + noise[::-1], 0.068 + noise[[2, 0, 4, 1, 3]]],
                         log_x=True, shared_heldouts=True, n_boot=2000)
    assert zz["means"][-1] < zz["means"][0] and not zz["monotone"]
    assert stats.classify_trend(zz) == "no clear trend"
    assert stats.classify_trend({"ci95": [None, None]}) == "no clear trend"
    two = stats.trend_fit([1, 10], [np.array([0.2, 0.3]), np.array([0.1, 0.1])], log_x=True)
    assert two["slope"] is not None and two["ci95"] == [None, None]


def test_grid_mean_ci_against_an_independent_loop():
    t = np.random.default_rng(4).normal(size=(4, 3))
    ci = stats.grid_mean_ci(t, n_boot=2000, seed=5)
    rng = np.random.default_rng(5)  # same draw order: held-outs first, then sources
    h_idx = rng.integers(0, 3, size=(2000, 3))
    s_idx = rng.integers(0, 4, size=(2000, 4))
    means = [np.mean([t[i][j] for i in s for j in h]) for s, h in zip(s_idx, h_idx)]
    assert ci == pytest.approx(list(np.percentile(means, [2.5, 97.5])))
    assert stats.grid_mean_ci(t[:, :2]) == [None, None]


def test_grid_means_equal_the_resampled_grids():
    rng = np.random.default_rng(7)
    t = rng.normal(size=(6, 4))
    s_idx, h_idx = rng.integers(0, 6, (300, 6)), rng.integers(0, 4, (300, 4))
    direct = t[s_idx[:, :, None], h_idx[:, None, :]].mean(axis=(1, 2))
    np.testing.assert_allclose(stats.grid_means(t, s_idx, h_idx), direct, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- several stars, several replicates

STARS = np.array([[0.1, 0.3],  # star 0 to held-outs 0, 1
                  [0.2, 0.6]])  # star 1


def _three_way_enumeration():
    """All 64 equally likely resamples (stars, sources, held-outs, each 2 of 2 with replacement), by loops."""
    out = []
    for j in itertools.product(range(2), repeat=2):
        for s in itertools.product(range(2), repeat=2):
            for h in itertools.product(range(2), repeat=2):
                star_m = sum(STARS[a][b] for a in j for b in h) / 4
                reg_m = sum(REG[a][b] for a in s for b in h) / 4
                out.append(star_m / reg_m)
    return np.array(out)


def test_three_way_bootstrap_matches_enumeration():
    exact = _three_way_enumeration()
    res = stats.cluster_bootstrap(STARS, REG, n_boot=64000, seed=2)
    assert res["ratio"]["estimate"] == pytest.approx(STARS.mean() / REG.mean())
    assert res["n_stars"] == 2 and res["n_heldouts"] == 2 and res["n_sources"] == 2
    sm, rm = stats.block_bootstrap([(STARS, REG)], n_boot=64000, seed=2)
    got = dict(zip(*np.unique(np.round(sm / rm, 12), return_counts=True)))
    want = dict(zip(*np.unique(np.round(exact, 12), return_counts=True)))
    assert set(got) == set(want)  # the stars are resampled: outcomes mixing star rows occur
    for v, c in want.items():
        assert got[v] / 64000 == pytest.approx(c / 64, abs=0.006)
    # one star row resampled from itself is the two-way bootstrap of before, draw for draw
    one = stats.cluster_bootstrap(STAR, REG, n_boot=5000, seed=4)
    assert one["ratio"] == stats.cluster_bootstrap(STAR[None, :], REG, n_boot=5000, seed=4)["ratio"]


def test_headline_with_stars_against_hand_enumeration():
    """The headline test averages each held-out's contrast over the stars, then flips signs over held-outs."""
    rng = np.random.default_rng(5)
    stars = rng.uniform(0.1, 0.5, (3, 5))
    reg = rng.uniform(0.3, 0.9, (4, 5))
    d = [np.mean(stars[:, h]) - np.mean(reg[:, h]) for h in range(5)]
    pats = [np.mean([s * abs(x) for s, x in zip(signs, d)]) for signs in itertools.product((1, -1), repeat=5)]
    want = np.mean([p <= np.mean(d) + 1e-12 for p in pats])
    hl = stats.headline(stars, reg, n_boot=1000)
    assert hl["p_value"] == pytest.approx(want) and hl["min_p"] == 1 / 32
    assert hl["n_stars"] == 3
    assert hl["star_ratios"] == pytest.approx([stars[j].mean() / reg.mean() for j in range(3)])


def test_detectable_shift_is_the_edge_of_significance():
    d = np.array([-0.02, 0.05, -0.01, 0.03, -0.04, 0.01])
    delta = stats.detectable_shift(d, alpha=0.05)
    e = d - d.mean()

    def p_by_hand(x):
        pats = [np.mean(np.array(s) * np.abs(x)) for s in itertools.product((1, -1), repeat=x.size)]
        return np.mean([p <= x.mean() + 1e-12 for p in pats])

    assert p_by_hand(e - delta) < 0.05 <= p_by_hand(e - delta * 0.999)
    assert stats.detectable_shift(np.array([-1.0, 2.0, 0.5, 0.1]), alpha=0.05) is None  # 2^-4 > 0.05
    hl = stats.headline(np.full((2, 6), 0.5) + d, np.ones((3, 6)), n_boot=200)
    assert hl["detectable"]["ratio"] == pytest.approx(1 - delta / 1.0)


def test_replicates_pool_heldouts_and_weigh_blocks_equally():
    rng = np.random.default_rng(6)
    blocks = [(rng.uniform(0.1, 0.4, (2, 4)), rng.uniform(0.3, 0.8, (3, 4))) for _ in range(3)]
    hl = stats.headline(None, None, blocks=blocks, n_boot=2000)
    d = np.concatenate([a.mean(0) - b.mean(0) for a, b in blocks])
    assert hl["p_value"] == stats.sign_flip_test(d)["p_value"] and hl["min_p"] == 2.0 ** -12
    assert hl["ratio"]["estimate"] == pytest.approx(np.mean([a.mean() for a, _ in blocks])
                                                    / np.mean([b.mean() for _, b in blocks]))
    assert hl["n_replicates"] == 3 and hl["n_stars"] == 6 and hl["n_heldouts"] == 12
