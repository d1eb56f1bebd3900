import pytest
import torch
import torch.nn.functional as F

from stardomain.errors import UserError
from stardomain.models import MODELS, build_model

SMALL = {
    "mlp": [{"width": 8}, {"width": 8, "depth": 3, "bn": True}],
    "cnn": [{"widths": [4, 8]}, {"widths": [4, 8], "norm": "none"}],
    "resnet": [{"depth": 8, "width": 0.25}, {"depth": 8, "width": 0.25, "norm": "ln"},
               {"depth": 8, "width": 0.5, "norm": "gn"}, {"depth": 18, "width": 0.0625}],
    "vgg": [{"depth": 11, "width": 0.0625}, {"depth": 19, "width": 0.0625, "bn": True}],
    "wrn": [{"depth": 10, "width_factor": 1}],
    "densenet": [{"depth": 10, "growth": 4}],
    "gpt": [{"dim": 8, "heads": 2}, {"dim": 8, "heads": 2, "kv_heads": 1, "rope": True, "norm": "rms", "mlp": "swiglu"}],
    "bert": [{"dim": 8, "heads": 2}],
}


def test_every_registered_model_has_a_test_case():
    assert set(MODELS) - {"vit"} <= set(SMALL)


@pytest.mark.parametrize("name,kwargs", [(n, k) for n, ks in SMALL.items() for k in ks])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_model_builds_and_trains_a_step(name, kwargs, shape):
    torch.manual_seed(0)
    m = build_model({"name": name, "kwargs": kwargs}, shape, 10)
    x, y = torch.randn(8, *shape), torch.arange(8) % 10
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    loss = F.cross_entropy(m(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    opt.step()
    changed = [k for k, v in m.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "a training step changed nothing"
    assert m.eval()(x).shape == (8, 10)


def test_mlp_matches_the_papers_shape():
    m = build_model({"name": "mlp", "kwargs": {"width": 16}}, (1, 28, 28), 10)
    shapes = [tuple(p.shape) for p in m.parameters()]
    assert shapes == [(16, 784), (16,), (10, 16), (10,)]


def test_resnet20_depth_counts_convs():
    m = build_model({"name": "resnet", "kwargs": {"depth": 20}}, (3, 32, 32), 10)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3)]
    assert len(convs) == 19  # 19 3x3 convs + the linear head = 20 weighted layers


def test_user_model_factory(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("user_model_mod")
    mod.make_net = lambda num_classes, hidden=5: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(hidden),
                                                                      torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))
    monkeypatch.setitem(sys.modules, "user_model_mod", mod)
    m = build_model({"factory": "user_model_mod:make_net", "kwargs": {"hidden": 7}}, (1, 8, 8), 4)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize("cfg", [{"name": "nope"}, {"name": "resnet", "kwargs": {"depth": 19}},
                                 {"name": "mlp", "kwargs": {"widht": 3}}])
def test_bad_model_is_a_user_error(cfg):
    with pytest.raises(UserError):
        build_model(cfg, (1, 8, 8), 10)
