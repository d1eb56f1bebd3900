"""sd.Starlight, the objective for a training loop of one's own: one step's gradient against a second module at
the drawn (source, t), gradient accumulation, autocast, inputs that need gradients, the context form, the
sources it accepts, alignment, the same star as `sd.star` from a hand-written loop, and activation
checkpointing refused."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import stardomain as sd
from stardomain.config import Config
from stardomain.data import batches, first_inputs, get_dataset, num_batches
from stardomain.errors import UserError
from stardomain.interpolate import lerp
from stardomain.models import build_model
from stardomain.training import build_optimizer, build_scheduler, init_model

ARCH = {"name": "mlp", "kwargs": {"width": 8, "bn": True}}
SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _models(n_sources=3, seed=0):
    torch.manual_seed(seed)
    star = build_model(ARCH, SHAPE, 10)
    sources = [build_model(ARCH, SHAPE, 10).state_dict() for _ in range(n_sources)]
    for s in sources:  # non-trivial BN statistics, so a wrong permutation of buffers would show
        for k in s:
            if k.endswith("running_mean"):
                s[k] = torch.randn_like(s[k])
    return star, sources


def _hand_grads(star_sd, source_sd, t, x, y):
    """Independent: a second module holding lerp(star, source, t), back-propagated there; the star's gradient
    is (1-t) times that one (chain rule)."""
    second = build_model(ARCH, SHAPE, 10)
    second.load_state_dict(lerp(star_sd, source_sd, t))
    second.train()
    F.cross_entropy(second(x), y).backward()
    return {k: (1 - t) * p.grad for k, p in second.named_parameters()}


def test_one_step_gradient_is_one_minus_t_times_the_gradient_at_the_drawn_point():
    star, sources = _models()
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 10, (16,))
    light = sd.Starlight(star, sources, example_input=x[:2], align_every=1, seed=3)
    before = {k: v.clone() for k, v in star.state_dict().items()}
    star.train()
    F.cross_entropy(light(x), y).backward()
    n, t = light.last_draw
    assert light.alignments == 1 and 0 <= n < 3 and 0 < t < 1
    want = _hand_grads(before, light.aligned_sources[n], t, x, y)
    for k, p in star.named_parameters():
        torch.testing.assert_close(p.grad, want[k], rtol=1e-5, atol=1e-7)
    # the star's own BatchNorm statistics are untouched (the interpolated forward used scratch buffers)
    for k, b in star.named_buffers():
        assert torch.equal(b, before[k]), k
    assert all(not v.requires_grad for s in light.aligned_sources for v in s.values())


def test_aligned_sources_compute_the_original_functions_and_moved():
    star, sources = _models()
    x = torch.randn(8, *SHAPE)
    light = sd.Starlight(star, sources, example_input=x[:2], align_every=None)
    assert light.permutations == [None] * 3
    light.realign()
    probe = build_model(ARCH, SHAPE, 10).eval()
    moved = 0
    for orig, al, perm in zip(sources, light.aligned_sources, light.permutations):
        probe.load_state_dict(orig)
        want = probe(x)
        probe.load_state_dict(al)
        torch.testing.assert_close(probe(x), want, rtol=1e-5, atol=1e-6)
        moved += any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
    assert moved > 0


def test_draws_are_seeded_and_alignment_runs_every_align_every_calls():
    star, sources = _models()
    x = torch.randn(4, *SHAPE)
    runs = []
    for _ in range(2):
        light = sd.Starlight(copy.deepcopy(star), sources, example_input=x[:2], align_every=3, seed=5)
        with torch.no_grad():
            draws = []
            for _ in range(7):
                light(x)
                draws.append(light.last_draw)
        runs.append(draws)
        assert light.alignments == 3  # calls 0, 3, 6
    assert runs[0] == runs[1]
    other = sd.Starlight(copy.deepcopy(star), sources, align_every=None, seed=6)
    with torch.no_grad():
        other(x)
    assert other.last_draw != runs[0][0]


def test_gradient_accumulation_sums_each_calls_own_draw():
    star, sources = _models()
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 10, (16,))
    light = sd.Starlight(star, sources, align_every=None, seed=1)
    before = star.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    star.train()
    want = {k: torch.zeros_like(p) for k, p in star.named_parameters()}
    for xc, yc in zip(x.chunk(2), y.chunk(2)):
        (F.cross_entropy(light(xc), yc) / 2).backward()
        n, t = light.last_draw
        for k, g in _hand_grads(before, sources[n], t, xc, yc).items():
            want[k] += g / 2
    for k, p in star.named_parameters():
        torch.testing.assert_close(p.grad, want[k], rtol=1e-5, atol=1e-7)


def test_inputs_that_need_gradients_get_their_own_unscaled_gradient():
    star, sources = _models()
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 10, (16,))
    light = sd.Starlight(star, sources, align_every=None, seed=2)
    before = {k: v.clone() for k, v in star.state_dict().items()}
    star.train()
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(light(xg), y).backward()
    n, t = light.last_draw
    second = build_model(ARCH, SHAPE, 10)
    second.load_state_dict(lerp(before, sources[n], t))
    second.train()
    x2 = x.clone().requires_grad_(True)
    F.cross_entropy(second(x2), y).backward()
    torch.testing.assert_close(xg.grad, x2.grad, rtol=1e-5, atol=1e-7)
    for k, p in star.named_parameters():
        torch.testing.assert_close(p.grad, (1 - t) * dict(second.named_parameters())[k].grad, rtol=1e-5, atol=1e-7)


class _Box:
    """An output object pytree cannot look into."""

    def __init__(self, logits):
        self.logits = logits


def test_outputs_of_any_structure_get_the_factor_exactly_once():
    star, sources = _models()
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 10, (16,))
    wrapped = {"dict": lambda m: (lambda v: {"logits": m(v), "aux": [m(v)[:, :2]]}),
               "box": lambda m: (lambda v: _Box(m(v)))}
    grads = {}
    for name in ("plain", "dict", "box"):
        s = copy.deepcopy(star).train()
        net = s if name == "plain" else _Wrap(s, wrapped[name])
        light = sd.Starlight(net, sources if name == "plain" else [{f"inner.{k}": v for k, v in src.items()}
                                                                      for src in sources], align_every=None, seed=4)
        out = light(x)
        logits = out if name == "plain" else out["logits"] if name == "dict" else out.logits
        loss = F.cross_entropy(logits, y) + (out["aux"][0].sum() * 0 if name == "dict" else 0)
        loss.backward()
        grads[name] = {k: p.grad for k, p in s.named_parameters()}
    for name in ("dict", "box"):
        for k in grads["plain"]:
            torch.testing.assert_close(grads[name][k], grads["plain"][k], rtol=1e-5, atol=1e-7)


class _Wrap(nn.Module):
    def __init__(self, inner, make_forward):
        super().__init__()
        self.inner = inner
        self._make = make_forward

    def forward(self, x):
        return self._make(self.inner)(x)


def test_the_context_form_gives_the_same_gradient_as_a_call():
    star, sources = _models()
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 10, (16,))
    grads = []
    for form in ("call", "context"):
        s = copy.deepcopy(star).train()
        light = sd.Starlight(s, sources, example_input=x[:2], align_every=2, seed=4)
        if form == "call":
            F.cross_entropy(light(x), y).backward()
        else:
            with light.drawn():
                loss = F.cross_entropy(s(x), y)
            loss.backward()
        grads.append({k: p.grad for k, p in s.named_parameters()})
        assert isinstance(s[1].weight, nn.Parameter)  # the module has its own parameters back
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_autocast_runs_in_bfloat16_and_the_gradient_follows_the_hand_computation():
    star, sources = _models()
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 10, (16,))
    light = sd.Starlight(star, sources, align_every=None, seed=8)
    before = {k: v.clone() for k, v in star.state_dict().items()}
    star.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = light(x)
        loss = F.cross_entropy(out.float(), y)
    assert out.dtype == torch.bfloat16
    loss.backward()
    n, t = light.last_draw
    want = _hand_grads(before, sources[n], t, x, y)
    for k, p in star.named_parameters():
        assert p.grad.dtype == torch.float32
        # bfloat16 matmuls: close in norm (biases in front of BatchNorm have a gradient of ~0 either way)
        assert (p.grad - want[k]).norm() <= 0.05 * want[k].norm() + 1e-4, k


def test_tied_weights_are_interpolated_wherever_the_module_uses_them():
    def tied():
        torch.manual_seed(len(made))
        m = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
        m[2].weight = m[0].weight  # one parameter under two names
        made.append(m)
        return m
    made: list = []
    star, sources = tied(), [tied().state_dict() for _ in range(2)]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    light = sd.Starlight(star, sources, align_every=None, seed=1)
    before = {k: v.clone() for k, v in star.state_dict().items()}
    F.cross_entropy(light(x), y).backward()
    n, t = light.last_draw
    second = tied()
    second.load_state_dict(lerp(before, sources[n], t))
    F.cross_entropy(second(x), y).backward()
    for (k, p), q in zip(star.named_parameters(), second.parameters()):
        torch.testing.assert_close(p.grad, (1 - t) * q.grad, rtol=1e-5, atol=1e-7)
    # the second use matters: the gradient differs from the one with the tie broken
    untied = tied()
    untied.load_state_dict(lerp(before, sources[n], t))
    untied[2].weight = nn.Parameter(untied[0].weight.detach().clone())
    F.cross_entropy(untied(x), y).backward()
    assert not torch.allclose(star[0].weight.grad, (1 - t) * untied[0].weight.grad)


def test_tied_weights_get_the_factor_once_when_it_goes_onto_the_parameters_gradients():
    """The context form (and inputs that need gradients) put (1-t) on θ's gradients: a weight used twice
    must still get it once, on its total gradient."""
    def tied(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
        m[2].weight = m[0].weight
        return m
    star, sources = tied(0), [tied(1).state_dict(), tied(2).state_dict()]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    light = sd.Starlight(star, sources, align_every=None, seed=1)
    before = {k: v.clone() for k, v in star.state_dict().items()}
    with light.drawn() as (n, t):
        loss = F.cross_entropy(star(x), y)
    loss.backward()
    second = tied(3)
    second.load_state_dict(lerp(before, sources[n], t))
    F.cross_entropy(second(x), y).backward()
    for (k, p), q in zip(star.named_parameters(), second.parameters()):
        torch.testing.assert_close(p.grad, (1 - t) * q.grad, rtol=1e-5, atol=1e-7)


def test_the_interpolated_weights_reach_a_shared_submodule_and_one_replaced_after_the_first_call():
    """Where the module holds its tensors is found once per module: a submodule used under two names gets the
    interpolated weights once (not swapped twice), one replaced after the first call is found again (else the
    step would silently run it at its own weights), and a forward that raises leaves the module its own."""
    def shared(seed):
        torch.manual_seed(seed)
        inner = nn.Linear(6, 6)
        return nn.Sequential(inner, nn.Tanh(), inner, nn.Tanh(), nn.Linear(6, 3))
    star, sources = shared(0), [shared(1).state_dict(), shared(2).state_dict()]
    x = torch.randn(8, 6)
    light = sd.Starlight(star, sources, align_every=None, seed=1)

    def check():
        before = {k: v.clone() for k, v in star.state_dict().items()}
        out = light(x)
        n, t = light.last_draw
        second = shared(3)
        second.load_state_dict(lerp(before, sources[n], t))
        torch.testing.assert_close(out, second(x), rtol=0, atol=0)
    check()
    star[4] = copy.deepcopy(star[4])  # the same values in a new submodule holding new tensors
    light.params = dict(star.named_parameters())
    check()
    own = {k: p for k, p in star.named_parameters()}
    with pytest.raises(ZeroDivisionError):  # raised after the inner module ran at the interpolated weights
        sd.Starlight(_Wrap(star, lambda m: (lambda v: m(v) * (1 / 0))),
                     [{f"inner.{k}": v for k, v in s.items()} for s in sources], align_every=None)(x)
    assert all(p is own[k] for k, p in star.named_parameters())
    star[4].__dict__["root"] = star  # a plain reference back to the root: the cache must not keep it alive
    gone = weakref.ref(star)
    del star, light, own
    gc.collect()
    assert gone() is None


def test_a_bfloat16_star_trains_against_float32_sources_at_its_own_precision():
    star, sources = _models()
    star = star.to(torch.bfloat16)
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 10, (16,))
    light = sd.Starlight(star, sources, example_input=x[:2].bfloat16(), align_every=1, seed=4)
    before = {k: v.clone() for k, v in star.state_dict().items()}
    star.train()
    F.cross_entropy(light(x.bfloat16()).float(), y).backward()
    n, t = light.last_draw
    aligned = light.aligned_sources[n]  # the originals' own precision, permuted
    # the same point built by hand in bfloat16: each source weight rounded to bfloat16, then lerped
    second = copy.deepcopy(star)
    second.load_state_dict(lerp(before, {k: v.to(torch.bfloat16) for k, v in aligned.items()}, t))
    F.cross_entropy(second(x.bfloat16()).float(), y).backward()
    for (k, p), q in zip(star.named_parameters(), second.parameters()):
        assert p.grad.dtype == torch.bfloat16
        torch.testing.assert_close(p.grad.float(), (1 - t) * q.grad.float(), rtol=2e-2, atol=1e-3)


def test_sources_as_trained_results_files_and_state_dicts_are_the_same(tmp_path):
    cfg = Config.model_validate({"data": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"width": 8}},
                                 "train": {"epochs": 1, "batch_size": 64}})
    a, b = sd.train(cfg, seed=0), sd.train(cfg, seed=1)
    a.save(tmp_path / "a.safetensors"), b.save(tmp_path / "b.safetensors")
    x = first_inputs(a.data.train)
    star = init_model(cfg, a.data, 5)
    forms = [[a, b], [tmp_path / "a.safetensors", str(tmp_path / "b.safetensors")], [a.state_dict, b.state_dict]]
    outs = []
    for sources in forms:
        light = sd.Starlight(copy.deepcopy(star), sources, example_input=x, align_every=1, seed=0)
        with torch.no_grad():
            outs.append(light(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_bad_input_is_one_clear_error():
    star, sources = _models()
    with pytest.raises(UserError, match="example_input"):
        sd.Starlight(star, sources)
    with pytest.raises(UserError, match="does not fit"):
        sd.Starlight(star, [{k: v for k, v in sources[0].items() if "running" not in k}], align_every=None)
    with pytest.raises(UserError, match="align_every"):
        sd.Starlight(star, sources, align_every=0)
    with pytest.raises(UserError, match="t_sampling"):
        sd.Starlight(star, sources, align_every=None, t_sampling="gaussian")
    with pytest.raises(UserError, match="at least one"):
        sd.Starlight(star, [], align_every=None)
    with pytest.raises(UserError, match="no parameters"):
        sd.Starlight(nn.ReLU(), [{}], align_every=None)
    for seed in (-1, 1.5, True):
        with pytest.raises(UserError, match="seed must be a whole number"):
            sd.Starlight(star, sources, align_every=None, seed=seed)
    with pytest.raises(UserError, match=r"example_input: the star cannot run on it \(.*shapes cannot be multiplied"):
        sd.Starlight(star, sources, example_input=torch.randn(2, 7))
    light = sd.Starlight(star, sources, align_every=None)
    star.double()  # converted after Starlight was made: its sources are still float32
    with pytest.raises(UserError, match="after .to()"):
        light(torch.randn(4, *SHAPE, dtype=torch.float64))


def _hand_loop(cfg, sources, seed):
    """`stardomain star`'s recipe written as a user would: own optimiser, schedule and batches, sd.Starlight
    for the objective, BatchNorm recomputed after every epoch."""
    data = get_dataset(cfg.data)
    tc = cfg.train
    star = init_model(cfg, data, seed)
    light = sd.Starlight(star, sources, example_input=first_inputs(data.train), align_every=cfg.star.align_every,
                         seed=seed)
    opt = build_optimizer(star.parameters(), tc.optimizer)
    sched = build_scheduler(opt, tc, num_batches(data.train, tc.batch_size, drop_last=True))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for _ in range(tc.epochs):
        star.train()
        for x, y in batches(data.train, tc.batch_size, generator=gen, drop_last=True):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(light(x), y).backward()
            opt.step()
            sched.step()
        light.recalibrate_bn(data.train, batch_size=tc.eval_batch_size)
    return star, light


def test_a_hand_written_loop_gives_bitwise_the_star_of_sd_star():
    cfg = Config.model_validate({"data": {"name": "digits"}, "model": ARCH | {"kwargs": {"width": 8, "bn": True}},
                                 "train": {"epochs": 2, "batch_size": 64,
                                           "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
                                 "star": {"align_every": 7}})
    sources = [sd.train(cfg, seed=s) for s in (0, 1, 2)]
    ref = sd.star(sources, seed=9)
    star, light = _hand_loop(cfg, sources, seed=9)
    assert light.alignments == ref.meta["star"]["alignments"] > 1
    got = star.state_dict()
    for k, v in ref.state_dict.items():
        assert torch.equal(got[k], v), k


def test_state_dict_resumes_the_same_draws_and_alignment():
    star, sources = _models()
    x = torch.randn(8, *SHAPE)
    whole = sd.Starlight(copy.deepcopy(star), sources, example_input=x[:2], align_every=2, seed=1)
    first = sd.Starlight(copy.deepcopy(star), sources, example_input=x[:2], align_every=2, seed=1)
    with torch.no_grad():
        for _ in range(3):
            whole(x), first(x)
        resumed = sd.Starlight(copy.deepcopy(star), sources, example_input=x[:2], align_every=2, seed=1)
        resumed.load_state_dict(first.state_dict())
        for _ in range(3):
            whole(x), resumed(x)
            assert resumed.last_draw == whole.last_draw
    assert resumed.calls == whole.calls == 6 and resumed.alignments == whole.alignments == 3
    for a, b in zip(resumed.permutations, whole.permutations):
        assert all(torch.equal(a[g], b[g]) for g in a)
    for k in whole.scratch:
        assert torch.equal(resumed.scratch[k], whole.scratch[k]), k


def test_steady_training_reuses_the_interpolated_weights_buffers():
    star, sources = _models()
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 10, (16,))
    light = sd.Starlight(star.train(), sources, align_every=None, seed=0)
    for _ in range(3):
        F.cross_entropy(light(x), y).backward()
    assert len(light.pool) == 1  # one set, back in the pool after each backward
    kept = [b.data_ptr() for b in light.pool[0]]
    F.cross_entropy(light(x), y).backward()
    assert len(light.pool) == 1 and [b.data_ptr() for b in light.pool[0]] == kept  # the same memory again


def test_forwards_never_back_propagated_leave_nothing_behind():
    """A validation pass or a skipped batch (light(x) with gradients on, no backward) must free its interpolated
    weights with its graph, and keep neither the module nor its hooks alive."""
    star, sources = _models()
    x = torch.randn(16, *SHAPE)
    light = sd.Starlight(star.train(), sources, align_every=None, seed=0)
    seen = []
    handle = star[1].register_forward_pre_hook(lambda m, a: seen.append(weakref.ref(m.weight)))
    for _ in range(3):
        out = light(x)
        del out
    handle.remove()
    gc.collect()
    assert len(seen) == 3 and all(w() is None for w in seen)  # each call's interpolated weight is gone
    gone = weakref.ref(star)
    del star, light
    gc.collect()
    assert gone() is None


class _Checkpointed(nn.Module):
    """A star whose first layer runs under activation checkpointing: backward re-runs it."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(6, 8), nn.Linear(8, 3), reentrant

    def forward(self, x):
        h = checkpoint(lambda z: torch.tanh(self.a(z)), x, use_reentrant=self.reentrant)
        return self.b(h)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("form", ["call", "drawn"])
def test_activation_checkpointing_is_refused_before_a_wrong_gradient_reaches_the_star(reentrant, form):
    torch.manual_seed(0)
    star, source = _Checkpointed(reentrant), _Checkpointed(reentrant).state_dict()
    x = torch.randn(5, 6, requires_grad=reentrant)  # reentrant checkpointing needs an input that needs a gradient
    y = torch.randint(0, 3, (5,))
    # the premise: the re-run reads the star's own weights, so the gradient would be the one at θ's activations
    light = sd.Starlight(_Checkpointed(reentrant), [source], align_every=None, seed=0)
    light.star.load_state_dict(star.state_dict())
    n, t = light.draws.draw()
    light.draws = sd.objective.Draws(light.settings, 1, 0)  # the same draw again below
    with light.drawn():
        loss = F.cross_entropy(light.star(x), y)
    sd.objective._unwatch(light.star)  # the guard off
    loss.backward()
    second = _Checkpointed(reentrant)
    second.load_state_dict(lerp(star.state_dict(), source, t))
    F.cross_entropy(second(x), y).backward()
    assert not torch.allclose(light.star.a.weight.grad, (1 - t) * second.a.weight.grad, atol=1e-4)

    light = sd.Starlight(star, [source], align_every=None, seed=0)
    with pytest.raises(UserError, match="activation checkpointing"):
        if form == "call":
            loss = F.cross_entropy(light(x), y)
        else:
            with light.drawn():
                loss = F.cross_entropy(star(x), y)
        loss.backward()
    assert all(p.grad is None for p in star.parameters())
    if form == "drawn":  # backward inside the block: the re-run sees the interpolated weights, and is right
        light = sd.Starlight(star, [source], align_every=None, seed=0)
        before = {k: v.clone() for k, v in star.state_dict().items()}
        with light.drawn() as (n, t):
            F.cross_entropy(star(x), y).backward()
        second = _Checkpointed(reentrant)
        second.load_state_dict(lerp(before, source, t))
        F.cross_entropy(second(x), y).backward()
        for p, q in zip(star.parameters(), second.parameters()):
            torch.testing.assert_close(p.grad, (1 - t) * q.grad)


def test_the_checkpointing_guard_leaves_after_one_backward_and_lets_the_star_itself_run_before_it():
    star, sources = _models()
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    light = sd.Starlight(star, sources, align_every=None, seed=0)
    star.train()
    loss = F.cross_entropy(light(x), y) + 0.5 * F.cross_entropy(star(x), y)  # θ's own term before backward
    assert all(len(m._forward_pre_hooks) == 1 for m in star.modules())
    loss.backward()
    assert all(p.grad is not None for p in star.parameters())
    assert not any(m._forward_pre_hooks for m in star.modules())  # steady training pays nothing
    F.cross_entropy(light(x), y).backward()
    assert not any(m._forward_pre_hooks for m in star.modules())
