"""The pair kinds a study can measure, one `PairKind` each, in one table (`KINDS`).

The config (which names `study.pairs` accepts and which it measures by default), the planner (which models
a kind pairs, which centre it needs, whether it aligns), the statistics (how a kind's CI resamples) and the
report (label, colour, own figure) all read this table, so adding a pair kind is one entry here.
Nothing here imports the rest of the package: the config reads it while it is being defined.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

CENTRES = ("star", "average", "merged")  # one model each, built only when some measured kind pairs it
GROUPS = ("sources", "heldouts")  # populations
GROUP_WORDS = {"sources": "sources", "heldouts": "held-outs"}
# Alignment variants a study can add (study.eval.variants): align only one role's permutation groups
# (stardomain.permute.variants; plain names here so the config imports no torch), or nothing.
VARIANTS = ("heads", "mlp", "stream", "none")
VARIANT_WORDS = {"full": "full alignment", "heads": "attention heads only", "mlp": "MLP units only",
                 "stream": "residual stream only", "none": "not aligned"}
# Alignment methods (stardomain.permute.align; config.AlignMethod): study.eval.align_method aligns every
# aligned pair; study.eval.methods measures star_heldout and regular_regular again with each one listed.
METHODS = ("weight", "activation", "ste", "sinkhorn")
METHOD_WORDS = {"weight": "weight matching", "activation": "activation matching",
                "ste": "straight-through estimator", "sinkhorn": "Sinkhorn re-basin"}


@dataclass(frozen=True)
class PairKind:
    """Pairs of `a`'s models with `b`'s (a centre or a population); `a == b`: every unordered pair within."""

    name: str
    label: str  # the report's name for it (tables, legends)
    color: str  # matplotlib colour in the report's figures
    a: str  # a centre (CENTRES) or a population (GROUPS)
    b: str
    align: bool | None = None  # None: study.eval.align decides; False: never aligned (a control)
    default: bool = True  # measured unless study.pairs says otherwise
    centre_name: str | None = None  # a naive centre the verdict weighs the star against, in words
    base: str | None = None  # the kind this one measures again with another alignment (a variant or control)
    variant: str | None = None  # that alignment (VARIANTS): only this role's groups aligned, or none
    method: str | None = None  # that alignment method (METHODS); None: study.eval.align_method

    def __post_init__(self):
        for side in (self.a, self.b):
            if side not in CENTRES + GROUPS:
                raise ValueError(f"pair kind {self.name}: {side!r} is neither a centre {CENTRES} nor a group {GROUPS}")

    @property
    def centres(self) -> tuple[str, ...]:
        """The centre models the kind needs planned."""
        return tuple(s for s in (self.a, self.b) if s in CENTRES)

    @property
    def grid(self) -> bool:
        """source × held-out: every pair shares its source and its held-out with others (two-way bootstrap)."""
        return self.a == "sources" and self.b == "heldouts"

    @property
    def within(self) -> bool:
        """Pairs inside one population: they share models, so their CI (over pairs) says so."""
        return self.a == self.b

    @property
    def own_figure(self) -> bool:
        """Other alignments of a kind (unaligned barriers are an order of magnitude higher): drawn on
        figures of their own, beside their base kind."""
        return self.base is not None


def _table(*kinds: PairKind) -> dict[str, PairKind]:
    return {k.name: k for k in kinds}


KINDS: dict[str, PairKind] = _table(
    PairKind("star_heldout", "star – held-out", "tab:red", "star", "heldouts"),
    PairKind("regular_regular", "regular – regular (source × held-out)", "tab:blue", "sources", "heldouts"),
    PairKind("heldout_heldout", "held-out – held-out", "tab:cyan", "heldouts", "heldouts"),
    PairKind("star_source", "star – source", "tab:orange", "star", "sources"),
    PairKind("average_heldout", "aligned average – held-out", "tab:green", "average", "heldouts",
             centre_name="aligned average"),
    # Controls beyond the paper: regular-regular without alignment (how much of the barrier permutation
    # symmetry explains), and the held-outs' barriers to a "merge many" centre (Git Re-Basin's MergeMany).
    PairKind("regular_regular_unaligned", "regular – regular, not aligned (control)", "tab:gray", "sources",
             "heldouts", align=False, default=False, base="regular_regular", variant="none"),
    PairKind("merged_heldout", "merge-many centre – held-out (control)", "tab:purple", "merged", "heldouts",
             default=False, centre_name="merge-many centre"),
)


def _variant_kinds(bases: tuple[str, ...], colors: dict[str, str]) -> None:
    """The alignment variants (study.eval.variants) of `bases`: one kind per base and variant, named
    `<base>_<variant>` (`<base>_unaligned` for none), unless the table has that variant already."""
    for base in bases:
        b = KINDS[base]
        for v in VARIANTS:
            if variant_of(base, v) is None:
                name = f"{base}_{'unaligned' if v == 'none' else v}"
                KINDS[name] = PairKind(name, f"{b.label.split(' (')[0]}, {VARIANT_WORDS[v]}",
                                       colors.get(v, b.color), b.a, b.b, align=v != "none", default=False,
                                       base=base, variant=v)


def variant_of(base: str, variant: str) -> str | None:
    """The kind measuring `base`'s pairs with alignment variant `variant` (None: none registered)."""
    return next((k.name for k in KINDS.values() if k.base == base and k.variant == variant), None)


def _method_kinds(bases: tuple[str, ...]) -> None:
    """The alignment methods (study.eval.methods) of `bases`: one kind per base and method, `<base>_<method>`."""
    for base in bases:
        b = KINDS[base]
        for m in METHODS:
            name = f"{base}_{m}"
            KINDS[name] = PairKind(name, f"{b.label.split(' (')[0]}, {METHOD_WORDS[m]}", b.color, b.a, b.b,
                                   align=True, default=False, base=base, method=m)


def method_of(base: str, method: str) -> str | None:
    """The kind measuring `base`'s pairs aligned by `method` (None: none registered)."""
    return next((k.name for k in KINDS.values() if k.base == base and k.method == method), None)


def with_variants(kinds: list[str], variants: list[str], methods: list[str] = ()) -> list[str]:
    """study.pairs plus, per study.eval.variants entry, the registered variant of each kind listed, and per
    study.eval.methods entry, the kind aligned by that method."""
    out = list(dict.fromkeys(kinds))
    extra = [variant_of(k, v) for v in dict.fromkeys(variants) for k in out]
    extra += [method_of(k, m) for m in dict.fromkeys(methods) for k in out]
    return out + [k for k in dict.fromkeys(extra) if k is not None and k not in out]


_variant_kinds(("star_heldout", "regular_regular"), {"none": "tab:pink"})
_method_kinds(("star_heldout", "regular_regular"))


def names() -> tuple[str, ...]:
    return tuple(KINDS)


def default_names() -> tuple[str, ...]:
    return tuple(k.name for k in KINDS.values() if k.default)


def get(name: str) -> PairKind | None:
    return KINDS.get(name)


def naive_centres() -> dict[str, str]:
    """kind -> words, for the kinds that pair a naive centre with the held-outs (the verdict's controls)."""
    return {k.name: k.centre_name for k in KINDS.values() if k.centre_name}


class KindField(Mapping):
    """A live read-only view kind name -> one field of its entry, over the kinds where that field is set
    when `only_set` (report.KIND_NAMES, KIND_COLORS; verdict.CENTRES)."""

    def __init__(self, attr: str, only_set: bool = False):
        self.attr, self.only_set = attr, only_set

    def _names(self) -> list[str]:
        return [n for n, k in KINDS.items() if not self.only_set or getattr(k, self.attr) is not None]

    def __getitem__(self, name: str):
        if name not in self._names():
            raise KeyError(name)
        return getattr(KINDS[name], self.attr)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())
