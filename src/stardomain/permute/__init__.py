"""Permutation symmetry: specs from traced models, applying permutations, weight/activation matching.

    spec = spec_from_model(model, example_input)          # plain data: groups of permutable units
    perm, info = weight_matching(spec, sd_a, sd_b)         # perm to apply to B
    sd_b_aligned = apply_permutation(spec, sd_b, perm)     # same function as B, closer to A
    sd_b_aligned, info = align(model, sd_a, sd_b, example_input=x)   # all of it, equivalence-checked
    align(..., variant="heads")                            # only attention heads (VARIANTS), the rest fixed

Where things are: docs/architecture.md (permute/).
"""

from .activations import activation_matching
from .alignment import METHODS, CoverageWarning, MatchingOptions, align
from .cache import spec_for
from .checks import EquivalenceError, activation_error, check_equivalence, equivalence_error
from .matching import weight_matching
from .permutations import apply_permutation, distance, identity, inverse, random_permutation
from .rules.registry import register_leaf_module
from .spec import ROLES, Group, Member, PermutationSpec, Probe, Unpermuted
from .tracer import spec_from_model
from .variants import VARIANTS, restrict

__all__ = ["spec_from_model", "spec_for", "apply_permutation", "weight_matching", "activation_matching", "align",
           "check_equivalence", "equivalence_error", "activation_error", "EquivalenceError", "CoverageWarning",
           "distance", "identity", "inverse", "random_permutation", "register_leaf_module", "PermutationSpec",
           "Group", "Member", "Probe", "Unpermuted", "ROLES", "VARIANTS", "restrict", "METHODS", "MatchingOptions"]
