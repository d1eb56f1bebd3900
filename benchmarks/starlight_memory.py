"""Peak memory of Starlight against the number of sources N: it should be about N model copies plus one
ordinary training step.

Each measurement runs in a fresh process: the data set is loaded, the peak-RSS mark reset (Linux
/proc/self/clear_refs), and the peak resident set size (VmHWM) over the run read back. Model: MLP
784-1024-1024-10 (1.86M parameters, 7.4 MB in float32) on 1,280 MNIST images, batch 128, 1 epoch.
Two ways in:
  files   `star_to_file` (what the CLI does): source files read from disk, alignment every epoch. Only the
          aligned copies live in memory (the originals are re-read from disk when aligning).
  memory  `train_star` with N state dicts already in memory, align_every=never: the bank holds references
          to the caller's tensors (no copy), so the caller's N copies are all there is.
Baseline: an ordinary training run (`train.train`) of the same model and data in a fresh process.

    python benchmarks/starlight_memory.py [--ns 1,10,50]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CFG = {"data": {"name": "mnist", "train_subset": 1280}, "model": {"name": "mlp", "kwargs": {"width": 1024, "depth": 2}},
       "train": {"epochs": 1, "batch_size": 128}, "star": {"match_iters": 1}}  # memory does not depend on sweeps

CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from stardomain.config import Config
from stardomain.data import get_dataset
from stardomain import training as tr, starlight as sl
from stardomain.checkpoint import save_model
from stardomain.files import star_to_file
mode, n, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = Config.model_validate(json.loads(sys.argv[4]))
data = get_dataset(cfg.data)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def reset_peak():  # the data set's loading peak is not Starlight's: restart the high-water mark here
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
if mode == "write":
    for i in range(n):
        m = tr.init_model(cfg, data, 1000 + i)
        save_model(f"{folder}/s{i}.safetensors", m.state_dict(), tr.model_meta(cfg, data, 1000 + i, "source"))
    sys.exit(0)
import gc; gc.collect()
reset_peak()
before = status("VmRSS")
if mode == "baseline":
    tr.train(cfg, 0, device="cpu", progress=False)
elif mode == "memory":
    srcs = [tr.init_model(cfg, data, 1000 + i).state_dict() for i in range(n)]
    cfg = cfg.model_copy(update={"star": cfg.star.model_copy(update={"align_every": "never"})})
    sl.train_star(cfg, srcs, seed=0, device="cpu", progress=False)
else:
    star_to_file(cfg, [f"{folder}/s{i}.safetensors" for i in range(n)], f"{folder}/star.safetensors",
                    device="cpu", progress=False)
print(json.dumps({"peak": status("VmHWM") - before, "before": before}))
"""


def child(mode, n, folder):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(n), folder, json.dumps(CFG)], capture_output=True,
                       text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1]) if mode != "write" else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="1,10,50")
    a = ap.parse_args()
    ns = [int(x) for x in a.ns.split(",")]
    model_mb = (784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10) * 4 / 1e6
    with tempfile.TemporaryDirectory() as folder:
        child("write", max(ns), folder)
        base = child("baseline", 0, folder)
        print(f"model copy {model_mb:.2f} MB; ordinary training run: peak {base['peak'] / 1e6:.1f} MB over the "
              f"process after loading data ({base['before'] / 1e6:.0f} MB)")
        print(f"{'way':<7} {'N':>4} {'peak MB':>9} {'over ordinary MB':>17} {'in model copies':>16} "
              f"{'per source':>11}")
        for mode in ("files", "memory"):
            for n in ns:
                r = child(mode, n, folder)
                extra = (r["peak"] - base["peak"]) / 1e6
                print(f"{mode:<7} {n:>4} {r['peak'] / 1e6:9.1f} {extra:17.1f} {extra / model_mb:16.1f} "
                      f"{extra / model_mb / n:11.2f}", flush=True)


if __name__ == "__main__":
    main()
