"""The groups of units found so far, as a union-find the tracer grows one op at a time."""

from __future__ import annotations

from .spec import Member, Probe

NESTED_TWICE = ("blocks following the units of two groups whose block sizes do not nest (neither divides the "
                "other), or rigid blocks nested twice: the permutations keeping both are not expressed, so pinned")


class GroupBuilder:
    """Union-find over groups of units: merged when an op ties them, pinned (with reasons) when an op
    is not understood, cut into parts (a fused q/k/v projection) or folded (grouped-query attention)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.n: list[int] = []
        self.reasons: list[list[str]] = []
        self.members: list[list[Member]] = []
        self.probes: list[list[Probe]] = []
        self.label: list[str] = []
        self.heads: list[int] = []
        self.couple: list[int | None] = []
        self.parts: dict[int, list[int]] = {}  # a group cut into sub-groups (a fused q/k/v projection)
        self.cut_into: dict[int, list[int]] = {}  # ... of those, the ones cut (split), not folded
        self.head_only: list[bool] = []
        self.attention: list[bool] = []  # units met in an attention product (role "heads")
        self.summed: list[bool] = []     # the sum of several computed values (role "stream")
        self.nested_in: list[int | None] = []  # blocks moving as another group's units (hierarchy.py)
        self.as_value: list[bool] = []  # the axis of a parameter read as a plain value (a mask, a table)
        self.named: dict[int, str] = {}  # root -> its name in the finished spec (assembly.py)

    def new(self, n: int, label: str, reason: str | None = None) -> int:
        g = len(self.parent)
        self.parent.append(g)
        self.n.append(n)
        self.reasons.append([reason] if reason else [])
        self.members.append([])
        self.probes.append([])
        self.label.append(label)
        self.heads.append(0)
        self.couple.append(None)
        self.head_only.append(False)
        self.attention.append(False)
        self.summed.append(False)
        self.nested_in.append(None)
        self.as_value.append(False)
        return g

    def role(self, g: int) -> str:
        r = self.find(g)
        return "heads" if self.attention[r] else "stream" if self.summed[r] else "mlp"

    def mark(self, flags: list[bool], *gids: int) -> None:
        for g in gids:
            flags[self.find(g)] = True

    def _inherit(self, new: int, r: int) -> None:
        self.attention[new], self.summed[new] = self.attention[r], self.summed[r]

    def split(self, g: int, sizes: list[int], nested: bool = False) -> list[int] | None:
        """Cut group g's units into consecutive sub-groups (q, k and v of one fused projection, the two sides
        of a slice). Only a group whose members all span its units plainly can be cut; groups whose blocks
        follow its units (hierarchy.py) are cut alike, each part following its part; using the whole again
        later pins every part (see union, add, fix). None: it cannot be cut. nested: g is such a child."""
        r = self.find(g)
        if r in self.cut_into:  # cut before (the same value sliced twice): the same parts, if the same cuts
            subs = self.cut_into[r]
            return subs if [self.n[self.find(sg)] for sg in subs] == list(sizes) else None
        if sum(sizes) != self.n[r] or not self._can_split(r, nested):
            return None
        subs, off = [], 0
        for n in sizes:
            sg = self.new(n, f"{self.label[r]}[{off}:{off + n}]")
            self.reasons[sg] = list(self.reasons[r])
            self._inherit(sg, r)
            self.members[sg] = [Member(m.tensor, m.axis, m.offset + off * m.block, m.block) for m in self.members[r]]
            self.probes[sg] = [Probe(p.node, p.axis, p.offset + off * p.block, p.block) for p in self.probes[r]]
            subs.append(sg)
            off += n
        self.members[r], self.probes[r] = [], []
        self.parts[r] = self.cut_into[r] = subs
        for c in self.children(r):  # (checked by _can_split: each can be cut alike)
            q = self.n[c] // self.n[r]
            for part, sub in zip(subs, self.split(c, [q * n for n in sizes], nested=True)):
                self.heads[sub], self.nested_in[sub], self.head_only[sub] = self.n[part], part, self.head_only[c]
        return subs

    def _can_split(self, r: int, nested: bool) -> bool:
        if r in self.parts or self.couple[r] is not None or (self.heads[r] and not nested):
            return False
        if any(m.rep != 1 or m.by >= 0 for m in self.members[r]) or any(p.rep != 1 for p in self.probes[r]):
            return False
        return all(self._can_split(c, True) for c in self.children(r))

    def children(self, r: int) -> list[int]:
        """The groups whose blocks follow group r's units (hierarchy.py)."""
        return [c for c in range(len(self.parent)) if self.parent[c] == c and self.nested_in[c] is not None
                and self.find(self.nested_in[c]) == r]

    def leaves(self, g: int) -> list[tuple[int, int]]:
        """Group g as the groups it has been cut into (split, cut), in order: [(group, units)]."""
        r = self.find(g)
        if r not in self.cut_into:
            return [(r, self.n[r])]
        return [x for sg in self.cut_into[r] for x in self.leaves(sg)]

    def cut(self, g: int, at: int) -> bool:
        """Make a boundary at unit `at` of group g, cutting the part it falls in (a slice of the feature axis
        at a static index: its units are a group of their own) -> False: that part cannot be cut."""
        off = 0
        for leaf, n in self.leaves(g):
            if off < at < off + n:
                return self.split(leaf, [at - off, off + n - at]) is not None
            off += n
        return True

    def fold(self, q: int, k: int, rep: int) -> bool:
        """Grouped-query attention: query group q (rep query heads per key head) becomes rep-members of
        key group k (Member.rep): q's units move with the key units they meet. Later uses of q alone pin
        both (as after a split). False: it cannot be folded."""
        q, k = self.find(q), self.find(k)
        if q == k or q in self.parts or k in self.parts or self.couple[q] is not None or not self.heads[k]:
            return False
        if self.n[q] != rep * self.n[k] or self.heads[q] != rep * self.heads[k]:
            return False
        if any(m.rep != 1 or m.by >= 0 for m in self.members[q]):
            return False
        self.reasons[k] += self.reasons[q]
        self.members[k] += [Member(m.tensor, m.axis, m.offset, m.block, rep) for m in self.members[q]]
        self.head_only[k] = self.head_only[k] or self.head_only[q]  # rotary query units fix the key units
        self.mark(self.attention, k)
        self.probes[k] += [Probe(p.node, p.axis, p.offset, p.block, rep) for p in self.probes[q]]
        self.members[q], self.probes[q] = [], []
        self.parts[q] = [k]
        return True

    def _whole_used(self, r: int) -> None:
        for sg in self.parts.get(r, []):
            self.fix(sg, "a fused projection used both whole and in parts")

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if a in self.parts or b in self.parts:
            self._whole_used(a)
            self._whole_used(b)
            self.reasons[a].append("a fused projection used both whole and in parts")
        if self.n[a] <= 0 or self.n[b] <= 0:  # a pin (size unknown): takes the other's size
            self.n[a] = self.n[b] = max(self.n[a], self.n[b])
        elif self.n[a] != self.n[b]:  # cannot happen for a consistent graph; be safe
            self.fix(a, "size mismatch in a merge")
            self.fix(b, "size mismatch in a merge")
        if b < a:
            a, b = b, a
        self.parent[b] = a
        self.reasons[a] += self.reasons[b]
        self.members[a] += self.members[b]
        self.probes[a] += self.probes[b]
        ha, hb = self.heads[a], self.heads[b]
        pa, pb = self.nested_in[a], self.nested_in[b]
        if ha and hb and ha != hb and (pa is None or pb is None):
            self.fix(a, "merged groups split into different numbers of heads")
        self.heads[a] = ha or hb  # a head-structured permutation is legal for the merged group too
        self.head_only[a] = self.head_only[a] or self.head_only[b]
        self.attention[a] = self.attention[a] or self.attention[b]
        self.summed[a] = self.summed[a] or self.summed[b]
        self.as_value[a] = self.as_value[a] or self.as_value[b]
        ca, cb = self.couple[a], self.couple[b]
        if ca is not None and cb is not None and self.find(ca) != self.find(cb):
            self.fix(a, "attention heads coupled to two different groups")
        self.couple[a] = ca if ca is not None else cb
        self.nested_in[a] = pa if pa is not None else pb
        if pa is not None and pb is not None:
            self.heads[a], self.nested_in[a] = ha, pa
            self.nest(a, pb)
        return a

    def nest(self, child: int, parent: int) -> None:
        """Group `child`'s blocks (one per unit of `parent`) move as `parent`'s units do (hierarchy.py). If its
        blocks already follow another group: of the same size, the two parents' units move alike (one group);
        of another size whose blocks nest in these (or these in its), the finer parent's units move in blocks
        following the coarser parent's units (a chain); blocks that do not nest are pinned."""
        c, p = self.find(child), self.find(parent)
        old = self.nested_in[c]
        if old is None:
            self.set_heads(c, self.n[p])
            self.nested_in[c] = p
            return
        old, h_old, h = self.find(old), self.heads[c], self.n[p]
        if old == p:
            return
        if h_old == h:
            self.union(old, p)
        elif max(h_old, h) % min(h_old, h) or self.head_only[c]:
            for g in (c, old, p):
                self.fix(g, NESTED_TWICE)
        else:
            fine, coarse = (old, p) if h_old > h else (p, old)
            self.heads[c], self.nested_in[c] = self.n[fine], fine
            self.nest(fine, coarse)

    def nest_rigid(self, child: int, parent: int) -> bool:
        """Group `child`'s blocks follow `parent`'s units, its units keeping their order within a block (a
        channel shuffle's row read in whole blocks). False: child already has a block structure."""
        c = self.find(child)
        if self.nested_in[c] is not None or self.heads[c] or self.couple[c] is not None or c == self.find(parent):
            return False
        self.nest(c, parent)
        self.head_only[c] = True
        return True

    def set_heads(self, g: int, h: int) -> None:
        r = self.find(g)
        if self.heads[r] and self.heads[r] != h:
            nested = max(h, self.heads[r]) % min(h, self.heads[r]) == 0
            self.fix(r, "split into different numbers of heads" + (
                f" ({min(h, self.heads[r])} and {max(h, self.heads[r])}: nested blocks, which are expressed only for "
                "convolutions with one input channel per group)" if nested else
                f" ({h} and {self.heads[r]}: blocks that do not nest)"))
        self.heads[r] = h

    def set_couple(self, a: int, b: int) -> None:
        """Two attention groups that must share their head-level permutation (q/k with v/o)."""
        self.mark(self.attention, a, b)
        self.tie_blocks(a, b)

    def tie_blocks(self, a: int, b: int, what: str = "attention heads") -> None:
        """Two block-structured groups that must share their block-level permutation (coupled); `what`
        the blocks are, for the reason given when they cannot."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        for x, y in ((a, b), (b, a)):
            if self.couple[x] is not None and self.find(self.couple[x]) != y:
                self.fix(x, f"{what} coupled to two different groups")
                self.fix(y, f"{what} coupled to two different groups")
            self.couple[x] = y

    def fix(self, g: int, reason: str) -> None:
        r = self.find(g)
        if reason not in self.reasons[r]:
            self.reasons[r].append(reason)
            for sg in self.parts.get(r, []):
                self.fix(sg, reason)

    def add(self, gid: int, m: Member) -> None:
        r = self.find(gid)
        if r in self.parts:
            self._whole_used(r)
            self.fix(r, "a fused projection used both whole and in parts")
        self.members[r].append(m)

    def fix_units(self, gid: int) -> None:
        """Something treats each unit within a head by its position (rotary embeddings): the group may
        still move whole heads (every head is treated alike), never units within a head."""
        self.head_only[self.find(gid)] = True
