"""stardomain: star domains, alignment and barriers in weight space.

    import stardomain as sd
    a, b = sd.train("cfg.yaml", seed=0), sd.train("cfg.yaml", seed=1)
    sd.barrier(a, b).barrier

The verbs (`stardomain.api`) load on first use, so `import stardomain` stays light (no torch).
Three verbs share their names with submodules (train, barrier, bma): the package attributes are always the
verbs (`_Package`), so reach those modules' contents with `from stardomain.train import fit` or
`importlib.import_module("stardomain.train")`, not `from stardomain import train`.
"""

import os as _os
import sys as _sys
import types as _types

# PyTorch's own switch: large CPU tensors (a 1000-image batch's activations) on transparent huge pages.
# Fresh allocations then take far fewer page faults: BatchNorm recalibration and evaluation ran 1.7x
# faster on our 2-core machine. Read by PyTorch at its first allocation; an explicit setting wins.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

__all__ = ["Config", "train", "star", "align", "barrier", "bma", "run", "load", "save",
           "Trained", "Aligned", "Barrier", "BMA", "Study"]


class _Package(_types.ModuleType):
    """The package's class: its verb and result-type names always mean stardomain.api's objects, loaded on
    first use (PEP 549 style). A plain module `__getattr__` would not do: importing the submodules `train`,
    `barrier` or `bma` binds those names to the modules first."""

    def __getattribute__(self, name: str):
        if name in _API:
            from . import api

            return getattr(api, name)
        return super().__getattribute__(name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | _API)


_API = frozenset(__all__)
_sys.modules[__name__].__class__ = _Package
