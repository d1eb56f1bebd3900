"""Alignment methods against each other: weight matching, activation matching, the straight-through
estimator and Sinkhorn re-basin (docs/method.md, "Learned alignment") on the same trained pairs.

Pairs (models A and B from seeds 0 and 1, trained here once and kept in --cache):
  mlp512x3   Git Re-Basin's MNIST MLP 784-512-512-512-10 (Adam 1e-3, batch 128)
  mlp16/64   the width sweep's MNIST MLP 784-w-10 at widths 16 and 64 (its recipe: SGD 0.05, momentum
             0.9, cosine, batch 128)
  cnn        the BN CNN (Conv-BN-ReLU x4) on digits (Adam 1e-3, batch 64)
  resnet20   ResNet-20 (BN) on digits (Adam 1e-3, batch 64)
  gpt        the zoo `gpt` of configs/text_gpt.yaml on pydoc_text (AdamW 0.01, batch 32, cosine)
--epochs and --train-subset size the training to the machine (MNIST: the first N of a seeded shuffle).
For each pair and method: the barrier record of `stardomain barrier --method M` (11 points, BN
recomputed at every t; gpt on a seeded 1,000-window sample of its train split, as configs/text_gpt.yaml),
the train and test loss barriers and the alignment's wall time; the learned methods with their
default settings (config.LearnedAlignConfig), seed 0.

    .venv/bin/python benchmarks/align_methods.py [--cases mlp16,cnn] [--epochs 3] [--train-subset 10000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import stardomain as sd
from stardomain.checkpoint import data_from_meta
from stardomain.data import sample_examples

METHODS = ("weight", "activation", "ste", "sinkhorn")
MNIST_SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9}


def cases(epochs: int, subset: int) -> dict[str, dict]:
    mnist = {"name": "mnist", "train_subset": subset}
    digits = {"name": "digits"}
    adam = {"name": "adam", "lr": 1e-3}
    return {
        "mlp512x3": {"data": mnist, "model": {"name": "mlp", "kwargs": {"width": 512, "depth": 3}},
                     "train": {"epochs": epochs, "batch_size": 128, "optimizer": adam}},
        **{f"mlp{w}": {"data": mnist, "model": {"name": "mlp", "kwargs": {"width": w, "depth": 1}},
                       "train": {"epochs": epochs, "batch_size": 128, "optimizer": MNIST_SGD,
                                 "schedule": {"name": "cosine"}}} for w in (16, 64)},
        "cnn": {"data": digits, "model": {"name": "cnn", "kwargs": {"widths": [16, 32, 64, 128]}},
                "train": {"epochs": 4 * epochs, "batch_size": 64, "optimizer": adam}},
        "resnet20": {"data": digits, "model": {"name": "resnet", "kwargs": {"depth": 20}},
                     "train": {"epochs": 4 * epochs, "batch_size": 64, "optimizer": adam}},
        "gpt": {"data": {"name": "pydoc_text", "kwargs": {"context": 64}, "train_subset": 3000},
                "model": {"name": "gpt", "kwargs": {"dim": 32, "depth": 2, "heads": 4, "mlp_ratio": 4}},
                "train": {"epochs": 2 * epochs, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01},
                          "schedule": {"name": "cosine"}}},
    }


def trained(name: str, cfg: dict, seed: int, cache: Path):
    path = cache / f"{name}-s{seed}.safetensors"
    if path.exists():
        return sd.load(path), 0.0
    t0 = time.perf_counter()
    m = sd.train(cfg, seed=seed)
    m.save(path)
    return sd.load(path), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="mlp16,mlp64,cnn,resnet20,gpt,mlp512x3")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/align_methods"))
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line per measurement here")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    all_cases = cases(args.epochs, args.train_subset)
    print("| pair | method | train barrier | test barrier | align s | A test acc | training |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        cfg = all_cases[name]
        (a, ta), (b, tb) = trained(name, cfg, 0, args.cache), trained(name, cfg, 1, args.cache)
        # gpt as configs/text_gpt.yaml: a 1,000-window sample of train; its test split (594 windows) whole
        bundle = data_from_meta(a.meta, name)
        data = bundle if name != "gpt" else sample_examples(bundle, 1000, 0)
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            rec = sd.barrier(a, b, data=data, align_method=method, device="cpu").record
            wall = time.perf_counter() - t0
            br = rec["barrier"]
            how = f"{cfg['train']['epochs']} ep" + (f", {ta + tb:.0f} s" if ta + tb else "")
            print(f"| {name} | {method} | {br['train_loss']:.4f} | {br['test_loss']:.4f} | "
                  f"{rec['timings']['align_s']:.1f} | {a.metrics['test']['acc']:.3f} | {how} |", flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps({"pair": name, "method": method, "barrier": br, "wall_s": wall,
                                        "timings": rec["timings"], "alignment": {
                                            k: v for k, v in rec["alignment"].items() if k != "warnings"},
                                        "metrics_a": a.metrics, "metrics_b": b.metrics}) + "\n")


if __name__ == "__main__":
    main()
