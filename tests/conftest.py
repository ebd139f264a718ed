"""Shared test settings: deterministic, offline, small."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
