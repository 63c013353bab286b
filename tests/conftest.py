"""Shared fixtures: Hydra's compose API on the project's configs, tiny synthetic data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import segtrain  # noqa: F401  (applies the torchvision import fix before any test imports it)
from segtrain.config import CONFIG_DIR
from segtrain.runtime import NATIVE_BF16_ENV


def pytest_addoption(parser):
    parser.addoption("--native-bf16", choices=("0", "1"), default=None,
                     help="run the whole suite as on a CPU with (1) or without (0) native bf16 units: "
                          "SEGTRAIN_NATIVE_BF16 for this process and the commands it starts")


def pytest_configure(config):
    forced = config.getoption("--native-bf16")
    if forced is not None:
        os.environ[NATIVE_BF16_ENV] = forced


@pytest.fixture
def native_bf16(monkeypatch):
    """The code paths of a CPU with native bf16 units (AVX512-BF16, AMX), whatever this CPU has: ``trainer.amp=auto``
    picks bf16, in this process and the commands a test starts."""
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")


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


def train_then_signal(overrides: list[str], run_dir: Path, cwd: Path, sig: int = signal.SIGUSR2) -> tuple[int, str]:
    """``python -m segtrain`` with ``overrides`` into ``run_dir``, sent ``sig`` once its signal handlers are in place
    (the start-up summary's "checkpoints in" line comes after them): (exit status, its output)."""
    proc = subprocess.Popen([sys.executable, "-m", "segtrain", *overrides, f"hydra.run.dir={run_dir}"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "checkpoints in" in line:
            break
    time.sleep(0.5)
    proc.send_signal(sig)
    lines.append(proc.communicate(timeout=300)[0])
    return proc.returncode, "".join(lines)
