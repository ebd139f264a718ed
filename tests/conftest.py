"""Shared test settings: deterministic, offline, small; demo data generated once per session.

Plugins load at import time so that tests can be parametrised over ``list_tasks()``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test: one process per core, one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # (also for the processes tests start)
    torch.set_num_threads(1)
os.environ.pop("LORKD_PL_TASKS_DIR", None)
_DEMO_ROOT = Path(tempfile.mkdtemp(prefix="lorkd-pl-tests-")) / "demo"
os.environ["LORKD_PL_DEMO_DATA"] = str(_DEMO_ROOT)
os.environ["LORKD_PL_CACHE"] = str(_DEMO_ROOT.parent / "cache")  # the session's, not the user's ~/.cache

from lorkd_pl.data.plugins import load_plugins  # noqa: E402

load_plugins()


def pytest_unconfigure(config) -> None:
    shutil.rmtree(_DEMO_ROOT.parent, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_root() -> Path:
    """Demo data folder of the session (generated on first use)."""
    return _DEMO_ROOT


@pytest.fixture
def clean_registry():
    """Restore the registry's tasks and regions after a test that registers its own."""
    from lorkd_pl import registry

    tasks, regions, defaults = dict(registry._TASKS), list(registry._REGIONS), set(registry._DEFAULTS)
    yield registry
    registry._TASKS.clear()
    registry._TASKS.update(tasks)
    registry._REGIONS[:] = regions
    registry._DEFAULTS.clear()
    registry._DEFAULTS.update(defaults)
