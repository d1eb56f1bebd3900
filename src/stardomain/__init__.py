"""stardomain: star domains, alignment and barriers in weight space.

    import stardomain as sd
    a, b = sd.train("cfg.yaml", seed=0), sd.train("cfg.yaml", seed=1)
    sd.barrier(a, b).barrier

The verbs (`stardomain.api`) load on first use, so `import stardomain` stays light (no torch). Three
verbs share their names with submodules (train, barrier, bma): those modules are callable, and calling
one runs the verb (`stardomain._verbs`), so `sd.train(...)` and `from stardomain.train import fit` both work.
"""

import os as _os

# PyTorch's own switch: large CPU tensors (a 1000-image batch's activations) on transparent huge pages.
# Fresh allocations then take far fewer page faults: BatchNorm recalibration and evaluation ran 1.7x
# faster on our 2-core machine. Read by PyTorch at its first allocation; an explicit setting wins.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

__all__ = ["Config", "train", "star", "align", "barrier", "bma", "run", "load", "save",
           "Trained", "Aligned", "Barrier", "BMA", "Study", "Starlight"]


_VERB_MODULES = frozenset({"train", "barrier", "bma"})  # submodules that, called, run the verb


def __getattr__(name: str):
    if name in _VERB_MODULES:  # the (callable) module itself; imported, it is a plain attribute from then on
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name == "Starlight":  # the objective for training loops of one's own
        from .objective import Starlight

        return Starlight
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'stardomain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
