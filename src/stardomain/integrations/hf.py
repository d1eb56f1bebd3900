"""Train a Hugging Face model as a star model of given sources with `transformers.Trainer`.

    trainer = StarlightTrainer(model=model, args=args, train_dataset=ds,
                               starlight={"sources": sources, "example_input": batch, "align_every": 100})
    trainer.train()

`StarlightTrainer` is a `Trainer` whose training loss is the Starlight objective: each training
`compute_loss` runs inside `Starlight.drawn()`, so the model's own forward (and its own loss, or the
Trainer's `compute_loss_func`) sees the interpolated weights (1-t)·θ + t·π(θ_n), and the Trainer's
backward gives θ (1-t)·∇L. Evaluation (`model.eval()`) sees θ itself. Everything else (optimiser,
schedule, gradient accumulation, mixed precision, several processes) is the Trainer's own.
Needs the optional extra `hf` (pip install 'stardomain[hf]').
"""

from __future__ import annotations

from typing import Any, Mapping

from transformers import Trainer

from ..errors import UserError
from ..objective import RECOMPUTE, Starlight


class StarlightTrainer(Trainer):
    """`starlight`: the arguments of `Starlight` except the star (the Trainer's model): sources (state dicts
    of the model, Trained results or model files), example_input (a batch the model accepts, a dict of
    tensors for most models), t_sampling, align_every, seed, ... `light` is the Starlight once training
    has started."""

    def __init__(self, *args: Any, starlight: Mapping[str, Any], **kwargs: Any):
        if not isinstance(starlight, Mapping) or "sources" not in starlight:
            raise UserError("StarlightTrainer needs starlight={'sources': [...], ...} (the arguments of sd.Starlight)")
        super().__init__(*args, **kwargs)
        if any(getattr(self.args, k, False) for k in ("activation_checkpointing", "gradient_checkpointing")):
            raise UserError(RECOMPUTE)  # (checkpointing switched on in the model itself: refused in its first backward)
        self.starlight_options = dict(starlight)
        self.light: Starlight | None = None

    def compute_loss(self, model, inputs, *args: Any, **kwargs: Any):
        if not model.training:
            return super().compute_loss(model, inputs, *args, **kwargs)
        if self.light is None:
            options = dict(self.starlight_options)
            self.light = Starlight(self.model, options.pop("sources"), **options)
        with self.light.drawn():
            return super().compute_loss(model, inputs, *args, **kwargs)
