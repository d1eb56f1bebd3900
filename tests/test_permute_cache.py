"""The spec cache never serves a spec for a model it did not capture: two models of one class that differ
only in a configuration object (as Hugging Face models differ in config.attn_implementation), in one
process, each get their own spec."""

import torch
import torch.nn as nn

from stardomain.permute import align, apply_permutation, random_permutation, spec_for, spec_from_model


class Config:
    def __init__(self, fused: bool, heads: int = 2):
        self.fused, self.heads = fused, heads


class ConfigModel(nn.Module):
    """Reads its config in forward: fused=True splits the hidden units into two halves that are
    multiplied (a gated unit: the halves must be permuted alike); fused=False uses them as they are."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.fc3 = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc1(x)
        if self.config.fused:
            a, b = h.chunk(2, dim=-1)
            return self.fc3(torch.relu(a) * b)
        return self.fc2(torch.relu(h))


def _noisy(m, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in m.state_dict().items()}


def test_models_differing_only_in_config_get_their_own_spec():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    plain, gated = ConfigModel(Config(fused=False)), ConfigModel(Config(fused=True))
    gated.load_state_dict(plain.state_dict())  # same class, same shapes, same weights
    s_plain, s_gated = spec_for(plain, x), spec_for(gated, x)
    assert s_plain == spec_from_model(plain, x) and s_gated == spec_from_model(gated, x)
    assert s_plain != s_gated
    for m in (plain, gated):  # aligning each in this process is exact (the check would raise otherwise)
        sd = _noisy(m, 1)
        sp = apply_permutation(spec_for(m, x), sd, random_permutation(spec_for(m, x), torch.Generator().manual_seed(2)))
        out, info = align(m, sd, sp, example_input=x)
        assert info["distance_after"] < 1e-6 and info["equivalence_error"] < 1e-10


def test_a_hit_is_checked_against_a_fresh_trace():
    """A graph that changes for a reason the attributes do not show (here the config object's class
    attribute changed after the first capture) is captured anew."""
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    m = ConfigModel(Config(fused=False))
    first = spec_for(m, x)
    Config.flag = True  # not read by forward: still a hit
    assert spec_for(m, x) is first
    del Config.flag
    ConfigModel.forward, old = (lambda self, x: self.fc2(torch.relu(self.fc1(x)) * 2)), ConfigModel.forward
    try:
        again = spec_for(m, x)
        assert again is not first and again == spec_from_model(m, x)
    finally:
        ConfigModel.forward = old


def test_an_unreadable_attribute_means_no_cache():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    m = ConfigModel(Config(fused=False))
    m.handle = object.__new__(type("Opaque", (), {"__slots__": ()}))  # nothing the key can read
    assert spec_for(m, x) is not spec_for(m, x)
