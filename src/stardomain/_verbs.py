"""Submodules that are also API verbs. `stardomain.train`, `stardomain.barrier` and `stardomain.bma` are
modules (so `import stardomain.train as tr` and `stardomain.bma.bma_files` keep working) and, called,
the verbs of `stardomain.api` (`sd.train(cfg)`, `sd.barrier(a, b)`, `sd.bma(star, sources)`)."""

import sys
import types


class VerbModule(types.ModuleType):
    """A module that, called, runs the `stardomain.api` function of its own name."""

    def __call__(self, *args, **kwargs):
        from . import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Called at the end of each such module: its calls go to the verb from then on."""
    sys.modules[module_name].__class__ = VerbModule
