"""Barrier curve: ours (stardomain.barriers.curve, method auto) against the straightforward reference
(for each t: build the model, one full BatchNorm pass at interior t with PyTorch's own train-mode
BatchNorm, one full pass over train and test), in one process, on the same pair. Prints the speed ratio
and the largest difference between the curves.

    .venv/bin/python benchmarks/barrier.py                 # MNIST MLP width 16 + MNIST BN CNN
    .venv/bin/python benchmarks/barrier.py --only mlp --reps 3

Timings alternate reference/ours and keep each one's best, so load from other processes on a shared
machine hurts both alike.
"""

from __future__ import annotations

import argparse
import time

import copy

import torch
import torch.nn.functional as F

from stardomain.barriers import curve, grid
from stardomain.config import Config
from stardomain.data import batches, get_dataset
from stardomain.interpolate import lerp
from stardomain.training import train
from stardomain.barriers import BarrierSettings


def pair(model: dict, data: dict, epochs: int, device: str):
    cfg = Config.model_validate({"data": data, "model": model,
                                 "train": {"epochs": epochs, "batch_size": 128}})
    a, _ = train(cfg, 0, device=device, progress=False)
    b, _ = train(cfg, 1, device=device, progress=False)
    return a, a.state_dict(), b.state_dict(), get_dataset(cfg.data)


@torch.no_grad()
def reference(model, sa, sb, data, ts, device, batch_size=1000, bn_batches=None):
    """The protocol written plainly: per t, a model; at interior t, BatchNorm statistics reset and
    re-estimated by PyTorch's train-mode BatchNorm (momentum=None: the cumulative average over batches);
    then eval-mode passes over train and test."""
    m = copy.deepcopy(model).to(device)
    bns = [x for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    rec = {"train": {"loss": [], "acc": []}, "test": {"loss": [], "acc": []}}
    for t in ts:
        m.load_state_dict(sa if t == 0 else sb if t == 1 else lerp(sa, sb, t))
        if 0 < t < 1 and bns:
            for bn in bns:
                bn.reset_running_stats()
                bn.momentum = None
            m.train()
            for x, _ in batches(data.train, batch_size, device=device, max_batches=bn_batches):
                m(x)
        m.eval()
        for s in ("train", "test"):
            loss, correct, n = 0.0, 0, 0
            for x, y in batches(data.split(s), batch_size, device=device):
                out = m(x)
                loss += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
                n += len(y)
            rec[s]["loss"].append(loss / n)
            rec[s]["acc"].append(correct / n)
    return rec


def bench(name, model, sa, sb, data, reps, points, device, bn_batches=None):
    ts = grid(points)
    best = {"reference": float("inf"), "ours": float("inf")}
    recs = {}
    for _ in range(reps):
        for who in ("reference", "ours"):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            recs[who] = (reference(model, sa, sb, data, ts, device, bn_batches=bn_batches) if who == "reference"
                         else curve(model, sa, sb, data, ts, BarrierSettings(method='auto', bn_batches=bn_batches), device=device))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best[who] = min(best[who], time.perf_counter() - t0)

    def d(m):
        return max(abs(x - y) for s in ("train", "test") for x, y in zip(recs["reference"][s][m], recs["ours"][s][m]))

    # accuracy differences in examples: a prediction that flips on float rounding near a tie moves
    # accuracy by 1/n, so it is reported as a count rather than hidden in a fraction
    flips = max(round(abs(x - y) * len(data.split(s))) for s in ("train", "test")
                for x, y in zip(recs["reference"][s]["acc"], recs["ours"][s]["acc"]))
    ratio = best["reference"] / best["ours"]
    print(f"{name:<30} train {len(data.train):>6}  reference {best['reference']:7.2f}s  ours ({recs['ours']['method']}) "
          f"{best['ours']:6.2f}s  speed-up {ratio:4.2f}x  max diff: loss {d('loss'):.1e}, acc {d('acc'):.1e} "
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
