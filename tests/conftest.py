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
