"""Barrier curve: ours (stardomain.barrier.curve, method auto) against the straightforward reference
(for each t: build the model, one full BatchNorm pass at interior t, one full pass over train and test),
in one process, on the same pair. Prints the speed ratio and the largest difference between the curves.

    .venv/bin/python benchmarks/barrier.py                 # MNIST MLP width 16 + MNIST BN CNN
    .venv/bin/python benchmarks/barrier.py --only mlp --reps 3

Timings alternate reference/ours and keep each one's best, so load from other processes on a shared
machine hurts both alike.
"""

from __future__ import annotations

import argparse
import time

import torch

from stardomain.barrier import curve, grid
from stardomain.config import Config
from stardomain.data import get_dataset
from stardomain.train import train


def pair(model: dict, data: dict, epochs: int, device: str):
    cfg = Config.model_validate({"data": data, "model": model,
                                 "train": {"epochs": epochs, "batch_size": 128}})
    a, _ = train(cfg, 0, device=device, progress=False)
    b, _ = train(cfg, 1, device=device, progress=False)
    return a, a.state_dict(), b.state_dict(), get_dataset(cfg.data)


def bench(name, model, sa, sb, data, reps, points, device, bn_batches=None):
    ts = grid(points)
    best = {"loop": float("inf"), "auto": float("inf")}
    recs = {}
    for _ in range(reps):
        for method in ("loop", "auto"):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            recs[method] = curve(model, sa, sb, data, ts, method=method, device=device, bn_batches=bn_batches)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best[method] = min(best[method], time.perf_counter() - t0)
    def d(m):
        return max(abs(x - y) for s in ("train", "test") for x, y in zip(recs["loop"][s][m], recs["auto"][s][m]))

    # accuracy differences in examples: a prediction that flips on float rounding near a tie moves
    # accuracy by 1/n, so it is reported as a count rather than hidden in a fraction
    flips = max(round(abs(x - y) * len(data.split(s))) for s in ("train", "test")
                for x, y in zip(recs["loop"][s]["acc"], recs["auto"][s]["acc"]))
    ratio = best["loop"] / best["auto"]
    print(f"{name:<30} train {len(data.train):>6}  reference {best['loop']:7.2f}s  ours ({recs['auto']['method']}) "
          f"{best['auto']:6.2f}s  speed-up {ratio:4.2f}x  max diff: loss {d('loss'):.1e}, acc {d('acc'):.1e} "
          f"({flips} example(s))", flush=True)
    return ratio


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["mlp", "cnn"], default=None)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--points", type=int, default=11)
    ap.add_argument("--cnn-widths", default="32,64", help="widths of the BN CNN (our `cnn` model)")
    ap.add_argument("--cnn-train-subset", type=int, default=10000, help="MNIST training examples for the CNN")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, {args.points} t values")
    if args.only in (None, "mlp"):
        a, sa, sb, d = pair({"name": "mlp", "kwargs": {"width": 16}}, {"name": "mnist"}, 1, args.device)
        bench("MNIST MLP width 16 (no BN)", a, sa, sb, d, args.reps, args.points, args.device)
        a, sa, sb, d = pair({"name": "mlp", "kwargs": {"width": 16, "bn": True}}, {"name": "mnist"}, 1, args.device)
        bench("MNIST MLP width 16 + BN", a, sa, sb, d, args.reps, args.points, args.device)
    if args.only in (None, "cnn"):
        widths = [int(w) for w in args.cnn_widths.split(",")]
        a, sa, sb, d = pair({"name": "cnn", "kwargs": {"widths": widths}},
                            {"name": "mnist", "train_subset": args.cnn_train_subset}, 1, args.device)
        bench(f"MNIST BN CNN widths {widths}", a, sa, sb, d, args.reps, args.points, args.device)


if __name__ == "__main__":
    main()
