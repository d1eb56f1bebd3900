"""Step cost of `sd.Starlight` in a hand-written loop against an ordinary training step of the same model.

Two steps on the same model, batch and optimiser, timed interleaved in one process:
  plain      zero_grad, forward, cross-entropy, backward, SGD step
  starlight  zero_grad, light(x) (draw, interpolated forward), cross-entropy, backward, SGD step
             (alignment off, so the step itself is what is timed: weight matching costs the same
             per alignment as in `stardomain star`, see benchmarks/RESULTS.md)
Models: MLP 784-512-512-10 (MNIST shape), our BN `cnn` (CIFAR shape), and (`--models mlp16`) the default
study's MLP 784-16-10, whose step is so small that the fixed per-call cost shows. Batch 128. Target: <= 1.10x.
`--parts` adds two steps that split the cost: a plain step after only reading the drawn source's parameters
(the memory traffic any Starlight step needs), and one after lerping them into buffers (no Python beyond).

    python benchmarks/starlight_objective.py [--threads 2] [--rounds 15] [--models mlp,cnn] [--clock cpu] [--parts]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import stardomain as sd
from stardomain.models import build_model
from stardomain.objective import Draws

MODELS = {
    "mlp": ({"name": "mlp", "kwargs": {"width": 512, "depth": 2}}, (1, 28, 28)),
    "mlp16": ({"name": "mlp", "kwargs": {"width": 16}}, (1, 28, 28)),  # the default study's: overhead-bound
    "cnn": ({"name": "cnn", "kwargs": {}}, (3, 32, 32)),
}


def make_steps(arch, shape, batch, parts=False):
    torch.manual_seed(0)
    model = build_model(arch, shape, 10).train()
    sources = [build_model(arch, shape, 10).state_dict() for _ in range(3)]
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    light = sd.Starlight(model, sources, align_every=None, seed=0)
    draws = Draws(light.settings, len(sources), seed=0)  # the parts' own (source, t) stream, as light's
    bufs = {k: torch.empty_like(p) for k, p in light.params.items()}

    def plain():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def starlight():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(light(x), y).backward()
        opt.step()

    def read_source():  # the drawn source read once (a sum per tensor), then a plain step
        n, _ = draws.draw()
        for v in light.bank.get(n).values():
            v.sum()
        plain()

    def lerp_only():  # the drawn source lerped into buffers, then a plain step
        n, t = draws.draw()
        with torch.no_grad():
            for k, v in light.bank.get(n).items():
                torch.lerp(light.params[k], v, t, out=bufs[k])
        plain()

    steps = {"plain": plain, "starlight": starlight}
    return {**steps, "read source": read_source, "lerp only": lerp_only} if parts else steps


def time_steps(steps, rounds, reps, clock):
    for f in steps.values():  # warm-up
        f(), f()
    per = {k: [] for k in steps}
    for _ in range(rounds):
        for k, f in steps.items():
            t0 = clock()
            for _ in range(reps):
                f()
            per[k].append((clock() - t0) / reps)
    return per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: this process's CPU time (steadier on a crowded machine)")
    ap.add_argument("--parts", action="store_true", help="also time reading the source, and lerp alone")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, batch {a.batch}, {a.rounds} interleaved rounds, "
          f"{a.clock} clock, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'model':<6} {'plain ms':>9} {'starlight ms':>13} {'ratio':>7} {'median ratio':>13}  (IQR)  "
          "(ms and ratio: fastest round; median ratio: of each round's own ratio, rounds interleaved)")
    for name in a.models.split(","):
        arch, shape = MODELS[name]
        clock = time.perf_counter if a.clock == "wall" else time.process_time
        per = time_steps(make_steps(arch, shape, a.batch, a.parts), a.rounds, 1 if name == "cnn" else 5, clock)
        mn = {k: min(v) for k, v in per.items()}
        paired = [s / p for p, s in zip(per["plain"], per["starlight"])]  # each round's own ratio
        q1, q2, q3 = statistics.quantiles(paired, n=4)
        print(f"{name:<6} {mn['plain'] * 1e3:9.2f} {mn['starlight'] * 1e3:13.2f} "
              f"{mn['starlight'] / mn['plain']:7.3f} {q2:13.3f}  ({q1:.3f}-{q3:.3f})", flush=True)
        if a.parts:
            extra = {k: statistics.median(s - p for p, s in zip(per["plain"], v)) * 1e3 for k, v in per.items()}
            print("       ms per step over plain (median of rounds): "
                  + ", ".join(f"{k} {v:+.3f}" for k, v in extra.items() if k != "plain"))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
