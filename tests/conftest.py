"""Shared fixtures: Hydra's compose API on the project's configs, tiny synthetic data."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import segtrain  # noqa: F401  (applies the torchvision import fix before any test imports it)
from segtrain.config import CONFIG_DIR


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def compose_cfg():
    """``compose_cfg(overrides)`` -> the composed training config, as ``python -m segtrain`` sees it."""

    def _compose(overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=overrides or [])

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def fast_overrides(tmp_path):
    """``debug=fast`` with its data and outputs inside the test's tmp dir."""
    return ["debug=fast", f"dataset.root={tmp_path / 'data'}"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A four-step ``debug=fast`` run shared by the predict and export tests: its data under ``data/``,
    the run under ``run/`` (``run/checkpoints/last.pt``). Tests write their own files elsewhere."""
    from segtrain.config import compose_config
    from segtrain.train import train

    tmp = tmp_path_factory.mktemp("trained")
    overrides = ["debug=fast", f"dataset.root={tmp / 'data'}", "trainer.max_steps=4"]
    train(compose_config(overrides), tmp / "run", overrides=overrides)
    return tmp
