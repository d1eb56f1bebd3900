"""Assembling results.json from a finished plan's artifacts: models, pair records, per-kind summaries,
the pairwise tests, the verdict blocks (stardomain.verdict). Deterministic: no timings, fixed order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UserError
from ..pairkinds import CENTRES, GROUP_WORDS
from ..pairkinds import get as pair_kind
from ..pairkinds import naive_centres
from ..stats import (grid_mean_ci, mann_whitney_less, paired_differences, paired_wilcoxon_less, sign_flip_test,
                     summarize)
from ..verdict import (MAIN_METRICS, SECONDARY, analyse, grid, heldout_values, row_headline, star_means, verdict,
                       verdict_line)
from ..utils import round_floats
from .plan import Plan, Task
from .tasks import _record_json, _read_json

RESULTS_FORMAT = 1


def _metrics_of(records: list[dict]) -> list[str]:
    names: list[str] = []
    for r in records:
        for k, v in (r.get("barrier") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in names:
                names.append(k)
    return names


def summarize_pairs(pairs: dict[str, list[dict]], *, seed: int = 0, n_boot: int = 10000) -> dict:
    """Per kind and metric: `summarize`. The CI resamples what the pairs' models are: source × held-out
    kinds resample sources and held-outs (two-way cluster bootstrap); star–held-out, star–source and
    centre–held-out pairs each have their own held-out or source, so resampling pairs is resampling models.
    (Pairs within one population, e.g. held-out–held-out, share models; their CI resamples pairs: `ci_method`
    says which.)"""
    out: dict = {}
    for kind, recs in pairs.items():
        entry = pair_kind(kind)
        out[kind] = {}
        for m in _metrics_of(recs):
            s = summarize([r["barrier"].get(m) for r in recs], seed=seed, n_boot=n_boot)
            several = entry is not None and entry.a == "star" and len({r["a"] for r in recs}) > 1
            g = grid(recs, m) if entry is not None and (entry.grid or several) else None
            if g is not None and s["n"] >= 3:
                s["ci95"] = grid_mean_ci(g[0], n_boot=n_boot, seed=seed)
                s["ci_method"] = (f"two-way cluster bootstrap over stars and {GROUP_WORDS[entry.b]}" if several
                                  else "two-way cluster bootstrap over sources and held-outs")
            elif s["ci95"][0] is not None:
                s["ci_method"] = "bootstrap over pairs" + (
                    f" (pairs share {GROUP_WORDS[entry.a]})" if entry is not None and entry.within else "")
            out[kind][m] = s
    return out


# ---------------------------------------------------------------- assembling results

def _model_entry(root: Path, task: Task) -> dict:
    side = _read_json(root / task.output)
    if side is None:
        raise UserError(f"study artifact {task.output} is missing; re-run the study to finish it")
    return {"label": task.label, **{k: side[k] for k in ("role", "seed", "file", "sha256", "metrics", "fit", "info")
                                    if k in side}}


def _pair_records(root: Path, tasks: dict[str, Task], keys: list[str]) -> list[dict]:
    """The pair records, named by today's plan (a star measured as "star" is "star 0" once there are more)."""
    out = []
    for k in keys:
        rec = _read_json(root / tasks[k].output)
        if rec is None:
            raise UserError(f"study artifact {tasks[k].output} is missing; re-run the study to finish it")
        p = tasks[k].params
        out.append({**{kk: v for kk, v in rec.items() if kk not in ("key", "timings_")}, "a": p["a_label"],
                    "b": p["b_label"]})
    return out


def _quality(entries: list[dict]) -> dict:
    return {f"{s}_{m}": summarize([e["metrics"][s][m] for e in entries], n_boot=1000)
            for s in ("train", "test") for m in ("loss", "acc")}


SOLUTION_LOSS = 0.01  # "near-zero training loss" (a solution in the paper's sense): at most this, in nats


def _mean_metrics(entries: list[dict]) -> dict:
    """train/test loss and accuracy averaged over models (the stars, where one number stands for them)."""
    return {s: {m: sum(e["metrics"][s][m] for e in entries) / len(entries) for m in ("loss", "acc")}
            for s in ("train", "test")}


def fit_summary(models: dict) -> dict:
    """How each group was trained (its fit criteria, epochs run, rules met) and whether the regular models
    are solutions in the paper's sense (training loss <= SOLUTION_LOSS)."""
    out: dict[str, Any] = {"solution_loss": SOLUTION_LOSS}
    for group in ("sources", "heldouts", "stars"):
        entries = models.get(group) or []
        fits = [e.get("fit") or {} for e in entries]
        if not entries:
            continue
        out[group] = {"criteria": sorted({f.get("criterion") or "not recorded" for f in fits}),
                      "epochs": [f.get("epochs") for f in fits],
                      "reached": [f.get("reached") for f in fits],
                      "train_loss": [e["metrics"]["train"]["loss"] for e in entries]}
    regular = [e["metrics"]["train"]["loss"] for g in ("sources", "heldouts") for e in models.get(g) or []]
    out["regular_are_solutions"] = bool(regular) and max(regular) <= SOLUTION_LOSS
    return out


def collect(cfg: Config, plan: Plan, root: str | Path) -> dict:
    """Read every artifact and build results.json (deterministic: no timings, fixed order)."""
    root = Path(root)
    st = cfg.study
    tasks = plan.by_key()
    L = plan.layout["main"]
    models = {"sources": [_model_entry(root, tasks[k]) for k in L["sources"]],
              "heldouts": [_model_entry(root, tasks[k]) for k in L["heldouts"]]}
    if L.get("star"):
        models["stars"] = [_model_entry(root, tasks[k]) for k in L["star"]]
    for name in CENTRES:
        if name != "star" and L.get(name):
            models[name] = _model_entry(root, tasks[L[name]])
    pairs = {kind: _pair_records(root, tasks, keys) for kind, keys in L["pairs"].items()}
    summary = summarize_pairs(pairs, seed=st.seed, n_boot=st.bootstrap)

    tests = _tests(pairs)
    regular = models["sources"] + models["heldouts"]
    star_quality = {"regular": _quality(regular), "fit": fit_summary(models)}
    if "stars" in models:
        star_quality["star"] = _mean_metrics(models["stars"])
        star_quality["stars"] = [{"label": e["label"], **e["metrics"], "fit": e.get("fit")} for e in models["stars"]]
    for name in ("average", "merged"):
        if name in models:
            star_quality[name] = models[name]["metrics"]

    sweeps: dict[str, list] = {}
    for dim, rows in plan.layout.get("sweeps", {}).items():
        out_rows = []
        for row in rows:
            p = {kind: _pair_records(root, tasks, keys) for kind, keys in row["pairs"].items()}
            entry = {"value": row["value"], "stars": [_model_entry(root, tasks[k]) for k in row["star"]],
                     "summary": summarize_pairs(p, seed=st.seed, n_boot=st.bootstrap), "pairs": p}
            if "sources" in row:
                entry["regular"] = _quality([_model_entry(root, tasks[k]) for k in row["sources"] + row["heldouts"]])
                entry["headline"] = row_headline(_record_json(p), alpha=st.alpha, n_boot=st.bootstrap, seed=st.seed)
            out_rows.append(entry)
        sweeps[dim] = out_rows

    results = {"format_version": RESULTS_FORMAT, "config": cfg.model_dump(mode="json"), "models": models,
               "pairs": pairs, "summary": summary, "tests": tests, "star_quality": star_quality,
               "sweeps": sweeps}
    if plan.layout.get("bma"):
        rec = _read_json(root / tasks[plan.layout["bma"]].output)
        results["bma"] = rec["result"] if rec else None
    results.update(analyse(_record_json(results), alpha=st.alpha, n_boot=st.bootstrap, seed=st.seed))
    results = _record_json(results)
    results["verdict_line"] = verdict_line(results)
    results["verdict"] = verdict(results)
    # 12 significant digits: reductions whose order depends on memory alignment (diagnostics such as
    # alignment distances) can differ in the last bit between processes; the file should not
    return round_floats(results, 12)


_PAIRED = "secondary (paired by held-out, rank test; the headline uses the sign-flip test on the same pairing)"
_HEADLINE = "headline (per-held-out paired differences; valid although pairs share models)"


def _tests(pairs: dict[str, list[dict]]) -> dict:
    """Pairwise tests (secondary: they treat pairs as independent) beside the per-held-out sign-flip tests."""
    tests: dict[str, Any] = {}
    sh = pairs.get("star_heldout") or []
    if not sh:
        return tests
    metrics = _metrics_of(sh)
    if pairs.get("regular_regular"):
        for m in metrics:
            tests.setdefault("star_heldout_below_regular_regular", {})[m] = _role(mann_whitney_less(
                [r["barrier"][m] for r in sh], [r["barrier"][m] for r in pairs["regular_regular"]]), SECONDARY)
        for m in metrics:
            g = grid(pairs["regular_regular"], m)
            star = star_means(sh, m, g[2]) if g else None
            if star is None:
                continue
            tests.setdefault("star_heldout_below_regular_regular_paired", {})[m] = _role(
                paired_wilcoxon_less(star, g[0].mean(0)), _PAIRED)
            if m in MAIN_METRICS:
                tests.setdefault("star_heldout_below_regular_regular_sign_flip", {})[m] = _role(
                    sign_flip_test(paired_differences(star, g[0])), _HEADLINE)
    heldouts = list(dict.fromkeys(r["b"] for r in sh))
    for kind in naive_centres():
        if not pairs.get(kind):
            continue
        for m in metrics:
            star, c = star_means(sh, m, heldouts), heldout_values(pairs[kind], m, heldouts)
            if star is None or c is None:
                continue
            tests.setdefault(f"star_heldout_below_{kind}", {})[m] = _role(paired_wilcoxon_less(star, c), _PAIRED)
            if m in MAIN_METRICS:
                tests.setdefault(f"star_heldout_below_{kind}_sign_flip", {})[m] = _role(
                    sign_flip_test(star - c), _HEADLINE)
    return tests


def _role(test: dict | None, role: str) -> dict | None:
    return None if test is None else {**test, "role": role}

