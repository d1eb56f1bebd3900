"""Starlight inside Lightning and transformers.Trainer (optional extras; skipped only when absent).

Each framework takes one optimiser step with plain SGD (lr 1, no momentum, clipping or decay), so the
step it applied is -(1-t)·∇L at the drawn (source, t), which a second module holding the interpolated
weights computes independently. Lightning's DDP strategy (CPU, gloo, two processes) must leave every rank
with the same star and the same source permutations."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from stardomain.errors import UserError
from stardomain.interpolate import lerp
from stardomain.models import build_model

HERE = Path(__file__).resolve().parent
ARCH = {"name": "mlp", "kwargs": {"width": 8, "bn": True}}
SHAPE = (1, 8, 8)


def _expected_step(make, before, source, t, loss_of):
    """θ_before - (1-t)·∇L at lerp(θ_before, source, t), from a second module (lr 1)."""
    second = make()
    second.load_state_dict(lerp(before, source, t))
    second.train()
    loss_of(second).backward()
    return {k: before[k] - (1 - t) * p.grad for k, p in second.named_parameters()}


def test_lightning_callback_step_is_the_starlight_step(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from stardomain.integrations.lightning import StarlightCallback

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model(ARCH, SHAPE, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

    torch.manual_seed(0)
    lit = Classifier()
    sources = [build_model(ARCH, SHAPE, 10).state_dict() for _ in range(3)]
    x, y = torch.randn(16, *SHAPE), torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in lit.model.state_dict().items()}
    cb = StarlightCallback(sources, module="model", example_input=x[:2], align_every=1, seed=3)
    trainer = pl.Trainer(callbacks=[cb], accelerator="cpu", devices=1, max_steps=1, enable_progress_bar=False,
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(lit, DataLoader(TensorDataset(x, y), batch_size=16))
    n, t = cb.light.last_draw
    assert cb.light.calls == 1 and cb.light.alignments == 1
    want = _expected_step(lambda: build_model(ARCH, SHAPE, 10), before, cb.light.aligned_sources[n], t,
                          lambda m: F.cross_entropy(m(x), y))
    for k, p in lit.model.named_parameters():
        assert isinstance(p, torch.nn.Parameter)
        torch.testing.assert_close(p.detach(), want[k], rtol=1e-5, atol=1e-6)
    for k, b in lit.model.named_buffers():  # interpolated forwards never touched θ's BatchNorm statistics
        assert torch.equal(b, before[k]), k


@pytest.mark.slow
def test_lightning_ddp_ranks_end_with_the_same_star_and_alignment(tmp_path):
    pytest.importorskip("lightning.pytorch")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(HERE / "lightning_ddp.py"), str(tmp_path), "2"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert info[0]["world_size"] == 2
    # 512 examples, batch 32 per rank, two epochs: 16 steps; aligned at calls 0, 3, ..., 15
    assert info[0]["global_step"] == info[1]["global_step"] == 16
    assert info[0]["calls"] == info[1]["calls"] == 16 and info[0]["alignments"] == info[1]["alignments"] == 6
    assert info[0]["last_draw"] == info[1]["last_draw"]
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    perms = [k for k in ranks[0] if k.startswith("perm")]
    assert perms and any(not torch.equal(ranks[0][k], torch.arange(len(ranks[0][k]))) for k in perms)
    init = info[0]["initial"]
    assert not torch.equal(ranks[0]["star.1.weight"], torch.tensor(init["1.weight"]))  # it trained


def _hf_vit_trainer(tmp_path, **args):
    """A one-step StarlightTrainer of a tiny ViT built from its config (nothing downloaded), plain SGD, lr 1.
    -> (trainer, model factory, model, data (x, y), the model's weights before)"""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from stardomain.integrations.hf import StarlightTrainer

    def make():
        cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, num_labels=10, hidden_size=16,
                                     num_hidden_layers=1, num_attention_heads=4, intermediate_size=24)
        return transformers.ViTForImageClassification(cfg)

    torch.manual_seed(0)
    model = make()
    sources = [make().state_dict() for _ in range(2)]
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                                          learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
                                          weight_decay=0.0, max_grad_norm=0.0, use_cpu=True, report_to=[],
                                          save_strategy="no", remove_unused_columns=False, seed=0,
                                          dataloader_num_workers=0, disable_tqdm=True, **args)
    data = [{"pixel_values": x[i], "labels": y[i]} for i in range(8)]
    trainer = StarlightTrainer(model=model, args=args, train_dataset=data,
                               starlight={"sources": sources, "example_input": x[:2], "align_every": 1, "seed": 2})
    return trainer, make, model, (x, y), before


def test_hf_trainer_step_is_the_starlight_step(tmp_path):
    trainer, make, model, (x, y), before = _hf_vit_trainer(tmp_path)
    trainer.train()
    light = trainer.light
    n, t = light.last_draw
    assert light.calls == 1 and light.alignments == 1
    want = _expected_step(make, before, light.aligned_sources[n], t,
                          lambda m: m(pixel_values=x, labels=y).loss)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[k], rtol=1e-4, atol=1e-6)


def test_hf_trainer_refuses_gradient_checkpointing_before_a_wrong_step(tmp_path):
    """Checkpointing re-runs blocks in backward at the star's own weights: refused, asked for in the
    arguments (at once) or switched on in the model (by the guard in the first backward), with θ unchanged."""
    transformers = pytest.importorskip("transformers")
    new = "activation_checkpointing" in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    name = "activation_checkpointing" if new else "gradient_checkpointing"  # transformers 5 renamed it
    with pytest.raises(UserError, match="activation checkpointing"):
        _hf_vit_trainer(tmp_path, **{name: True})
    trainer, _, model, _, before = _hf_vit_trainer(tmp_path)
    getattr(model, f"{name}_enable")()
    with pytest.raises(UserError, match="activation checkpointing"):
        trainer.train()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
