"""Shared test settings (CPU only, few threads) and fixtures.

- ``one_thread``: one intra-op thread for the test. The test models are tiny: on two busy cores
  each convolution otherwise waits for a descheduled OpenMP thread (a forward pass went from
  8 ms to 1.6 s).
- ``cpu_accelerate``: for tests that run ``train()``, ``train_segmentation()`` or the command
  line in this process: one thread, Accelerate on the CPU even where a GPU is, and Accelerate's
  process-wide state (it pins e.g. mixed_precision) reset before and after, so each run starts
  as a fresh process would.

The tiny networks and runs are in ``helpers.py``; child-process environments and launches in
``processes.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from processes import reset_accelerate_state

# Under pytest-xdist (README's test command) each worker is one of several processes sharing
# the cores: one thread each, or two workers on two cores fight over four threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, at most 4 (each holds its own torch and tiny models;
    the tests' module fixtures are built once per worker)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cpu_accelerate(one_thread: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    reset_accelerate_state()
    yield
    reset_accelerate_state()
