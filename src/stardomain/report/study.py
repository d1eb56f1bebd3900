"""The study report: plots (matplotlib's object API, PNG), `report.md`, and a self-contained `report.html`
(markdown-it, PNGs embedded as data URIs) written from `results.json` alone, so a report can be rebuilt
without recomputing.

Figures: mean ± std interpolation curves per pair kind on one figure (the paper's key figure), barrier
distributions per pair kind, barrier against |Z| / width / depth / t-sampling when swept.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
from markdown_it import MarkdownIt
from matplotlib.figure import Figure  # the object API: never switches a notebook's backend

from .. import pairkinds
from .averaging import plot_result, report_section
from ..checkpoint import atomic_write_bytes, atomic_write_text

# Live views of the pair-kind table (stardomain.pairkinds): a registered kind is named and coloured too.
KIND_NAMES = pairkinds.KindField("label")
KIND_COLORS = pairkinds.KindField("color")
METRIC_NAMES = {"train_loss": "training-loss barrier", "test_loss": "test-loss barrier",
                "train_acc": "training-accuracy barrier (drop)", "test_acc": "test-accuracy barrier (drop)",
                "train_loss_ts": "training-loss barrier, temperature-scaled",
                "test_loss_ts": "test-loss barrier, temperature-scaled"}


def axis_label(metric: str) -> str:
    """A barrier axis with its unit: loss barriers in nats of cross-entropy, accuracy drops as fractions."""
    return METRIC_NAMES[metric] + (" (nats)" if "loss" in metric else " (fraction)")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _own_figure(kind: str) -> bool:
    """Unaligned barriers are an order of magnitude higher and would flatten the rest: their own figure."""
    entry = pairkinds.get(kind)
    return entry is not None and entry.own_figure


def plot_curves(results: dict, kinds: tuple[str, ...] | None = None, title: str = "along linear paths") -> bytes | None:
    """Loss along the path, mean ± std over pairs, one line per pair kind (train and test panels)."""
    pairs = {k: v for k, v in results.get("pairs", {}).items() if v and (
        k in kinds if kinds is not None else not _own_figure(k))}
    if not pairs:
        return None
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, split in zip(axes, ("train", "test")):
        for kind, recs in pairs.items():
            t = np.asarray(recs[0]["t"], float)
            y = np.asarray([r[split]["loss"] for r in recs], float)
            m, s = y.mean(0), (y.std(0, ddof=1) if len(y) > 2 else np.zeros_like(t))  # n <= 2: no spread
            c = KIND_COLORS.get(kind)
            ax.plot(t, m, "-o", ms=3, color=c, label=f"{KIND_NAMES.get(kind, kind)} (n={len(recs)})")
            ax.fill_between(t, m - s, m + s, color=c, alpha=0.18)
        ax.set_xlabel("t   (0 = first model, 1 = second model)")
        ax.set_ylabel(f"{split} cross-entropy (nats)")
        ax.set_title(f"{split} loss {title}\n(mean ± std; no band for n ≤ 2)", fontsize=10)
        ax.grid(alpha=0.3)
    # the legend below both panels, where it covers no curve
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 3), 1, 1))
    return _png(fig)


def plot_distributions(results: dict) -> bytes | None:
    """Per pair kind: every barrier as a dot, with a box plot, for train and test loss."""
    pairs = {k: v for k, v in results.get("pairs", {}).items() if v and not _own_figure(k)}
    if not pairs:
        return None
    metrics = ["train_loss", "test_loss"]
    if any("train_loss_ts" in (r.get("barrier") or {}) for recs in pairs.values() for r in recs):
        metrics += ["train_loss_ts", "test_loss_ts"]  # the temperature-scaling control
    rows = len(metrics) // 2
    fig = Figure(figsize=(11, 4.2 * rows))
    axes = fig.subplots(rows, 2, squeeze=False)
    axes = axes.reshape(-1)
    kinds = list(pairs)
    for ax, metric in zip(axes, metrics):
        data = [[r["barrier"][metric] for r in pairs[k] if r["barrier"].get(metric) is not None] for k in kinds]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(kinds) + 1))
        rng = np.random.default_rng(0)
        for i, (k, d) in enumerate(zip(kinds, data), start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=12, color=KIND_COLORS.get(k), alpha=0.8, zorder=3)
        ax.set_xticklabels([KIND_NAMES.get(k, k).split(" (")[0] for k in kinds], rotation=20, fontsize=8)
        ax.set_ylabel(axis_label(metric))
        ax.set_title(f"{METRIC_NAMES[metric]} per pair kind", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)


def plot_sweep(results: dict, dim: str, metric: str = "train_loss") -> bytes | None:
    rows = results.get("sweeps", {}).get(dim) or []
    if not rows:
        return None
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    labels = [str(r["value"]) for r in rows]
    numeric = all(isinstance(r["value"], (int, float)) for r in rows)
    xs = [r["value"] for r in rows] if numeric else list(range(len(rows)))
    fits = (results.get("trends") or {}).get(dim, {}).get(metric, {})
    for kind in ("star_heldout", "regular_regular"):
        pts = [(x, r["summary"].get(kind, {}).get(metric)) for x, r in zip(xs, rows)]
        pts = [(x, s) for x, s in pts if s and s["n"]]
        if not pts:
            continue
        ys = [p[1]["mean"] for p in pts]
        # error bars: the bootstrap 95% CI of each mean (none for n <= 2)
        err = np.array([[m - (s["ci95"][0] if s["ci95"][0] is not None else m),
                         (s["ci95"][1] if s["ci95"][1] is not None else m) - m] for m, (_, s) in zip(ys, pts)]).T
        ax.errorbar([p[0] for p in pts], ys, yerr=np.clip(err, 0, None), fmt="o", capsize=4, color=KIND_COLORS[kind],
                    label=KIND_NAMES[kind] + " (mean, 95% CI)")
        f = fits.get(kind)
        if f and f.get("slope") is not None and numeric:
            xg = np.geomspace(min(f["x"]), max(f["x"]), 50)
            yg = f["intercept"] + f["slope"] * np.log10(xg)
            yg = 10 ** yg if f["log_y"] else yg
            ci = "—" if f["ci95"][0] is None else f"{f['ci95'][0]:+.2f} to {f['ci95'][1]:+.2f}"
            what = "exponent" if f["log_y"] else "slope per 10×"
            ax.plot(xg, yg, "--", color=KIND_COLORS[kind], lw=1.2,
                    label=f"fit: {what} {f['slope']:+.2f} (95% CI {ci}), {f['direction']}")
    reg = results.get("summary", {}).get("regular_regular", {}).get(metric)
    if dim in ("n_sources", "t_sampling") and reg:
        ax.axhline(reg["mean"], ls="--", color=KIND_COLORS["regular_regular"],
                   label=f"regular – regular (main study) {reg['mean']:.3g}")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels)
    if numeric and dim in ("n_sources", "width") and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels)
        ax.minorticks_off()
    names = {"n_sources": "number of sources |Z|", "width": "width", "depth": "depth", "t_sampling": "t sampling"}
    ax.set_xlabel(names.get(dim, dim))
    ax.set_ylabel(axis_label(metric))
    if dim == "width" and fits and numeric and min(xs) > 0:
        ax.set_yscale("log")  # a power law is a straight line
    ax.set_title(f"{METRIC_NAMES[metric]} against {names.get(dim, dim)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


_VARIANT_ORDER = ("full", *pairkinds.VARIANTS)


def _variant_rows(results: dict) -> tuple[list[str], dict[str, dict[str, str]], list[str]]:
    """(bases, base -> {variant -> kind}, the variants measured for some base, in order) over the measured
    kinds, when some variant other than "none" was measured (study.eval.variants); else ([], {}, [])."""
    summary = results.get("summary", {})
    entries = [pairkinds.get(k) for k in summary]
    bases = list(dict.fromkeys(e.base for e in entries if e is not None and e.variant not in (None, "none")))
    table = {b: {v: k for v in _VARIANT_ORDER if (k := b if v == "full" else pairkinds.variant_of(b, v)) in summary}
             for b in bases if b in summary}
    return list(table), table, [v for v in _VARIANT_ORDER if any(v in row for row in table.values())]


def plot_variants(results: dict) -> bytes | None:
    """Which symmetry carries the barrier: the mean barrier (95% CI) after each alignment variant, per
    base pair kind, train and test loss."""
    bases, table, variants = _variant_rows(results)
    if not bases:
        return None
    summary = results["summary"]
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    width = 0.8 / len(bases)
    for ax, metric in zip(axes, ("train_loss", "test_loss")):
        for i, base in enumerate(bases):
            xs, ys, err = [], [], []
            for j, v in enumerate(variants):
                s = summary.get(table[base].get(v), {}).get(metric)
                if not s or not s.get("n"):
                    continue
                lo, hi = s["ci95"] if s["ci95"][0] is not None else (s["mean"], s["mean"])
                xs.append(j + (i - (len(bases) - 1) / 2) * width)
                ys.append(s["mean"])
                err.append((max(0.0, s["mean"] - lo), max(0.0, hi - s["mean"])))
            ax.bar(xs, ys, width, yerr=np.array(err).T if err else None, capsize=3, color=KIND_COLORS.get(base),
                   alpha=0.85, label=KIND_NAMES.get(base, base).split(" (")[0])
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels([pairkinds.VARIANT_WORDS[v] for v in variants], rotation=15, fontsize=8)
        ax.set_ylabel(axis_label(metric))
        ax.set_title(f"{METRIC_NAMES[metric]} after each alignment\n(mean, 95% CI)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def make_plots(results: dict) -> dict[str, bytes]:
    plots = {"curves": plot_curves(results), "barriers": plot_distributions(results)}
    measured = [pairkinds.get(k) for k, v in results.get("pairs", {}).items() if v]
    unaligned = [e for e in measured if e is not None and e.base and e.align is False]
    if unaligned:
        plots["alignment_control"] = plot_curves(results, tuple(dict.fromkeys(
            k for e in unaligned for k in (e.base, e.name))), "with and without weight matching")
    plots["variants"] = plot_variants(results)
    for dim in results.get("sweeps", {}):
        plots[f"sweep_{dim}"] = plot_sweep(results, dim)
    return {k: v for k, v in plots.items() if v}


def _f(x, nd=4) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _ci(ci, nd=4) -> str:
    lo, hi = ci or (None, None)
    return "—" if lo is None or hi is None else f"[{lo:.{nd}f}, {hi:.{nd}f}]"


def _p(p) -> str:
    return "—" if p is None else f"{p:.4g}"


def _summary_table(results: dict) -> list[str]:
    rows = ["| pair kind | metric | mean | std | 95% CI | n | min | max |", "|---|---|---|---|---|---|---|---|"]
    for kind, metrics in results.get("summary", {}).items():
        for m in METRIC_NAMES:
            s = metrics.get(m)
            if s:
                rows.append(f"| {KIND_NAMES.get(kind, kind)} | {m} | {_f(s['mean'])} | {_f(s['std'])} | "
                            f"{_ci(s['ci95'])} | {s['n']} | {_f(s['min'])} | {_f(s['max'])} |")
    return rows


def _variants_lines(results: dict, plots: dict[str, str], metric: str = "train_loss") -> list[str]:
    """The alignment variants' table: each variant's barrier, the share of the hidden-unit axes it aligns,
    and how much of full alignment's reduction of the barrier (unaligned − full) it achieves alone."""
    bases, table, variants = _variant_rows(results)
    if not bases:
        return []
    summary, pairs = results["summary"], results.get("pairs", {})
    head = "| alignment | share of hidden-unit axes aligned |" + "".join(
        f" {KIND_NAMES.get(b, b).split(' (')[0]} | of full alignment's reduction |" for b in bases)
    rows = [head, "|---|---|" + "---|---|" * len(bases)]
    for v in variants:
        fracs = [r["alignment"].get("permutable_fraction") for b in bases for r in pairs.get(table[b].get(v), [])]
        frac = 0.0 if v == "none" else next((f for f in fracs if f is not None), None)
        cells = [pairkinds.VARIANT_WORDS[v], "—" if frac is None else f"{100 * frac:.0f}%"]
        for b in bases:
            s = summary.get(table[b].get(v), {}).get(metric)
            full, none = (summary.get(table[b].get(w), {}).get(metric) for w in ("full", "none"))
            gain = none["mean"] - full["mean"] if full and none else None
            cells += [_pm(s) + (f" {_ci(s['ci95'])}" if s and s["ci95"][0] is not None else ""),
                      "—" if not s or not gain or gain <= 0 else f"{100 * (none['mean'] - s['mean']) / gain:.0f}%"]
        rows.append("| " + " | ".join(cells) + " |")
    lines = ["## Which symmetry carries the barrier", "",
             f"{METRIC_NAMES[metric].capitalize()} after aligning only one kind of permutation group, the others "
             "left as trained: attention heads, MLP hidden units (a block's inner units), the residual stream "
             "(docs/method.md, \"Alignment variants\"). The reduction column is (unaligned − variant) / "
             "(unaligned − full) of the means: the part of full alignment's gain one symmetry achieves alone.",
             "", *rows, ""]
    if "variants" in plots:
        lines += [f"![variants]({plots['variants']})", ""]
    return lines


def _tests_table(results: dict) -> list[str]:
    rows = ["| comparison | metric | test | statistic | p-value | role |", "|---|---|---|---|---|---|"]
    for name, by_metric in results.get("tests", {}).items():
        for m, t in (by_metric or {}).items():
            if t and m in METRIC_NAMES:
                stat = "—" if t.get("statistic") is None else f"{t['statistic']:.4g}"
                rows.append(f"| {name.replace('_', ' ')} | {m} | {t['test']} ({t['alternative']}) | "
                            f"{stat} | {_p(t.get('p_value'))} | {t.get('role', '')} |")
    return rows if len(rows) > 2 else []


def _quality_table(results: dict) -> list[str]:
    q = results.get("star_quality", {})
    rows = ["| model | train loss | train acc | test loss | test acc |", "|---|---|---|---|---|"]
    reg = q.get("regular")
    if reg:
        rows.append(f"| regular (mean ± std, n={reg['train_loss']['n']}) | {_f(reg['train_loss']['mean'])} ± "
                    f"{_f(reg['train_loss']['std'])} | {_f(reg['train_acc']['mean'])} | {_f(reg['test_loss']['mean'])}"
                    f" ± {_f(reg['test_loss']['std'])} | {_f(reg['test_acc']['mean'])} |")
    for name in ("star", "average", "merged"):
        if name in q:
            m = q[name]
            rows.append(f"| {name} | {_f(m['train']['loss'])} | {_f(m['train']['acc'])} | {_f(m['test']['loss'])} | "
                        f"{_f(m['test']['acc'])} |")
    return rows


def _sweep_tables(results: dict) -> list[str]:
    out = []
    for dim, rows in results.get("sweeps", {}).items():
        out += [f"### Sweep: {dim}", "", "| value | star–held-out train-loss barrier | regular–regular | "
                "ratio (95% CI) | star train loss | star test acc |", "|---|---|---|---|---|---|"]
        for r in rows:
            sh = r["summary"].get("star_heldout", {}).get("train_loss")
            rr = r["summary"].get("regular_regular", {}).get("train_loss")
            hl = r.get("headline")
            ratio = f"{_f(hl['ratio']['estimate'], 3)} {_ci(hl['ratio']['ci95'], 3)}" if hl else "—"
            out.append(f"| {r['value']} | {_pm(sh)} | {_pm(rr)} | {ratio} | "
                       f"{_f(r['star']['metrics']['train']['loss'])} | {_f(r['star']['metrics']['test']['acc'])} |")
        out.append("")
        out += _trend_table(results, dim)
    return out


def _pm(s: dict | None) -> str:
    if not s or not s.get("n"):
        return "—"
    return _f(s["mean"]) + (f" ± {_f(s['std'])}" if s.get("std") is not None else "") + f" (n={s['n']})"


def _trend_table(results: dict, dim: str) -> list[str]:
    """The fitted trend of a sweep, with its cluster-bootstrap interval (stardomain.stats.trend_fit)."""
    by_metric = (results.get("trends") or {}).get(dim)
    if not by_metric:
        return []
    what = "exponent b of c·width^b" if dim == "width" else "slope per tenfold |Z|"
    rows = [f"Fitted trend ({what}; 95% CI from resampling each row's models; 'falls' only when the whole "
            "interval is below 0):", "", "| metric | pair kind | fitted | 95% CI | trend | means monotone |",
            "|---|---|---|---|---|---|"]
    for m, fits in by_metric.items():
        for kind, f in fits.items():
            rows.append(f"| {m} | {KIND_NAMES.get(kind, kind)} | {_f(f.get('slope'), 3)} | {_ci(f.get('ci95'), 3)} | "
                        f"{f.get('direction', '—')} | {'yes' if f.get('monotone') else 'no'} |")
    return rows + [""]


def _headline_lines(results: dict) -> list[str]:
    hl = results.get("headline")
    if not hl:
        return []
    r, d = hl["ratio"], hl["difference"]
    rows = ["| quantity | estimate | 95% CI |", "|---|---|---|",
            f"| star–held-out / regular–regular ({hl['metric']}) | {_f(r['estimate'], 3)} | {_ci(r['ci95'], 3)} |",
            f"| star–held-out − regular–regular | {_f(d['estimate'], 4)} | {_ci(d['ci95'], 4)} |"]
    return ["## Headline statistics", "",
            f"Intervals: {hl['ci_method']} ({hl['n_boot']} resamples; {hl['n_sources']} sources, {hl['n_heldouts']} "
            f"held-outs). Test: {hl['test_name']}, one-sided, p = {_p(hl['p_value'])}; the smallest p this design can "
            f"give is {_p(hl['min_p'])} (α = {hl['alpha']:g}). Verdict: **{hl['verdict']}**"
            + (f"; flags: {'; '.join(hl['flags'])}." if hl.get("flags") else "."), "", *rows, ""]


def _controls_lines(results: dict) -> list[str]:
    c = results.get("controls") or {}
    rows = ["| control | value | 95% CI | note |", "|---|---|---|---|"]
    for cen in (c.get("centres") or {}).values():
        rows.append(f"| {cen['name']} – held-out barrier (star: {_f(cen['star_mean'])}) | {_f(cen['mean'])} | — | "
                    f"sign-flip p (star lower) = {_p(cen['test']['p_value'])}; "
                    f"{'as low as the star' if cen['as_low'] else 'above the star'} |")
    al = c.get("alignment")
    if al:
        sh = al["share_removed"]
        rows.append(f"| share of the regular–regular barrier removed by alignment | {_f(sh['estimate'], 3)} | "
                    f"{_ci(sh['ci95'], 3)} | unaligned {_f(al['unaligned_mean'])}, aligned {_f(al['aligned_mean'])} |")
    ts = c.get("temperature_scaled")
    if ts:
        rows.append(f"| star–held-out / regular–regular after temperature scaling | "
                    f"{_f(ts['ratio']['estimate'], 3)} | "
                    f"{_ci(ts['ratio']['ci95'], 3)} | star {_f(ts['star_mean'])}, regular {_f(ts['regular_mean'])}, "
                    f"sign-flip p = {_p(ts['p_value'])} |")
    if len(rows) == 2:
        return []
    return ["## Controls", "", "Naive centres, alignment and calibration: what else could explain a low star "
            "barrier.", "", *rows, ""]


def _bma_section(results: dict, raw: dict | None = None) -> str | None:
    """report.averaging.report_section on the full BMA result (with its timings)."""
    res = raw or results.get("bma")
    if not res:
        return None
    return report_section(res)


def _cost_lines(timings: dict | None) -> list[str]:
    if not timings:
        return []
    by = timings.get("total_seconds_by_op", {})
    tasks = timings.get("tasks", {})
    n = {op: sum(1 for v in tasks.values() if v.get("op") == op) for op in by}
    lines = ["## Cost (this machine; not part of results.json)", "",
             "| task kind | count | total seconds | seconds each |", "|---|---|---|---|"]
    for op, s in by.items():
        lines.append(f"| {op} | {n.get(op, 0)} | {s:.1f} | {s / max(1, n.get(op, 1)):.2f} |")
    return lines + [""]


def _provenance() -> str:
    """When and with what this report was written (the models' own files record where they ran)."""
    import time

    from ..checkpoint import package_versions

    v = package_versions()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    others = ", ".join(f"{k} {v[k]}" for k in v if k != "stardomain")
    return f"Written {when} by stardomain {v['stardomain']} ({others}); the resolved config is at the end."


def _config_lines(cfg: dict) -> list[str]:
    """The study's resolved config (every default filled in) as YAML: `stardomain run` reads it back."""
    import yaml

    if not cfg:
        return []
    return ["## Config", "", "The resolved config of this study, every default filled in (`stardomain config`"
            " prints the same for a file; saved as YAML it runs the same study):", "", "```yaml",
            yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None).rstrip(), "```", ""]


def render_markdown(results: dict, plots: dict[str, str], timings: dict | None = None,
                    bma_raw: dict | None = None) -> str:
    cfg = results.get("config", {})
    st = cfg.get("study", {})
    model = cfg.get("model", {})
    lines = ["# Star-domain study", "", f"**{results.get('verdict_line', '')}**", "",
             f"Data **{cfg.get('data', {}).get('name') or cfg.get('data', {}).get('factory')}**, model "
             f"**{model.get('name') or model.get('factory')}** {model.get('kwargs', {})}, "
             f"{st.get('n_sources')} sources, {st.get('n_heldouts')} held-outs, barriers on "
             f"{st.get('eval', {}).get('points')} points, "
             f"{'after weight matching' if st.get('eval', {}).get('align') else 'without alignment'}.", "",
             _provenance(), "",
             "## Verdict", "", results.get("verdict", ""), "", *_headline_lines(results), *_controls_lines(results),
             "## Interpolation curves", "", f"![curves]({plots['curves']})" if "curves" in plots else "", "",
             "## Barriers", "", "95% CI of each mean: source × held-out kinds resample sources and held-outs "
             "(two-way cluster bootstrap); other kinds resample their pairs (each has its own held-out or source, "
             "except held-out – held-out pairs, which share held-outs). — : n ≤ 2, no spread or interval.", "",
             *_summary_table(results), ""]
    if "barriers" in plots:
        lines += [f"![barriers]({plots['barriers']})", ""]
    if "alignment_control" in plots:
        lines += ["The alignment control: the same pairs with and without weight matching.", "",
                  f"![alignment_control]({plots['alignment_control']})", ""]
    lines += _variants_lines(results, plots)
    t = _tests_table(results)
    if t:
        lines += ["## Tests", "", "One-sided: is the first kind's barrier below the second's? The sign-flip test "
                  "on per-held-out paired differences is the headline (valid although pairs share models). "
                  "Mann–Whitney U compares all pairs as if independent, and the paired Wilcoxon test is a rank "
                  "version of the headline pairing: secondary rows.", "", *t, ""]
    lines += ["## Is the star a solution at all?", "", *_quality_table(results), ""]
    sw = _sweep_tables(results)
    if sw:
        lines += ["## Sweeps", "", *sw]
        for k, p in plots.items():
            if k.startswith("sweep_"):
                lines += [f"![{k}]({p})", ""]
    b = _bma_section(results, bma_raw)
    if b:
        lines += [b, ""]
    if "bma" in plots:
        lines += ["Reliability diagrams and each metric against K, the number of models averaged:", "",
                  f"![bma]({plots['bma']})", ""]
    lines += _config_lines(cfg)
    lines += _cost_lines(timings)
    return "\n".join(lines) + "\n"


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
          "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
          "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}")


_CONFIG_BLOCK = re.compile(r'(<h2>Config</h2>\n(?:<p>.*?</p>\n)?)(<pre><code class="language-yaml">.*?</code></pre>\n)',
                           re.S)


def _md_to_html(md: str, images: dict[str, bytes], plots: dict[str, str]) -> str:
    """report.md rendered by markdown-it (CommonMark + tables; raw HTML off, line breaks kept), each image
    link to a plot replaced by the PNG as a data URI, so the page is one self-contained file."""
    src_to_png = {path: images[name] for name, path in plots.items()}
    md_it = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("table")
    tokens = md_it.parse(md)
    for child in (c for tok in tokens for c in tok.children or []):
        png = src_to_png.get(child.attrGet("src")) if child.type == "image" else None
        if png is not None:
            child.attrSet("src", "data:image/png;base64," + base64.b64encode(png).decode())
    body = md_it.renderer.render(tokens, md_it.options, {})
    body = _CONFIG_BLOCK.sub(lambda m: f"{m.group(1)}<details><summary>the config as YAML</summary>\n{m.group(2)}"
                             "</details>\n", body, count=1)  # collapsed: long, and last
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Star-domain study</title><style>" + _STYLE
            + "</style></head><body>\n" + body + "</body></html>\n")


def study_html(results: dict) -> str:
    """A study as a notebook shows it (`sd.Study`): the report's verdict and tables as an HTML fragment,
    without the figures (they are in the study folder's report)."""
    md_it = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("table")
    body = md_it.render(render_markdown(results, {}))
    body = _CONFIG_BLOCK.sub(lambda m: f"{m.group(1)}<details><summary>the config as YAML</summary>\n{m.group(2)}"
                             "</details>\n", body, count=1)
    return f"<div class='stardomain-study'>{body}</div>"


def write_report(results: dict, out: str | Path, timings: dict | None = None,
                 bma_raw: dict | None = None) -> dict[str, Path]:
    """Write plots/*.png, report.md (images by relative path) and report.html (images embedded)."""
    out = Path(out)
    images = make_plots(results)
    paths = {}
    for name, png in images.items():
        p = out / "plots" / f"{name}.png"
        atomic_write_bytes(p, png)
        paths[name] = f"plots/{name}.png"
    if bma_raw and bma_raw.get("_curves"):  # the BMA figure, as `stardomain bma --plot` draws it
        plot_result(bma_raw, out / "plots" / "bma.png")
        images["bma"] = (out / "plots" / "bma.png").read_bytes()
        paths["bma"] = "plots/bma.png"
    md = render_markdown(results, paths, timings, bma_raw)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", _md_to_html(md, images, paths))
    return {"md": out / "report.md", "html": out / "report.html", **{k: out / v for k, v in paths.items()}}
