"""Alignment variants: a spec restricted to the groups of one role (spec.ROLES), so aligning with it moves
only that symmetry and leaves every other group at the identity. Comparing the barriers after each
variant says which symmetry carries the barrier (docs/method.md, "Alignment variants").

"full" keeps every group, "none" none; "heads", "mlp" and "stream" keep the groups of that role. A
kept attention group keeps its coupled partner (they share one head permutation), and a kept nested group
its whole family (hierarchy.py), so a restricted spec is always a legal one: any permutation of it computes the same function.
"""

from __future__ import annotations

from ..errors import UserError
from .hierarchy import family_of
from .spec import ROLES, PermutationSpec, Unpermuted

VARIANTS = ("full", *ROLES, "none")


def in_words(variant: str) -> str:
    """How a barrier's B was aligned, for titles and one-line summaries."""
    return {"full": "aligned", "none": "not aligned"}.get(variant, f"aligned: {variant} only")


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise UserError(f"unknown alignment variant {variant!r}; choose {', '.join(VARIANTS)}")
    return variant


def restrict(spec: PermutationSpec, variant: str) -> PermutationSpec:
    """The spec with only `variant`'s groups; the others are listed as unpermuted (so permutable_fraction
    is the share of the hidden-unit axes this variant aligns)."""
    if check_variant(variant) == "full":
        return spec
    keep = {k for k, g in spec.groups.items() if g.role == variant}
    keep |= {spec.groups[k].couple for k in keep if spec.groups[k].couple in spec.groups}
    keep |= {kk for k in keep for kk in family_of(spec, k)}  # nested groups: the blocks follow the parent
    dropped = [Unpermuted(", ".join(dict.fromkeys(f"{m.tensor}[{m.axis}]" for m in g.members)),
                          f"left at the identity by the '{variant}' alignment variant (a {g.role} group)",
                          [[m.tensor, m.axis, m.offset, m.span(g.size, g.heads)] for m in g.members])
               for k, g in spec.groups.items() if k not in keep]
    out = PermutationSpec({k: g for k, g in spec.groups.items() if k in keep}, spec.unpermuted + dropped,
                          spec.shapes, spec.parameters, spec.capture, spec.capture_error)
    out.graph_signature = getattr(spec, "graph_signature", None)  # the same capture (see spec_from_model)
    return out
