"""train.fit, the one training loop: a new use of it is a step and a few hooks; its extra state resumes."""

import pytest
import torch
import torch.nn.functional as F

from stardomain import starlight as sl
import stardomain.training as tr
from stardomain.checkpoint import weights_sha256
from stardomain.config import StarConfig
from stardomain.data import get_dataset


def test_a_custom_step_with_extra_state_resumes_to_the_same_bits(digits_cfg, tmp_path):
    """A use of fit with its own step (cross-entropy + an L2 term) and its own counter in the resume
    state: killed after epoch 1 and rerun, it ends with the same weights and the same counter."""
    data = get_dataset(digits_cfg.data)
    tc = digits_cfg.train

    def run(state_path, stop_at=None):
        model = tr.init_model(digits_cfg, data, 3)
        seen = {"batches": 0}

        def step(x, y, _n):
            loss = F.cross_entropy(model(x), y) + 1e-3 * sum(p.square().sum() for p in model.parameters())
            loss.backward()
            seen["batches"] += 1
            return loss.item(), None

        def saved(epoch):
            if epoch == stop_at:
                raise KeyboardInterrupt

        hooks = tr.Hooks(step, lambda loss, e: f"diverged at {e}", saved=saved, state=lambda: dict(seen),
                         restore=lambda st: seen.update(batches=int(st["batches"])))
        n = tr.fit(model, data, tc, 3, "digest", hooks, device=torch.device("cpu"), state_path=state_path,
                   progress=False)
        return model, n, seen["batches"]

    full, n_full, b_full = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "s.state", stop_at=1)
    resumed, n_res, b_res = run(tmp_path / "s.state")
    assert weights_sha256(resumed.state_dict()) == weights_sha256(full.state_dict())
    assert n_res == n_full == b_full == b_res == tc.epochs * (len(data.train) // tc.batch_size)


def test_star_resume_keeps_the_alignment_counter(digits_cfg, tmp_path):
    """The star's metadata counts alignments over the whole run, across a resume (extra resumable state)."""
    pytest.importorskip("stardomain.permute")
    cfg = digits_cfg.model_copy(update={"star": StarConfig(align_every="epoch")})
    sources = [tr.train(digits_cfg, seed=s, progress=False)[0].state_dict() for s in (1, 2)]
    _, full = sl.train_star(cfg, sources, seed=4, progress=False)

    def stop(epoch, rec):
        if epoch == 2:
            raise KeyboardInterrupt

    state = tmp_path / "star.state"
    with pytest.raises(KeyboardInterrupt):
        sl.train_star(cfg, sources, seed=4, state_path=state, progress=False, on_epoch=stop)
    _, resumed = sl.train_star(cfg, sources, seed=4, state_path=state, progress=False)
    assert full["alignments"] == resumed["alignments"] == cfg.train.epochs
    assert resumed["steps"] == full["steps"] and resumed["history"] == full["history"]
