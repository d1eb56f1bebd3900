"""Statistics that respect the study's design (numpy/scipy only; nothing here knows about models).

Every barrier pair shares its models with other pairs: the S×H regular–regular pairs are built from S
sources and H held-outs, and the H star–held-out pairs share the star. Pairs are therefore not
independent observations, and tests that treat them as such (Mann–Whitney over pairs) overstate the
evidence. Here the *models* are the units:

- `cluster_bootstrap`: resample sources, held-outs and stars (with replacement, three-way; within each
  study replicate when there are several), recompute the star–held-out mean over the resampled stars ×
  held-outs and the regular–regular mean over the resampled source×held-out grid; percentile intervals of
  their ratio and difference.
- `sign_flip_test`: per-held-out paired differences d_h = mean_j star[j, h] − mean_s regular[s, h]; under
  the null each d_h is symmetric about 0, so all 2^H sign patterns are equally likely (exact when H ≤ 16).
  Its smallest attainable p is 2^-H: with 4 held-outs no result can be significant at 5%.
  `detectable_shift` turns that into the smallest effect the design would call significant.
- `trend_fit` / `classify_trend`: OLS slope of barrier against log10|Z| or the power-law exponent of
  barrier against width (log-log), with a cluster-bootstrap interval; "falls" only when the whole
  interval is below 0.
- `summarize`: mean, spread and a bootstrap CI of one list of values; with n ≤ 2 no spread or interval
  is reported (None, shown as a dash), because two numbers cannot estimate one.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

MIN_FOR_SPREAD = 3  # n <= 2: no std, no interval
EXACT_SIGN_FLIP_MAX = 16  # all 2^H patterns up to this many held-outs, else seeded Monte Carlo


def _ci(draws: np.ndarray, level: float = 0.95) -> list[float | None]:
    d = draws[np.isfinite(draws)]
    if d.size == 0:
        return [None, None]
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(d, [a, 100 - a])
    return [float(lo), float(hi)]


def summarize(values: Sequence[float | None], *, seed: int = 0, n_boot: int = 10000) -> dict:
    """mean, std (n-1), n, min, max, median and a seeded 95% percentile-bootstrap CI of the mean.
    n <= 2: std None and ci95 [None, None] (too few values to estimate a spread)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "min": None, "max": None, "median": None, "ci95": [None, None]}
    out = {"mean": float(x.mean()), "std": None, "n": n, "min": float(x.min()), "max": float(x.max()),
           "median": float(np.median(x)), "ci95": [None, None]}
    if n >= MIN_FOR_SPREAD:
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        out["std"] = float(x.std(ddof=1))
        out["ci95"] = _ci(means)
    return out


# ---------------------------------------------------------------- the clustered design

def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """B×n: how often each index occurs in each row of idx."""
    B = idx.shape[0]
    return np.bincount((np.arange(B)[:, None] * n + idx).ravel(), minlength=B * n).reshape(B, n).astype(float)


def grid_means(table: np.ndarray, s_idx: np.ndarray, h_idx: np.ndarray) -> np.ndarray:
    """Mean of table[s_idx[b]][:, h_idx[b]] for every resample b, as c_s·T·c_h / (S·H) with the index counts
    c_s, c_h: O(B·(S+H)) memory instead of the B×S×H resampled grids."""
    cs, ch = _counts(s_idx, table.shape[0]), _counts(h_idx, table.shape[1])
    return ((cs @ table) * ch).sum(axis=1) / (s_idx.shape[1] * h_idx.shape[1])


def _star_table(star) -> np.ndarray:
    """Star–held-out barriers as stars × held-outs (one star: a row)."""
    return np.atleast_2d(np.asarray(star, float))


def resampled_means(star, regular: np.ndarray, s_idx: np.ndarray, h_idx: np.ndarray,
                    j_idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For B resamples (rows of s_idx: B×S, h_idx: B×H, j_idx: B×J stars): the star–held-out mean over the
    resampled stars × held-outs and the regular–regular mean over the resampled source×held-out grid."""
    star = _star_table(star)
    j_idx = np.zeros((h_idx.shape[0], star.shape[0]), int) if j_idx is None else j_idx
    return grid_means(star, j_idx, h_idx), grid_means(np.asarray(regular, float), s_idx, h_idx)


def _ratio(a: np.ndarray | float, b: np.ndarray | float):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(b) > 0, np.asarray(a, float) / np.asarray(b, float), np.nan)


def _check_block(star: np.ndarray, regular: np.ndarray) -> None:
    if regular.ndim != 2 or star.shape[1] != regular.shape[1]:
        raise ValueError(f"star has {star.shape[-1]} held-out columns, the regular table {regular.shape[-1]}")


def block_bootstrap(blocks: Sequence[tuple], *, n_boot: int = 10000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three-way cluster bootstrap of the star–held-out and regular–regular means over independent blocks
    (one block per study replicate: `star[j, h]` stars × held-outs, `regular[s, h]` sources × held-outs).
    Within each block, held-outs, sources and stars are resampled with replacement; the same resampled
    held-outs enter both means, so the comparison stays paired. A resample's mean is the average of its
    blocks' means (every block weighs the same). -> (B star means, B regular means)."""
    rng = np.random.default_rng(seed)
    sm, rm = np.zeros(n_boot), np.zeros(n_boot)
    for star, regular in blocks:
        star, regular = _star_table(star), np.asarray(regular, float)
        _check_block(star, regular)
        (S, H), J = regular.shape, star.shape[0]
        h_idx = rng.integers(0, H, size=(n_boot, H))
        s_idx = rng.integers(0, S, size=(n_boot, S))
        j_idx = rng.integers(0, J, size=(n_boot, J))
        b_sm, b_rm = resampled_means(star, regular, s_idx, h_idx, j_idx)
        sm += b_sm / len(blocks)
        rm += b_rm / len(blocks)
    return sm, rm


def cluster_bootstrap(star, regular, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                      blocks: Sequence[tuple] | None = None) -> dict:
    """Cluster bootstrap of star–held-out vs regular–regular (`regular[s, h]`: source s, held-out h;
    `star[h]`, or `star[j, h]` for several stars): sources, held-outs and stars resampled with replacement
    (`block_bootstrap`; `blocks` adds further independent replicates). -> ratio and difference with
    percentile CIs."""
    blocks = [(star, regular)] if blocks is None else list(blocks)
    tabs = [(_star_table(a), np.asarray(b, float)) for a, b in blocks]
    for a, b in tabs:
        _check_block(a, b)
    sm, rm = block_bootstrap(tabs, n_boot=n_boot, seed=seed)
    ratio_d, diff_d = _ratio(sm, rm), sm - rm
    s_mean = float(np.mean([a.mean() for a, _ in tabs]))
    r_mean = float(np.mean([b.mean() for _, b in tabs]))
    est_ratio = float(_ratio(s_mean, r_mean))
    return {"ratio": {"estimate": None if np.isnan(est_ratio) else est_ratio, "ci95": _ci(ratio_d, level)},
            "difference": {"estimate": s_mean - r_mean, "ci95": _ci(diff_d, level)},
            "star_mean": s_mean, "regular_mean": r_mean, "n_sources": sum(b.shape[0] for _, b in tabs),
            "n_heldouts": sum(b.shape[1] for _, b in tabs), "n_stars": sum(a.shape[0] for a, _ in tabs),
            "n_replicates": len(tabs), "n_boot": n_boot, "undefined_ratio_draws": int(np.isnan(ratio_d).sum()),
            "method": "cluster bootstrap (sources, held-outs and stars resampled with replacement"
                      + (", within each replicate" if len(tabs) > 1 else "") + "), percentile CI"}


def _flip_stats(d: np.ndarray, n_mc: int, seed: int) -> tuple[np.ndarray, bool]:
    """The sign-flip null distribution of mean(d): all 2^H patterns (H <= EXACT_SIGN_FLIP_MAX), else n_mc
    seeded random ones. -> (statistics, exact)."""
    H = d.size
    if H <= EXACT_SIGN_FLIP_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=H)))
        return signs @ np.abs(d) / H, True
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_mc, H))
    return signs @ np.abs(d) / H, False


def sign_flip_test(d: Sequence[float], *, n_mc: int = 100000, seed: int = 0) -> dict:
    """One-sided sign-flip permutation test of mean(d) < 0 for paired differences d (one per held-out).
    p = share of sign patterns whose mean is <= the observed one (the observed pattern included)."""
    d = np.asarray(d, float)
    H = int(d.size)
    if H == 0:
        return {"test": "sign_flip", "alternative": "less", "p_value": None, "n": 0, "min_p": None}
    obs = float(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    stats, exact = _flip_stats(d, n_mc, seed)
    if exact:
        p, min_p = float(np.mean(stats <= obs + tol)), 2.0 ** -H
    else:
        p = float((1 + np.sum(stats <= obs + tol)) / (1 + n_mc))
        min_p = max(2.0 ** -H, 1.0 / (1 + n_mc))
    return {"test": "sign_flip", "alternative": "less", "statistic": obs, "p_value": p, "n": H,
            "exact": exact, "min_p": min_p}


def detectable_shift(d: Sequence[float], *, alpha: float = 0.05, n_mc: int = 20000, seed: int = 0) -> float | None:
    """The power the design has, in barrier units: the smallest δ >= 0 such that the sign-flip test would
    reject at `alpha` if every paired difference were its observed deviation from the mean, shifted down
    by δ (the observed spread, with a true effect δ). None when no shift can reach alpha (2^-H >= alpha).
    Found by bisection (the p-value falls as δ grows)."""
    d = np.asarray(d, float)
    if d.size == 0 or 2.0 ** -d.size >= alpha:
        return None
    e = d - d.mean()

    def p_at(delta: float) -> float:
        return sign_flip_test(e - delta, n_mc=n_mc, seed=seed)["p_value"]

    lo, hi = 0.0, float(np.abs(e).max()) * 2 + 1e-12
    if p_at(lo) < alpha:
        return 0.0
    while p_at(hi) >= alpha:  # only when Monte Carlo noise keeps p above alpha: widen
        hi *= 2
        if hi > 1e12:
            return None
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if p_at(mid) < alpha else (mid, hi)
    return hi


def paired_differences(star, regular) -> np.ndarray:
    """d_h = mean over stars of star[j, h] − mean over sources of regular[s, h] (one star: star[h])."""
    return _star_table(star).mean(axis=0) - np.asarray(regular, float).mean(axis=0)


def headline(star, regular, *, alpha: float = 0.05, n_boot: int = 10000, seed: int = 0,
             blocks: Sequence[tuple] | None = None) -> dict:
    """The dependence-aware comparison (docs/method.md, "The headline test"): the cluster-bootstrap ratio and
    difference (sources, held-outs and stars resampled), the sign-flip p-value on the per-held-out
    contrasts averaged over stars (pooled over replicates when `blocks` gives several), each star's own
    ratio, and the design's power: the smallest attainable p and the smallest ratio reduction it would call
    significant at `alpha`."""
    blocks = [(star, regular)] if blocks is None else list(blocks)
    boot = cluster_bootstrap(None, None, n_boot=n_boot, seed=seed, blocks=blocks)
    d = np.concatenate([paired_differences(a, b) for a, b in blocks])
    test = sign_flip_test(d, seed=seed)
    if boot["n_heldouts"] < MIN_FOR_SPREAD:  # two held-outs cannot estimate a spread
        boot["ratio"]["ci95"] = [None, None]
        boot["difference"]["ci95"] = [None, None]
    shift = detectable_shift(d, alpha=alpha, seed=seed)
    rm = boot["regular_mean"]
    per_star = [float(_ratio(row.mean(), np.asarray(b, float).mean())) for a, b in blocks for row in _star_table(a)]
    return {"ratio": boot["ratio"], "difference": boot["difference"], "star_mean": boot["star_mean"],
            "regular_mean": rm, "n_sources": boot["n_sources"], "n_heldouts": boot["n_heldouts"],
            "n_stars": boot["n_stars"], "n_replicates": boot["n_replicates"],
            "star_ratios": [None if np.isnan(r) else r for r in per_star],
            "ci_method": boot["method"], "n_boot": n_boot, "test": test, "p_value": test["p_value"],
            "min_p": test["min_p"], "alpha": alpha,
            "detectable": {"shift": shift, "ratio": None if shift is None or rm <= 0 else 1 - shift / rm,
                           "meaning": "the ratio at or below which the sign-flip test rejects at alpha, given "
                                      "the spread of the per-held-out contrasts observed here"}}


# ---------------------------------------------------------------- pairwise tests (secondary)

def mann_whitney_less(x: Sequence[float], y: Sequence[float]) -> dict | None:
    """One-sided Mann–Whitney U: are values in x stochastically smaller than those in y? Treats every pair
    as independent, which study pairs are not (they share models): a secondary row only."""
    from scipy.stats import mannwhitneyu

    if len(x) == 0 or len(y) == 0:
        return None
    res = mannwhitneyu(np.asarray(x, float), np.asarray(y, float), alternative="less")
    return {"test": "mann_whitney_u", "alternative": "less", "statistic": float(res.statistic),
            "p_value": float(res.pvalue), "n_x": len(x), "n_y": len(y)}


def paired_wilcoxon_less(x: Sequence[float], y: Sequence[float]) -> dict | None:
    """One-sided Wilcoxon signed-rank on paired values (x_i - y_i < 0?)."""
    from scipy.stats import wilcoxon

    d = np.asarray(x, float) - np.asarray(y, float)
    if d.size == 0 or not np.any(d != 0):
        return None
    res = wilcoxon(d, alternative="less")
    return {"test": "wilcoxon_signed_rank", "alternative": "less", "statistic": float(res.statistic),
            "p_value": float(res.pvalue), "n": int(d.size), "mean_difference": float(d.mean())}


# ---------------------------------------------------------------- trends

def ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc ** 2).sum())
    return slope, float(y.mean() - slope * x.mean())


def _row_mean(table: np.ndarray, s_idx: np.ndarray | None, h_idx: np.ndarray) -> np.ndarray:
    """Per-resample mean of one sweep row: 1-D (held-outs) or 2-D (sources × held-outs)."""
    if table.ndim == 1:
        return table[h_idx].mean(axis=1)
    return grid_means(table, s_idx, h_idx)


def trend_fit(x: Sequence[float], tables: Sequence, *, log_x: bool = False, log_y: bool = False,
              shared_heldouts: bool = False, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Fit y = a + b·X to the per-row mean barriers (X = log10 x if log_x; y = log10 mean if log_y, so b is a
    power-law exponent) and a cluster-bootstrap CI of b. `tables[i]`: row i's barriers, 1-D over held-outs
    or 2-D sources × held-outs. shared_heldouts: every row measured on the same held-outs (a |Z| sweep),
    so one held-out resample serves all rows; otherwise each row's models are resampled independently
    (a width sweep trains a population per width). The interval covers sampling of models, not lack of fit."""
    xs = np.asarray(x, float)
    tabs = [np.asarray(t, float) for t in tables]
    X = np.log10(xs) if log_x else xs
    means = np.array([t.mean() for t in tabs])
    out = {"x": xs.tolist(), "means": means.tolist(), "log_x": log_x, "log_y": log_y, "slope": None, "intercept": None,
           "ci95": [None, None], "n_points": len(xs), "n_boot": n_boot, "dropped_draws": 0,
           "monotone": _monotone(means)}
    if len(xs) < 2 or len(set(X.tolist())) < 2 or (log_y and np.any(means <= 0)):
        out["reason"] = "fewer than two distinct x values" if len(set(X.tolist())) < 2 else "a mean barrier of 0"
        return out
    Y = np.log10(means) if log_y else means
    out["slope"], out["intercept"] = ols(X, Y)
    heldouts = [t.shape[-1] for t in tabs]
    if min(heldouts) < MIN_FOR_SPREAD:
        out["reason"] = "fewer than 3 held-outs per row: no interval"
        return out
    rng = np.random.default_rng(seed)
    draws = np.empty((n_boot, len(tabs)))
    shared = rng.integers(0, heldouts[0], size=(n_boot, heldouts[0])) if shared_heldouts else None
    for i, t in enumerate(tabs):
        h_idx = shared if shared_heldouts else rng.integers(0, t.shape[-1], size=(n_boot, t.shape[-1]))
        s_idx = rng.integers(0, t.shape[0], size=(n_boot, t.shape[0])) if t.ndim == 2 else None
        draws[:, i] = _row_mean(t, s_idx, h_idx)
    ok = np.all(draws > 0, axis=1) if log_y else np.ones(n_boot, bool)
    Yb = np.log10(np.where(draws > 0, draws, np.nan)) if log_y else draws
    Xc = X - X.mean()
    slopes = (Yb - Yb.mean(axis=1, keepdims=True)) @ Xc / (Xc ** 2).sum()
    slopes[~ok] = np.nan
    out["ci95"] = _ci(slopes, level)
    out["dropped_draws"] = int((~ok).sum())
    return out


def _monotone(means: np.ndarray) -> bool:
    d = np.diff(np.asarray(means, float))
    return bool(np.all(d <= 0) or np.all(d >= 0))


def classify_trend(fit: dict) -> str:
    """"falls" only if the slope's whole CI is below 0, "rises" if above, else "no clear trend"."""
    lo, hi = (fit or {}).get("ci95") or (None, None)
    if lo is None or hi is None:
        return "no clear trend"
    if hi < 0:
        return "falls"
    if lo > 0:
        return "rises"
    return "no clear trend"


def table_ratio(num, den, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """mean(num) / mean(den) for two S×H tables measured on the same sources and held-outs (e.g. aligned vs
    unaligned regular–regular barriers), with a two-way cluster-bootstrap CI (same resampled grid for both)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    if num.shape != den.shape or num.ndim != 2:
        raise ValueError(f"tables must have one S×H shape, got {num.shape} and {den.shape}")
    S, H = num.shape
    rng = np.random.default_rng(seed)
    h_idx = rng.integers(0, H, size=(n_boot, H))
    s_idx = rng.integers(0, S, size=(n_boot, S))
    n_m, d_m = grid_means(num, s_idx, h_idx), grid_means(den, s_idx, h_idx)
    est = _ratio(num.mean(), den.mean())
    ci = _ci(_ratio(n_m, d_m), level) if H >= MIN_FOR_SPREAD else [None, None]
    return {"estimate": None if np.isnan(est) else float(est), "ci95": ci, "n_sources": S, "n_heldouts": H}


def grid_mean_ci(table, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> list[float | None]:
    """95% CI of the mean of an S×H table (source × held-out pairs) from the two-way cluster bootstrap;
    [None, None] with fewer than 3 held-outs."""
    t = np.asarray(table, float)
    S, H = t.shape
    if H < MIN_FOR_SPREAD:
        return [None, None]
    rng = np.random.default_rng(seed)
    h_idx = rng.integers(0, H, size=(n_boot, H))
    s_idx = rng.integers(0, S, size=(n_boot, S))
    return _ci(grid_means(t, s_idx, h_idx), level)
