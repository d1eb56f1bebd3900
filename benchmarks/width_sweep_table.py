"""The width-sweep table of benchmarks/RESULTS.md from a study folder (`configs/mnist_width_sweep.yaml`).

Reads plan.json and the cached artifacts directly, so it also works on a run that is still going (widths
whose pairs are not all measured are listed as pending). Per width: regular–regular and star–held-out
training-loss barriers (mean, 95% interval), their ratio with a 95% interval, and the star's own training
loss against the regular models' range.

Intervals: a two-way cluster bootstrap (seeded, 10,000 resamples): each resample draws the sources and the
held-outs with replacement, the regular–regular mean is taken over the drawn source × held-out grid and
the star–held-out mean over the drawn held-outs, so pairs that share a model are not counted as
independent. With 3 held-outs per width the held-out draws take only 10 distinct values, so the
intervals are coarse and wide: that is the honest width of 3 held-outs.

    python benchmarks/width_sweep_table.py RUN_FOLDER [--metric train_loss]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from stardomain import stats


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def cluster_bootstrap(rr: np.ndarray, sh: np.ndarray, n_boot: int = 10000, seed: int = 0) -> dict:
    """rr: (sources × held-outs) barriers, sh: (held-outs,) star barriers -> 95% intervals of both means and
    of their ratio sh/rr: the study's own two-way cluster bootstrap (`stardomain.stats`), same draws."""
    rng = np.random.default_rng(seed)  # the draw order of stats.cluster_bootstrap, so the intervals agree
    ns, nh = rr.shape
    h_idx = rng.integers(0, nh, size=(n_boot, nh))
    s_idx = rng.integers(0, ns, size=(n_boot, ns))
    sh_b, rr_b = stats.resampled_means(sh, rr, s_idx, h_idx)
    ratio = stats.cluster_bootstrap(sh, rr, n_boot=n_boot, seed=seed)["ratio"]["ci95"]
    pct = lambda v: [float(x) for x in np.percentile(v, [2.5, 97.5])]  # noqa: E731
    return {"rr": pct(rr_b), "sh": pct(sh_b), "ratio": ratio}


def width_rows(root: Path, metric: str = "train_loss") -> list[dict]:
    plan = _read(root / "plan.json")
    tasks = {t["key"]: t for t in plan["tasks"]}

    def out(key: str) -> dict | None:
        t = tasks[key]
        name = f"models/{t['params']['name']}.json" if t["op"] in ("train", "star", "average") \
            else f"cache/{t['op']}/{key}.json"
        return _read(root / name)

    rows = []
    for row in plan["layout"]["sweeps"]["width"]:
        recs = {kind: [out(k) for k in keys] for kind, keys in row["pairs"].items()}
        models = [out(k) for k in row["sources"] + row["heldouts"]]
        star = out(row["star"])
        entry: dict = {"width": row["value"]}
        if any(r is None for v in recs.values() for r in v) or star is None or any(m is None for m in models):
            entry["pending"] = True
            rows.append(entry)
            continue
        ns, nh = len(row["sources"]), len(row["heldouts"])
        rr = np.array([r["barrier"][metric] for r in recs["regular_regular"]], float).reshape(ns, nh)
        sh = np.array([r["barrier"][metric] for r in recs["star_heldout"]], float)
        reg_loss = np.array([m["metrics"]["train"]["loss"] for m in models], float)
        reg_acc = np.array([m["metrics"]["test"]["acc"] for m in models], float)
        ci = cluster_bootstrap(rr, sh)
        s_loss = star["metrics"]["train"]["loss"]
        where = "below" if s_loss < reg_loss.min() else "above" if s_loss > reg_loss.max() else "within"
        entry.update({"n_rr": int(rr.size), "n_sh": int(sh.size), "rr_mean": float(rr.mean()), "rr_ci": ci["rr"],
                      "sh_mean": float(sh.mean()), "sh_ci": ci["sh"], "ratio": float(sh.mean() / rr.mean()),
                      "ratio_ci": ci["ratio"], "star_train_loss": s_loss, "star_test_acc": star["metrics"]["test"]["acc"],
                      "regular_train_loss_mean": float(reg_loss.mean()), "regular_train_loss_min": float(reg_loss.min()),
                      "regular_train_loss_max": float(reg_loss.max()), "regular_test_acc_mean": float(reg_acc.mean()),
                      "star_vs_regular": where})
        rows.append(entry)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| width | regular–regular (n) [95% CI] | star–held-out (n) [95% CI] | ratio [95% CI] | star train loss "
            "| regular train loss mean (min–max) | star vs range | test acc star / regular |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r.get("pending"):
            lines.append(f"| {r['width']} | pending | | | | | | |")
            continue
        lines.append(
            f"| {r['width']} | {r['rr_mean']:.4f} ({r['n_rr']}) [{r['rr_ci'][0]:.4f}–{r['rr_ci'][1]:.4f}] "
            f"| {r['sh_mean']:.4f} ({r['n_sh']}) [{r['sh_ci'][0]:.4f}–{r['sh_ci'][1]:.4f}] "
            f"| **{r['ratio']:.2f}** [{r['ratio_ci'][0]:.2f}–{r['ratio_ci'][1]:.2f}] | {r['star_train_loss']:.4f} "
            f"| {r['regular_train_loss_mean']:.4f} ({r['regular_train_loss_min']:.4f}–{r['regular_train_loss_max']:.4f}) "
            f"| {r['star_vs_regular']} | {100 * r['star_test_acc']:.2f}% / {100 * r['regular_test_acc_mean']:.2f}% |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--metric", default="train_loss")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    a = ap.parse_args()
    rows = width_rows(a.root, a.metric)
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
