"""Run by tests/test_integrations.py: a LightningModule trained as a star with StarlightCallback under Lightning's
DDP strategy (CPU, gloo, 2 processes). Each rank writes its star, its sources' permutations and its counters.

    python tests/lightning_ddp.py OUT_DIR [DEVICES]
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from stardomain.data import get_dataset
from stardomain.config import DataConfig
from stardomain.integrations.lightning import StarlightCallback
from stardomain.models import build_model

ARCH = {"name": "mlp", "kwargs": {"width": 16, "bn": True}}


class Classifier(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about Starlight."""

    def __init__(self, shape):
        super().__init__()
        self.model = build_model(ARCH, shape, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main(out: Path, devices: int) -> None:
    torch.set_num_threads(1)
    data = get_dataset(DataConfig(name="digits"))
    x, y = data.train.x[:512], data.train.y[:512]
    torch.manual_seed(0)
    sources = [build_model(ARCH, data.input_shape, 10).state_dict() for _ in range(3)]
    lit = Classifier(data.input_shape)
    callback = StarlightCallback(sources, module="model", example_input=x[:2], align_every=3, seed=0,
                                 bn_data=(x, y))
    trainer = pl.Trainer(callbacks=[callback], accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_epochs=2, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, deterministic=True)
    torch.manual_seed(1)
    trainer.fit(lit, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    light = callback.light
    tensors = {f"star.{k}": v.detach().contiguous() for k, v in lit.model.state_dict().items()}
    for n, perm in enumerate(light.permutations):
        tensors.update({f"perm{n}.{g}": p.contiguous() for g, p in perm.items()})
    save_file(tensors, str(out / f"rank{trainer.global_rank}.safetensors"))
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"calls": light.calls, "alignments": light.alignments, "world_size": trainer.world_size,
         "global_step": trainer.global_step, "last_draw": light.last_draw,
         "initial": {k: v.tolist() for k, v in sources[0].items() if k.endswith("weight")}}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
