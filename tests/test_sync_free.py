"""The training step keeps an accelerator busy: between check points (log lines, saves, the
non-finite limit) it never reads a device value on the host.

On the CPU :func:`diffunet.gpu_check.count_step_syncs` counts, under a dispatch mode, the
operations that would make the host wait for a GPU (``aten._local_scalar_dense`` behind
``.item()``/``bool()``/``int()``, ``nonzero``, ``is_nonzero``, ``equal``, ``masked_select``,
``unique``) plus ``Tensor.tolist``, step by step; the test asserts none between check points.
Data loading (host work on host tensors) is left out.
On a GPU (marked ``gpu``) the same loop runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffunet import training
from diffunet.config import load_config
from diffunet.gpu_check import StepSyncs, count_step_syncs
from helpers import tiny_run

pytestmark = pytest.mark.usefixtures("cpu_accelerate")

def _run_counted(tmp_path: Path, *extra: str) -> StepSyncs:
    cfg = load_config(None, tiny_run("train.max_steps=10", "train.log_every=4",
                                     "train.save_every=1000", "train.sample_every=1000",
                                     "train.max_nonfinite=1000", "unet.dropout=0.1", *extra))
    found = count_step_syncs(cfg, tmp_path / "run")
    assert found.steps == 10
    return found


@pytest.mark.parametrize("extra", [
    [],
    ["unet.num_classes=4", "train.label_dropout=0.5"],
    ["train.grad_clip=none", "train.grad_accum_steps=2"],
], ids=["unconditional", "class-conditional", "no-clipping-accumulated"])
def test_no_host_sync_between_check_points(tmp_path: Path, extra: list[str]) -> None:
    where = _run_counted(tmp_path, *extra)
    checks = {4, 8, 10}  # the log lines (every 4 steps, and the last step with its save)
    assert where.between(checks) == {}
    # The counter has teeth: the check points read the loss and the counters.
    assert all(where.syncs[s] > 0 for s in checks)


def test_a_nonfinite_step_is_skipped_on_the_device(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The skip of a NaN step happens without a host read, and still leaves weights, EMA and
    # optimizer exactly as they were (tests/test_training.py checks the states).
    real = training.step_loss
    calls = []

    def second_is_nan(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(training, "step_loss", second_is_nan)
    where = _run_counted(tmp_path)
    assert where.between({4, 8, 10}) == {}
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert '"nonfinite_skipped": 1' in log[0]


@pytest.mark.gpu
def test_no_host_sync_on_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA: the loop between check points under ``set_sync_debug_mode("error")``."""
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    real_forever = training._forever
    state = {"step": 0}

    def strict_between_checks(loader):
        batches = real_forever(loader)
        while True:
            torch.cuda.set_sync_debug_mode(0)  # data loading and the check points may sync
            item = next(batches)
            state["step"] += 1
            if state["step"] % 4 not in (0, 1) and state["step"] < 10:
                torch.cuda.set_sync_debug_mode("error")
            yield item

    monkeypatch.setattr(training, "_forever", strict_between_checks)
    cfg = load_config(None, tiny_run("train.max_steps=10", "train.log_every=4",
                                     "train.save_every=1000", "train.sample_every=1000",
                                     "train.max_nonfinite=1000"))
    try:
        assert training.train(cfg, tmp_path / "run", progress=False).step == 10
    finally:
        torch.cuda.set_sync_debug_mode(0)
