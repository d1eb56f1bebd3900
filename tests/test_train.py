import math

import pytest
import torch

import stardomain.training as tr
from stardomain.checkpoint import weights_sha256
from stardomain.config import ScheduleConfig
from stardomain.data import get_dataset
from stardomain.errors import UserError


def sha(model):
    return weights_sha256(model.state_dict())


def test_same_seed_same_bits_different_seed_differs(digits_cfg):
    a, _ = tr.train(digits_cfg, seed=0, progress=False)
    b, _ = tr.train(digits_cfg, seed=0, progress=False)
    c, _ = tr.train(digits_cfg, seed=1, progress=False)
    assert sha(a) == sha(b)
    assert sha(a) != sha(c)


def test_training_learns_digits(digits_cfg):
    cfg = digits_cfg.model_copy(update={"train": digits_cfg.train.model_copy(update={"epochs": 10})})
    _, metrics = tr.train(cfg, seed=0, progress=False)
    assert metrics["test"]["acc"] > 0.85 and metrics["train"]["loss"] < metrics["test"]["loss"] + 0.5


def test_evaluate_matches_a_direct_computation(digits_cfg):
    model, metrics = tr.train(digits_cfg, seed=0, progress=False)
    d = get_dataset(digits_cfg.data)
    with torch.no_grad():
        out = model(d.test.x)
    assert metrics["test"]["loss"] == pytest.approx(torch.nn.functional.cross_entropy(out, d.test.y).item(), rel=1e-5)
    assert metrics["test"]["acc"] == pytest.approx((out.argmax(1) == d.test.y).float().mean().item())


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "nesterov": True}, {"name": "adam", "lr": 0.003},
                                       {"name": "adamw", "lr": 0.003, "weight_decay": 0.01}])
@pytest.mark.parametrize("schedule", [{"name": "cosine", "warmup_epochs": 1}, {"name": "step", "step_epochs": [1]},
                                      {"name": "onecycle"}])
def test_recipes_train(digits_cfg, optimizer, schedule):
    cfg = digits_cfg.model_validate({**digits_cfg.model_dump(), "train": {
        "epochs": 2, "batch_size": 64, "optimizer": optimizer, "schedule": schedule,
        "label_smoothing": 0.1, "grad_clip": 1.0}})
    _, m = tr.train(cfg, seed=0, progress=False)
    assert m["test"]["acc"] > 0.3


def test_lr_schedules_closed_form():
    cos = ScheduleConfig(name="cosine")
    assert tr.lr_factor(cos, 0, 10, 10) == 1.0
    assert tr.lr_factor(cos, 50, 10, 10) == pytest.approx(0.5)
    assert tr.lr_factor(cos, 100, 10, 10) == pytest.approx(0.0)
    warm = ScheduleConfig(name="cosine", warmup_epochs=1)
    assert tr.lr_factor(warm, 0, 10, 10) == pytest.approx(0.1)
    assert tr.lr_factor(warm, 9, 10, 10) == pytest.approx(1.0)
    assert tr.lr_factor(warm, 55, 10, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    step = ScheduleConfig(name="step", step_epochs=[3, 6], gamma=0.1)
    assert [tr.lr_factor(step, s * 10, 10, 10) for s in (0, 3, 5, 6, 9)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    one = ScheduleConfig(name="onecycle", pct_start=0.25)
    assert tr.lr_factor(one, 25, 10, 10) == pytest.approx(1.0)
    assert tr.lr_factor(one, 100, 10, 10) == pytest.approx(0.0, abs=1e-12)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_state(digits_cfg, tmp_path):
    cfg = digits_cfg.model_validate({**digits_cfg.model_dump(), "train": {
        "epochs": 3, "optimizer": {"name": "sgd", "lr": 100, "momentum": 0.9}}})  # lr 1e6 is refused when read
    state = tmp_path / "m.state"
    with pytest.raises(UserError, match="diverged"):
        tr.train(cfg, seed=0, state_path=state, progress=False)


def test_killed_training_resumes_to_identical_weights(digits_cfg, tmp_path, monkeypatch):
    full, _ = tr.train(digits_cfg, seed=5, progress=False)
    state = tmp_path / "m.state"
    real_save = tr.save_state

    def save_then_die(path, st):
        real_save(path, st)
        if st["epoch"] == 2:
            raise KeyboardInterrupt  # killed right after epoch 2 was saved

    monkeypatch.setattr(tr, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        tr.train(digits_cfg, seed=5, state_path=state, progress=False)
    monkeypatch.setattr(tr, "save_state", real_save)
    resumed, _ = tr.train(digits_cfg, seed=5, state_path=state, progress=False)
    assert sha(resumed) == sha(full)


def test_state_from_another_config_is_ignored(digits_cfg, tmp_path):
    state = tmp_path / "m.state"
    tr.train(digits_cfg, seed=0, state_path=state, progress=False)
    other = digits_cfg.model_validate({**digits_cfg.model_dump(), "train": {"epochs": 3, "batch_size": 32}})
    fresh, _ = tr.train(other, seed=0, progress=False)
    resumed, _ = tr.train(other, seed=0, state_path=state, progress=False)
    assert sha(fresh) == sha(resumed)


def test_cuda_request_without_cuda_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserError):
        tr.resolve_device("cuda")
