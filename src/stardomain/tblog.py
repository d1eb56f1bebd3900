"""Optional TensorBoard logging of per-epoch training metrics (`--tensorboard DIR` on train and star).

TensorBoard is not a dependency: without the `tensorboard` package the option prints one warning line
and training goes on (the same metrics are in the model's metadata, `history`, and in OUT.csv).
"""

from __future__ import annotations

import sys
from pathlib import Path


class EpochLog:
    """on_epoch(epoch, record): every number in the record (but `epoch`) as the scalar `prefix/name` at
    step = the epoch's number (1-based, as in `history`), flushed at once so a live TensorBoard shows it."""

    def __init__(self, writer, prefix: str):
        self.writer, self.prefix = writer, prefix

    def __call__(self, epoch: int, record: dict) -> None:
        step = int(record.get("epoch", epoch + 1))
        for name, value in record.items():
            if name != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{self.prefix}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def epoch_log(logdir: str | Path | None, prefix: str) -> EpochLog | None:
    """An EpochLog writing under `logdir`, or None (no logdir, or no tensorboard package: one warning)."""
    if logdir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: --tensorboard needs the tensorboard package (pip install tensorboard); training "
              "without it (per-epoch metrics are still in the model's metadata and OUT.csv)", file=sys.stderr)
        return None
    return EpochLog(SummaryWriter(log_dir=str(logdir)), prefix)
