"""stardomain: star domains, alignment and barriers in weight space.

    import stardomain as sd
    a, b = sd.train("cfg.yaml", seed=0), sd.train("cfg.yaml", seed=1)
    sd.barrier(a, b).barrier

The verbs are the functions of `stardomain.api`; they load on first use, so `import stardomain` stays
light (no torch). The modules behind them are nouns (`stardomain.training`, `stardomain.barriers`,
`stardomain.averaging`, `stardomain.permute`), so no verb hides a module of the same name.
"""

import os as _os

from ._version import __version__

# PyTorch's own switch: large CPU tensors (a 1000-image batch's activations) on transparent huge pages.
# Fresh allocations then take far fewer page faults: BatchNorm recalibration and evaluation ran 1.7x
# faster on our 2-core machine. Read by PyTorch at its first allocation; an explicit setting wins.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__all__ = ["Config", "train", "star", "align", "barrier", "bma", "run", "load", "save",
           "Trained", "Aligned", "Barrier", "BMA", "Study", "Starlight", "__version__"]


def __getattr__(name: str):
    if name == "Starlight":  # the objective for training loops of one's own
        from .objective import Starlight

        return Starlight
    if name in __all__:
        from . import api

        value = getattr(api, name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'stardomain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
