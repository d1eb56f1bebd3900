"""Step cost of `sd.Starlight` in a hand-written loop against an ordinary training step of the same model.

Steps on the same model, batch and optimiser, each timed alone, all kinds in a fresh random order every
round (so the machine's slow spells fall on every kind alike), compared by their median times:
  plain        zero_grad, forward, cross-entropy, backward, SGD step (momentum 0.9)
  starlight    the same with `light(x)` (draw, interpolated forward) in place of `model(x)`
               (alignment off, so the step itself is what is timed: weight matching costs the same per
               alignment as in `stardomain star`, see benchmarks/RESULTS.md)
  read source  a plain step after reading the drawn source's parameters once (one sum per tensor)
  lerp only    a plain step after lerping the drawn source into buffers: the memory traffic any exact
               Starlight step pays (it must read a source and write the interpolated weights), with none
               of our code; `starlight` minus `lerp only` is what our implementation adds
Three sources (`--sources`), drawn as `sd.Starlight` draws them. Models: MLP 784-512-512-10 (MNIST shape, batch 128:
touches each weight least per example, so the interpolation weighs most), our BN `cnn` and ResNet-20
(CIFAR shape, batch 128), a GPT of width 128, depth 4 (813k parameters; 32 windows of 64 tokens), and the
default study's MLP 784-16-10 (`mlp16`, a ~0.6 ms step, where fixed per-call costs show). Target <= 1.10x.

    python benchmarks/starlight_objective.py [--threads 2] [--seconds 40] [--models mlp,cnn,resnet20,gpt,mlp16]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

import stardomain as sd
from stardomain.models import build_model
from stardomain.objective import Draws

MODELS = {  # name: (model section, input shape, batch, token inputs)
    "mlp": ({"name": "mlp", "kwargs": {"width": 512, "depth": 2}}, (1, 28, 28), 128, False),
    "cnn": ({"name": "cnn", "kwargs": {}}, (3, 32, 32), 128, False),
    "resnet20": ({"name": "resnet", "kwargs": {"depth": 20}}, (3, 32, 32), 128, False),
    "gpt": ({"name": "gpt", "kwargs": {"dim": 128, "depth": 4, "heads": 4, "mlp_ratio": 4}}, (64,), 32, True),
    "mlp16": ({"name": "mlp", "kwargs": {"width": 16}}, (1, 28, 28), 128, False),
}
CLASSES = 96  # the GPT's vocabulary; 10 classes for the others


def make_steps(arch, shape, batch, tokens, n_sources=3):
    torch.manual_seed(0)
    classes = CLASSES if tokens else 10
    model = build_model(arch, shape, classes, tokens=tokens).train()
    sources = [build_model(arch, shape, classes, tokens=tokens).state_dict() for _ in range(n_sources)]
    if tokens:
        x, y = torch.randint(0, classes, (batch, *shape)), torch.randint(0, classes, (batch * shape[0],))
    else:
        x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    light = sd.Starlight(model, sources, align_every=None, seed=0)
    draws = Draws(light.settings, len(sources), seed=0)  # the floor steps' own (source, t) stream, as light's
    bufs = {k: torch.empty_like(p) for k, p in light.params.items()}

    def step(forward):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x).reshape(len(y), -1), y).backward()
        opt.step()

    def read_source():
        n, _ = draws.draw()
        for v in light.bank.get(n).values():
            v.sum()
        step(model)

    def lerp_only():
        n, t = draws.draw()
        with torch.no_grad():
            for k, v in light.bank.get(n).items():
                torch.lerp(light.params[k], v, t, out=bufs[k])
        step(model)

    return {"plain": lambda: step(model), "starlight": lambda: step(light), "read source": read_source,
            "lerp only": lerp_only}


def time_steps(steps, seconds, seed=0):
    """{kind: [seconds per step]}: rounds of one step of every kind in a fresh random order."""
    for f in steps.values():  # warm-up
        for _ in range(3):
            f()
    per = {k: [] for k in steps}
    kinds, rng, end = list(steps), random.Random(seed), time.perf_counter() + seconds
    while time.perf_counter() < end or len(per["plain"]) < 15:
        rng.shuffle(kinds)
        for k in kinds:
            t0 = time.perf_counter()
            steps[k]()
            per[k].append(time.perf_counter() - t0)
    return per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=40, help="time spent per model")
    ap.add_argument("--models", default="mlp,cnn,resnet20,gpt,mlp16")
    ap.add_argument("--sources", type=int, default=3, help="sources drawn from (1: the source stays in cache)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, {a.sources} sources, {a.seconds:.0f} s per model, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'model':<9} {'rounds':>6} {'plain ms':>9} {'starlight':>10} {'read source':>12} {'lerp only':>10}"
          "   (median step; ratios to plain)")
    for name in a.models.split(","):
        per = time_steps(make_steps(*MODELS[name], n_sources=a.sources), a.seconds)
        med = {k: statistics.median(v) for k, v in per.items()}
        ratio = {k: med[k] / med["plain"] for k in med}
        print(f"{name:<9} {len(per['plain']):6d} {med['plain'] * 1e3:9.2f} {ratio['starlight']:10.3f} "
              f"{ratio['read source']:12.3f} {ratio['lerp only']:10.3f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
