"""How a BMA result looks: the table the CLI prints, the report section (tables and plain sentences), and
the figure (reliability diagrams and metric-vs-K curves). Reads only the result dict of
`averaging.evaluate_predictors`; computes nothing."""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np

from .. import metrics as M
from ..averaging import PREDICTORS
from ..checkpoint import atomic_write_bytes


def predictors(result: dict) -> list[str]:
    """Predictor names in a result, in display order (each predictor's `display` rank; names no
    registered predictor knows after those; individual sources last)."""
    rank = {p.name: p.display for p in PREDICTORS}
    names = [n for n in result if not n.startswith(("_", "source_"))]
    names = sorted(names, key=lambda n: rank.get(n, 1000))  # stable: unknown names keep their order
    return names + sorted((n for n in result if n.startswith("source_")), key=lambda s: int(s.split("_")[1]))


def _label(name: str) -> str:
    d = M.metric(name)
    return d.label if d else name


def table(result: dict, cols: Sequence[str] | None = None) -> str:
    """The plain-text table the CLI prints: one row per predictor (sources apart), one column per metric
    of metrics.METRICS present in the result, and seconds."""
    cols = list(cols) if cols is not None else [*_metric_columns(result), "seconds"]
    lines = [f"{'predictor':<16}" + "".join(f"{_label(c)[:12]:>13}" for c in cols)]
    for name in predictors(result):
        if not name.startswith("source_"):
            e = result[name]
            lines.append(f"{name:<16}" + "".join(f"{e[c]:>13.4f}" if isinstance(e.get(c), float) else f"{'n/a':>13}"
                                                 for c in cols))
    return "\n".join(lines)


def _metric_columns(result: dict) -> list[str]:
    """Every metric of metrics.METRICS that some predictor of the result has."""
    names = predictors(result)
    return [d.name for d in M.METRICS if any(d.name in result.get(n, {}) for n in names)]


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _cell(e: dict, m: str) -> str:
    v = _num(e.get(m))
    if math.isnan(v):
        return "n/a"
    ci = _num((e.get("ci95") or {}).get(m))
    return f"{v:.4f}" if math.isnan(ci) else f"{v:.4f} ± {ci:.4f}"


def report_section(result: dict) -> str:
    """A markdown section: predictors x metrics (± 95% CI half-width over evaluation seeds for BMA,
    over sources for the source mean), and sentences, generated from the numbers, saying where
    star-domain BMA beats the deep ensemble and where it does not."""
    info = result.get("_info", {})
    cols = _metric_columns(result)
    names = [n for n in predictors(result) if not n.startswith("source_")]
    lines = ["## Bayesian model averaging", ""]
    lines.append(f"K = {info.get('k')} sampled models per BMA run, {len(info.get('seeds', []))} evaluation seed(s), "
                 f"{info.get('n_sources')} sources, test set of {info.get('test_size')} examples; sources "
                 f"{'aligned by weight matching' if info.get('aligned') else 'NOT aligned'}; BatchNorm "
                 f"{'recomputed for every sampled model' if info.get('bn_recalibrated') else 'absent'}. "
                 "Values after ± are 95% CI half-widths (t-interval over evaluation seeds; over sources for "
                 "the source mean). ECE uses 15 equal-width bins, ACE 15 equal-mass bins; Brier is the "
                 "multi-class sum over classes. OOD shifts: "
                 f"{', '.join(info.get('ood_shifts', [])) or 'none'}.")
    lines += ["", "| predictor | " + " | ".join(_label(c) for c in cols) + " | seconds |",
              "|---|" + "---|" * (len(cols) + 1)]
    for n in names:
        e = result[n]
        lines.append(f"| {n} | " + " | ".join(_cell(e, c) for c in cols) + f" | {_num(e.get('seconds')):.2f} |")
    lines.append("")
    if "star_bma" in result and "ensemble" in result:
        lines += _star_bma_sentences(result, cols)
    if result.get("_by_n"):
        lines += _by_n_table(result["_by_n"])
    return "\n".join(lines) + "\n"


def _star_bma_sentences(result: dict, cols: list[str]) -> list[str]:
    """Where star-domain BMA beats the ensemble (each metric's direction from its descriptor), within
    the CI, or loses; then the star, the fusion star and the regular-domain control in numbers."""
    info = result.get("_info", {})
    sb, en = result["star_bma"], result["ensemble"]
    better, worse, tied = [], [], []
    for c in cols:
        a, b = _num(sb.get(c)), _num(en.get(c))
        if math.isnan(a) or math.isnan(b):
            continue
        ci = _num((sb.get("ci95") or {}).get(c))
        ci = 0.0 if math.isnan(ci) else ci
        txt = f"{_label(c)} ({a:.4f} vs {b:.4f})"
        if abs(a - b) <= ci:
            tied.append(txt)
        elif (a > b) == M.metric(c).higher_is_better:
            better.append(txt)
        else:
            worse.append(txt)
    parts, lines = [], []
    if better:
        parts.append("Star-domain BMA beats the deep ensemble on " + ", ".join(better))
    if worse:
        parts.append(("it is worse on " if better else "Star-domain BMA is worse than the deep ensemble on ")
                     + ", ".join(worse))
    if tied:
        parts.append("the difference lies within the 95% CI on " + ", ".join(tied))
    if parts:
        lines.append("; ".join(parts) + " (star BMA vs ensemble).")
    if "star" in result:
        st = result["star"]
        lines.append(f"The star alone reaches accuracy {_num(st.get('accuracy')):.4f} and NLL "
                     f"{_num(st.get('nll')):.4f} at the cost of one network, against "
                     f"{_num(en.get('accuracy')):.4f} and {_num(en.get('nll')):.4f} for the "
                     f"{info.get('n_sources')}-model ensemble.")
    if "fusion_star" in result:
        fu = result["fusion_star"]
        lines.append(f"The fusion star (mu > 0) reaches accuracy {_num(fu.get('accuracy')):.4f} and NLL "
                     f"{_num(fu.get('nll')):.4f}, one network against the ensemble's "
                     f"{_num(en.get('accuracy')):.4f} and {_num(en.get('nll')):.4f}.")
    if "regular_bma" in result:
        rb = result["regular_bma"]
        lines.append(f"Control: regular-domain BMA has NLL {_cell(rb, 'nll')} and misclassification AUROC "
                     f"{_cell(rb, 'auroc_misclassification')}, star-domain BMA {_cell(sb, 'nll')} and "
                     f"{_cell(sb, 'auroc_misclassification')}.")
    return lines


def _by_n_table(by_n: dict) -> list[str]:
    kinds = ("ensemble", "star_bma", "regular_bma")
    lines = ["", "Against the number of sources n (NLL / misclassification AUROC):", "",
             "| n | " + " | ".join(kinds) + " |", "|---|---|---|---|"]
    for n, e in sorted(by_n.items(), key=lambda kv: int(kv[0])):
        cells = [f"{_cell(e[p], 'nll')} / {_cell(e[p], 'auroc_misclassification')}" if p in e else "n/a"
                 for p in kinds]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def plot_result(result: dict, path) -> None:
    """Reliability diagrams and metric-vs-K curves in one PNG (written atomically)."""
    from matplotlib.figure import Figure  # the object API: never switches a notebook's backend

    fig = Figure(figsize=(15, 9))
    axes = fig.subplots(2, 3)
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    colours = {"ensemble": "C0", "star_bma": "C1", "regular_bma": "C2", "star": "C3", "weight_average": "C4",
               "fusion_star": "C5", "source_0": "C7"}
    for name, col in colours.items():
        rel = (result.get(name) or {}).get("reliability")
        if not rel:
            continue
        pts = [(c, a) for c, a, n in zip(rel["confidence"], rel["accuracy"], rel["count"]) if n and c is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", color=col, ms=3, label=f"{name} (ECE {_num(result[name].get('ece')):.3f})")
    ax.set(xlabel="confidence (top-label)", ylabel="accuracy", title="reliability (15 equal-width bins)",
           xlim=(0, 1), ylim=(0, 1))
    rel_legend = ax.get_legend_handles_labels()  # drawn below the figure, where it covers no curve
    curves = result.get("_curves", {})
    panels = ("nll", "ece", "auroc_misclassification", "accuracy", "ood_auroc")
    for ax, m in zip(axes.flat[1:], panels):
        title = _label(m)
        for kind, col in (("star_bma", "C1"), ("regular_bma", "C2")):
            c = curves.get(kind)
            if not c or m not in c:
                continue
            mean = np.array([_num(v) for v in c[m]])
            sd = np.array([_num(v) for v in c.get(m + "_std", [None] * len(mean))])
            ax.plot(c["k"], mean, "o-", color=col, label=kind)
            if not np.isnan(sd).all():
                ax.fill_between(c["k"], mean - sd, mean + sd, color=col, alpha=0.2)
        for name, col, ls in (("ensemble", "C0", "--"), ("star", "C3", ":"), ("weight_average", "C4", "-.")):
            v = _num((result.get(name) or {}).get(m))
            if not math.isnan(v):
                ax.axhline(v, color=col, ls=ls, label=name)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="K (models averaged)", title=f"{title} vs K")
        if m == "nll":
            ax.set_ylabel("test cross-entropy (nats)")
    # the legends below the panels, where they cover no curve: reliability (with ECE), then the K panels
    handles: dict = {}
    for ax in axes.flat[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if rel_legend[0]:
        fig.legend(*rel_legend, loc="lower center", bbox_to_anchor=(0.5, 0.035), ncol=len(rel_legend[0]),
                   fontsize=8, frameon=False, title="reliability", title_fontsize=8)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8,
                   frameon=False)
    fig.suptitle(f"BMA: {result.get('_info', {}).get('n_sources')} sources, K = {result.get('_info', {}).get('k')}")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": "stardomain bma"})  # see checkpoint.check_output
    atomic_write_bytes(path, buf.getvalue())


