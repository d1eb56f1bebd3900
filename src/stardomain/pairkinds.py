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
        """Unaligned barriers are an order of magnitude higher: drawn on their own figure."""
        return self.align is False


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
             "heldouts", align=False, default=False),
    PairKind("merged_heldout", "merge-many centre – held-out (control)", "tab:purple", "merged", "heldouts",
             default=False, centre_name="merge-many centre"),
)


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
