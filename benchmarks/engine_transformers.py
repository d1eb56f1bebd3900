"""Barrier curves of transformers: every engine strategy on the same pair, in one process, alternating, each
strategy's best of `--reps` kept; then the memory one process keeps after repeated curves per strategy.

Why: `auto` chose vmap for the GPT (whose scaled dot-product attention vmap can only batch by looping
inside) and the fused TorchScript path for the ViT (a conv net by its patch embedding, but without the
BatchNorm whose folding is that path's gain; and every `torch.jit.freeze` keeps memory until the process
ends). The curves must agree to float32 rounding whatever the strategy.

    .venv/bin/python benchmarks/engine_transformers.py            # GPT on pydoc_text + ViT on MNIST
    .venv/bin/python benchmarks/engine_transformers.py --reps 3 --leak 6
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import torch

from stardomain.barriers import curve, grid
from stardomain.config import Config
from stardomain.data import get_dataset, sample_examples
from stardomain.training import train
from stardomain.barriers import BarrierSettings

CASES = {
    "gpt": {"data": {"name": "pydoc_text", "kwargs": {"context": 64}, "train_subset": 3000},
            "model": {"name": "gpt", "kwargs": {"dim": 32, "depth": 2, "heads": 4, "mlp_ratio": 4}},
            "train": {"epochs": 1, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01}}, "examples": 1000},
    "vit": {"data": {"name": "mnist", "train_subset": 10000},
            "model": {"name": "vit", "kwargs": {"patch": 7, "dim": 32, "depth": 2, "heads": 4, "mlp_dim": 64}},
            "train": {"epochs": 1, "batch_size": 128, "optimizer": {"name": "adamw", "lr": 0.003}}, "examples": 2000},
}
STRATEGIES = ("auto", "vmap", "loop", "fused")


def rss_mb() -> float:
    """Resident memory now (not the peak: an earlier strategy's transient peak would hide what stays)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--leak", type=int, default=4, help="repeated curves per strategy for the memory column")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the "no batching rule" warning of the vmap column is the point
    print("| model | strategy auto picks | " + " | ".join(f"{s} (s)" for s in STRATEGIES)
          + " | max curve difference | MB kept per curve: " + " / ".join(STRATEGIES) + " |")
    print("|---|---|" + "---|" * len(STRATEGIES) + "---|---|")
    for name, c in CASES.items():
        cfg = Config.model_validate({k: v for k, v in c.items() if k != "examples"})
        a, _ = train(cfg, 0, progress=False)
        b, _ = train(cfg, 1, progress=False)
        data = sample_examples(get_dataset(cfg.data), c["examples"], 0)
        sa, sb, ts = a.state_dict(), b.state_dict(), grid(11)
        best = {s: float("inf") for s in STRATEGIES}
        curves = {}
        for _ in range(args.reps):
            for s in STRATEGIES:
                t0 = time.perf_counter()
                curves[s] = curve(a, sa, sb, data, ts, BarrierSettings(method=s))
                best[s] = min(best[s], time.perf_counter() - t0)
        ref = curves["loop"]["train"]["loss"]
        diff = max(abs(x - y) for s in STRATEGIES for x, y in zip(curves[s]["train"]["loss"], ref))
        kept = []
        for s in STRATEGIES:  # growth of the resident memory over repeated curves, after a warm-up curve
            curve(a, sa, sb, data, ts, BarrierSettings(method=s))
            before = rss_mb()
            for _ in range(args.leak):
                curve(a, sa, sb, data, ts, BarrierSettings(method=s))
            kept.append(f"{(rss_mb() - before) / args.leak:.1f}")
        picked = curves["auto"].get("method", "?")
        print(f"| {name} | {picked} | " + " | ".join(f"{best[s]:.2f}" for s in STRATEGIES)
              + f" | {diff:.1e} | " + " / ".join(kept) + " |", flush=True)


if __name__ == "__main__":
    main()
