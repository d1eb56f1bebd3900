"""Which Starlight recipe makes the default study's star a solution (issue 13, part 3)?

The paper calls a star a solution when its own training loss lies within the range of the regular models'.
This script reuses the sources and held-outs of an existing study folder (the default study:
`stardomain run --out DIR`), trains one star per candidate recipe (a list of `--set`-style overrides of the
star section) and records, per candidate: the star's own train loss / test accuracy against the regular
models' range, the star–held-out training-loss barrier (11 points, held-out aligned to the star) against
the study's regular–regular barrier, and the star's wall time. Results are appended as JSON lines to
`--out`; candidates already there are skipped (re-running resumes).

    python benchmarks/star_recipe.py --study runs/default --out recipe.jsonl [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from stardomain import starlight as sl
from stardomain.barriers import measure
from stardomain.checkpoint import build_from_meta, read_model_file
from stardomain.config import apply_overrides, read_yaml, validate, Config
from stardomain.data import get_dataset
from stardomain.study import default_config_path
from stardomain.barriers import BarrierSettings

SGD = "{name: sgd, lr: %s, momentum: 0.9}"


def recipe(epochs: int, lr: float = 0.05, schedule: str = "cosine", **star) -> list[str]:
    """Overrides for a star with its own training recipe plus star-section settings."""
    out = [f"star.train={{epochs: {epochs}, batch_size: 128, optimizer: {SGD % lr}, schedule: {{name: {schedule}}}}}"]
    return out + [f"star.{k}={v}" for k, v in star.items()]


CANDIDATES: dict[str, list[str]] = {
    "e5 (sources' recipe)": recipe(5),
    "e10 (old default)": recipe(10),
    "e15": recipe(15),
    "e20": recipe(20),
    "e10 mu0.1": recipe(10, mu=0.1),
    "e10 mu0.3": recipe(10, mu=0.3),
    "e10 mu1": recipe(10, mu=1.0),
    "e10 chunks4": recipe(10, chunks=4),
    "e10 lr0.1": recipe(10, lr=0.1),
    "e10 init=average": recipe(10, init="average"),
    "e10 align every 100 steps": recipe(10, align_every=100),
    "e10 t beta(2,2)": recipe(10, t_sampling="beta"),
    "e15 mu0.3": recipe(15, mu=0.3),
    "e10 mu0.3 chunks4": recipe(10, mu=0.3, chunks=4),
    "e10 mu1 chunks4": recipe(10, mu=1.0, chunks=4),
    "e15 mu0.1 chunks4": recipe(15, mu=0.1, chunks=4),
    "e15 lr0.1": recipe(15, lr=0.1),
    "e20 lr0.1": recipe(20, lr=0.1),
    "e15 chunks4": recipe(15, chunks=4),
    "e15 lr0.1 chunks4": recipe(15, lr=0.1, chunks=4),
    "e10 lr0.1 mu0.1": recipe(10, lr=0.1, mu=0.1),
    "e10 lr0.1 init=average": recipe(10, lr=0.1, init="average"),
    "e15 init=average": recipe(15, init="average"),
    "e15 align every 100 steps": recipe(15, align_every=100),
    "e15 constant lr": recipe(15, schedule="constant"),
}


def model_files(study: Path) -> tuple[list[Path], list[Path]]:
    plan = json.loads((study / "plan.json").read_text())
    names = {t["key"]: t["params"].get("name") for t in plan["tasks"]}
    main = plan["layout"]["main"]
    return ([study / f"models/{names[k]}.safetensors" for k in main["sources"]],
            [study / f"models/{names[k]}.safetensors" for k in main["heldouts"]])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=1, help="star seeds per candidate (0..N-1)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = read_yaml(default_config_path())
    src_files, ho_files = model_files(a.study)
    sources = [read_model_file(p)[0] for p in src_files]
    heldouts = [read_model_file(p)[0] for p in ho_files]
    regular = [read_model_file(p)[1]["metrics"] for p in src_files + ho_files]
    reg_loss = np.array([m["train"]["loss"] for m in regular])
    results = json.loads((a.study / "results.json").read_text())
    rr = results["summary"]["regular_regular"]["train_loss"]
    probe = build_from_meta(read_model_file(src_files[0])[1])
    done = set()
    if a.out.is_file():
        done = {json.loads(line)["name"] for line in a.out.read_text().splitlines() if line.strip()}
    only = [s for s in a.only.split(",") if s] or list(CANDIDATES)
    print(f"regular train loss: mean {reg_loss.mean():.4f} range {reg_loss.min():.4f}-{reg_loss.max():.4f}; "
          f"regular-regular barrier {rr['mean']:.4f} (n={rr['n']})", flush=True)
    for name in only:
        if name in done:
            continue
        cfg = validate(Config, apply_overrides(json.loads(json.dumps(base)), CANDIDATES[name]), name)
        data = get_dataset(cfg.data)
        losses, accs, bars, secs, align_s = [], [], [], [], []
        for seed in range(a.seeds):
            t0 = time.perf_counter()
            star, info = sl.train_star(cfg, sources, seed=seed, progress=False)
            secs.append(time.perf_counter() - t0)
            align_s.append(info["align_seconds"])
            sd = {k: v.detach() for k, v in star.state_dict().items()}
            bars.append([measure(probe, sd, h, data, BarrierSettings(points=11))["barrier"]["train_loss"] for h in heldouts])
            losses.append(info["metrics"]["train"]["loss"])
            accs.append(info["metrics"]["test"]["acc"])
        per_seed = [float(np.mean(b)) for b in bars]
        row = {"name": name, "overrides": CANDIDATES[name], "seeds": a.seeds,
               "star_train_loss": float(np.mean(losses)), "star_train_loss_seeds": losses,
               "star_test_acc": float(np.mean(accs)), "regular_train_loss_mean": float(reg_loss.mean()),
               "regular_train_loss_min": float(reg_loss.min()), "regular_train_loss_max": float(reg_loss.max()),
               "star_heldout": float(np.mean(per_seed)), "star_heldout_seeds": per_seed, "star_heldout_all": bars,
               "regular_regular": rr["mean"], "star_seconds": float(np.mean(secs)),
               "align_seconds": float(np.mean(align_s))}
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name:28s} star loss {row['star_train_loss']:.4f} ({row['star_train_loss'] / reg_loss.mean():.2f}x mean)"
              f" [{min(losses):.4f}-{max(losses):.4f}] acc {100 * row['star_test_acc']:.2f}% | star-ho {row['star_heldout']:.4f} "
              f"[{min(per_seed):.4f}-{max(per_seed):.4f}] "
              f"({row['star_heldout'] / rr['mean']:.2f}x rr) | {row['star_seconds']:.1f}s/star", flush=True)


if __name__ == "__main__":
    main()
