"""Variance reduction: does splitting each mini-batch into k chunks, each with its own (source, t) draw,
lower star-held-out barriers for the same compute (same epochs, batch size and examples seen)?

Setting (the issue's MNIST MLP, scaled to run in minutes on 2 cores): MNIST, 3,000 training images,
MLP 784-16-10, SGD lr 0.05 momentum 0.9, batch 64, 20 epochs; 5 sources, 4 held-outs; Starlight with
re-alignment every epoch; stars for k in {1, 2, 4, 8}, each with 3 star seeds. Barrier: training-loss
barrier on the training split, 11 points, held-out aligned to the star by weight matching
(stardomain.permute), mean over seeds x held-outs with its standard error. Also the star's own training
loss and the wall time of its training.

    python benchmarks/starlight_chunks.py [--ks 1,2,4,8] [--seeds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from stardomain import starlight as sl
from stardomain import training as tr
from stardomain.barriers import measure
from stardomain.config import Config
from stardomain.data import get_dataset
from stardomain.models import build_model
from stardomain.barriers import BarrierSettings


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = Config.model_validate({"data": {"name": "mnist", "train_subset": 3000},
                                 "model": {"name": "mlp", "kwargs": {"width": 16}},
                                 "train": {"epochs": 20, "batch_size": 64,
                                           "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}}})
    data = get_dataset(cfg.data)
    models = [tr.train(cfg, seed=s, progress=False)[0].state_dict() for s in range(9)]
    sources, heldouts = models[:5], models[5:]
    probe = build_model(cfg.model, data.input_shape, data.num_classes)

    def aligned_barrier(sd_a, sd_b):
        return measure(probe, sd_a, sd_b, data, BarrierSettings(points=11))["barrier"]["train_loss"]

    reg = [aligned_barrier(s, h) for s in sources for h in heldouts]
    print(f"regular-regular (source x held-out, aligned): {np.mean(reg):.4f} +- {np.std(reg) / np.sqrt(len(reg)):.4f}"
          f"  (n={len(reg)}); sources' own train loss {np.mean([tr.evaluate(probe, data.train)['loss'] for s in sources if probe.load_state_dict(s) or True]):.4f}")
    print(f"{'k':>3} {'star-heldout':>13} {'+- se':>7} {'star train loss':>16} {'star train acc':>15} {'seconds':>8}")
    for k in [int(x) for x in a.ks.split(",")]:
        c = cfg.model_copy(update={"star": cfg.star.model_copy(update={"chunks": k})})
        bs, losses, accs, secs = [], [], [], []
        for seed in range(a.seeds):
            t0 = time.perf_counter()
            star, info = sl.train_star(c, sources, seed=seed, progress=False)
            secs.append(time.perf_counter() - t0)
            sd = {kk: v.detach() for kk, v in star.state_dict().items()}
            bs += [aligned_barrier(sd, h) for h in heldouts]
            losses.append(info["metrics"]["train"]["loss"])
            accs.append(info["metrics"]["train"]["acc"])
        print(f"{k:>3} {np.mean(bs):13.4f} {np.std(bs) / np.sqrt(len(bs)):7.4f} {np.mean(losses):16.4f} "
              f"{np.mean(accs):15.4f} {np.mean(secs):8.1f}", flush=True)


if __name__ == "__main__":
    main()
