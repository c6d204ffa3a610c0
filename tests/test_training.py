"""Training: the run folder, exact resume, the command line, two processes, signals, non-finite
losses, gradient accumulation, the LR schedule and EMA.

Everything runs a tiny UNet (8 channels, 16x16) on the built-in shapes for a handful of steps.
``train()`` runs in-process where the behaviour is the library's; the command line, signals and
``accelerate launch`` run as subprocesses.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffunet import cli, load_model, training
from diffunet.config import RunConfig, load_config, run_config_from_dict, to_dict
from diffunet.data import GlobalBatchSampler
from diffunet.errors import ConfigError
from diffunet.training import EMA, TrainingError, lr_at, train
from diffunet.unet import UNet
from helpers import tiny_run
from processes import cpu_env, launch_two, reset_accelerate_state

TINY = tiny_run()
# Every train() here runs in this process, on the CPU, from a fresh Accelerate state.
pytestmark = pytest.mark.usefixtures("cpu_accelerate")
STATE_FILES = {"model.safetensors", "ema.safetensors", "phema.safetensors",
               "optimizer.safetensors", "rng.safetensors", "rng_rank0.safetensors",
               "trainer.json"}
# a state at or after the carried guide's step (train.guide_at, 0.5 of max_steps) also keeps it
GUIDED_STATE_FILES = STATE_FILES | {"guide.safetensors"}


def _cfg(*extra: str) -> RunConfig:
    return load_config(None, [*TINY, *extra])


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{a.name}: {k} differs"


def _assert_close(a: Path, b: Path, atol: float) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=atol, msg=f"{a.name}: {k}")


def _differs(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return any(not torch.equal(ta[k], tb[k]) for k in ta)


def _state(out: Path, step: int) -> Path:
    return out / "state" / f"step{step:07d}"


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]


def _leftovers(out: Path) -> list[Path]:
    """Temporary folders/files of interrupted writes (state/.tmp-*, .<name>.*.tmp)."""
    return [p for p in out.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".tmp")]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every path under ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"",
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _diffunet(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffunet", *args], env=cpu_env(),
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# 1. The run folder, end to end through the command line.


def test_cli_run_folder(tmp_path: Path) -> None:
    overrides = [*TINY, "train.max_steps=6", "train.log_every=2", "train.sample_every=3",
                 "train.save_every=2", "train.keep_last=2"]
    out = tmp_path / "run"
    r = _diffunet("train", *overrides, "--out-dir", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert f"step 6: model file {out / 'weights' / 'model_step0000006.safetensors'}" in r.stderr
    cfg = load_config(None, overrides)

    assert run_config_from_dict(json.loads((out / "config.json").read_text())) == cfg

    log = _log(out)
    assert [rec["step"] for rec in log] == [2, 4, 6]
    for rec in log:
        assert isinstance(rec["loss"], float) and 0 < rec["loss"] < 10
        assert rec["lr"] == pytest.approx(1e-3)
        assert rec["images_per_s"] > 0
        assert rec["nonfinite_skipped"] == 0

    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step0000003.png", "step0000006.png"]
    with Image.open(out / "samples" / "step0000006.png") as grid:  # 2x2 tiles of 16 + padding 2
        assert grid.size == (38, 38) and grid.mode == "RGB"

    weights = sorted(p.name for p in (out / "weights").iterdir())
    assert weights == [f"model_step{s:07d}.safetensors" for s in (2, 4, 6)]
    for s in (2, 4, 6):
        net, schedule, meta = load_model(out / "weights" / f"model_step{s:07d}.safetensors")
        assert meta["step"] == s
        assert meta["run_config"] == to_dict(cfg)
        # the file states the keys its formulation reads (the others take their defaults)
        used = cfg.schedule.used_fields()
        assert net.config == cfg.unet and schedule.config.used_fields() == used
        assert all(getattr(schedule.config, k) == getattr(cfg.schedule, k) for k in used)
    # The inference file holds the EMA weights (and, after step 3, the EMA of step 3 as its
    # carried guide, under guide.*).
    carried = _tensors(out / "weights" / "model_step0000006.safetensors")
    ema = _tensors(_state(out, 6) / "ema.safetensors")
    assert {k for k in carried if not k.startswith("guide.")} == ema.keys()
    assert all(torch.equal(carried[k], v) for k, v in ema.items())

    # keep_last=2: only the two newest states remain, each complete.
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step0000004", "step0000006"]
    for s in (4, 6):
        assert {p.name for p in _state(out, s).iterdir()} == GUIDED_STATE_FILES
        trainer = json.loads((_state(out, s) / "trainer.json").read_text())
        assert trainer["step"] == s and trainer["world_size"] == 1
    assert _leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# 2. Exact resume: N steps == N/2 steps + resume, and no skipped data is read again.


class _Recording(torch.utils.data.Dataset):
    """Wraps a data set and records the index batches the loader asks for."""

    def __init__(self, base, log: list[list[int]]) -> None:
        self.base, self.log = base, log
        self.num_classes, self.skipped = base.num_classes, base.skipped

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        self.log.append([int(index)])
        return self.base[index]

    def __getitems__(self, indices):
        self.log.append([int(i) for i in indices])
        return self.base.__getitems__(indices)


@pytest.mark.parametrize("variant", [
    [],
    ["unet.num_classes=4", "train.label_dropout=0.5"],
    ["data.task=superres", "data.superres_factor=2", "train.label_dropout=0.5"],
    ["data.task=inpaint", "train.label_dropout=0.5"],
], ids=["unconditional", "class-conditional", "superres", "inpaint"])
def test_resume_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         variant: list[str]) -> None:
    n = 6
    common = [*variant, "unet.dropout=0.3", "data.random_flip=true", "train.lr_schedule=constant",
              "train.log_every=1", "train.save_every=2", "train.sample_every=2"]
    reads: list[list[int]] = []
    real_build = training.build_dataset
    monkeypatch.setattr(training, "build_dataset", lambda c: _Recording(real_build(c), reads))
    stream = GlobalBatchSampler(64, 4, seed=0)

    # a task run first reads its preview images (the data set's first ones, one by one)
    previews = ([[i] for i in range(_cfg(*common).sample.num_images)]
                if any(v.startswith("data.task=") for v in variant) else [])

    full, half = tmp_path / "full", tmp_path / "half"
    result = train(_cfg(*common, f"train.max_steps={n}"), full, progress=False)
    assert result.step == n and not result.interrupted
    assert reads == previews + [stream.batch_at(s) for s in range(n)]

    train(_cfg(*common, f"train.max_steps={n // 2}"), half, progress=False)
    spare = tmp_path / "spare"
    shutil.copytree(half, spare)
    reads.clear()
    messages: list[str] = []
    result = train(_cfg(*common, f"train.max_steps={n}"), half, resume=True, progress=False,
                   say=messages.append)
    assert result.step == n
    assert any(f"(step {n // 2})" in m for m in messages)
    # The resumed run reads batch N/2 first and nothing from before it.
    assert reads == previews + [stream.batch_at(s) for s in range(n // 2, n)]

    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors",
                 "rng.safetensors", "rng_rank0.safetensors"):
        _assert_identical(_state(full, n) / name, _state(half, n) / name)
    _assert_identical(full / "weights" / f"model_step{n:07d}.safetensors",
                      half / "weights" / f"model_step{n:07d}.safetensors")
    opt_full = json.loads((_state(full, n) / "trainer.json").read_text())["optimizer"]
    opt_half = json.loads((_state(half, n) / "trainer.json").read_text())["optimizer"]
    assert opt_full == opt_half
    # The log is the same run's log: one line per step, the resumed part continuing it.
    assert [r["step"] for r in _log(half)] == list(range(1, n + 1))
    assert [r["loss"] for r in _log(half)] == [r["loss"] for r in _log(full)]

    # The check has teeth: without the dropout RNG state the resumed run differs.
    # (removed from the state's record of its files too, as resuming on more processes than
    # the state had finds no file for the new ranks; a file just missing is refused as damage)
    (_state(spare, n // 2) / "rng_rank0.safetensors").unlink()
    record = json.loads((_state(spare, n // 2) / "trainer.json").read_text())
    del record["files"]["rng_rank0.safetensors"]
    (_state(spare, n // 2) / "trainer.json").write_text(json.dumps(record))
    train(_cfg(*common, f"train.max_steps={n}"), spare, resume=True, progress=False)
    assert _differs(_state(full, n) / "model.safetensors", _state(spare, n) / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# 3. The out dir: --resume on a new one, refusing a non-empty one or a file, incompatible resumes.


@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_resume_on_new_out_dir_starts_fresh(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            exists: bool) -> None:
    out = tmp_path / "new"
    if exists:
        out.mkdir()
    rc = cli.main(["train", *TINY, "train.max_steps=2", "--out-dir", str(out), "--resume",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "no saved state" in err and "starting a fresh run" in err
    assert {p.name for p in _state(out, 2).iterdir()} == GUIDED_STATE_FILES  # guide: step 1


def test_non_empty_out_dir_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    (out / "state" / "step0000002").mkdir(parents=True)
    (out / "state" / "step0000002" / "trainer.json").write_text("{}")
    (out / "notes.txt").write_text("my notes")
    before = _snapshot(out)
    r = _diffunet("train", *TINY, "train.max_steps=2", "--out-dir", str(out), "--no-progress")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("diffunet train: error: --out-dir") and "--resume" in lines[0]
    assert _snapshot(out) == before


def test_out_dir_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "file.txt"
    out.write_text("x")
    rc = cli.main(["train", *TINY, "train.max_steps=2", "--out-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "is a file" in err
    assert out.read_text() == "x"


@pytest.mark.parametrize("change, key", [
    ("unet.base_channels=16", "unet.base_channels"),
    ("train.batch_size=8", "train.batch_size"),
])
def test_resume_with_other_model_settings_is_refused(tmp_path: Path, change: str,
                                                     key: str) -> None:
    out = tmp_path / "run"
    train(_cfg("train.max_steps=2"), out, progress=False)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=re.escape(key)):
        train(_cfg("train.max_steps=4", change), out, resume=True, progress=False)
    assert _snapshot(out) == before


def test_resume_without_config_continues_saved_config(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    first = [*TINY, "train.max_steps=2", "train.log_every=1", "train.lr=5e-4"]
    assert cli.main(["train", *first, "--out-dir", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    rc = cli.main(["train", "train.max_steps=4", "--out-dir", str(out), "--resume",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"resuming from {_state(out, 2)} (step 2)" in err
    saved = run_config_from_dict(json.loads((out / "config.json").read_text()))
    assert saved == load_config(None, [*first, "train.max_steps=4"])
    assert json.loads((_state(out, 4) / "trainer.json").read_text())["step"] == 4
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]
    assert all(r["lr"] == pytest.approx(5e-4) for r in _log(out)[1:])


def test_resume_from_older_state_drops_later_log_lines(tmp_path: Path) -> None:
    # As after a crash between writing a log line and saving the state: the resumed run logs
    # those steps again, and the log keeps one line per step.
    out = tmp_path / "run"
    common = ["train.log_every=1", "train.save_every=2", "train.keep_last=5"]
    train(_cfg(*common, "train.max_steps=3"), out, progress=False)
    shutil.rmtree(_state(out, 3))
    assert [r["step"] for r in _log(out)] == [1, 2, 3]
    result = train(_cfg(*common, "train.max_steps=4"), out, resume=True, progress=False)
    assert result.step == 4
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step0000002", "step0000004"]


# ---------------------------------------------------------------------------------------------
# 4. Two processes (gloo on the CPU) give the single-process run.


def _launch(out: Path, overrides: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return launch_two(["train", *overrides, "--out-dir", str(out), "--no-progress"], env,
                      timeout=180)


@pytest.mark.slow
@pytest.mark.parametrize("task", [[], ["data.task=inpaint", "train.label_dropout=0.5"]],
                         ids=["unconditional", "inpaint"])
def test_two_processes_match_one(tmp_path: Path, task: list[str]) -> None:
    """(inpaint: its holes and condition dropout are drawn for the global batch and sliced)"""
    overrides = [*TINY, "train.max_steps=4", "train.log_every=2", "train.save_every=2",
                 "train.sample_every=4", "unet.dropout=0.0", "data.random_flip=true", *task]
    two, one = tmp_path / "two", tmp_path / "one"
    r = _launch(two, overrides, cpu_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("model file") == 1  # only the main process talks
    assert [rec["step"] for rec in _log(two)] == [2, 4]  # one log, written once
    assert sorted(p.name for p in (two / "state").iterdir()) == ["step0000002", "step0000004"]
    assert {p.name for p in _state(two, 4).iterdir()} == GUIDED_STATE_FILES | {
        "rng_rank1.safetensors"}
    assert json.loads((_state(two, 4) / "trainer.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (two / "samples").iterdir()) == ["step0000004.png"]
    assert _leftovers(two) == []

    train(load_config(None, overrides), one, progress=False)
    for rel in ("weights/model_step0000004.safetensors", "state/step0000004/model.safetensors",
                "state/step0000004/ema.safetensors", "state/step0000004/phema.safetensors",
                "phema/step0000004-sr0.05.safetensors"):
        _assert_close(two / rel, one / rel, atol=1e-5)
    for a, b in zip(_log(two), _log(one)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        # the gradients are all-reduced before their norm: the same as one process's
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["grad_clipped"] == b["grad_clipped"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs this launch is a real 2-GPU run")
def test_two_processes_without_cpu_flag_are_refused(tmp_path: Path) -> None:
    # Without ACCELERATE_USE_CPU and without a GPU, Accelerate gives each process a world of
    # one: two lone runs writing one folder. train() refuses before touching the folder.
    out = tmp_path / "run"
    env = cpu_env()
    del env["ACCELERATE_USE_CPU"]
    r = _launch(out, [*TINY, "train.max_steps=2"], env)
    assert r.returncode != 0
    assert r.stderr.count("diffunet train: error: launched as 2 processes") == 1
    assert "ACCELERATE_USE_CPU=1" in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_run_folder_other_nodes_cannot_see_is_refused(tmp_path: Path) -> None:
    # Two processes, as on two nodes without a shared file system: the second does not see
    # what the first writes into --out-dir (here: it is told the main process's marker is not
    # there). Every process writes its part of a state there, so the run is refused at start.
    script = tmp_path / "other_node.py"
    script.write_text(
        "import os, pathlib, sys\n"
        "if os.environ.get('RANK') == '1':\n"
        "    real = pathlib.Path.exists\n"
        "    pathlib.Path.exists = lambda p: False if p.name.startswith('.shared-') "
        "else real(p)\n"
        "from diffunet.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n")
    out = tmp_path / "run"
    r = launch_two(["train", *TINY, "train.max_steps=2", "--out-dir", str(out),
                    "--no-progress"], cpu_env(), timeout=180, script=str(script))
    assert r.returncode != 0
    assert r.stderr.count("diffunet train: error: --out-dir") == 1, r.stderr[-2000:]
    assert "is not the same folder for process 1" in r.stderr
    assert "a file system all nodes share" in r.stderr
    assert not out.exists()  # the marker is gone, and so is the folder the run made


# ---------------------------------------------------------------------------------------------
# 5. SIGTERM / SIGINT: save, say so, exit 0; --resume goes on from there.


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_saves_and_resume_continues(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           signame: str) -> None:
    out = tmp_path / "run"
    settings = [*TINY, "unet.dropout=0.3", "train.log_every=1", "train.save_every=100000",
                "train.sample_every=100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffunet", "train", *settings, "train.max_steps=100000",
         "--out-dir", str(out), "--no-progress"],
        env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        log = out / "log.jsonl"
        while not (log.is_file() and log.read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no log line within 60 s"
            time.sleep(0.05)
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    m = re.search(rf"stopped by {signame} at step (\d+); state saved in (\S+); "
                  r"continue with --resume", err)
    assert m, err
    n = int(m.group(1))
    assert Path(m.group(2)) == _state(out, n)
    assert [p.name for p in (out / "state").iterdir()] == [f"step{n:07d}"]
    assert {p.name for p in _state(out, n).iterdir()} == STATE_FILES
    assert json.loads((_state(out, n) / "trainer.json").read_text())["step"] == n
    assert (out / "weights" / f"model_step{n:07d}.safetensors").is_file()
    assert _log(out)[-1]["step"] == n
    assert _leftovers(out) == []

    rc = cli.main(["train", f"train.max_steps={n + 2}", "--out-dir", str(out), "--resume",
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"(step {n})" in err
    assert sorted(p.name for p in (out / "state").iterdir()) == [f"step{n:07d}",
                                                                 f"step{n + 2:07d}"]
    assert [r["step"] for r in _log(out)] == list(range(1, n + 3))
    assert _leftovers(out) == []

    # Stopped, saved in one process and resumed in another: the uninterrupted run's weights.
    whole = tmp_path / "whole"
    train(load_config(None, [*settings, f"train.max_steps={n + 2}"]), whole, progress=False)
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        _assert_identical(_state(whole, n + 2) / name, _state(out, n + 2) / name)


# ---------------------------------------------------------------------------------------------
# 6. Non-finite losses: skipped steps, and a clear stop when nothing else happens.


def test_nonfinite_steps_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = training.step_loss  # the objective train() runs (every formulation's)

    def flaky(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss  # the second step

    monkeypatch.setattr(training, "step_loss", flaky)
    out = tmp_path / "run"
    result = train(_cfg("train.max_steps=4", "train.save_every=1", "train.keep_last=10",
                        "train.log_every=1"), out, progress=False)
    assert result.step == 4 and result.nonfinite_skipped == 1
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        _assert_identical(_state(out, 1) / name, _state(out, 2) / name)  # step 2 changed nothing
    # step 3 trained again
    assert _differs(_state(out, 2) / "model.safetensors", _state(out, 3) / "model.safetensors")
    log = _log(out)
    assert [r["nonfinite_skipped"] for r in log] == [0, 1, 1, 1]
    assert log[1]["loss"] is None and all(isinstance(r["loss"], float) for r in log[2:])


def test_only_nonfinite_losses_stop_with_advice(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    real = training.step_loss

    def nan_loss(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * float("nan")

    monkeypatch.setattr(training, "step_loss", nan_loss)
    with pytest.raises(TrainingError) as info:
        train(_cfg("train.max_steps=50", "train.max_nonfinite=3"), tmp_path / "run",
              progress=False)
    msg = str(info.value)
    assert len(calls) == 3
    assert "\n" not in msg
    assert "non-finite for 3 steps in a row" in msg
    assert "train.lr" in msg and "train.grad_clip" in msg and "train.mixed_precision" in msg


def _spy_grad_norms(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The global norm of every step's gradients, as torch computes it, before the step's
    clipping (recorded as ``_update`` starts)."""
    norms: list[float] = []
    real = training._update

    def spy(run, cfg, model, *args, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
            norms.append(float(torch.nn.utils.get_total_norm(grads)))
        else:
            norms.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))))
        return real(run, cfg, model, *args, **kwargs)

    monkeypatch.setattr(training, "_update", spy)
    return norms


@pytest.mark.parametrize("clip", ["1.0", "none"])
def test_the_log_holds_the_gradient_norm_before_clipping(tmp_path: Path, clip: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    norms = _spy_grad_norms(monkeypatch)
    train(_cfg("train.max_steps=3", "train.log_every=1", f"train.grad_clip={clip}"),
          tmp_path / "run", progress=False)
    log = _log(tmp_path / "run")
    assert len(norms) == 3 and all(n > 0 for n in norms)
    assert [r["grad_norm"] for r in log] == pytest.approx(norms, rel=1e-5)
    if clip == "none":
        assert all("grad_clipped" not in r for r in log)  # nothing is clipped
    else:
        assert [r["grad_clipped"] for r in log] == [float(n > 1.0) for n in norms]


def test_grad_clipped_is_the_share_of_the_intervals_steps_over_the_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every other step's loss (so its gradient) scaled by 100: norms of about 2 and 200, and a
    # limit of 20 between them clips two of the four steps of the interval.
    norms = _spy_grad_norms(monkeypatch)
    calls = []
    real = training.step_loss

    def every_other_big(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * (100.0 if len(calls) % 2 else 1.0)

    monkeypatch.setattr(training, "step_loss", every_other_big)
    train(_cfg("train.max_steps=4", "train.log_every=4", "train.grad_clip=20"),
          tmp_path / "run", progress=False)
    (rec,) = _log(tmp_path / "run")
    assert [n > 20 for n in norms] == [True, False, True, False], norms
    assert rec["grad_clipped"] == 0.5
    assert rec["grad_norm"] == pytest.approx(sum(norms) / 4, rel=1e-5)


def test_a_skipped_step_leaves_the_gradient_norm_out(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    norms = _spy_grad_norms(monkeypatch)
    calls = []
    real = training.step_loss

    def second_is_nan(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(training, "step_loss", second_is_nan)
    train(_cfg("train.max_steps=3", "train.log_every=3"), tmp_path / "run", progress=False)
    (rec,) = _log(tmp_path / "run")
    assert rec["nonfinite_skipped"] == 1
    assert rec["grad_norm"] == pytest.approx((norms[0] + norms[2]) / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# 7. Gradient accumulation is the same step as one big batch.


def test_grad_accumulation_matches_full_batch(tmp_path: Path) -> None:
    common = ["train.batch_size=8", "train.max_steps=3", "unet.dropout=0.0"]
    train(_cfg(*common, "train.grad_accum_steps=2"), tmp_path / "accum", progress=False)
    train(_cfg(*common), tmp_path / "full", progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        _assert_close(_state(tmp_path / "accum", 3) / name, _state(tmp_path / "full", 3) / name,
                      atol=1e-6)
    # EMA weights trail the raw ones.
    assert _differs(_state(tmp_path / "full", 3) / "model.safetensors",
                    _state(tmp_path / "full", 3) / "ema.safetensors")


# ---------------------------------------------------------------------------------------------
# 8. Learning rate and EMA.


def test_lr_warmup_then_constant() -> None:
    cfg = _cfg("train.lr=1e-3", "train.warmup_steps=4", "train.max_steps=20")
    got = [lr_at(cfg, s) for s in range(8)]
    assert got == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    assert lr_at(cfg, 19) == pytest.approx(1e-3)
    no_warmup = _cfg("train.lr=1e-3", "train.warmup_steps=0")
    assert lr_at(no_warmup, 0) == pytest.approx(1e-3)


def test_lr_cosine_decays_to_zero() -> None:
    cfg = _cfg("train.lr=1e-3", "train.warmup_steps=4", "train.max_steps=20",
               "train.lr_schedule=cosine")
    got = [lr_at(cfg, s) for s in range(21)]
    assert got[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert got[4] == pytest.approx(1e-3)
    assert got[12] == pytest.approx(5e-4)  # half way through the decay
    assert all(a >= b for a, b in zip(got[4:], got[5:]))
    assert got[19] < 2e-5 and got[20] == pytest.approx(0.0, abs=1e-12)


def test_lr_linear_decays_to_zero_at_max_steps_after_the_warmup() -> None:
    cfg = _cfg("train.lr=1e-3", "train.warmup_steps=4", "train.max_steps=20",
               "train.lr_schedule=linear")
    got = [lr_at(cfg, s) for s in range(21)]
    assert got[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # warm-up, unchanged
    assert got[4] == pytest.approx(1e-3)  # the decay starts at the peak ...
    assert got[12] == pytest.approx(5e-4)  # ... is half way at the middle of its 16 steps ...
    assert all(a - b == pytest.approx(1e-3 / 16) for a, b in zip(got[4:], got[5:]))  # a line
    # ... and the last optimizer step (max_steps - 1) still moves the weights, by lr / 16;
    # the line reaches 0 at max_steps, a step that is never taken
    assert got[19] == pytest.approx(1e-3 / 16) and got[20] == 0.0
    assert lr_at(_cfg("train.lr_schedule=linear", "train.warmup_steps=0",
                      "train.max_steps=10"), 0) == pytest.approx(1e-3)


def test_ema_decay_and_update() -> None:
    net = UNet(_cfg().unet)
    ema = EMA(net, 0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(1 / 10)
    assert ema.decay_at(10) == pytest.approx(11 / 20)
    assert ema.decay_at(10**6) == pytest.approx(0.999)
    assert EMA(net, 0.999, warmup=False).decay_at(0) == 0.999
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())

    ema = EMA(net, 0.9, warmup=False)
    old = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, step=0)
    for e, o, p in zip(ema.model.parameters(), old, net.parameters()):
        torch.testing.assert_close(e, 0.9 * o + 0.1 * p)


# ---------------------------------------------------------------------------------------------
# 9. Class-conditional models need labels that fit.


def test_num_classes_must_match_data(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"unet\.num_classes is 3 but the data set has 4 classes"):
        train(_cfg("unet.num_classes=3", "train.max_steps=2"), out, progress=False)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 10. One writer per run folder.


def test_one_writer_per_run_folder_and_a_killed_holder_leaves_no_lock(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from diffunet.runs import lock_folder\nlock = lock_folder(Path(sys.argv[1]))\n"
         "print('locked', flush=True)\ntime.sleep(120)\n", str(out)],
        env=cpu_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["train", *TINY, "train.max_steps=2", "--out-dir", str(out), "--resume",
                "--no-progress"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"diffunet train: error: {out} is in use by another diffunet run "
                       f"(process {holder.pid}); wait for it to finish or stop it, or choose "
                       "another --out-dir")
        assert list(out.iterdir()) == []  # the refused run wrote nothing
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    reset_accelerate_state()
    assert cli.main(argv) == 0, capsys.readouterr().err  # the kernel released the lock
    assert (out / "state" / "step0000002").is_dir()


def test_a_batch_the_machine_cannot_hold_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^training a UNet of .* parameters .* on "
                                          r"train\.batch_size=1000000000000 images of 3x16x16 "
                                          r"needs .* GiB of activations, more than the"):
        train(_cfg("train.batch_size=1000000000000"), out, progress=False)
    assert not out.exists()


def test_header_then_preview_and_model_file_at_the_last_step(tmp_path: Path) -> None:
    out = tmp_path / "run"
    said: list[str] = []
    train(_cfg("train.max_steps=5", "train.sample_every=3", "train.save_every=4"), out,
          progress=False, say=said.append)
    header = said[:5]
    assert header[0] == ("data: builtin shapes (generated), 64 images of 16x16 RGB, 4 classes "
                         "(circle, square, triangle, cross); the labels are unused: "
                         "unet.num_classes is unset")
    assert re.fullmatch(r"model: UNet, [0-9,]+ parameters \(0\.\d\dM; base_channels 8, "
                        r"channel_mults \(1, 2\)\); flow matching \(rectified flow\): "
                        r"velocity prediction, logit-normal t \(0\.0, 1\.0\), shift 1\.0",
                        header[1]), header[1]
    assert header[2] == "device: cpu, precision fp32, 1 process"
    assert header[3] == ("batch: 4 global, 4 per process; steps 0 -> 5, preview every 3, save "
                         "every 4 and at the last step; carried guide: the EMA of step 2")
    assert header[4] == f"out-dir: {out}, a fresh run"
    # 5 is no multiple of sample_every or save_every: the last step still gets both
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step0000003.png", "step0000005.png"]
    assert sorted(p.name for p in (out / "weights").iterdir()) == [
        "model_step0000004.safetensors", "model_step0000005.safetensors"]

    said.clear()
    train(_cfg("train.max_steps=6", "train.sample_every=3", "train.save_every=4",
               "train.grad_accum_steps=2"), out, resume=True, progress=False, say=said.append)
    assert said[0] == f"resuming from {_state(out, 5)} (step 5)"
    # max_steps 6 moves the guide step to 3, which the run passed: it keeps its guide of step 2
    assert said[1].startswith("note: the carried guide stays the EMA of step 2")
    assert "batch: 4 global, 4 per process in 2 micro-batches of 2; steps 5 -> 6" in said[5]
    assert said[6] == f"out-dir: {out}, resumed from {_state(out, 5)} at step 5"


# ---------------------------------------------------------------------------------------------
# 9b. Class folders: unet.num_classes and the class names follow the data.


CLASSES = ["cat", "dog", "fish"]


def _class_folder_run(tmp_path: Path) -> list[str]:
    """Run arguments of a 2-step tiny run on 3 class folders of 3 8x8 PNGs each."""
    data = tmp_path / "pets"
    for k, name in enumerate(CLASSES):
        (data / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (100 * k, 60 * i, 200)).save(data / name / f"{i}.png")
    return tiny_run("data.source=folder", f"data.path={data}", "data.class_folders=true",
                    "train.max_steps=2", image_size=8)


def test_class_folders_set_num_classes_and_name_the_labels(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    args = _class_folder_run(tmp_path)
    assert cli.main(["train", *args, "--dry-run", "--out-dir", str(tmp_path / "dry")]) == 0
    dry = capsys.readouterr().out
    assert "num_classes = 3" in dry and "# classes (unet.num_classes): 3 (cat, dog, fish)" in dry
    out = tmp_path / "run"
    result = train(load_config(None, args), out, progress=False)
    net, _, meta = load_model(result.model_path)
    assert net.config.num_classes == 3 and meta["class_names"] == CLASSES
    assert json.loads((out / "config.json").read_text())["unet"]["num_classes"] == 3

    assert cli.main(["info", str(result.model_path)]) == 0
    assert "classes          3: 0 cat, 1 dog, 2 fish" in capsys.readouterr().out
    assert cli.main(["info", str(result.model_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] == CLASSES

    def sample(*labels: str) -> int:
        return cli.main(["sample", str(result.model_path), "--out-dir", str(tmp_path / "s"),
                         "--num-samples", "3", "--steps", "2", "--no-progress",
                         "--class-label", *labels])

    assert sample("fish,cat") == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["labels"] == [2, 0, 2] and manifest["settings"]["class_labels"] == [2, 0]
    assert sample("dgo") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no class 'dgo'; did you mean 'dog'?" in err[0]
    assert "cat, dog, fish" in err[0]


def test_num_classes_that_differs_from_the_class_folders_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = _class_folder_run(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", *args, "unet.num_classes=4", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unet.num_classes is 4" in err[0] and "3 class folders" in err[0]
    assert "data.class_folders=true" in err[0] and not out.exists()
    # the same number is fine
    cfg = training.fit_classes_to_data(load_config(None, [*args, "unet.num_classes=3"]), CLASSES)
    assert cfg.unet.num_classes == 3


def test_header_config_line_names_the_toml_the_overrides_or_the_defaults(tmp_path: Path
                                                                         ) -> None:
    from diffunet.cli.common import describe_config

    run = tmp_path / "run"
    assert describe_config(["configs/mnist.toml", "train.max_steps=500", "unet.dropout=0.1"],
                           run, False) == ("config: configs/mnist.toml with train.max_steps=500 "
                                           "unet.dropout=0.1")
    assert describe_config([], run, False) == "config: the built-in defaults (no CONFIG.toml)"
    assert describe_config(["train.max_steps=9"], run, True) == (
        "config: the built-in defaults (no CONFIG.toml) with train.max_steps=9")
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert describe_config(["train.max_steps=9"], run, True) == (
        f"config: {run / 'config.json'} (the run's own) with train.max_steps=9")


def test_cli_train_prints_the_config_line_first(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    from diffunet import cli

    toml = tmp_path / "tiny.toml"
    toml.write_text("[train]\nmax_steps = 1\n")
    assert cli.main(["train", str(toml), *tiny_run("train.max_steps=1"), "--out-dir",
                     str(tmp_path / "run"), "--no-progress"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"config: {toml} with "), err[0]
    assert err[1].startswith("data: ")
