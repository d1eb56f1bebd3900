"""Stopping rules (train.stop, star.match_fit) and independent study seeds (study.plan.model_seed)."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stardomain.starlight as sl
from stardomain.checkpoint import read_model_file
from stardomain.config import STUDY_SEED_MAX, Config, validate
from stardomain.data import get_dataset
from stardomain.files import train_to_file
from stardomain.study.plan import build_plan, deep_merge, model_seed

from stardomain import training as tr


def _with(cfg: Config, **train) -> Config:
    return validate(Config, deep_merge(cfg.model_dump(), {"train": train}))


def _checks(cfg: Config, seed: int = 0) -> list[float]:
    """The training-split loss at every epoch end of a full run (an unmeetable rule records them all)."""
    hist: list[dict] = []
    tr.train(_with(cfg, stop={"acc": 1.0}), seed, progress=False, history=hist)
    return [h["check"]["loss"] for h in hist]


def test_a_rule_stops_at_the_first_epoch_that_meets_it(digits_cfg):
    cfg = _with(digits_cfg, epochs=5)
    losses = _checks(cfg)
    assert len(losses) == 5
    target = losses[1]  # met at epoch 2 at the latest (the first epoch at or below it)
    first = next(i for i, v in enumerate(losses) if v <= target) + 1
    hist: list[dict] = []
    model, metrics = tr.train(_with(cfg, stop={"loss": target}), 0, progress=False, history=hist)
    rec = tr.fit_record(tr.StopRule.of(_with(cfg, stop={"loss": target}).train.stop), 5, hist)
    assert rec["epochs"] == first and rec["reached"] is True and rec["cap"] == 5
    assert rec["train_loss"] == pytest.approx(metrics["train"]["loss"]) == pytest.approx(losses[first - 1])
    # the check is the model's own training-split evaluation (no augmentation, eval mode)
    assert metrics["train"]["loss"] <= target


def test_a_rule_that_cannot_be_met_stops_at_the_cap_and_says_so(digits_cfg, tmp_path):
    cfg = _with(digits_cfg, epochs=2, stop={"acc": 1.0, "loss": 1e-9})
    meta = train_to_file(cfg, 3, tmp_path / "m.safetensors", progress=False)
    fit = read_model_file(tmp_path / "m.safetensors")[1]["fit"]
    assert fit == meta["fit"]
    assert fit["reached"] is False and fit["epochs"] == 2 and fit["cap"] == 2
    assert "training accuracy >= 1" in fit["criterion"] and "training loss <= 1e-09" in fit["criterion"]
    # without a rule the metadata says so too
    plain = train_to_file(digits_cfg, 3, tmp_path / "p.safetensors", progress=False)["fit"]
    assert plain == {"criterion": "a fixed 3 epochs", "cap": 3, "epochs": 3, "reached": None}


@pytest.mark.parametrize("kill_after", [1, 2])
def test_killed_run_with_a_rule_resumes_to_the_same_bits(digits_cfg, tmp_path, kill_after):
    """Killed after epoch 1 (before the rule is met) or after epoch 2 (the epoch that meets it, saved but
    not yet written as a model): the resumed run stops where the uninterrupted one did, bit for bit."""
    cfg = _with(digits_cfg, epochs=5)
    target = _checks(cfg, seed=4)[1]
    cfg = _with(cfg, stop={"loss": target})
    ref = train_to_file(cfg, 4, tmp_path / "ref.safetensors", progress=False)

    class Killed(Exception):
        pass

    def kill(epoch, rec):
        if epoch + 1 == kill_after:
            raise Killed

    out = tmp_path / "m.safetensors"
    with pytest.raises(Killed):
        train_to_file(cfg, 4, out, progress=False, on_epoch=kill)
    assert out.with_name(out.name + ".state").exists()
    got = train_to_file(cfg, 4, out, progress=False)
    assert got["sha256"] == ref["sha256"] and got["fit"] == ref["fit"]


def test_fit_matched_star_stops_at_the_sources_median(digits_cfg):
    cfg = digits_cfg
    sources = [tr.train(cfg, s, progress=False)[0].state_dict() for s in (21, 22, 23)]
    data = get_dataset(cfg.data)
    probe = tr.init_model(cfg, data, 0)
    losses = []
    for sd in sources:  # independent: each source's training loss by its own evaluation
        probe.load_state_dict(sd)
        losses.append(tr.evaluate(probe, data.train)["loss"])
    scfg = validate(Config, deep_merge(cfg.model_dump(), {"star": {"align_every": "epoch", "match_fit": 0.5,
                                                                   "train": {"epochs": 12, "batch_size": 64}}}))
    star, info = sl.train_star(scfg, sources, seed=7, progress=False)
    fit = info["fit"]
    assert fit["target_loss"] == pytest.approx(float(np.median(losses)))
    checks = [h["check"]["loss"] for h in info["fit_history"]]
    assert fit["epochs"] == len(checks) <= 12
    if fit["reached"]:  # stopped at the first epoch end at or below the sources' median
        assert checks[-1] <= fit["target_loss"] and all(c > fit["target_loss"] for c in checks[:-1])
    else:
        assert len(checks) == 12 and min(checks) > fit["target_loss"]
    assert info["metrics"]["train"]["loss"] == pytest.approx(checks[-1])


# ---------------------------------------------------------------- independent seeds

def _model_seeds(study_seed: int) -> dict[str, int]:
    cfg = validate(Config, {"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 8}},
                            "study": {"seed": study_seed, "n_sources": 4, "n_heldouts": 3, "n_stars": 3,
                                      "sweeps": {"n_sources": [1, 6], "width": [4, 8], "t_sampling": ["beta"]}}})
    return {t.key: t.params["seed"] for t in build_plan(cfg).tasks if t.op in ("train", "star")}


@settings(max_examples=10, deadline=None)
@given(st.integers(0, STUDY_SEED_MAX),
       st.integers(1, 10**6))
def test_different_study_seeds_share_no_model_seed(a, step):
    b = min(a + step, STUDY_SEED_MAX)
    if a == b:
        b = a - 1
    sa, sb = _model_seeds(a), _model_seeds(b)
    assert set(sa.values()).isdisjoint(sb.values())
    assert max(sa.values()) < 2**63  # torch generators take 64-bit seeds


def test_roles_get_their_own_seeds_and_seed_zero_keeps_the_old_ones():
    seeds = _model_seeds(0)
    # sources, held-outs and stars of one study never share a seed (sweep rows reuse the main roles' seeds
    # on other architectures or source counts, so compare the distinct values per role)
    assert model_seed(0, "source", 3) == 3 and model_seed(0, "heldout", 2) == 1002 and model_seed(0, "star", 0) == 2000
    assert model_seed(7, "source", 0) == 70000 and model_seed(7, "star", 2) == 72002
    by_role = {r: {model_seed(5, r, i) for i in range(1000)} for r in ("source", "heldout", "star")}
    assert not (by_role["source"] & by_role["heldout"]) and not (by_role["heldout"] & by_role["star"])
    assert sorted(set(seeds.values())) == [0, 1, 2, 3, 4, 5, 1000, 1001, 1002, 2000, 2001, 2002]
