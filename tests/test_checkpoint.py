import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import stardomain.checkpoint as ck
from stardomain.errors import UserError
from stardomain.training import model_meta, train


@pytest.fixture
def model_file(digits_cfg, tmp_path):
    model, metrics = train(digits_cfg, seed=0, progress=False)
    from stardomain.data import get_dataset

    path = tmp_path / "m.safetensors"
    ck.save_model(path, model.state_dict(), model_meta(digits_cfg, get_dataset(digits_cfg.data), 0, "source",
                                                       metrics=metrics))
    return path, model


def test_round_trip_rebuilds_the_same_function(model_file):
    path, model = model_file
    loaded, meta = ck.load_model(path)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    for key in ("format_version", "model", "data", "seed", "role", "config", "metrics", "versions", "sha256"):
        assert key in meta
    assert meta["sha256"] == ck.weights_sha256(model.state_dict())
    assert not list(path.parent.glob("*.partial"))  # atomic write left no temp file


def test_sha256_ignores_dict_order_but_not_values():
    a = {"w": torch.ones(3), "b": torch.zeros(2)}
    b = {"b": torch.zeros(2), "w": torch.ones(3)}
    assert ck.weights_sha256(a) == ck.weights_sha256(b)
    assert ck.weights_sha256(a) != ck.weights_sha256({"w": torch.ones(3), "b": torch.tensor([0.0, 1e-30])})


def test_pickle_file_is_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps(Boom(), protocol=2))
    with pytest.raises(UserError, match="pickle"):
        ck.read_model_file(p)
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    with pytest.raises(UserError, match="pickle"):
        ck.read_model_file(tmp_path / "model.pt")


def test_truncated_file_is_refused(model_file, tmp_path):
    path, _ = model_file
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        t = tmp_path / f"cut{cut}.safetensors"
        t.write_bytes(data[:cut])
        with pytest.raises(UserError, match="truncated|corrupt|not a"):
            ck.read_model_file(t)


def test_wrong_sha_is_refused(model_file, tmp_path):
    path, _ = model_file
    sd, meta = ck.read_model_file(path)
    sd = {k: v.clone() for k, v in sd.items()}
    sd["1.weight"][0, 0] += 1.0
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad, metadata={"stardomain": json.dumps(meta)})
    with pytest.raises(UserError, match="sha256"):
        ck.read_model_file(bad)


def test_foreign_safetensors_and_wrong_architecture_are_refused(model_file, tmp_path):
    path, _ = model_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, foreign)
    with pytest.raises(UserError, match="metadata"):
        ck.read_model_file(foreign)
    sd, meta = ck.read_model_file(path)
    meta["model"]["kwargs"]["width"] = 32
    other = tmp_path / "other.safetensors"
    ck.save_model(other, sd, meta)
    with pytest.raises(UserError, match="architecture"):
        ck.load_model(other)


def test_training_state_round_trip(tmp_path):
    opt_state = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9).state_dict()
    st = {"epoch": 3, "nested": {"a": [torch.arange(3), 2.5, None, "x"], 7: (1, 2)}, "opt": opt_state,
          "gen": torch.Generator().manual_seed(1).get_state()}
    ck.save_state(tmp_path / "s", st)
    back = ck.load_state(tmp_path / "s")
    assert back["epoch"] == 3 and back["nested"]["a"][1:] == [2.5, None, "x"] and back["nested"][7] == (1, 2)
    assert torch.equal(back["nested"]["a"][0], torch.arange(3)) and torch.equal(back["gen"], st["gen"])
    assert back["opt"]["param_groups"] == opt_state["param_groups"]
