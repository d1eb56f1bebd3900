"""Stacked population training vs one model at a time (benchmarks/RESULTS.md, "Stacked population training").

The same population (K MLPs on MNIST, consecutive seeds, the default study's recipe) trained both ways in
one process, the two sides alternating, each timed `--repeats` times (the minimum is reported: the
machine is shared). Both sides include the final train/test evaluation every model file carries. The
weights are checked bitwise equal (the contract of docs/method.md, "Stacked population training"), which
holds at one torch thread: with more, stacked training is refused, so `--threads 2` times two solo-trained
populations running side by side would be the fair comparison, and that is `stardomain run --workers 2`.

    python benchmarks/stacked_training.py --widths 16 128 --k 10 --epochs 1
"""

from __future__ import annotations

import argparse
import time

import torch

from stardomain.config import Config
from stardomain.data import get_dataset
from stardomain.population import train_population
from stardomain.training import train


def recipe(width: int, epochs: int) -> Config:
    return Config.model_validate({
        "data": {"name": "mnist"}, "model": {"name": "mlp", "kwargs": {"width": width}},
        "train": {"epochs": epochs, "batch_size": 128, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                  "schedule": {"name": "cosine"}}})


def solo(cfg: Config, seeds: list[int]) -> list[dict]:
    return [train(cfg, s, device="cpu", progress=False)[0].state_dict() for s in seeds]


def stacked(cfg: Config, seeds: list[int]) -> list[dict]:
    return [m.state_dict() for m, _, _ in train_population(cfg, seeds, device="cpu", progress=False)]


def timed(fn, cfg: Config, seeds: list[int]) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    out = fn(cfg, seeds)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--k", type=int, default=10, help="models in the population")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads (stacking needs 1)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    get_dataset(recipe(16, 1).data)  # loaded once, outside the timings
    seeds = list(range(a.k))
    print("| width | K | epochs | threads | solo (s) | stacked (s) | speed-up | bitwise equal |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in a.threads:
        torch.set_num_threads(threads)
        for width in a.widths:
            cfg = recipe(width, a.epochs)
            t_solo, t_stack, equal = [], [], True
            for _ in range(a.repeats):
                ts, w_solo = timed(solo, cfg, seeds)
                tk, w_stack = timed(stacked, cfg, seeds)
                t_solo.append(ts)
                t_stack.append(tk)
                equal &= all(torch.equal(v, b[n]) for a_, b in zip(w_solo, w_stack) for n, v in a_.items())
            print(f"| {width} | {a.k} | {a.epochs} | {threads} | {min(t_solo):.2f} | {min(t_stack):.2f} | "
                  f"{min(t_solo) / min(t_stack):.2f}x | {equal} |", flush=True)


if __name__ == "__main__":
    main()
