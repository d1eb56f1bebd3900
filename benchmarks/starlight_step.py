"""Cost of one Starlight step against one ordinary training step, and against the paper code's way.

Three steps on the same model, batch and optimiser, timed interleaved in one process:
  plain      zero_grad, forward, cross-entropy, backward, SGD step
  ours       stardomain.starlight.star_loss: the module run at lerp(θ, θ_n, t) (objective.interpolated_forward),
             (1-t) on the output's gradient
  reference  the paper code's way: concatenate all parameters into one vector, interpolate the vectors,
             copy the result into a second module, back-propagate there, copy the gradient vector back into
             the star's .grad scaled by (1-t), SGD step
Models: MLP 784-512-512-10 (MNIST shape), our BN `cnn` and ResNet-20 (CIFAR shape), batch 128.

    python benchmarks/starlight_step.py [--threads 2] [--rounds 7] [--models mlp,cnn,resnet20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from stardomain.models import build_model
from stardomain.starlight import star_loss

MODELS = {
    "mlp": ({"name": "mlp", "kwargs": {"width": 512, "depth": 2}}, (1, 28, 28)),
    "cnn": ({"name": "cnn", "kwargs": {}}, (3, 32, 32)),
    "resnet20": ({"name": "resnet", "kwargs": {"depth": 20}}, (3, 32, 32)),
}


def make_steps(arch, shape, batch):
    torch.manual_seed(0)
    model = build_model(arch, shape, 10).train()
    source = build_model(arch, shape, 10)
    src = {k: v.detach() for k, v in source.named_parameters()}
    second = build_model(arch, shape, 10).train()
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    params = dict(model.named_parameters())
    scratch = {k: b.clone() for k, b in model.named_buffers()}
    src_vec = parameters_to_vector(src.values())
    pool = []
    t = 0.37

    def plain():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def ours():
        opt.zero_grad(set_to_none=True)
        star_loss(model, params, [(src, t)], x, y, scratch=scratch, pool=pool)
        opt.step()

    def reference():
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            vec = (1 - t) * parameters_to_vector(model.parameters()) + t * src_vec
            vector_to_parameters(vec, second.parameters())
        second.zero_grad(set_to_none=True)
        F.cross_entropy(second(x), y).backward()
        with torch.no_grad():
            g = parameters_to_vector([p.grad for p in second.parameters()]) * (1 - t)
            offset = 0
            for p in model.parameters():
                n = p.numel()
                p.grad = g[offset:offset + n].view_as(p).clone()
                offset += n
        opt.step()

    return {"plain": plain, "ours": ours, "reference": reference}


def time_steps(steps, rounds, reps):
    for f in steps.values():  # warm-up
        f(), f()
    per = {k: [] for k in steps}
    for _ in range(rounds):
        for k, f in steps.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            per[k].append((time.perf_counter() - t0) / reps)
    return per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--models", default="mlp,cnn,resnet20")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, batch {a.batch}, {a.rounds} interleaved rounds")
    print(f"{'model':<9} {'plain ms':>9} {'ours ms':>9} {'ref ms':>9} {'ours/plain':>11} {'ref/plain':>10} "
          f"{'median: ours':>14} {'median: ref':>13}   (ms and first ratios: fastest round)")
    for name in a.models.split(","):
        arch, shape = MODELS[name]
        steps = make_steps(arch, shape, a.batch)
        reps = 5 if name == "mlp" else 1
        per = time_steps(steps, a.rounds, reps)
        # on a shared machine the fastest round is the least disturbed one: report min (and median)
        mn = {k: min(v) for k, v in per.items()}
        med = {k: statistics.median(v) for k, v in per.items()}
        print(f"{name:<9} {mn['plain'] * 1e3:9.2f} {mn['ours'] * 1e3:9.2f} {mn['reference'] * 1e3:9.2f} "
              f"{mn['ours'] / mn['plain']:11.3f} {mn['reference'] / mn['plain']:10.3f} "
              f"{med['ours'] / med['plain']:14.3f} {med['reference'] / med['plain']:13.3f}", flush=True)


if __name__ == "__main__":
    main()
