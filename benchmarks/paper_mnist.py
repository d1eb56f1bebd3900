"""The star-domain paper's own MNIST width sweep, re-analysed with this project's statistics.

The official repository (github.com/aktsonthalia/starlight) publishes, per width of its one-hidden-layer
MLP (784-w-10), every pair it measured: 17 sources × 3 held-outs (regular–regular), the star against the
3 held-outs and against the 17 sources. Each pair lists its training-loss barrier and the training loss
at the 11 points of the path, so the endpoints' own training losses (t = 0 and t = 1) can be read off.
`benchmarks/data/paper_mnist_width_sweep.json` holds those numbers only (no code or text of theirs),
with the commit and file names they came from.

Per width this prints the regular–regular and star–held-out means, their ratio with the study's own
two-way cluster bootstrap (`stardomain.stats.cluster_bootstrap`: sources and held-outs resampled with
replacement, 10,000 seeded resamples, percentile interval), and the training losses of the regular
models and of the star: the paper's stars fit worse than its regular models at every width from 8 up.

    python benchmarks/paper_mnist.py                      # the table (and --json FILE for the numbers)
    python benchmarks/paper_mnist.py --extract CLONE.git  # rebuild the data file from a clone of starlight
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from stardomain import stats
from stardomain.checkpoint import atomic_write_json

DATA = Path(__file__).with_name("data") / "paper_mnist_width_sweep.json"
REPO = "aktsonthalia/starlight"
WIDTHS = (4, 8, 16, 32, 64, 128, 256)
FILE = "results/out/mlp_mnist_depth_1_width_{w}.yaml"
N_BOOT = 10000


# ---------------------------------------------------------------- extraction (run once, from a clone)

def _endpoints(pairs: list[dict], key: str) -> dict[str, float]:
    """Every model's own value of `key` (train_losses, train_accuracies): t = 0 is model1, t = 1 model2 of
    each pair; the median over the pairs a model is in (they agree: the extraction checks it)."""
    seen: dict[str, list[float]] = {}
    for p in pairs:
        seen.setdefault(p["model1_id"], []).append(float(p[key][0]))
        seen.setdefault(p["model2_id"], []).append(float(p[key][-1]))
    if any(max(v) - min(v) > 1e-9 for v in seen.values()):
        raise ValueError(f"a model's {key} differs between the pairs it is in")
    return {m: float(np.median(v)) for m, v in seen.items()}


def _one_width(doc: dict) -> dict:
    """One result file -> sources, held-outs, star, the barrier tables and each model's training loss."""
    rr_pairs, sh_pairs, ss_pairs = doc["anchor_held_out"], doc["star_held_out"], doc["star_anchor"]
    sources = list(dict.fromkeys(p["model1_id"] for p in rr_pairs))
    heldouts = list(dict.fromkeys(p["model2_id"] for p in rr_pairs))
    stars = {p["model1_id"] for p in sh_pairs + ss_pairs}
    if len(stars) != 1:
        raise ValueError(f"expected one star, found {sorted(stars)}")
    star = stars.pop()
    rr = {(p["model1_id"], p["model2_id"]): float(p["train_loss_barrier"]) for p in rr_pairs}
    sh = {p["model2_id"]: float(p["train_loss_barrier"]) for p in sh_pairs}
    ss = {p["model2_id"]: float(p["train_loss_barrier"]) for p in ss_pairs}
    if len(rr) != len(sources) * len(heldouts) or set(sh) != set(heldouts) or set(ss) != set(sources):
        raise ValueError("the pairs do not form a full source × held-out design")
    pairs = rr_pairs + sh_pairs + ss_pairs
    return {"sources": sources, "heldouts": heldouts, "star": star,
            "regular_regular": [[rr[s, h] for h in heldouts] for s in sources],
            "star_heldout": [sh[h] for h in heldouts], "star_source": [ss[s] for s in sources],
            "train_loss": _endpoints(pairs, "train_losses"), "train_acc": _endpoints(pairs, "train_accuracies")}


def extract(clone: Path, commit: str) -> dict:
    """Read the seven result files at `commit` of a local clone (git show; nothing is checked out)."""
    import yaml

    def show(*args: str) -> str:
        return subprocess.run(["git", "--git-dir", str(clone), *args], check=True, capture_output=True,
                              text=True).stdout

    commit = show("rev-parse", commit).strip()
    out = {"source": {"repository": f"https://github.com/{REPO}", "commit": commit,
                      "committed": show("show", "-s", "--format=%cI", commit).strip(),
                      "files": {str(w): FILE.format(w=w) for w in WIDTHS},
                      "what": "per-pair training-loss barriers (train_loss_barrier) and the endpoints' training "
                              "losses and accuracies in % (train_losses, train_accuracies at t = 0 and t = 1; losses "
                              "given to 3 decimals, so 0.0 means below 0.0005). model1 is the source (anchor) or the star, model2 the "
                              "held-out or the source."},
           "widths": {}}
    for w in WIDTHS:
        out["widths"][str(w)] = _one_width(yaml.safe_load(show("show", f"{commit}:{FILE.format(w=w)}")))
    return out


# ---------------------------------------------------------------- re-analysis

def analyse_width(row: dict, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Means, the cluster-bootstrap ratio and the fits of one width (the statistics of our own studies)."""
    rr = np.asarray(row["regular_regular"], float)
    sh = np.asarray(row["star_heldout"], float)
    boot = stats.cluster_bootstrap(sh, rr, n_boot=n_boot, seed=seed)
    loss = row["train_loss"]
    regular = np.array([loss[m] for m in row["sources"] + row["heldouts"]], float)
    star = loss[row["star"]]
    acc = row["train_acc"]
    return {"n_sources": rr.shape[0], "n_heldouts": rr.shape[1], "n_stars": 1,
            "regular_regular": float(rr.mean()), "star_heldout": float(sh.mean()),
            "star_source": float(np.mean(row["star_source"])),
            "ratio": boot["ratio"]["estimate"], "ratio_ci95": boot["ratio"]["ci95"],
            "regular_train_loss": {"mean": float(regular.mean()), "median": float(np.median(regular)),
                                   "min": float(regular.min()), "max": float(regular.max())},
            "regular_train_acc_min": min(acc[m] for m in row["sources"] + row["heldouts"]),
            "star_train_loss": star, "star_train_acc": acc[row["star"]], "star_over_regular_median": star / max(float(np.median(regular)), 5e-4)}


def analyse(data: dict, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    return {"source": data["source"], "n_boot": n_boot, "seed": seed,
            "method": "two-way cluster bootstrap over sources and held-outs (stardomain.stats.cluster_bootstrap)",
            "widths": {w: analyse_width(row, n_boot=n_boot, seed=seed) for w, row in data["widths"].items()}}


def table(result: dict) -> str:
    head = ("| width | regular–regular | star–held-out | ratio [95% CI] | regular train loss mean, median "
            "(min–max) | star train loss | lowest regular / star train acc |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for w, r in result["widths"].items():
        lo, hi = r["ratio_ci95"]
        f = r["regular_train_loss"]
        lines.append(f"| {w} | {r['regular_regular']:.3f} | {r['star_heldout']:.3f} | {r['ratio']:.2f} "
                     f"[{lo:.2f}–{hi:.2f}] | {f['mean']:.3f}, {f['median']:.3f} ({f['min']:.3f}–{f['max']:.3f}) "
                     f"| {r['star_train_loss']:.3f} | {r['regular_train_acc_min']:.2f}% / {r['star_train_acc']:.2f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extract", type=Path, metavar="CLONE", help="git directory of a starlight clone: "
                    "rebuild the data file from its result files")
    ap.add_argument("--commit", default="HEAD", help="commit of the clone to read (with --extract)")
    ap.add_argument("--data", type=Path, default=DATA, help="the numbers (default: %(default)s)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the re-analysis as JSON")
    args = ap.parse_args(argv)
    if args.extract:
        atomic_write_json(args.data, extract(args.extract, args.commit))
        print(f"wrote {args.data}", file=sys.stderr)
    data = json.loads(args.data.read_text())
    result = analyse(data)
    src = data["source"]
    print(f"{src['repository']} @ {src['commit'][:12]} ({src['committed'][:10]}), {result['method']}, "
          f"{result['n_boot']} resamples\n")
    print(table(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
