import pytest
import torch

from stardomain.barriers import curve, measure
from stardomain.data import get_dataset
from stardomain.errors import UserError
from stardomain.interpolate import lerp
from stardomain.models import build_model
from stardomain.repair import apply_repair, channel_stats, remove_repair, repair_points
from stardomain.training import train
from stardomain.barriers import BarrierSettings


@pytest.fixture(scope="module")
def pair(request):
    from stardomain.config import Config

    cfg = Config.model_validate({"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 16, "depth": 2}},
                                 "train": {"epochs": 4, "batch_size": 64}})
    a, _ = train(cfg, 0, progress=False)
    b, _ = train(cfg, 1, progress=False)
    return a, a.state_dict(), b.state_dict(), get_dataset(cfg.data)


def test_channel_stats_match_a_direct_computation(pair):
    model, sd_a, _, data = pair
    stats = channel_stats(model, data.train, batch_size=100)
    assert repair_points(model) == ["1", "3"]  # both hidden Linear layers, not the logits
    with torch.no_grad():
        h = model[1](model[0](data.train.x)).double()
    assert torch.allclose(stats["1"][0], h.mean(0), atol=1e-6)
    assert torch.allclose(stats["1"][1], h.std(0, unbiased=False), atol=1e-6)


def test_repair_to_a_models_own_statistics_changes_nothing(pair):
    model, sd_a, _, data = pair
    stats = channel_stats(model, data.train, batch_size=2000)
    x = data.test.x
    before = model(x)
    hooks = apply_repair(model, stats, stats, 0.3, data.train, batch_size=2000)
    after = model(x)
    remove_repair(hooks)
    assert torch.allclose(before, after, atol=1e-3)
    assert torch.equal(model(x), before)  # hooks removed


@pytest.mark.parametrize("t", [0.25, 0.5, 0.8])
def test_repaired_channels_have_the_interpolated_target_statistics(pair, t):
    model, sd_a, sd_b, data = pair
    m = build_model({"name": "mlp", "kwargs": {"width": 16, "depth": 2}}, (1, 8, 8), 10)
    m.load_state_dict(sd_a)
    sa = channel_stats(m, data.train, 2000)
    m.load_state_dict(sd_b)
    sb = channel_stats(m, data.train, 2000)
    m.load_state_dict(lerp(sd_a, sd_b, t))
    collapsed = channel_stats(m, data.train, 2000)
    hooks = apply_repair(m, sa, sb, t, data.train, batch_size=2000)
    got = channel_stats(m, data.train, 2000)  # measured after the REPAIR hooks
    remove_repair(hooks)
    for name in ("1", "3"):
        mean_t = (1 - t) * sa[name][0] + t * sb[name][0]
        std_t = (1 - t) * sa[name][1] + t * sb[name][1]
        assert torch.allclose(got[name][0], mean_t, atol=1e-3)
        assert torch.allclose(got[name][1], std_t * (std_t / (std_t + 1e-5)), atol=1e-3)
    assert not torch.allclose(collapsed["3"][1], got["3"][1], atol=1e-3)  # it did change something


def test_barrier_with_repair(pair):
    model, sd_a, sd_b, data = pair
    rec = measure(model, sd_a, sd_b, data, BarrierSettings(points=5, align=False, repair=True))
    plain = measure(model, sd_a, sd_b, data, BarrierSettings(points=5, align=False))
    assert rec["bn"]["repair"] is True and rec["method"] == "loop"
    for s in ("train", "test"):  # endpoints are the models themselves either way
        assert rec[s]["loss"][0] == pytest.approx(plain[s]["loss"][0])
        assert rec[s]["loss"][-1] == pytest.approx(plain[s]["loss"][-1])
    assert rec["train"]["loss"][2] != pytest.approx(plain["train"]["loss"][2])


def test_repair_refuses_batchnorm_networks():
    data = get_dataset("digits")
    m = build_model({"name": "mlp", "kwargs": {"width": 8, "bn": True}}, (1, 8, 8), 10)
    sd = m.state_dict()
    with pytest.raises(UserError, match="REPAIR"):
        curve(m, sd, sd, data, [0, 0.5, 1], BarrierSettings(repair=True))
