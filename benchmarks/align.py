"""Weight matching: stardomain.permute vs the `rebasin` package (0.0.47, the one the paper used).

Same pairs, same process: an MLP 784-512-512-10, the small BN CNN (Conv-BN-ReLU-MaxPool x4, flatten,
linear; 28x28 input) and a CIFAR ResNet-20 (BN). A and B are independent seeded initialisations with
randomised BN statistics (timing does not depend on training; correctness is about the function).
Reported per side: wall time of the whole alignment (tracing + matching + applying), the ratio, the
L2 distance to A after alignment, and the output error of the aligned B against B
(max |f_aligned(x) - f_B(x)| / max |f_B(x)|, eval mode, float32, 64 random inputs). A correct
alignment has an output error at float32 rounding level (~1e-6).

    .venv/bin/pip install rebasin==0.0.47      # optional; not a stardomain dependency
    .venv/bin/python benchmarks/align.py [--reps 3]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from stardomain.models import build_model
from stardomain.permute import apply_permutation, distance, spec_from_model, weight_matching

PAIRS = [
    ("MLP 784-512-512-10", {"name": "mlp", "kwargs": {"width": 512, "depth": 2}}, (1, 28, 28), 10),
    ("BN CNN 32-64-128-256 (28x28)", {"name": "cnn", "kwargs": {"widths": [32, 64, 128, 256], "norm": "bn"}}, (1, 28, 28), 10),
    ("ResNet-20 BN (32x32)", {"name": "resnet", "kwargs": {"depth": 20, "norm": "bn"}}, (3, 32, 32), 10),
]


def make(cfg, shape, classes, seed):
    torch.manual_seed(seed)
    m = build_model(cfg, shape, classes)
    g = torch.Generator().manual_seed(seed + 100)
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
            mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
            mod.weight.data.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=g))
            mod.bias.data.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
    return m.eval()


def out_error(model, sd_ref, sd_new, x):
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    a.load_state_dict(sd_ref)
    b.load_state_dict(sd_new)
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return float((ya - yb).abs().max() / ya.abs().max())


def ours(ma, mb, x_trace):
    t0 = time.perf_counter()
    spec = spec_from_model(mb, x_trace)
    t1 = time.perf_counter()
    perm, info = weight_matching(spec, ma.state_dict(), mb.state_dict())
    sd = apply_permutation(spec, mb.state_dict(), perm)
    t2 = time.perf_counter()
    return sd, t2 - t0, t2 - t1, info["iterations"]


def theirs(ma, mb, x_trace):
    from rebasin import PermutationCoordinateDescent

    mb = copy.deepcopy(mb)
    t0 = time.perf_counter()
    pcd = PermutationCoordinateDescent(copy.deepcopy(ma), mb, x_trace)
    pcd.rebasin()
    return {k: v.detach().clone() for k, v in mb.state_dict().items()}, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3, help="repetitions of ours (best time is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides (on a shared 2-core "
                    "machine more than 1 makes small convolutions 50x slower through thread contention)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import rebasin  # noqa: F401
        have = True
    except ImportError:
        have = False
        print("rebasin not installed: `.venv/bin/pip install rebasin==0.0.47` to compare; timing ours only")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for label, cfg, shape, classes in PAIRS:
        ma, mb = make(cfg, shape, classes, 0), make(cfg, shape, classes, 1)
        x_trace = torch.randn(2, *shape, generator=torch.Generator().manual_seed(5))
        x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(6))
        sd_a, sd_b = ma.state_dict(), mb.state_dict()
        best = None
        for _ in range(args.reps):
            r = ours(ma, mb, x_trace)
            best = r if best is None or r[1] < best[1] else best
        sd_o, t_o, t_wm, iters = best
        print(f"\n{label}: distance A-B {distance(sd_a, sd_b):.3f}")
        print(f"  stardomain  {t_o:8.3f} s (matching {t_wm:.3f} s, {iters} passes)  distance after "
              f"{distance(sd_a, sd_o):.3f}  output error {out_error(mb, sd_b, sd_o, x):.2e}")
        if have:
            sd_r, t_r = theirs(ma, mb, x_trace)
            print(f"  rebasin     {t_r:8.3f} s  distance after {distance(sd_a, sd_r):.3f}  "
                  f"output error {out_error(mb, sd_b, sd_r, x):.2e}")
            print(f"  speed-up    {t_r / t_o:8.1f}x")


if __name__ == "__main__":
    main()
