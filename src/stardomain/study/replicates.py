"""Replicating a study over several study seeds in one command, with one combined verdict.

Study seeds own disjoint blocks of model seeds (study.plan.model_seed), so the studies are independent
replicates: each runs into OUT/seed-<s>/ as a study of its own (resumable, with its own report), and
`verdict.combined` pools them (docs/method.md, "The headline test", Replicates). OUT/combined.json holds
the combined headline and every replicate's verdict line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..checkpoint import atomic_write_json
from ..config import STUDY_SEED_MAX, Config
from ..errors import UserError
from ..utils import round_floats
from ..verdict import combined
from .folder import check_study_folder, mark_study_folder

MARK = "replicates.json"  # the seeds a replicated-study folder holds (the folder carries the study mark too)


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" or "0-4" (or a mix: "0-2,7") -> distinct study seeds in order; bad text is a UserError."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise UserError(f"--seeds {text!r}: give study seeds like 0,1,2 or 0-4") from None
    seeds = list(dict.fromkeys(seeds))
    if not seeds or any(not 0 <= s <= STUDY_SEED_MAX for s in seeds) or len(seeds) > 1000:
        raise UserError(f"--seeds {text!r}: between 1 and 1000 study seeds, each from 0 to {STUDY_SEED_MAX}")
    return seeds


def run_replicates(cfg: Config, out: str | Path, seeds: Sequence[int], *, run_one, force: bool = False) -> dict:
    """Run the study once per seed (`run_one(cfg, folder)`, i.e. study.run_study) into OUT/seed-<s>/ and
    combine. -> {"seeds", "headline", "verdict_line", "replicates"} (also written to OUT/combined.json)."""
    root = Path(out)
    check_study_folder(root, force)
    root.mkdir(parents=True, exist_ok=True)
    mark_study_folder(root)
    atomic_write_json(root / MARK, {"seeds": list(seeds)})
    results = []
    for s in seeds:
        one = cfg.model_copy(update={"study": cfg.study.model_copy(update={"seed": s})})
        results.append(run_one(one, root / f"seed-{s}"))
    st = cfg.study
    if any(not r.get("headline") for r in results):
        raise UserError("a combined verdict needs star_heldout and regular_regular pairs in every replicate")
    res = {"seeds": list(seeds), **combined(results, alpha=st.alpha, n_boot=st.bootstrap, seed=st.seed)}
    res = round_floats(res, 12)
    atomic_write_json(root / "combined.json", res)
    return res
