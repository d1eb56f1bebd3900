"""The paper's MNIST width sweep beside ours: does the star's lower barrier survive fit-matching?

Four series of the star–held-out / regular–regular training-loss barrier ratio against the MLP's width:

- paper: the official per-pair results (benchmarks/paper_mnist.py), 17 sources, 3 held-outs, one star;
- (a) `paper recipe`: our sources and held-outs trained until they reach the paper's regular training
  loss at that width or a cap of epochs (configs/mnist_width_sweep_fit.yaml), one star trained with the
  sources' recipe for as many epochs as the sources took (the paper's recipe);
- (b) `fit-matched`: the same sources and held-outs, several stars, each stopped when its training loss
  reaches its sources' median (star.match_fit 0.5), so star and regular models fit equally well;
- (c) `5 epochs`: our 5-epoch recipe (configs/mnist_width_sweep.yaml) at the same design size. The
  committed docs/results run used that config's earlier star, 15 fixed epochs; the config's star is now
  fit-matched (cap 30), so `run --part c` measures that.

`run` trains and measures (one `stardomain run` per study folder: killed, the same command resumes);
`report` writes results.json, report.md and the figure from the finished folders (widths not finished
are listed as pending; --keep carries an earlier results.json's rows for what the runs folder has not
measured). The text above the marker line of an existing report.md is kept.

    nice -n 5 python benchmarks/paper_side_by_side.py run runs/side --part b --part a --widths 4 8
    python benchmarks/paper_side_by_side.py report runs/side --out docs/results/mnist_width_sweep \
        --keep docs/results/mnist_width_sweep/results.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from stardomain import stats
from stardomain.checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text
from stardomain.verdict import grid, heldout_values

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIT_CONFIG = ROOT / "configs" / "mnist_width_sweep_fit.yaml"
OURS_CONFIG = ROOT / "configs" / "mnist_width_sweep.yaml"
WIDTHS = (4, 8, 16, 32, 64, 128, 256)
DESIGN = {"n_sources": 6, "n_heldouts": 3, "n_stars": 3}
LOWEST_TARGET = 0.0005  # the paper's losses have 3 decimals: "0.000" means below 0.0005
MARKER = "<!-- everything below is written by benchmarks/paper_side_by_side.py report -->"
METRIC = "train_loss"
PARTS = ("paper", "a", "b", "c")
LABELS = {"paper": "paper (official results, 17 sources, 1 star)",
          "a": "(a) sources to the paper's loss or the cap, star for their epochs",
          "b": "(b) same sources, fit-matched stars (the config's cap, 60 epochs)",
          "c": "(c) our 5-epoch recipe, 15-epoch star"}


def label(part: str) -> str:
    """A series' legend: the fixed parts above, or "(b) ... cap N" for fit-matched stars with another cap."""
    return LABELS.get(part) or f"(b) same sources, fit-matched stars, cap {part[len('bcap'):]} epochs"


def _paper_module():
    spec = importlib.util.spec_from_file_location("paper_mnist", HERE / "paper_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def paper_targets() -> dict[int, float]:
    """Per width: the paper's median regular training loss, at least LOWEST_TARGET (the stop rule's target)."""
    res = _paper_module().analyse(json.loads(_paper_module().DATA.read_text()), n_boot=10)
    return {int(w): max(r["regular_train_loss"]["median"], LOWEST_TARGET) for w, r in res["widths"].items()}


# ---------------------------------------------------------------- running the studies

def _stardomain(config: Path, out: Path, sets: list[str], workers: int, copied: bool = False) -> None:
    """One `stardomain run`; `copied`: the folder holds a population copied from another study (--force:
    it is not a study folder until the first run writes its plan)."""
    cmd = [sys.executable, "-m", "stardomain", "run", str(config), "--out", str(out), "--threads", "1",
           "--workers", str(workers)] + [a for s in sets for a in ("--set", s)] + (["--force"] if copied else [])
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def epochs_taken(folder: Path, role: str = "source") -> list[int]:
    """Epochs each model of `role` (source, heldout) of a finished study trained."""
    res = json.loads((folder / "results.json").read_text())
    return [_epochs_of(folder, m) for m in res["models"][role + "s"]]


def _copy_population(src: Path, dst: Path) -> None:
    """Hard links of a finished folder's models and cache, so a second study on the same sources reuses them
    (every write is an atomic rename, which replaces a link and never edits the shared file)."""
    for sub in ("models", "cache"):
        if (src / sub).is_dir() and not (dst / sub).exists():
            shutil.copytree(src / sub, dst / sub, copy_function=lambda a, b: Path(b).hardlink_to(a),
                            ignore=shutil.ignore_patterns("*.state", "*.partial"))


def _regular(width: int, target: float | None) -> list[str]:
    """The per-width settings: width and the sources' stop rule (None: no rule, the cap's fixed epochs)."""
    return [f"model.kwargs.width={width}", f"train.stop.loss={target:g}" if target is not None else "train.stop=null"]


def run_fit(runs: Path, width: int, target: float | None, workers: int, star_cap: int | None = None) -> None:
    """(b): sources and held-outs to the paper's loss (or the cap), fit-matched stars. `star_cap`: the stars'
    cap instead of the config's, in folder fit_cap{N} on the fit folder's population."""
    if star_cap is None:
        _stardomain(FIT_CONFIG, runs / "fit" / f"w{width}", _regular(width, target), workers)
        return
    fit, out = runs / "fit" / f"w{width}", runs / f"fit_cap{star_cap}" / f"w{width}"
    out.mkdir(parents=True, exist_ok=True)
    _copy_population(fit, out)
    _stardomain(FIT_CONFIG, out, _regular(width, target) + [f"star.train.epochs={star_cap}"], workers, True)


def run_paper(runs: Path, width: int, target: float | None, workers: int) -> None:
    """(a): the (b) folder's sources; one star trained for the sources' median number of epochs."""
    fit = runs / "fit" / f"w{width}"
    if not (fit / "results.json").exists():
        raise SystemExit(f"part a at width {width} needs the finished part b folder {fit} (its sources)")
    epochs = math.ceil(statistics.median(epochs_taken(fit)))
    out = runs / "paper" / f"w{width}"
    out.mkdir(parents=True, exist_ok=True)
    _copy_population(fit, out)
    _stardomain(FIT_CONFIG, out, _regular(width, target) + ["study.n_stars=1", "star.match_fit=null",
                                                            f"star.train.epochs={epochs}"], workers, True)


def run_ours(runs: Path, workers: int) -> None:
    """(c): the committed 5-epoch sweep config at this design size."""
    _stardomain(OURS_CONFIG, runs / "ours", [f"study.{k}={v}" for k, v in DESIGN.items()], workers)


# ---------------------------------------------------------------- collecting

def _stars(entry: dict) -> list[dict]:
    """The star model entries of a results.json population or sweep row ("stars"; one "star" before n_stars)."""
    x = entry.get("stars", entry.get("star"))
    return x if isinstance(x, list) else [] if x is None else [x]


def _epochs_of(folder: Path, model: dict) -> int:
    """Epochs a model trained: its fit record, else its per-epoch history (models/NAME.safetensors.csv)."""
    if (model.get("fit") or {}).get("epochs") is not None:
        return int(model["fit"]["epochs"])
    return len((folder / (model["file"] + ".csv")).read_text().strip().splitlines()) - 1


def _per_star(pairs: dict) -> dict[str, dict]:
    """Each star's own ratio (its held-out barriers over the regular grid; two-way cluster bootstrap)."""
    g = grid(pairs["regular_regular"], METRIC)
    table, _, heldouts = g
    out = {}
    for star in dict.fromkeys(r["a"] for r in pairs["star_heldout"]):
        vals = heldout_values([r for r in pairs["star_heldout"] if r["a"] == star], METRIC, heldouts)
        boot = stats.cluster_bootstrap(vals, table)
        out[star] = {"star_heldout": float(np.mean(vals)), "ratio": boot["ratio"]["estimate"],
                     "ratio_ci95": boot["ratio"]["ci95"]}
    return out


def part_row(pairs: dict, regular_losses: dict, stars: list[dict], headline: dict | None,
             epochs: dict | None = None) -> dict:
    """One width of one part: the pooled ratio and its interval (the study's own headline, which resamples
    stars, sources and held-outs), each star's ratio and fit, the regular models' fit."""
    rr = np.array([r["barrier"][METRIC] for r in pairs["regular_regular"]], float)
    sh = np.array([r["barrier"][METRIC] for r in pairs["star_heldout"]], float)
    own = _per_star(pairs)
    med = regular_losses["median"]
    star_rows = [{"label": s.get("label"), "seed": s.get("seed"), "train_loss": s["metrics"]["train"]["loss"],
                  "test_acc": s["metrics"]["test"]["acc"], "fit_ratio": s["metrics"]["train"]["loss"] / med,
                  "fit_met": (s.get("fit") or {}).get("reached"),
                  **own.get(s.get("label"), {})} for s in stars]
    return {"regular_regular": float(rr.mean()), "star_heldout": float(sh.mean()),
            "ratio": float(sh.mean() / rr.mean()),
            "ratio_ci95": (headline or {}).get("ratio", {}).get("ci95"),
            "p_value": (headline or {}).get("p_value"), "min_p": (headline or {}).get("min_p"),
            "n_regular_pairs": int(rr.size), "n_star_pairs": int(sh.size), "n_stars": len(stars),
            "regular_train_loss": regular_losses, "stars": star_rows,
            "star_train_loss_median": float(np.median([s["train_loss"] for s in star_rows])),
            "fit_ratio": float(np.median([s["fit_ratio"] for s in star_rows])), **({"epochs": epochs} if epochs else {})}


def _losses(models: list[dict]) -> dict:
    x = [m["metrics"]["train"]["loss"] for m in models]
    return {"median": float(np.median(x)), "min": float(min(x)), "max": float(max(x)), "n": len(x)}


def _folder_row(folder: Path, target: float) -> dict | None:
    """A finished per-width study (parts a and b) -> its row; None while it is not finished."""
    path = folder / "results.json"
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    if not res["pairs"].get("star_heldout"):  # the population alone, its stars not yet measured
        return None
    regular = res["models"]["sources"] + res["models"]["heldouts"]
    ep = epochs_taken(folder) + epochs_taken(folder, "heldout")
    stars = _stars(res["models"])
    star_ep = [_epochs_of(folder, s) for s in stars]
    opt = res["config"]["train"]["optimizer"]
    epochs = {"regular_min": min(ep), "regular_max": max(ep), "stars": star_ep,
              "target_loss": target, "regular_reached": sum(m["metrics"]["train"]["loss"] <= target for m in regular),
              "cap": res["config"]["train"]["epochs"],
              "recipe": f"{opt['name']} lr {opt['lr']:g}, {res['config']['train']['schedule']['name']}"}
    return part_row(res["pairs"], _losses(regular), stars, res.get("headline"), epochs)


def _ours_rows(folder: Path) -> dict[int, dict]:
    path = folder / "results.json"
    if not path.exists():
        return {}
    res = json.loads(path.read_text())
    out = {}
    for row in res["sweeps"]["width"]:
        q = row["regular"]["train_loss"]
        losses = {"median": q["median"], "min": q["min"], "max": q["max"], "n": q["n"]}
        out[int(row["value"])] = part_row(row["pairs"], losses, _stars(row), row.get("headline"),
                                         {"fixed": res["config"]["train"]["epochs"],
                                          "star_fixed": (res["config"]["star"]["train"] or res["config"]["train"])["epochs"]})
    return out


def _paper_rows() -> dict[int, dict]:
    pm = _paper_module()
    res = pm.analyse(json.loads(pm.DATA.read_text()))
    return {int(w): {"regular_regular": r["regular_regular"], "star_heldout": r["star_heldout"], "ratio": r["ratio"],
                     "ratio_ci95": r["ratio_ci95"], "n_regular_pairs": r["n_sources"] * r["n_heldouts"],
                     "n_star_pairs": r["n_heldouts"], "n_stars": 1, "regular_train_loss": r["regular_train_loss"],
                     "star_train_loss_median": r["star_train_loss"],
                     "fit_ratio": r["star_train_loss"] / max(r["regular_train_loss"]["median"], LOWEST_TARGET)}
            for w, r in res["widths"].items()}


def collect(runs: Path) -> dict:
    targets = paper_targets()
    parts: dict[str, dict] = {"paper": _paper_rows(), "c": _ours_rows(runs / "ours"), "a": {}, "b": {}}
    folders = [("a", "paper"), ("b", "fit")] + [(f"b{d.name[len('fit_'):]}", d.name)
                                                for d in sorted(runs.glob("fit_cap*")) if d.is_dir()]
    for part, sub in folders:
        for w in WIDTHS:
            row = _folder_row(runs / sub / f"w{w}", targets[w])
            if row is not None:
                parts.setdefault(part, {})[w] = row
    return {"metric": METRIC, "design": DESIGN, "targets": targets, "labels": {p: label(p) for p in parts},
            "source": json.loads(_paper_module().DATA.read_text())["source"],
            "parts": {p: {str(w): r for w, r in sorted(rows.items())} for p, rows in parts.items()}}


def keep_rows(result: dict, earlier: dict) -> dict:
    """`result` with the rows of an `earlier` results.json that it does not measure again: each (part, width)
    the runs folder has no finished study for keeps its earlier row and its part's label (a part measured
    under an earlier recipe carries its own key and label, so it is never mixed with a new one)."""
    parts = {p: dict(rows) for p, rows in result["parts"].items()}
    labels = dict(result["labels"])
    for part, rows in earlier["parts"].items():
        for w, row in rows.items():
            if w not in parts.setdefault(part, {}):
                parts[part][w] = row
                labels.setdefault(part, earlier["labels"][part])
    order = lambda rows: {w: rows[w] for w in sorted(rows, key=int)}  # noqa: E731
    return {**result, "labels": labels, "parts": {p: order(rows) for p, rows in parts.items()}}


# ---------------------------------------------------------------- the report

STYLE = {"paper": ("k", "o", -0.09), "a": ("tab:orange", "s", -0.03), "b": ("tab:blue", "D", 0.03),
         "c": ("tab:gray", "^", 0.09)}
EXTRA_STYLE = ("tab:purple", "v", 0.06)  # fit-matched stars with another cap


def figure(result: dict) -> bytes:
    """Left: the barrier ratio against width with 95% intervals; right: how well the stars fit (star training
    loss over the regular models' median), so a low ratio can be read beside the fit it came with."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8))
    ax, fx = fig.subplots(1, 2)
    for part, rows in result["parts"].items():
        if not rows:
            continue
        base = part.split("_")[0]
        color, marker, dx = STYLE.get(base, EXTRA_STYLE)
        earlier = dict(ls="--", mfc="none", alpha=0.7) if base != part else {}
        ws = np.array([int(w) for w in rows], float)
        x = np.log2(ws) + dx + (0.015 if earlier else 0)
        y = np.array([r["ratio"] for r in rows.values()])
        ci = [r.get("ratio_ci95") or [None, None] for r in rows.values()]
        lo = np.array([y[i] - c[0] if c[0] is not None else 0 for i, c in enumerate(ci)])
        hi = np.array([c[1] - y[i] if c[1] is not None else 0 for i, c in enumerate(ci)])
        ax.errorbar(x, y, yerr=[lo, hi], color=color, marker=marker, capsize=3, lw=1.2,
                    label=result["labels"][part], **earlier)
        fx.plot(x, [r["fit_ratio"] for r in rows.values()], color=color, marker=marker, lw=1.2, **earlier)
    for a in (ax, fx):
        a.set_xticks(np.log2(WIDTHS), [str(w) for w in WIDTHS])
        a.set_xlabel("hidden width")
        a.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_ylabel("star–held-out / regular–regular\n(training-loss barrier, 95% CI)")
    ax.set_ylim(0, 1.6)
    fx.set_yscale("log")
    fx.set_ylabel("star training loss / regular median")
    fx.set_title("how well the star fits", fontsize=9)
    ax.set_title("barrier ratio (below 1: the star is closer to the held-outs)", fontsize=9)
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _ci(c) -> str:
    return "—" if not c or c[0] is None else f"[{c[0]:.2f}–{c[1]:.2f}]"


def _epochs(r: dict) -> str:
    e = r.get("epochs")
    if not e:
        return "—"
    if "fixed" in e:
        return f"{e['fixed']} / {e['star_fixed']} (fixed)"
    reg = f"{e['regular_min']}" if e["regular_min"] == e["regular_max"] else f"{e['regular_min']}–{e['regular_max']}"
    recipe = f", {e['recipe']}" if e.get("recipe") else ""
    return (f"{reg} (cap {e['cap']}, {e['regular_reached']} reached{recipe}) / "
            f"stars {', '.join(map(str, e['stars']))}")


MET = {True: " ✓", False: " ✗"}  # a star's stop rule (fit-matched) met, or stopped at the cap


def tables(result: dict) -> list[str]:
    lines = []
    for part, rows in result["parts"].items():
        lines += [f"### {result['labels'][part]}", ""]
        if not rows:
            lines += ["Not run (no finished study folder).", ""]
            continue
        lines += ["| width | regular–regular | star–held-out | ratio [95% CI] | per-star ratios | regular train loss "
                  "median (min–max) | star train loss (× regular median) | epochs: regular / stars |",
                  "|---|---|---|---|---|---|---|---|"]
        for w, r in rows.items():
            f = r["regular_train_loss"]
            per = ", ".join(f"{s['ratio']:.2f}" for s in r.get("stars", []) if s.get("ratio") is not None) or "—"
            star = (", ".join(f"{s['train_loss']:.4f}{MET.get(s.get('fit_met'), '')}" for s in r.get("stars", []))
                    or f"{r['star_train_loss_median']:.4f}")
            lines.append(f"| {w} | {r['regular_regular']:.4f} | {r['star_heldout']:.4f} | **{r['ratio']:.2f}** "
                         f"{_ci(r.get('ratio_ci95'))} | {per} | {f['median']:.4f} ({f['min']:.4f}–{f['max']:.4f}) | "
                         f"{star} ({r['fit_ratio']:.2f}×) | {_epochs(r)} |")
        missing = ", ".join(str(w) for w in WIDTHS if str(w) not in rows)
        why = ("Not measured under this earlier recipe" if "_" in part else
               "Not run with this cap" if part.startswith("bcap") else "Pending (not finished)")
        lines += ([f"", f"{why}: widths {missing}."] if missing else []) + [""]
    return lines


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    atomic_write_bytes(out / "width_sweep.png", figure(result))
    old = (out / "report.md").read_text() if (out / "report.md").exists() else ""
    head = old.split(MARKER)[0].rstrip() or "# The paper's MNIST width sweep, side by side"
    src = result["source"]
    body = [MARKER, "", "![ratio and fit against width](width_sweep.png)", "",
            f"Paper numbers: {src['repository']} at commit `{src['commit']}`, files "
            f"`{src['files']['4'].replace('_4.yaml', '_*.yaml')}`. Ours: {DESIGN['n_sources']} sources, "
            f"{DESIGN['n_heldouts']} held-outs per width; stars: as many as a row's per-star ratios. "
            "Training-loss barriers after weight matching, 11 points; intervals: the study's own bootstrap "
            "over the models (sources and held-outs, and stars where there are several). Star training losses: ✓ the "
            "star met its fit rule (its sources' median), ✗ it stopped at the cap without meeting it.", ""] + tables(result)
    atomic_write_text(out / "report.md", head + "\n\n" + "\n".join(body) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and measure (resumable)")
    r.add_argument("runs", type=Path)
    r.add_argument("--part", choices=("a", "b", "c"), action="append", help="default: b, a, c")
    r.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--no-stop", type=int, nargs="*", default=[], metavar="WIDTH",
                   help="widths whose sources train for the cap without the stop rule (where the cap's loss is "
                        "above the paper's, the rule never fires and the weights are the same)")
    r.add_argument("--star-cap", type=int, help="part b only: the fit-matched stars' cap of epochs instead of "
                   "the config's (folder fit_capN, on the fit folder's sources)")
    p = sub.add_parser("report", help="results.json, report.md and the figure from the finished folders")
    p.add_argument("runs", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "mnist_width_sweep")
    p.add_argument("--keep", type=Path, metavar="RESULTS_JSON",
                   help="an earlier results.json: its rows for (part, width) the runs folder has not finished are kept")
    args = ap.parse_args(argv)
    if args.cmd == "report":
        result = collect(args.runs)
        if args.keep:
            result = keep_rows(result, json.loads(args.keep.read_text()))
        write_report(result, args.out)
        return 0
    bad = sorted(set(args.widths) - set(WIDTHS))
    if bad:
        ap.error(f"widths must be among {WIDTHS}, not {bad}")
    targets = paper_targets()
    for part in args.part or ["b", "a", "c"]:
        if part == "c":
            run_ours(args.runs, args.workers)
            continue
        for w in args.widths:
            target = None if w in args.no_stop else targets[w]
            if part == "b":
                run_fit(args.runs, w, target, args.workers, args.star_cap)
            else:
                run_paper(args.runs, w, target, args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
