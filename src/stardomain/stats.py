"""Statistics that respect the study's design (numpy/scipy only; nothing here knows about models).

Every barrier pair shares its models with other pairs: the S×H regular–regular pairs are built from S
sources and H held-outs, and the H star–held-out pairs share the star. Pairs are therefore not
independent observations, and tests that treat them as such (Mann–Whitney over pairs) overstate the
evidence. Here the *models* are the units:

- `cluster_bootstrap`: resample sources and held-outs (with replacement, two-way), recompute the
  star–held-out mean over the resampled held-outs and the regular–regular mean over the resampled
  source×held-out grid; percentile intervals of their ratio and difference.
- `sign_flip_test`: per-held-out paired differences d_h = star[h] − mean_s regular[s, h]; under the null
  each d_h is symmetric about 0, so all 2^H sign patterns are equally likely (exact when H ≤ 16).
  Its smallest attainable p is 2^-H: with 4 held-outs no result can be significant at 5%.
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


def resampled_means(star: np.ndarray, regular: np.ndarray, s_idx: np.ndarray,
                    h_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For B resamples (rows of s_idx: B×S, h_idx: B×H): the star–held-out mean over the resampled
    held-outs and the regular–regular mean over the resampled source×held-out grid."""
    return star[h_idx].mean(axis=1), grid_means(np.asarray(regular, float), s_idx, h_idx)


def _ratio(a: np.ndarray | float, b: np.ndarray | float):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(b) > 0, np.asarray(a, float) / np.asarray(b, float), np.nan)


def cluster_bootstrap(star: Sequence[float], regular, *, n_boot: int = 10000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Two-way cluster bootstrap of star–held-out vs regular–regular (`regular[s, h]`: source s, held-out h;
    `star[h]`). Resamples source indices and held-out indices with replacement; the same held-outs enter
    both means of a resample, so the comparison stays paired. -> ratio and difference with percentile CIs."""
    star = np.asarray(star, float)
    regular = np.asarray(regular, float)
    S, H = regular.shape
    if star.shape != (H,):
        raise ValueError(f"star has {star.shape[0]} values, the regular table {H} held-out columns")
    rng = np.random.default_rng(seed)
    h_idx = rng.integers(0, H, size=(n_boot, H))
    s_idx = rng.integers(0, S, size=(n_boot, S))
    sm, rm = resampled_means(star, regular, s_idx, h_idx)
    ratio_d, diff_d = _ratio(sm, rm), sm - rm
    est_ratio = float(_ratio(star.mean(), regular.mean()))
    return {"ratio": {"estimate": None if np.isnan(est_ratio) else est_ratio, "ci95": _ci(ratio_d, level)},
            "difference": {"estimate": float(star.mean() - regular.mean()), "ci95": _ci(diff_d, level)},
            "star_mean": float(star.mean()), "regular_mean": float(regular.mean()),
            "n_sources": S, "n_heldouts": H, "n_boot": n_boot, "undefined_ratio_draws": int(np.isnan(ratio_d).sum()),
            "method": "two-way cluster bootstrap (sources and held-outs resampled with replacement), percentile CI"}


def sign_flip_test(d: Sequence[float], *, n_mc: int = 100000, seed: int = 0) -> dict:
    """One-sided sign-flip permutation test of mean(d) < 0 for paired differences d (one per held-out).
    p = share of sign patterns whose mean is <= the observed one (the observed pattern included)."""
    d = np.asarray(d, float)
    H = int(d.size)
    if H == 0:
        return {"test": "sign_flip", "alternative": "less", "p_value": None, "n": 0, "min_p": None}
    obs = float(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if H <= EXACT_SIGN_FLIP_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=H)))
        stats = signs @ np.abs(d) / H
        p = float(np.mean(stats <= obs + tol))
        exact, min_p = True, 2.0 ** -H
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice((1.0, -1.0), size=(n_mc, H))
        stats = signs @ np.abs(d) / H
        p = float((1 + np.sum(stats <= obs + tol)) / (1 + n_mc))
        exact, min_p = False, max(2.0 ** -H, 1.0 / (1 + n_mc))
    return {"test": "sign_flip", "alternative": "less", "statistic": obs, "p_value": p, "n": H,
            "exact": exact, "min_p": min_p}


def paired_differences(star: Sequence[float], regular) -> np.ndarray:
    """d_h = star[h] − mean over sources of regular[s, h]."""
    return np.asarray(star, float) - np.asarray(regular, float).mean(axis=0)


def headline(star: Sequence[float], regular, *, alpha: float = 0.05, n_boot: int = 10000, seed: int = 0) -> dict:
    """The dependence-aware comparison: cluster-bootstrap ratio/difference and the sign-flip p-value."""
    boot = cluster_bootstrap(star, regular, n_boot=n_boot, seed=seed)
    test = sign_flip_test(paired_differences(star, regular), seed=seed)
    if boot["n_heldouts"] < MIN_FOR_SPREAD:  # two held-outs cannot estimate a spread
        boot["ratio"]["ci95"] = [None, None]
        boot["difference"]["ci95"] = [None, None]
    return {"ratio": boot["ratio"], "difference": boot["difference"], "star_mean": boot["star_mean"],
            "regular_mean": boot["regular_mean"], "n_sources": boot["n_sources"], "n_heldouts": boot["n_heldouts"],
            "ci_method": boot["method"], "n_boot": n_boot, "test": test, "p_value": test["p_value"],
            "min_p": test["min_p"], "alpha": alpha}


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
