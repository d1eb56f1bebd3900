"""Train an existing LightningModule as a star model of given sources: add one callback.

    trainer = L.Trainer(callbacks=[StarlightCallback(sources, module="model", example_input=x0)], ...)
    trainer.fit(lit_module, loader)

Every training batch runs inside `Starlight.drawn()`: from the batch's start until its backward, the star
module's parameters *are* the interpolated weights (1-t)·θ + t·π(θ_n) of that batch's draw, so the
module's own `training_step` computes the Starlight loss unchanged, and backward gives θ (1-t)·∇L through
autograd, where DistributedDataParallel's hooks see it. Under DDP every rank draws the same (source, t)
stream (one draw per global batch, as `stardomain star` with chunks = 1) and aligns the same way from the
same star, so the ranks stay identical. BatchNorm: interpolated forwards use scratch statistics; with
`bn_data` the star's own are recomputed on it after every epoch (the same data on every rank).
Needs the optional extra `lightning` (pip install 'stardomain[lightning]').
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl  # type: ignore[no-redef]

from ..errors import UserError
from ..objective import Starlight


class StarlightCallback(pl.Callback):
    """`sources`: state dicts (or Trained results, model files) of the star module; `module`: the attribute
    of the LightningModule that is the star (None: the LightningModule itself); `bn_data`: data to
    recompute the star's BatchNorm statistics on after every training epoch; other keywords go to
    `Starlight` (example_input, t_sampling, align_every, seed, ...). `light` is the Starlight once fitting
    has started."""

    def __init__(self, sources: Sequence[Any], *, module: str | None = None, bn_data: Any = None,
                 **starlight: Any):
        self.sources, self.module, self.bn_data, self.options = sources, module, bn_data, starlight
        self.light: Starlight | None = None
        self._pending: dict | None = None
        self._stack: contextlib.ExitStack | None = None

    def _star(self, pl_module):
        if self.module is None:
            return pl_module
        star = getattr(pl_module, self.module, None)
        if star is None:
            raise UserError(f"the LightningModule has no attribute {self.module!r} (StarlightCallback(module=...))")
        return star

    def on_fit_start(self, trainer, pl_module) -> None:
        self.light = Starlight(self._star(pl_module), self.sources, **self.options)
        if self._pending is not None:
            self.light.load_state_dict(self._pending)
            self._pending = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._leave()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.light.drawn())

    def _leave(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._leave()  # the optimiser and everything after the forward see θ itself

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._leave()  # a training_step that returned None skips backward

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._leave()
        if self.bn_data is not None:
            was = pl_module.training
            self.light.recalibrate_bn(self.bn_data)
            pl_module.train(was)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._leave()

    def state_dict(self) -> dict:
        return self.light.state_dict() if self.light is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._pending = dict(state_dict)
