"""Activation matching: units paired by the correlation of their activations on a batch of inputs."""

from __future__ import annotations

import torch

from .capture import capture_module
from .hierarchy import solving_units
from .matching import assign
from .permutations import identity
from .probes import load_into, observe
from .spec import PermutationSpec


def activation_matching(spec: PermutationSpec, model: torch.nn.Module, sd_a: dict, sd_b: dict,
                        x: torch.Tensor, *, max_probes: int = 3) -> tuple[dict[str, torch.Tensor], dict]:
    """Match units by the correlation of their activations on a batch `x` (-> perm for B, info).

    Each group is observed at up to `max_probes` places in the traced graph (preferring the output
    of nonlinearities); correlations are summed over those places and one assignment solved per group
    (head groups: whole heads as blocks, units within a head's q/k jointly and v/out jointly; nested
    groups: their family at once, matching.assign).
    nn.MultiheadAttention computes its q, k and v inside one fused op, so no graph node shows them:
    they are recomputed from the module's observed inputs and the model's own in_proj weights.
    """
    if not spec.groups:  # nothing to match (a capture failure included): same as weight matching
        return identity(spec), {"iterations": 0, "converged": True, "groups": 0}
    chosen, fused, acts_a, acts_b = _observe_pair(spec, model, x, sd_a, sd_b, max_probes)
    unit_axes: dict[str, set[int]] = {}  # node -> its axes some group permutes
    for g in spec.groups.values():
        for p in g.probes:
            unit_axes.setdefault(p.node, set()).add(p.axis)
    perm: dict[str, torch.Tensor] = {}
    for ks in solving_units(spec):
        if not any(chosen[kk] or fused.get(kk) for kk in ks):  # never observed
            perm.update({kk: torch.arange(spec.groups[kk].size) for kk in ks})
            continue
        corr = [_correlation(spec.groups[kk].size, chosen[kk], fused.get(kk, []), acts_a, acts_b, sd_a, sd_b,
                             unit_axes).numpy() for kk in ks]
        perm.update(zip(ks, assign(spec, ks, corr)))
    return perm, {"iterations": 1, "converged": True, "groups": len(spec.groups)}


def _observe_pair(spec: PermutationSpec, model: torch.nn.Module, x, sd_a: dict, sd_b: dict, max_probes: int):
    """-> (probes chosen per group, fused-attention probes per group, A's and B's observed activations):
    one captured copy of the model run with each state dict, recording only the nodes some probe reads."""
    import copy


    model = copy.deepcopy(model).eval()
    gm = capture_module(model, x, spec.capture)
    chosen = {k: sorted([p for p in g.probes if p.rep == 1],  # (a query head's copies of key units: not needed)
                        key=lambda p: (not _is_nonlinear(gm, p.node),))[:max_probes]
              for k, g in spec.groups.items()}
    fused = _mha_probes(spec, gm)
    mha_inputs = {}  # (MultiheadAttention node, 0/1/2) -> the node computing its query/key/value input
    for n in gm.graph.nodes:
        if any(n.name == node for ps in fused.values() for node, *_ in ps):
            for i, name in enumerate(("query", "key", "value")):
                a = n.args[i] if len(n.args) > i else n.kwargs[name]
                mha_inputs[n.name, i] = a.name
    wanted = {p.node for ps in chosen.values() for p in ps} | set(mha_inputs.values())

    def run(sd):
        load_into(gm, model, sd)
        if spec.capture == "fx":  # an exported module is already in eval mode (and refuses .eval())
            gm.eval()
        vals = observe(gm, x, wanted)
        return {**vals, **{key: vals[name] for key, name in mha_inputs.items()}}

    return chosen, fused, run(sd_a), run(sd_b)


def _correlation(n: int, probes: list, fused: list, acts_a: dict, acts_b: dict, sd_a: dict, sd_b: dict,
                 unit_axes: dict | None = None):
    """n x n correlation of A's and B's units, summed over the group's probes (and fused q/k/v probes).
    Where another axis of a probed value carries units too (a token-mixing MLP's hidden units along the
    channels), A's and B's values are sorted along it: samples that do not depend on its order."""
    c = torch.zeros(n, n, dtype=torch.float64)
    for p in probes:
        if p.node in acts_a and p.node in acts_b:  # (a re-export on the data may name nodes apart)
            ta, tb = acts_a[p.node], acts_b[p.node]
            for ax in sorted((unit_axes or {}).get(p.node, set()) - {p.axis}):
                ta, tb = ta.sort(dim=ax).values, tb.sort(dim=ax).values
            c += _unit_features(ta, p, n).T @ _unit_features(tb, p, n)
    for p in fused:
        c += _projected_units(acts_a, sd_a, p, n).T @ _projected_units(acts_b, sd_b, p, n)
    return c


def _unit_features(t: torch.Tensor, p, n: int) -> torch.Tensor:
    """The n units a probe sees (each a block of p.block values along p.axis), as normalised columns."""
    f = t.narrow(p.axis, p.offset, n * p.block).movedim(p.axis, -1)
    return _normalised(f.reshape(*f.shape[:-1], n, p.block).movedim(-2, -1).reshape(-1, n))


def _projected_units(acts: dict, sd: dict, probe, n: int) -> torch.Tensor:
    """Rows offset..offset+n of in_proj applied to the observed input: q, k or v units."""
    node, i, weight, bias, off = probe
    f = acts[node, i].double() @ sd[weight][off:off + n].double().T
    return _normalised(f + sd[bias][off:off + n].double() if bias is not None else f)


def _normalised(f: torch.Tensor) -> torch.Tensor:
    """(samples, units) -> centred unit columns of norm 1 (their inner products are correlations)."""
    f = f.reshape(-1, f.shape[-1]).double()
    f = f - f.mean(0)
    return f / (f.norm(dim=0) + 1e-12)


def _mha_probes(spec: PermutationSpec, gm) -> dict[str, list[tuple[str, int, str, str | None, int]]]:
    """group -> [(MultiheadAttention node, input (0 query, 1 key, 2 value), in_proj weight, its bias or
    None, first row)] for every group owning rows of an nn.MultiheadAttention's in_proj_weight."""
    nodes: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.MultiheadAttention):
            nodes.setdefault(n.target, []).append(n.name)
    out: dict[str, list] = {}
    for k, g in spec.groups.items():
        for m in g.members:
            mod = m.tensor.removesuffix(".in_proj_weight")
            if m.axis != 0 or m.block != 1 or mod == m.tensor or mod not in nodes:
                continue
            bias = f"{mod}.in_proj_bias" if f"{mod}.in_proj_bias" in spec.shapes else None
            e = gm.get_submodule(mod).embed_dim
            out.setdefault(k, []).extend((node, m.offset // e, m.tensor, bias, m.offset) for node in nodes[mod])
    return out


_NONLIN = ("relu", "gelu", "silu", "sigmoid", "tanh", "elu", "mish", "softplus", "hardswish")


def _is_nonlinear(gm, node_name: str) -> bool:
    for n in gm.graph.nodes:
        if n.name == node_name:
            t = n.target
            name = t if isinstance(t, str) else getattr(t, "__name__", "")
            if n.op == "call_module":
                name = type(gm.get_submodule(t)).__name__
            return any(s in name.lower() for s in _NONLIN)
    return False
