import os

import pytest
import torch

# Two cores shared by the suite: keep torch from oversubscribing.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def digits_cfg():
    """A config that trains a tiny MLP on scikit-learn's digits in about a second."""
    from stardomain.config import Config

    return Config.model_validate({
        "data": {"name": "digits"},
        "model": {"name": "mlp", "kwargs": {"width": 16}},
        "train": {"epochs": 3, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
    })


@pytest.fixture
def spec_running_every_layer(monkeypatch):
    """spec_from_model with a shape pass that runs every layer, where the default one puts zeros of the
    right shape in for convolutions, BatchNorm and activations: the two specs must be equal."""
    import stardomain.permute.capture as capture
    from stardomain.permute import spec_from_model

    real = capture.record_shapes

    def spec(model, x):
        with monkeypatch.context() as mp:
            mp.setattr(capture, "record_shapes", lambda m, g, example, fast=True: real(m, g, example, fast=False))
            return spec_from_model(model, x)

    return spec
