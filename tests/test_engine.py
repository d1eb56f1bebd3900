"""The stacked-weights engine: its K = 1 case is the single-model code, its strategies agree."""

import pytest
import torch

from stardomain.config import Config
from stardomain.data import get_dataset
import torch.nn as nn
import torch.nn.functional as F

from stardomain.data import Split
from stardomain.engine import Engine, Stack
from stardomain.interpolate import lerp, recalibrate_bn
from stardomain.models import build_model
from stardomain.training import evaluate, init_model

MLP_BN = {"name": "mlp", "kwargs": {"width": 16, "bn": True}}
CNN_BN = {"name": "cnn", "kwargs": {"widths": [4, 8], "norm": "bn"}}


def _pair(model):
    cfg = Config.model_validate({"data": {"name": "digits"}, "model": model})
    data = get_dataset(cfg.data)
    sds = []
    for seed in (0, 1):
        sd = init_model(cfg, data, seed).state_dict()
        g = torch.Generator().manual_seed(10 + seed)
        sds.append({k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                    for k, v in sd.items()})
    return cfg, data, build_model(cfg.model, data.input_shape, data.num_classes), sds


@pytest.mark.parametrize("model", [MLP_BN, CNN_BN], ids=["mlp-bn", "cnn-bn"])
def test_k1_is_the_single_model(model):
    """Recalibration and evaluation of a 1-row stack (loop strategy) are recalibrate_bn and train.evaluate,
    bit for bit."""
    cfg, data, m, (sd, _) = _pair(model)
    eng = Engine(m, strategy="loop")
    stack = eng.recalibrate(Stack.of([sd]), data.train, 300, 2)
    ref = build_model(cfg.model, data.input_shape, data.num_classes)
    ref.load_state_dict(sd)
    recalibrate_bn(ref, data.train, 300, 2)
    for k, v in ref.state_dict().items():
        assert torch.equal(stack.tensors[k][0], v), k
    got = eng.evaluate(stack, {"test": data.test}, 200)["test"]
    want = evaluate(ref, data.test, 200)
    assert got == {"loss": [want["loss"]], "acc": [want["acc"]]}


@pytest.mark.parametrize("model", [MLP_BN, CNN_BN], ids=["mlp-bn", "cnn-bn"])
def test_strategies_agree_and_segment_is_lerp(model):
    """A segment stack's rows are interpolate.lerp exactly; vmap (first-layer shortcut for the MLP) and
    loop give the same statistics and the same evaluation up to float32 rounding."""
    _, data, m, (a, b) = _pair(model)
    ts = [0.0, 0.3, 0.5, 1.0]
    seg = Stack.between(a, b, ts)
    for i, t in enumerate(ts):
        want = a if t == 0 else b if t == 1 else lerp(a, b, t)
        for k, v in want.items():
            assert torch.equal(seg.tensors[k][i], v), (k, t)
    out = {}
    for strategy in ("vmap", "loop", "fused"):
        eng = Engine(m, strategy=strategy, max_models=3)
        st = eng.recalibrate(seg, data.train, 400, None, rows=[1, 2])
        out[strategy] = (st, eng.evaluate(st, {"train": data.train, "test": data.test}, 400))
    for k, v in out["loop"][0].tensors.items():
        assert torch.allclose(out["vmap"][0].tensors[k], v, rtol=1e-5, atol=1e-6), k
        if k.endswith("num_batches_tracked"):
            assert out["vmap"][0].tensors[k].tolist() == [int(a[k]), 4, 4, int(b[k])]
    for s in ("train", "test"):
        assert out["vmap"][1][s]["loss"] == pytest.approx(out["loop"][1][s]["loss"], abs=1e-5)
        assert out["fused"][1][s]["loss"] == pytest.approx(out["loop"][1][s]["loss"], abs=1e-5)
        assert out["vmap"][1][s]["acc"] == pytest.approx(out["loop"][1][s]["acc"], abs=2 / len(data.split(s)))


def test_probs_strategies_agree():
    _, data, m, sds = _pair(MLP_BN)
    stack = Stack.of(sds)
    p_v = Engine(m, strategy="vmap").probs(stack, data.test.x, 128)
    p_l = Engine(m, strategy="loop").probs(stack, data.test.x, 128)
    assert p_v.shape == (2, len(data.test), 10) and p_v.dtype == torch.float64
    assert torch.allclose(p_v, p_l, atol=1e-6)


class Crossed(torch.nn.Module):
    """BatchNorm layers registered in one order and called in the other."""

    def __init__(self, in_shape=(1, 8, 8), num_classes=10):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(64, 12), torch.nn.Linear(12, num_classes)
        self.bn_late, self.bn_early = torch.nn.BatchNorm1d(num_classes), torch.nn.BatchNorm1d(12)

    def forward(self, x):
        return self.bn_late(self.fc2(torch.relu(self.bn_early(self.fc1(x.flatten(1))))))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_statistics_follow_layers_not_call_order(strategy):
    """Against PyTorch's own cumulative (momentum=None) train-mode pass, contiguous float32."""
    data = get_dataset({"name": "digits"})
    torch.manual_seed(0)
    m = Crossed()
    eng = Engine(m, strategy=strategy)
    got = eng.recalibrate(Stack.of([m.state_dict()] * 2), data.train, 500).tensors
    ref = Crossed()
    ref.load_state_dict(m.state_dict())
    for bn in (ref.bn_late, ref.bn_early):
        bn.reset_running_stats()
        bn.momentum = None
    ref.train()
    with torch.no_grad():
        for i in range(0, len(data.train), 500):
            ref(data.train.x[i:i + 500])
    for k, v in ref.state_dict().items():
        if "running" in k:
            assert torch.allclose(got[k][1], v, rtol=1e-5, atol=1e-6), k


def test_vmap_stacks_every_name_of_tied_weights_and_keeps_non_persistent_buffers():
    """An embedding tied to its output head (GPT-style) and a non-persistent buffer (rotary tables): each
    stacked row must compute what that weight set computes in the module itself."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight
            self.register_buffer("scale", torch.full((4,), 0.5), persistent=False)

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x) * self.scale))

    torch.manual_seed(0)
    a, b = Tied().state_dict(), Tied().state_dict()
    split = Split(torch.randint(7, (50,)), torch.randint(7, (50,)))
    m = Tied()
    got = Engine(m, "cpu", "vmap").evaluate(Stack.of([a, b]), {"s": split}, 16)["s"]["loss"]
    want = []
    for sd in (a, b):
        m.load_state_dict(sd)
        want.append(F.cross_entropy(m(split.x), split.y).item())
    assert got == pytest.approx(want, rel=1e-5) and want[0] != pytest.approx(want[1], rel=1e-3)
