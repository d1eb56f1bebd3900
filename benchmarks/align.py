"""Weight matching: stardomain.permute vs the `rebasin` package (0.0.47, the one the paper used).

Same pairs, same process: an MLP 784-512-512-10, the small BN CNN (Conv-BN-ReLU-MaxPool x4, flatten,
linear; 28x28 input) and a CIFAR ResNet-20 (BN). A and B are independent seeded initialisations with
randomised BN statistics and affines. With --trained, also MLP and BN CNN pairs trained for one epoch
on MNIST (stardomain.train, seeds 0 and 1): trained weights give less degenerate assignment problems.
Reported per side: wall time of the whole alignment (tracing + matching + applying), the median of
--reps runs, each from scratch after a garbage collection, the two sides alternating, with their range. The median, not the best:
rebasin draws a random group order and its time varies with it (0.26-0.95 s on ResNet-20 over 30
seeds); its runs are seeded 0, 1, ... so they repeat, and ours is seeded and deterministic. Also the
ratio of the medians, the L2 distance to A over *parameters* before and after alignment (the quantity
weight matching minimises; BN running statistics are data summaries that interpolation recomputes), and
the output error of the aligned B against B (max |f_aligned(x) - f_B(x)| / max |f_B(x)|, eval mode,
float32, 64 random inputs). A correct alignment has an output error at float32 rounding level (~1e-6).
For ours, the number of linear assignment problems solved and their total time (a separate,
instrumented run) show how much of the time is scipy's solver.
With --large, the peak memory of one alignment alone (both models built first, then the process's
peak resident-set mark reset) is measured in a fresh process per case and side, in copies of B's state dict
(tied tensors once); rebasin runs once per large pair (on GPT-2 small it takes minutes).

    .venv/bin/pip install rebasin==0.0.47      # optional; not a stardomain dependency
    .venv/bin/python benchmarks/align.py [--reps 5] [--threads 1] [--trained] [--large]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch

import stardomain.permute.matching as matching
from stardomain.models import build_model
from stardomain.permute import apply_permutation, distance, spec_from_model, weight_matching

PAIRS = [
    ("MLP 784-512-512-10", {"name": "mlp", "kwargs": {"width": 512, "depth": 2}}, (1, 28, 28), 10),
    ("BN CNN 32-64-128-256 (28x28)", {"name": "cnn", "kwargs": {"widths": [32, 64, 128, 256], "norm": "bn"}}, (1, 28, 28), 10),
    ("ResNet-20 BN (32x32)", {"name": "resnet", "kwargs": {"depth": 20, "norm": "bn"}}, (3, 32, 32), 10),
]
TRAINED = [PAIRS[0], PAIRS[1]]
# --large: a CIFAR ResNet-18 (11M parameters) and a GPT-2-small-shaped decoder (124M: 12 layers of width
# 768, 12 heads, MLP 3072, a 50,257-token tied embedding; the zoo's gpt over 48 pixel tokens). Targets on
# 2 cores: ResNet-18 <= 1 s, GPT-2 small <= 20 s, peak memory <= 4 model copies.
LARGE = [
    ("ResNet-18 BN (32x32)", {"name": "resnet", "kwargs": {"depth": 18, "norm": "bn"}}, (3, 32, 32), 10),
    ("GPT-2-small-shaped (124M)", {"name": "gpt", "kwargs": {"dim": 768, "depth": 12, "heads": 12, "mlp_ratio": 4,
                                                              "levels": 50247}}, (3, 32, 32), 10),
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


def trained(cfg, seed, subset):
    """One epoch of MNIST (the first `subset` training images) from seed `seed`."""
    from stardomain.config import load_config
    from stardomain.training import train

    conf = load_config(None, ["data.name=mnist", f"data.train_subset={subset}", f"model.name={cfg['name']}",
                              f"model.kwargs={cfg['kwargs']}", "train.epochs=1", "train.batch_size=128",
                              "train.optimizer={name: sgd, lr: 0.05, momentum: 0.9}"])
    model, metrics = train(conf, seed, device="cpu", progress=False)
    return model.eval(), metrics["test"]["acc"]


def out_error(model, sd_ref, sd_new, x):
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    a.load_state_dict(sd_ref)
    b.load_state_dict(sd_new)
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return float((ya - yb).abs().max() / ya.abs().max())


def ours(ma, mb, x_trace):
    gc.collect()
    t0 = time.perf_counter()
    spec = spec_from_model(mb, x_trace)
    t1 = time.perf_counter()
    sd_b = mb.state_dict()
    perm, info = weight_matching(spec, ma.state_dict(), sd_b)
    sd = apply_permutation(spec, sd_b, perm)
    t2 = time.perf_counter()
    return sd, t2 - t0, t1 - t0, info["iterations"]


def lap_census(ma, mb, x_trace):
    """(number of assignment problems, their sizes, seconds in scipy) of one weight matching."""
    spec = spec_from_model(mb, x_trace)
    log: list[tuple[int, float]] = []
    solve = matching.lsa

    def timed(c):
        t0 = time.perf_counter()
        out = solve(c)
        log.append((c.shape[0], time.perf_counter() - t0))
        return out

    matching.lsa = timed
    try:
        weight_matching(spec, ma.state_dict(), mb.state_dict())
    finally:
        matching.lsa = solve
    sizes: dict[int, int] = {}
    for n, _ in log:
        sizes[n] = sizes.get(n, 0) + 1
    return len(log), sizes, sum(t for _, t in log)


def theirs(ma, mb, x_trace, copied=False):
    from rebasin import PermutationCoordinateDescent

    if not copied:  # rebasin permutes B in place: on copies, outside the timing
        mb, ma = copy.deepcopy(mb), copy.deepcopy(ma)
    gc.collect()
    t0 = time.perf_counter()
    pcd = PermutationCoordinateDescent(ma, mb, x_trace)
    pcd.rebasin()
    return {k: v.detach().clone() for k, v in mb.state_dict().items()}, time.perf_counter() - t0


def _status(key: str) -> int:
    """A /proc/self/status memory figure (VmRSS: now, VmHWM: peak since the last reset), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def memory_child(case: int, side: str) -> None:
    """Peak memory of one alignment alone, in a fresh process: both models are built first, the peak
    resident-set mark is reset (/proc/self/clear_refs), the alignment runs, and its peak above the
    resident set just before is printed in model copies (one copy: B's state dict, tied tensors once)."""
    import json

    _, cfg, shape, classes = LARGE[case]
    ma, mb = make(cfg, shape, classes, 0), make(cfg, shape, classes, 1)
    x_trace = torch.randn(2, *shape, generator=torch.Generator().manual_seed(5))
    if side == "rebasin":
        ma, mb = copy.deepcopy(ma), copy.deepcopy(mb)
    unique = {v.data_ptr(): v for v in mb.state_dict().values()}  # a tied embedding/head counts once
    copy_bytes = sum(v.numel() * v.element_size() for v in unique.values())
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = ours(ma, mb, x_trace) if side == "ours" else theirs(ma, mb, x_trace, copied=True)
    peak = _status("VmHWM")
    del out
    print(json.dumps({"copies": (peak - before) / copy_bytes, "copy_mib": copy_bytes / 2**20}))


def peak_copies(case: int, side: str, threads: int) -> tuple[float, float]:
    """memory_child in a subprocess -> (peak above the start in model copies, MiB per copy)."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--memory-child", f"{case}:{side}"],
                       capture_output=True, text=True, check=True)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return d["copies"], d["copy_mib"]


def span(runs) -> str:
    return f"{min(r[1] for r in runs):.3f}-{max(r[1] for r in runs):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5, help="runs of each side (the median time is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides (on a shared 2-core "
                    "machine more than 1 makes small convolutions 50x slower through thread contention)")
    ap.add_argument("--trained", action="store_true", help="also align MLP and BN CNN pairs trained 1 epoch on MNIST")
    ap.add_argument("--subset", type=int, default=10000, help="MNIST training images for --trained")
    ap.add_argument("--large", action="store_true", help="only the large pairs: CIFAR ResNet-18 and a "
                    "GPT-2-small-shaped decoder (peak memory of the alignment alone reported in model copies)")
    ap.add_argument("--only", help="with --large: only the pair whose label contains this text (ResNet, GPT)")
    ap.add_argument("--no-memory", action="store_true", help="with --large: skip the peak-memory processes")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)  # CASE:SIDE, see memory_child
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        case, side = args.memory_child.split(":")
        memory_child(int(case), side)
        return
    try:
        import rebasin  # noqa: F401
        have = True
    except ImportError:
        have = False
        print("rebasin not installed: `.venv/bin/pip install rebasin==0.0.47` to compare; timing ours only")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; distances are L2 over parameters")
    jobs = [(label, cfg, shape, classes, None) for label, cfg, shape, classes in (LARGE if args.large else PAIRS)]
    if args.trained:
        jobs += [(label + ", trained", cfg, shape, classes, args.subset) for label, cfg, shape, classes in TRAINED]
    rows = []
    for case, (label, cfg, shape, classes, subset) in enumerate(jobs):
        if args.only and args.only.lower() not in label.lower():
            continue
        if subset is None:
            ma, mb = make(cfg, shape, classes, 0), make(cfg, shape, classes, 1)
            note = "random init"
        else:
            (ma, acc_a), (mb, acc_b) = trained(cfg, 0, subset), trained(cfg, 1, subset)
            note = f"1 epoch on {subset} MNIST images, test acc {acc_a:.3f} / {acc_b:.3f}"
        x_trace = torch.randn(2, *shape, generator=torch.Generator().manual_seed(5))
        x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(6))
        sd_a, sd_b = ma.state_dict(), mb.state_dict()
        params = [n for n, _ in mb.named_parameters()]
        runs, runs_r, failed = [], [], None
        for rep in range(args.reps):  # the sides alternate, so a slow spell of the machine hits both
            r = ours(ma, mb, x_trace)
            runs.append(r if rep == 0 else (None, *r[1:]))  # one aligned state dict kept: memory
            if have and failed is None and not (args.large and rep):  # large pairs: rebasin once (minutes)
                torch.manual_seed(rep)
                try:
                    r = theirs(ma, mb, x_trace)
                except Exception as e:  # noqa: BLE001 - rebasin does not run on every model: say so
                    failed = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    continue
                runs_r.append(r if rep == 0 else (None, *r[1:]))
        sd_o, _, _, iters = runs[0]
        t_o, t_spec = statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)
        mem = ""
        if args.large and subset is None and not args.no_memory:
            sides = ["ours"] + (["rebasin"] if have and failed is None else [])
            peaks = {side: peak_copies(case, side, args.threads) for side in sides}
            mem = "; peak memory of the alignment alone, in model copies of {:.0f} MiB: {}".format(
                peaks["ours"][1], ", ".join(f"{side} {c:.2f}" for side, (c, _) in peaks.items()))
        n_lap, sizes, t_lap = lap_census(ma, mb, x_trace)
        d0, d_o, e_o = distance(sd_a, sd_b, params), distance(sd_a, sd_o, params), out_error(mb, sd_b, sd_o, x)
        print(f"\n{label} ({note}): parameter distance A-B {d0:.3f}{mem}")
        print(f"  stardomain  {t_o:8.3f} s ({span(runs)}; spec {t_spec:.3f} s, {iters} passes, {n_lap} assignments "
              f"{dict(sorted(sizes.items()))} taking {t_lap:.3f} s)  distance after {d_o:.3f}  output error {e_o:.2e}")
        row = [label, t_o, d0, d_o, e_o, None, None, None]
        if have and failed is not None:
            print(f"  rebasin     fails: {failed}")
        elif have:
            sd_r, t_r = runs_r[0][0], statistics.median(r[1] for r in runs_r)
            d_r, e_r = distance(sd_a, sd_r, params), out_error(mb, sd_b, sd_r, x)
            print(f"  rebasin     {t_r:8.3f} s ({span(runs_r)})  distance after {d_r:.3f}  output error {e_r:.2e}")
            print(f"  speed-up    {t_r / t_o:8.1f}x   (scipy's assignments alone: {t_r / t_lap:.1f}x)")
            row[5:] = [t_r, d_r, e_r]
        rows.append(row)
    print(f"\n| pair | rebasin s | ours s | speed-up | param distance A-B | after: rebasin / ours | "
          f"output error: rebasin / ours |\n|---|---|---|---|---|---|---|")
    for label, t_o, d0, d_o, e_o, t_r, d_r, e_r in rows:
        rs = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {label} | {rs(t_r, '.3f')} | {t_o:.3f} | {rs(t_r and t_r / t_o, '.1f')}x | {d0:.3f} | "
              f"{rs(d_r, '.3f')} / {d_o:.3f} | {rs(e_r, '.1e')} / {e_o:.1e} |")


if __name__ == "__main__":
    main()
