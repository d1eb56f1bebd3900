"""Next-token (language-model) data end to end: the pydoc text set, token-level loss and accuracy in every
evaluator, training, Starlight, barriers, BMA and alignment of a GPT on it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from stardomain import barriers as B
from stardomain import averaging as bma
from stardomain.checkpoint import read_model_file
from stardomain.config import Config, validate
from stardomain.data import _pydoc_text, get_dataset, is_test_paragraph, per_token, pydoc_paragraphs
from stardomain.engine import Engine, Stack
from stardomain.errors import UserError
from stardomain.permute import align
from stardomain.starlight import train_star
from stardomain.files import train_to_file
from stardomain.training import evaluate, train
from stardomain.averaging import BMASettings
from stardomain.barriers import BarrierSettings

TEXT = {"name": "pydoc_text", "kwargs": {"context": 16}, "train_subset": 300}
GPT = {"name": "gpt", "kwargs": {"dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2}}
RECIPE = {"epochs": 2, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01}}


def cfg(**over) -> Config:
    return validate(Config, {"data": TEXT, "model": GPT, "train": RECIPE, **over})


@pytest.fixture(scope="module")
def pair():
    c = cfg()
    return c, get_dataset(c.data), train(c, 0, progress=False)[0], train(c, 1, progress=False)[0]


def test_text_is_deterministic_split_by_paragraph_and_shifted_by_one():
    a, b = _pydoc_text(context=16), _pydoc_text(context=16)
    for s in ("train", "test"):
        assert torch.equal(a[s][0], b[s][0]) and torch.equal(a[s][1], b[s][1])
    paragraphs = pydoc_paragraphs()
    assert len(set(paragraphs)) == len(paragraphs)  # each once: none can sit on both sides
    test = [p for p in paragraphs if is_test_paragraph(p)]
    train = [p for p in paragraphs if not is_test_paragraph(p)]
    assert 0.05 < sum(map(len, test)) / sum(map(len, paragraphs)) < 0.2
    vocab = a["info"]["vocab"]
    decode = lambda ids: "".join(vocab[i] for i in ids.tolist())  # noqa: E731
    for s, text in (("train", "\n\n".join(train)), ("test", "\n\n".join(test))):
        x, y = a[s]
        assert x.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == 16
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])  # y is x shifted by one
        assert decode(x.flatten()) + decode(y[-1, -1:]) == text[: x.numel() + 1]  # windows tile the text
    # passages do not leak: almost no 64-character test window occurs in the train text (table rules do)
    train_text, x64 = "\n\n".join(train), _pydoc_text(context=64)["test"][0]
    assert sum(decode(w) in train_text for w in x64) < 0.05 * len(x64)


def test_token_loss_and_accuracy_are_means_over_tokens(pair):
    c, data, m, _ = pair
    with torch.no_grad():
        logits = m(data.test.x)  # (N, T, V)
    want_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), data.test.y.reshape(-1)).item()
    want_acc = (logits.argmax(-1) == data.test.y).double().mean().item()
    got = evaluate(m, data.test, 100)
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5) and got["acc"] == pytest.approx(want_acc, abs=1e-12)
    eng = Engine(m, "cpu")
    r = eng.evaluate(Stack.of([m.state_dict()] * 2), {"test": data.test}, 100)["test"]
    assert r["loss"] == pytest.approx([want_loss] * 2, rel=1e-5) and r["acc"] == pytest.approx([want_acc] * 2)
    assert eng.strategy == "loop" and "batching rule" in (eng.fallback_reason or "")  # SDPA: vmap would loop inside
    p = eng.probs(Stack.of([m.state_dict()]), data.test.x[:3])
    assert p.shape == (1, 3 * 16, data.num_classes)
    assert torch.allclose(p[0], logits[:3].softmax(-1).reshape(-1, data.num_classes).double(), atol=1e-6)


def test_training_lowers_the_loss_and_files_record_vocab_and_context(tmp_path):
    c = cfg()
    data = get_dataset(c.data)
    torch.manual_seed(0)
    from stardomain.training import init_model

    before = evaluate(init_model(c, data, 0), data.test, 500)["loss"]
    meta = train_to_file(c, 0, tmp_path / "m.safetensors", progress=False)
    assert meta["metrics"]["test"]["loss"] < before - 0.3  # from about ln(vocab)
    assert before == pytest.approx(math.log(data.num_classes), abs=0.3)
    _, meta = read_model_file(tmp_path / "m.safetensors")
    d = meta["data"]
    assert d["vocab"] == data.info["vocab"] and d["context"] == 16 and d["input_dtype"] == "int64"
    assert d["num_classes"] == len(d["vocab"]) and d["input_shape"] == [16]


def test_alignment_of_trained_gpts_preserves_function_and_lowers_distance(pair):
    _, data, m0, m1 = pair
    sd1, info = align(m0, m0.state_dict(), m1.state_dict(), example_input=data.train.x[:4])
    assert info["distance_after"] < info["distance_before"]
    # the permuted B computes B's function on real text, in float64
    a, b = copy.deepcopy(m1).double(), copy.deepcopy(m1).double()
    b.load_state_dict({k: v.double() for k, v in sd1.items()})
    with torch.no_grad():
        assert torch.allclose(a(data.test.x[:8]), b(data.test.x[:8]), atol=1e-10)
    assert not torch.equal(sd1["h.0.mlp.c_fc.weight"], m1.state_dict()["h.0.mlp.c_fc.weight"])  # B was moved


def test_barrier_star_and_bma_run_on_sequence_models(pair):
    c, data, m0, m1 = pair
    rec = B.measure(m0, m0.state_dict(), m1.state_dict(), data, BarrierSettings(points=3), example_input=data.train.x[:4])
    assert rec["barrier"]["train_loss"] >= 0 and 0 <= rec["test"]["acc"][1] <= 1
    # endpoints are the models' own token-level losses
    assert rec["train"]["loss"][0] == pytest.approx(evaluate(m0, data.train, 1000)["loss"], rel=1e-5)
    star, info = train_star(cfg(star={"train": {**RECIPE, "epochs": 1}}), [m0.state_dict(), m1.state_dict()],
                            progress=False)
    assert math.isfinite(info["metrics"]["test"]["loss"])
    res = bma.evaluate_predictors(c, star.state_dict(), [m0.state_dict(), m1.state_dict()], BMASettings(k=2, seeds=1), device="cpu")
    single = next(v for k, v in res.items() if k == "star")
    assert single["nll"] == pytest.approx(evaluate(star, data.test, 1000)["loss"], rel=1e-4)
    assert res["_info"]["test_predictions"] == data.test.y.numel()


def _factory(n: int = 40, t: int = 8, vocab: int = 5, bad: str = ""):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(vocab, (n, t), generator=g)
    y = torch.roll(x, -1, 1)
    if bad == "float":
        x = x.float()
    if bad == "shape":
        y = y[:, :-1]
    return {"train": (x, y), "test": (x[:10], y[:10]), "num_classes": vocab}


def test_user_factory_with_token_tensors(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("tokfactory")
    mod.make = _factory
    monkeypatch.setitem(sys.modules, "tokfactory", mod)
    data = get_dataset({"factory": "tokfactory:make"})
    assert data.sequence and data.train.x.dtype == torch.int64 and data.input_shape == (8,)
    c = validate(Config, {"data": {"factory": "tokfactory:make"}, "model": GPT, "train": {**RECIPE, "epochs": 1}})
    m, metrics = train(c, 0, progress=False)
    assert 0 <= metrics["test"]["acc"] <= 1
    for bad, words in (("float", "integer token ids"), ("shape", "of the same shape")):
        with pytest.raises(UserError, match=words):
            get_dataset({"factory": "tokfactory:make", "kwargs": {"bad": bad}})


def test_models_refuse_inputs_they_cannot_read(monkeypatch):
    """An image/vector model on token ids, or the GPT on float feature vectors: one UserError before
    anything trains (not a dtype error from inside the first forward)."""
    with pytest.raises(UserError, match="model mlp reads images or feature vectors, but this data set holds token"):
        train(validate(Config, {"data": TEXT, "model": {"name": "mlp"}, "train": RECIPE}), 0, progress=False)
    import sys
    import types

    mod = types.ModuleType("vecfactory")
    mod.make = lambda: {"train": (torch.randn(20, 6), torch.randint(3, (20,))), "test": (torch.randn(5, 6),
                                                                                       torch.randint(3, (5,)))}
    monkeypatch.setitem(sys.modules, "vecfactory", mod)
    with pytest.raises(UserError, match="model gpt reads token ids .* feature vectors of shape"):
        train(validate(Config, {"data": {"factory": "vecfactory:make"}, "model": GPT, "train": RECIPE}), 0,
              progress=False)


def test_per_token_passes_class_targets_through():
    out, y = torch.randn(3, 4, 5, 7), torch.randint(7, (4, 5))
    o, t = per_token(out, y)
    assert o.shape == (3, 20, 7) and torch.equal(t, y.reshape(-1)) and torch.equal(o[1, 6], out[1, 1, 1])
    c = torch.randn(4, 7), torch.randint(7, (4,))
    assert per_token(*c)[0] is c[0]
