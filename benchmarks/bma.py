"""Star-domain BMA cost: stacked functional evaluation (vmap over K weight sets, batched BN
recalibration) against the straightforward loop that builds K modules (lerp, load_state_dict,
recalibrate_bn, forward). Same draws, same data, one process; prints both times, the ratio and the
largest difference in averaged probabilities.

    .venv/bin/python benchmarks/bma.py [--data mnist] [--model mlp-bn|cnn-bn] [--k 32] [--bn-batches 10]
"""

from __future__ import annotations

import argparse
import time

import torch

from stardomain import averaging as bma
from stardomain.config import Config
from stardomain.data import get_dataset
from stardomain.engine import Engine, Stack
from stardomain.interpolate import lerp, recalibrate_bn
from stardomain.models import build_model
from stardomain.training import init_model

MODELS = {"mlp-bn": {"name": "mlp", "kwargs": {"width": 64, "bn": True}},
          "cnn-bn": {"name": "cnn", "kwargs": {"widths": [16, 32], "norm": "bn"}}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--model", default="mlp-bn", choices=list(MODELS))
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--sources", type=int, default=5)
    ap.add_argument("--bn-batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = Config.model_validate({"data": {"name": a.data}, "model": MODELS[a.model]})
    data = get_dataset(cfg.data)
    star = init_model(cfg, data, 0).state_dict()
    sources = [init_model(cfg, data, s).state_dict() for s in range(1, a.sources + 1)]
    idx, t = bma.draw_star(len(sources), a.k, torch.Generator().manual_seed(0))
    x = data.test.x

    t0 = time.perf_counter()
    total = torch.zeros(len(x), data.num_classes, dtype=torch.float64)
    for n, tt in zip(idx.tolist(), t.tolist()):
        m = build_model(cfg.model, data.input_shape, data.num_classes)
        m.load_state_dict(lerp(star, sources[n], tt))
        recalibrate_bn(m, data.train, batch_size=a.batch_size, max_batches=a.bn_batches)
        with torch.no_grad():
            total += torch.cat([m(x[i:i + a.batch_size]).softmax(-1).double()
                                for i in range(0, len(x), a.batch_size)])
    loop = total / a.k
    t_loop = time.perf_counter() - t0

    ev = Engine(build_model(cfg.model, data.input_shape, data.num_classes), strategy="vmap")

    def chunk_weights(sl):
        rows = idx[sl].tolist()
        return (Stack({k: v.expand(len(rows), *v.shape) for k, v in star.items()}),
                Stack({k: torch.stack([sources[r][k] for r in rows]) for k in star}))

    t0 = time.perf_counter()
    (final, _, _) = bma._bma_run(ev, chunk_weights, t, x, data.test.y, {}, data.train, chunk=a.chunk,
                              batch_size=a.batch_size, bn_batches=a.bn_batches, ks=[], n_bins=15)
    t_fun = time.perf_counter() - t0
    diff = (final["test"] - loop).abs().max().item()
    print(f"{a.data} {a.model} K={a.k} bn_batches={a.bn_batches} test={len(x)} threads={torch.get_num_threads()}")
    print(f"loop over K modules : {t_loop:8.3f} s")
    print(f"stacked vmap (chunk {a.chunk}): {t_fun:8.3f} s")
    print(f"speed-up            : {t_loop / t_fun:8.2f}x   max |prob diff| {diff:.2e}")


if __name__ == "__main__":
    main()
