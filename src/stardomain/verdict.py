"""What a study's numbers say, computed from `results.json` content alone (so a report can be rebuilt).

`analyse` adds the dependence-aware blocks (stardomain.stats): `headline` (ratio and difference of
star–held-out to regular–regular barriers with two-way cluster-bootstrap CIs, the per-held-out sign-flip
p-value, its smallest attainable value, the verdict word and the flags that weaken it), `controls`
(naive centres, the share of the barrier alignment removes, temperature scaling) and `trends` (fits over
|Z| and width sweeps). `verdict_line` is the one sentence the CLI and the reports open with; `verdict`
the longer paragraph after it.

Verdict rules (metric: training-loss barrier): *supported* when the ratio's CI lies below 1, p < alpha
and the star is not a worse fit than every regular model; *not supported* when the ratio's CI lies at or
above 1 or the star's mean barrier is not lower; *inconclusive* otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import pairkinds, stats

HEADLINE_METRIC = "train_loss"
MAIN_METRICS = ("train_loss", "test_loss", "train_acc", "test_acc", "train_loss_ts", "test_loss_ts")
SECONDARY = "secondary (pairs share models; not independent)"
CENTRES = pairkinds.KindField("centre_name", only_set=True)  # naive-centre kind -> words (live view of the table)


# ---------------------------------------------------------------- tables from pair records

def heldout_values(records: list[dict], metric: str, heldouts: list[str]) -> np.ndarray | None:
    """One value per held-out (records' `b` is the held-out), in the order of `heldouts`."""
    by = {r["b"]: (r.get("barrier") or {}).get(metric) for r in records}
    vals = [by.get(h) for h in heldouts]
    return None if any(v is None for v in vals) else np.asarray(vals, float)


def grid(records: list[dict], metric: str,
         heldouts: list[str] | None = None) -> tuple[np.ndarray, list[str], list[str]] | None:
    """regular[s, h] from source×held-out records (`a` source, `b` held-out), sources in order of appearance."""
    sources = list(dict.fromkeys(r["a"] for r in records))
    heldouts = heldouts or list(dict.fromkeys(r["b"] for r in records))
    by = {(r["a"], r["b"]): (r.get("barrier") or {}).get(metric) for r in records}
    vals = [[by.get((s, h)) for h in heldouts] for s in sources]
    if not sources or any(v is None for row in vals for v in row):
        return None
    return np.asarray(vals, float), sources, heldouts


def star_table(records: list[dict], metric: str, heldouts: list[str]) -> np.ndarray | None:
    """stars × held-outs from star–held-out records (`a` a star, `b` a held-out), held-outs in that order."""
    g = grid(records, metric, heldouts)
    return None if g is None else g[0]


def star_means(records: list[dict], metric: str, heldouts: list[str]) -> np.ndarray | None:
    """Per held-out, the mean over stars of the star–held-out barrier (one star: its barriers)."""
    t = star_table(records, metric, heldouts)
    return None if t is None else t.mean(axis=0)


def _star_and_grid(pairs: dict, metric: str, reg_kind: str = "regular_regular"):
    """(stars × held-outs, sources × held-outs, held-out names) or None."""
    sh, rr = pairs.get("star_heldout") or [], pairs.get(reg_kind) or []
    if not sh or not rr:
        return None
    g = grid(rr, metric)
    if g is None:
        return None
    table, _, heldouts = g
    star = star_table(sh, metric, heldouts)
    return None if star is None else (star, table, heldouts)


# ---------------------------------------------------------------- analysis

def analyse(results: dict, *, alpha: float = 0.05, n_boot: int = 10000, seed: int = 0) -> dict:
    """-> {"headline": ..., "controls": ..., "trends": ...} (headline None without the two main pair kinds)."""
    pairs = results.get("pairs", {})
    out: dict[str, Any] = {"headline": None, "controls": {}, "trends": trends(results, n_boot=min(n_boot, 4000),
                                                                              seed=seed)}
    sg = _star_and_grid(pairs, HEADLINE_METRIC)
    if sg is None:
        return out
    star, table, heldouts = sg
    hl = stats.headline(star, table, alpha=alpha, n_boot=n_boot, seed=seed)
    hl["metric"] = HEADLINE_METRIC
    hl["test_name"] = headline_test_name(hl)
    centres = {}
    for kind, name in pairkinds.naive_centres().items():
        c = heldout_values(pairs.get(kind) or [], HEADLINE_METRIC, heldouts)
        if c is None:
            continue
        t = stats.sign_flip_test(star.mean(axis=0) - c, seed=seed)
        centres[kind] = {"name": name, "mean": float(c.mean()), "star_mean": float(star.mean()), "test": t,
                         "as_low": not (t["p_value"] is not None and t["p_value"] < alpha)}
    out["controls"]["centres"] = centres
    out["controls"].update(_alignment_share(pairs, n_boot, seed))
    ts = _star_and_grid(pairs, "train_loss_ts")
    if ts is not None:
        h2 = stats.headline(ts[0], ts[1], alpha=alpha, n_boot=n_boot, seed=seed)
        out["controls"]["temperature_scaled"] = {"metric": "train_loss_ts", **{k: h2[k] for k in (
            "ratio", "difference", "star_mean", "regular_mean", "p_value", "min_p")}}
    hl["flags"] = _flags(results, hl, centres, out["trends"], alpha)
    hl["verdict"] = _word(hl, _star_worse_fit(results))
    out["headline"] = hl
    return out


def headline_test_name(hl: dict) -> str:
    stars = f", averaged over {hl['n_stars']} stars" if hl.get("n_stars", 1) > 1 else ""
    return (f"sign-flip permutation test over {hl['n_heldouts']} held-outs (per-held-out paired differences"
            f"{stars})")


def row_headline(pairs: dict, *, alpha: float = 0.05, n_boot: int = 10000, seed: int = 0) -> dict | None:
    """A sweep row's star/regular ratio and difference with cluster-bootstrap CIs and its sign-flip p (e.g.
    the paper's "star ≈ 0.31 × regular at every width" is a statement about these)."""
    sg = _star_and_grid(pairs, HEADLINE_METRIC)
    if sg is None:
        return None
    h = stats.headline(sg[0], sg[1], alpha=alpha, n_boot=n_boot, seed=seed)
    return {"metric": HEADLINE_METRIC, **{k: h[k] for k in ("ratio", "difference", "p_value", "min_p", "n_sources",
                                                            "n_heldouts", "n_stars", "star_ratios")}}


def _alignment_share(pairs: dict, n_boot: int, seed: int) -> dict:
    """How much of the regular–regular barrier alignment removes: 1 − aligned / unaligned, on one grid."""
    a = grid(pairs.get("regular_regular") or [], HEADLINE_METRIC)
    u = grid(pairs.get("regular_regular_unaligned") or [], HEADLINE_METRIC)
    if a is None or u is None:
        return {}
    ua = grid(pairs["regular_regular_unaligned"], HEADLINE_METRIC, a[2])
    if ua is None or ua[1] != a[1]:
        return {}
    r = stats.table_ratio(a[0], ua[0], n_boot=n_boot, seed=seed)
    share = None if r["estimate"] is None else 1 - r["estimate"]
    ci = [None if r["ci95"][1] is None else 1 - r["ci95"][1], None if r["ci95"][0] is None else 1 - r["ci95"][0]]
    return {"alignment": {"metric": HEADLINE_METRIC, "aligned_mean": float(a[0].mean()),
                          "unaligned_mean": float(ua[0].mean()), "aligned_over_unaligned": r,
                          "share_removed": {"estimate": share, "ci95": ci}}}


def _star_worse_fit(results: dict) -> bool:
    q = results.get("star_quality", {})
    if "star" not in q or "regular" not in q:
        return False
    return q["star"]["train"]["loss"] > q["regular"]["train_loss"]["max"]


def _flags(results: dict, hl: dict, centres: dict, trend: dict, alpha: float) -> list[str]:
    flags = _design_flags(hl, _star_worse_fit(results), alpha)
    low = [kind for kind, c in centres.items() if c["as_low"]]
    if low:
        q = results.get("star_quality", {})
        own = {k: q.get(_centre_model(k)) for k in low}
        worse = [k for k in low if own.get(k) and "star" in q and own[k]["train"]["loss"] > q["star"]["train"]["loss"]]
        note = ""
        if worse and len(worse) == len(low):
            note = "; both worse fits than the star" if len(low) > 1 else "; a worse fit than the star"
        elif worse:
            note = f"; {', '.join(centres[k]['name'] for k in worse)} a worse fit than the star"
        flags.append(f"naive centre as low ({', '.join(centres[k]['name'] for k in low)}{note})")
    z = (trend.get("n_sources") or {}).get(HEADLINE_METRIC, {}).get("star_heldout")
    if z and z.get("slope") is not None:
        if z["direction"] == "no clear trend":
            flags.append("no clear trend over |Z|")
        elif not z["monotone"]:
            flags.append("trend over |Z| not monotone")
        elif z["direction"] == "rises":
            flags.append("barrier rises with |Z|")
    return flags


def _design_flags(hl: dict, star_worse_fit: bool, alpha: float) -> list[str]:
    """The flags any headline can carry: a worse-fit star, stars that disagree, too few held-outs."""
    flags = ["star a worse fit than the regular models"] if star_worse_fit else []
    est, per = hl["ratio"]["estimate"], [r for r in hl.get("star_ratios") or [] if r is not None]
    if est is not None and est < 1 and len(per) > 1 and any(r >= 1 for r in per):
        flags.append(f"stars disagree ({sum(r >= 1 for r in per)} of {len(per)} at or above the regular barrier)")
    if hl["min_p"] is not None and hl["min_p"] > alpha:
        flags.append(f"too few held-outs for significance at α = {alpha:g} ({hl['n_heldouts']} held-outs: "
                     f"smallest possible p = {hl['min_p']:.3g})")
    return flags


def combined(results: list[dict], *, alpha: float = 0.05, n_boot: int = 10000, seed: int = 0) -> dict:
    """One verdict over independent study replicates (disjoint model seeds): the headline statistics with
    every replicate a block (stats.headline: pooled sign-flip test, bootstrap within replicates), the same
    verdict rule. -> {"headline", "verdict_line", "replicates": each one's verdict line}."""
    blocks = []
    for r in results:
        sg = _star_and_grid(r.get("pairs") or {}, HEADLINE_METRIC)
        if sg is None:
            return {"headline": None, "verdict_line": verdict_line({}), "replicates": [x.get("verdict_line")
                                                                                       for x in results]}
        blocks.append(sg[:2])
    hl = stats.headline(None, None, blocks=blocks, alpha=alpha, n_boot=n_boot, seed=seed)
    hl["metric"] = HEADLINE_METRIC
    hl["test_name"] = headline_test_name(hl) + f", pooled over {len(blocks)} study seeds"
    worse = any(_star_worse_fit(r) for r in results)
    hl["flags"] = _design_flags(hl, worse, alpha)
    hl["verdict"] = _word(hl, worse)
    return {"headline": hl, "verdict_line": verdict_line({"headline": hl}),
            "replicates": [r.get("verdict_line") for r in results]}


def _word(hl: dict, star_worse_fit: bool) -> str:
    r = hl["ratio"]
    lo, hi = r["ci95"]
    if r["estimate"] is None:
        return "inconclusive"
    if (lo is not None and lo >= 1) or r["estimate"] >= 1:
        return "not supported"
    if hi is not None and hi < 1 and hl["p_value"] is not None and hl["p_value"] < hl["alpha"] \
            and not star_worse_fit:
        return "supported"
    return "inconclusive"


def trends(results: dict, *, n_boot: int = 4000, seed: int = 0) -> dict:
    """Fitted trends over the sweeps: barrier against log10|Z| (held-outs shared by every |Z|), and the
    power-law exponent of barrier against width (a population per width), per main loss metric."""
    out: dict[str, Any] = {}
    sweeps = results.get("sweeps", {})
    for dim, log_y, kinds, shared in (("n_sources", False, ("star_heldout",), True),
                                      ("width", True, ("star_heldout", "regular_regular"), False)):
        rows = sweeps.get(dim) or []
        if len(rows) < 2:
            continue
        by_metric = {}
        for metric in ("train_loss", "test_loss"):
            fits = {}
            for kind in kinds:
                xs, tabs = [], []
                for row in rows:
                    t = _row_table(row["pairs"], kind, metric)
                    if t is not None:
                        xs.append(row["value"])
                        tabs.append(t)
                if len(xs) < 2 or (shared and len({t.shape for t in tabs}) != 1):
                    continue
                f = stats.trend_fit(xs, tabs, log_x=True, log_y=log_y, shared_heldouts=shared, n_boot=n_boot,
                                    seed=seed)
                f["direction"] = stats.classify_trend(f)
                f["model"] = ("log10(barrier) = a + b·log10(width): b is the exponent" if log_y else
                              "barrier = a + b·log10|Z|: b is the change per tenfold |Z|")
                fits[kind] = f
            if fits:
                by_metric[metric] = fits
        if by_metric:
            out[dim] = by_metric
    return out


def _row_table(pairs: dict, kind: str, metric: str) -> np.ndarray | None:
    recs = pairs.get(kind) or []
    if not recs:
        return None
    if kind == "star_heldout":  # stars × held-outs; one star: its held-out values
        t = star_table(recs, metric, sorted({r["b"] for r in recs}))
        return t[0] if t is not None and t.shape[0] == 1 else t
    g = grid(recs, metric)
    return None if g is None else g[0]


# ---------------------------------------------------------------- words

def _f(x: float | None, nd: int = 3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _ci(ci, nd: int = 2) -> str:
    lo, hi = ci or (None, None)
    if lo is None or hi is None:
        return "—"
    return f"{lo:.{nd}f} to {hi:.{nd}f}" if min(lo, hi) < 0 else f"{lo:.{nd}f}–{hi:.{nd}f}"


def _p(p: float | None) -> str:
    return "—" if p is None else f"{p:.3g}"


def verdict_line(results: dict) -> str:
    """One sentence: supported / not supported / inconclusive, the effect, the valid p-value, the flags."""
    hl = results.get("headline")
    if not hl:
        return ("No verdict on this task: the study measured no star–held-out and regular–regular pairs "
                "(add both to study.pairs).")
    r = hl["ratio"]
    ci = r["ci95"]
    ci_txt = (f"95% CI {_ci(ci)}, cluster bootstrap over models" if ci[0] is not None else
              f"no interval with {hl['n_heldouts']} held-outs")
    effect = (f"star–held-out barrier is {r['estimate']:.2f}× the regular–regular one ({ci_txt})"
              if r["estimate"] is not None else "the regular–regular barrier is 0, so no ratio")
    stars = f", {hl['n_stars']} stars" if hl.get("n_stars", 1) > 1 else ""
    reps = f", {hl['n_replicates']} study seeds" if hl.get("n_replicates", 1) > 1 else ""
    line = (f"{hl['verdict'].capitalize()} on this task: {effect}, p = {_p(hl['p_value'])} "
            f"(sign-flip test over {hl['n_heldouts']} held-outs{stars}{reps})")
    if hl.get("flags"):
        line += "; flags: " + "; ".join(hl["flags"])
    return line + "."


def power_words(hl: dict) -> str:
    """What the design can detect, in one sentence (stats.detectable_shift)."""
    det = hl.get("detectable") or {}
    if det.get("ratio") is None:
        return (f"No effect can be significant with {hl['n_heldouts']} held-outs (smallest attainable p "
                f"{_p(hl['min_p'])} ≥ α).")
    return (f"Power: with the spread of per-held-out contrasts seen here, the test calls a star–held-out barrier "
            f"significant at α = {hl['alpha']:g} from {det['ratio']:.2f}× the regular one down (a "
            f"{100 * (1 - det['ratio']):.0f}% reduction).")


def _summary_words(s: dict) -> str:
    spread = f" ± {_f(s['std'])}" if s.get("std") is not None else ""
    ci = f"95% CI {_f(s['ci95'][0])}–{_f(s['ci95'][1])}, " if s["ci95"][0] is not None else ""
    return f"{_f(s['mean'])}{spread} ({ci}n={s['n']})"


def verdict(results: dict, metric: str = HEADLINE_METRIC) -> str:
    """The paragraph after the verdict line: numbers, the star's quality, centres, controls, trends."""
    s = results.get("summary", {})
    sh, rr = s.get("star_heldout", {}).get(metric), s.get("regular_regular", {}).get(metric)
    hl = results.get("headline")
    parts: list[str] = []
    if sh and rr and sh["n"] and rr["n"] and hl:
        parts.append(
            f"The star–held-out {metric.replace('_', ' ')} barrier is {_summary_words(sh)} against "
            f"{_summary_words(rr)} for regular–regular pairs (source × held-out, {_aligned(results)}). "
            f"Difference {_f(hl['difference']['estimate'])} (95% CI {_ci(hl['difference']['ci95'], 3)}), ratio "
            f"{_f(hl['ratio']['estimate'], 2)} (95% CI {_ci(hl['ratio']['ci95'])}); both intervals resample "
            f"sources and held-outs, not pairs. The headline test pairs each held-out's star barrier with the mean "
            f"of the sources' barriers to it: one-sided sign-flip p = {_p(hl['p_value'])} (smallest attainable "
            f"{_p(hl['min_p'])} with {hl['n_heldouts']} held-outs; α = {hl['alpha']:g}). {power_words(hl)}")
        mw = (results.get("tests", {}).get("star_heldout_below_regular_regular") or {}).get(metric)
        if mw:
            parts.append(f"A Mann–Whitney U test over all pairs gives p = {_p(mw['p_value'])}, but it treats the "
                         f"{rr['n']} regular pairs as independent while they share {hl['n_sources']} sources and "
                         f"{hl['n_heldouts']} held-outs, so it overstates the evidence (secondary row).")
    parts += _quality_words(results)
    parts += _control_words(results, metric)
    hh = s.get("heldout_heldout", {}).get(metric)
    if hh and hh["n"]:
        parts.append(f"Held-out–held-out pairs have {_summary_words(hh)}.")
    ss = s.get("star_source", {}).get(metric)
    if ss and ss["n"]:
        parts.append(f"The star to its own sources: {_summary_words(ss)}.")
    parts += _trend_words(results, metric)
    return " ".join(parts) if parts else "Not enough pairs were measured to say anything."


def _aligned(results: dict) -> str:
    ev = ((results.get("config") or {}).get("study") or {}).get("eval") or {}
    return "after weight matching" if ev.get("align", True) else "without alignment"


def _quality_words(results: dict) -> list[str]:
    q = results.get("star_quality", {})
    if "star" not in q:
        return []
    reg = q["regular"]["train_loss"]
    stars = q.get("stars") or [q["star"]]
    star_l = q["star"]["train"]["loss"]
    if star_l > reg["max"]:
        judge = (f"higher than every regular model's ({star_l / reg['mean']:.2f}× their mean), so the star is a "
                 "worse fit than a regular solution and a low barrier to it says less")
    elif star_l < reg["min"]:
        judge = "lower than every regular model's: the star is at least as good a solution"
    else:
        judge = "within the range of the regular models': the star is as good a solution as they are"
    own = (f"The star's own training loss is {_f(star_l, 4)} (test accuracy {100 * q['star']['test']['acc']:.2f}%)"
           if len(stars) == 1 else
           f"The {len(stars)} stars' own training losses are {', '.join(_f(s['train']['loss'], 4) for s in stars)} "
           f"(mean {_f(star_l, 4)}, test accuracy {100 * q['star']['test']['acc']:.2f}% on average)")
    out = [f"{own} against {_f(reg['mean'], 4)} on average (range {_f(reg['min'], 4)}–{_f(reg['max'], 4)}; test "
           f"accuracy {100 * q['regular']['test_acc']['mean']:.2f}%) for the regular models: {judge}."]
    return out + _fit_words(q.get("fit") or {})


def _fit_words(fit: dict) -> list[str]:
    """How long each group trained and whether the regular models are solutions in the paper's sense."""
    if not fit:
        return []
    bits = []
    for group, name in (("sources", "sources"), ("heldouts", "held-outs"), ("stars", "stars")):
        g = fit.get(group)
        if not g:
            continue
        reached = [r for r in g["reached"] if r is not None]
        met = f", the rule met by {sum(reached)} of {len(reached)}" if reached else ""
        ep = [e for e in g["epochs"] if e is not None]
        span = f"{min(ep)}–{max(ep)}" if ep and min(ep) != max(ep) else (str(ep[0]) if ep else "?")
        bits.append(f"{name}: {'; '.join(g['criteria'])} ({span} epochs{met})")
    sol = fit.get("solution_loss")
    words = ("are solutions in the paper's sense (training loss at most " if fit.get("regular_are_solutions") else
             "are not all solutions in the paper's sense (near-zero training loss, here at most ")
    return [f"Training ran to these criteria: {'; '.join(bits)}. The regular models {words}{_f(sol, 3)})."]


def _centre_model(kind: str) -> str | None:
    """The star_quality entry of the centre a naive-centre kind pairs with the held-outs."""
    entry = pairkinds.get(kind)
    return entry.a if entry is not None else None


def _control_words(results: dict, metric: str) -> list[str]:
    c = results.get("controls") or {}
    q = results.get("star_quality", {})
    out = []
    for kind, cen in (c.get("centres") or {}).items():
        own = q.get(_centre_model(kind))
        own_txt = f" (its own training loss {_f(own['train']['loss'], 4)})" if own else ""
        worse = bool(own and "star" in q and own["train"]["loss"] > q["star"]["train"]["loss"])
        if not cen["as_low"]:
            judge = "significantly above the star's, so Starlight's star is a better centre than this one."
        elif worse:
            judge = ("not significantly above the star's, but this centre is a worse fit than the star, and a low "
                     "barrier to a poor model is cheap.")
        else:
            judge = "not significantly above the star's: this naive centre does as well, so the star is not special."
        out.append(f"The {cen['name']} of the sources{own_txt} has a held-out barrier of {_f(cen['mean'])} against "
                   f"the star's {_f(cen['star_mean'])} (sign-flip p = {_p(cen['test']['p_value'])} that the star's is "
                   f"lower): {judge}")
    al = c.get("alignment")
    if al:
        sh = al["share_removed"]
        out.append(f"Without alignment, regular–regular barriers are {_f(al['unaligned_mean'])} against "
                   f"{_f(al['aligned_mean'])} after weight matching: permutation symmetry explains "
                   f"{_pct(sh['estimate'])} of the barrier (95% CI {_pct(sh['ci95'][0])}–{_pct(sh['ci95'][1])}).")
    ts = c.get("temperature_scaled")
    if ts:
        out.append(f"After temperature scaling each interpolated model, star–held-out {_f(ts['star_mean'])} against "
                   f"regular–regular {_f(ts['regular_mean'])}: ratio {_f(ts['ratio']['estimate'], 2)} (95% CI "
                   f"{_ci(ts['ratio']['ci95'])}), sign-flip p = {_p(ts['p_value'])}.")
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _trend_words(results: dict, metric: str) -> list[str]:
    tr = results.get("trends") or {}
    out = []
    z = (tr.get("n_sources") or {}).get(metric, {}).get("star_heldout")
    if z and z.get("slope") is not None:
        vals = ", ".join(f"|Z|={int(x)}: {_f(m)}" for x, m in zip(z["x"], z["means"]))
        word = {"falls": "falls", "rises": "rises", "no clear trend": "shows no clear trend"}[z["direction"]]
        out.append(f"Against |Z| the star–held-out barrier {word}: fitted slope {z['slope']:+.3f} per tenfold |Z| "
                   f"(95% CI {_ci(z['ci95'], 3)}){'' if z['monotone'] else ', and the means are not monotone'} "
                   f"({vals}).")
    w = (tr.get("width") or {}).get(metric)
    if w:
        names = {"star_heldout": "star–held-out", "regular_regular": "regular–regular"}
        bits = [f"{names.get(kind, kind)} exponent {f['slope']:+.2f} (95% CI {_ci(f['ci95'])})"
                for kind, f in w.items() if f.get("slope") is not None]
        if bits:
            out.append("Barrier against width, fitted as c·width^b (the paper assumes b ≈ −1, later work reports "
                       "≈ −1/2): " + "; ".join(bits) + ".")
    return out
