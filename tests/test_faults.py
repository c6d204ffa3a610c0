"""Faults: nothing is lost when a run is killed, interrupted, runs out of disk or goes non-finite.

- Training killed with SIGKILL at seeded-random moments, many times over (some kills timed to
  land inside a save): every ``state/step*`` folder left behind is complete, ``--resume`` picks
  the newest one, and the finished run's weights, optimizer, RNG and log equal an uninterrupted
  run's bit for bit.
- SIGTERM / SIGINT arriving in the middle of a save: the state is saved, exit code 0, and the
  resumed run equals the uninterrupted one.
- A full disk, a file-size limit or a read-only run folder during a save: one line naming the
  problem and the fix, exit code 2, the previous checkpoint byte-for-byte untouched, no
  half-written state left, and ``--resume`` goes on once the problem is gone.
- Non-finite losses (injected): skipped and counted; a run that only produces them stops with a
  one-line message.
- ``diffunet sample`` of 1500 images killed repeatedly: every image exactly once, never redrawn,
  byte-identical to an uninterrupted run's, no temporary files left.

Everything runs on the CPU with tiny models. Runs are subprocesses (``python -m diffunet``,
one intra-op thread) so that SIGKILL, exit codes and stderr are the real ones; the disk tests
that need to inject a failure run the command line in-process instead and say why.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffunet
from diffunet import NoiseSchedule, ScheduleConfig, UNet, UNetConfig, cli
from diffunet.sampling import GRID, MANIFEST, image_name
from helpers import RUN_HEADER, tiny_run
from processes import cpu_env, reset_accelerate_state

# A tiny run: 8x8 images, two levels, attention at 4x4, dropout and flips (so the RNG state
# matters), a save and post-hoc EMA snapshots after every step and a preview every 7 steps (so
# kills land in all three).
TRAIN = tiny_run("unet.dropout=0.3", "data.random_flip=true", "train.log_every=1",
                 "train.save_every=1", "train.sample_every=7", "train.keep_last=2",
                 "train.phema_every=1", image_size=8)
STEPS = 30
STATE_FILES = {"model.safetensors", "ema.safetensors", "phema.safetensors",
               "optimizer.safetensors", "rng.safetensors", "rng_rank0.safetensors",
               "trainer.json"}
COMPARED = ("model.safetensors", "ema.safetensors", "phema.safetensors", "optimizer.safetensors",
            "rng.safetensors", "rng_rank0.safetensors")


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "diffunet", "train", *TRAIN, f"train.max_steps={STEPS}",
            *extra, "--out-dir", str(out), "--resume", "--no-progress"]


def _start(cmd: list[str], log: Path, **popen) -> subprocess.Popen:
    """Start ``cmd`` with stdout and stderr going to ``log`` (readable after a SIGKILL)."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=cpu_env(), stdout=f, stderr=subprocess.STDOUT, **popen)


def _wait_until(proc: subprocess.Popen, done, timeout: float = 120, poll: float = 0.002) -> bool:
    """Poll ``done()`` until it is true (True) or ``proc`` has exited (False)."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "no progress within the timeout"
        time.sleep(poll)
    return True


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=120)


def _state(out: Path, step: int) -> Path:
    return out / "state" / f"step{step:07d}"


def _saving(out: Path) -> bool:
    """True while a state is being written (its temporary folder exists)."""
    try:
        return any(name.startswith(".tmp-step") for name in os.listdir(out / "state"))
    except FileNotFoundError:
        return False


def _writing_model_file(out: Path) -> bool:
    """True while a model file is being written (its temporary file exists)."""
    try:
        return any(name.endswith(".tmp") for name in os.listdir(out / "weights"))
    except FileNotFoundError:
        return False


def _complete_states(out: Path, files: set[str] = STATE_FILES) -> dict[int, Path]:
    """Every ``state/step*`` folder, each checked to be whole: all ``files`` there and
    readable."""
    found = {}
    root = out / "state"
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.name.startswith("."):
            continue
        m = re.fullmatch(r"step(\d{7})", p.name)
        assert m and p.is_dir(), f"unexpected entry {p}"
        trainer = json.loads((p / "trainer.json").read_text())
        # a state at or after the carried guide's step (train.guide_at) also keeps the guide
        want = files | ({"guide.safetensors"} if trainer.get("guide_step") else set())
        assert {f.name for f in p.iterdir()} == want, f"{p} is not complete"
        assert trainer["step"] == int(m.group(1))
        for name in sorted(want - {"trainer.json"}):
            load_file(str(p / name))  # raises on a truncated or damaged file
        found[int(m.group(1))] = p
    return found


def _leftovers(out: Path) -> list[Path]:
    """Temporary files or folders of interrupted writes, anywhere in the run folder."""
    return [p for p in out.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".tmp")]


def _log_steps(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]


def _assert_same_run(out: Path, ref: Path, step: int) -> None:
    """``out`` ends exactly where the uninterrupted ``ref`` does: weights, EMA, optimizer, RNG,
    the model file and the log (one line per step, the same losses)."""
    for name in COMPARED:
        a, b = load_file(str(_state(out, step) / name)), load_file(str(_state(ref, step) / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs from the uninterrupted run"
    ta = json.loads((_state(out, step) / "trainer.json").read_text())
    tb = json.loads((_state(ref, step) / "trainer.json").read_text())
    assert ta["optimizer"] == tb["optimizer"] and ta["step"] == tb["step"] == step
    weights = f"weights/model_step{step:07d}.safetensors"
    a, b = load_file(str(out / weights)), load_file(str(ref / weights))
    assert all(torch.equal(a[k], b[k]) for k in b) and a.keys() == b.keys()
    log, ref_log = _log_steps(out), _log_steps(ref)
    assert [r["step"] for r in log] == list(range(1, step + 1))  # every step exactly once
    assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]
    # every post-hoc EMA snapshot there, once, with the uninterrupted run's weights
    names = sorted(p.name for p in (out / "phema").iterdir())
    assert names == sorted(p.name for p in (ref / "phema").iterdir())
    for name in names:
        a, b = load_file(str(out / "phema" / name)), load_file(str(ref / "phema" / name))
        assert all(torch.equal(a[k], b[k]) for k in b) and a.keys() == b.keys(), name


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = subprocess.run(_train_cmd(out), env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


# ---------------------------------------------------------------------------------------------
# 1. SIGKILL at random moments, including during saves.


@pytest.mark.slow
def test_training_survives_repeated_sigkill(tmp_path: Path, reference_run: Path) -> None:
    rng = random.Random(6)  # the kill schedule is reproducible; the machine's timing is not
    # "early": anywhere from start-up to the first steps (imports, resume, log rewrite, ...);
    # "random": a random moment once the run has saved at least one new state;
    # "save": the moment a state's temporary folder appears, i.e. in the middle of a save;
    # "model-file": the moment the model file's temporary file appears (later in the save).
    modes = ["early", "random", "save", "model-file", "random", "save", "model-file", "random",
             "early", "save"]
    out = tmp_path / "run"
    newest = None
    interrupted_saves = interrupted_model_files = 0
    for attempt, mode in enumerate(modes):
        log = tmp_path / f"attempt{attempt}.log"
        start = max(_complete_states(out), default=0) if out.exists() else 0
        proc = _start(_train_cmd(out), log)
        if mode == "early":
            time.sleep(rng.uniform(0.0, 3.0))
        else:
            # first at least one new state (unless the run ends first: a slow machine is fine)
            _wait_until(
                proc, lambda: _state(out, start + 1).is_dir() or _state(out, start + 2).is_dir())
            if mode == "random":
                time.sleep(rng.uniform(0.0, 0.15))
            elif mode == "save":
                _wait_until(proc, lambda: _saving(out), timeout=30, poll=0.0005)
            else:
                _wait_until(proc, lambda: _writing_model_file(out), timeout=30, poll=0.0002)
        rc = _kill(proc)
        text = log.read_text()
        assert "Traceback" not in text, text
        # If it got that far, the run started from the newest complete state the previous
        # kill left behind, or fresh if there was none.
        found = re.search(r"resuming from (\S+) \(step (\d+)\)", text)
        if found:
            assert newest is not None and Path(found[1]) == newest, text
            assert int(found[2]) == int(newest.name[4:]), text
        elif "starting a fresh run" in text:
            assert newest is None, text
        interrupted_saves += _saving(out)
        interrupted_model_files += _writing_model_file(out)
        states = _complete_states(out)  # never a partial or damaged state
        newest = states[max(states)] if states else None
        if rc == 0:  # it finished before the kill (a slow machine): fine
            break

    final = subprocess.run(_train_cmd(out), env=cpu_env(), capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr
    if newest is not None:
        step = int(newest.name[4:])
        assert f"resuming from {newest} (step {step})" in final.stderr
    # Evidence that kills landed inside saves (else the test would prove little).
    assert interrupted_saves >= 1 and interrupted_model_files >= 1, (
        interrupted_saves, interrupted_model_files)
    assert sorted(_complete_states(out)) == [STEPS - 1, STEPS]  # keep_last=2
    assert _leftovers(out) == []
    _assert_same_run(out, reference_run, STEPS)


def test_a_log_line_cut_short_is_dropped_on_resume(tmp_path: Path, capsys,
                                                   cpu_accelerate) -> None:
    # A kill in the middle of appending to log.jsonl can leave a torn last line. Resuming drops
    # it with every line past the resumed step, rather than failing to parse it.
    out = tmp_path / "run"
    rc, err = _train_in_process(out, 2, capsys, "train.log_every=1")
    assert rc == 0, err
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.9')
    rc, err = _train_in_process(out, 4, capsys, "train.log_every=1")
    assert rc == 0, err
    assert [r["step"] for r in _log_steps(out)] == [1, 2, 3, 4]


def test_a_delete_cut_short_leaves_no_partial_state(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Pruning old states can be killed half way through deleting one. The folder is renamed
    # out of the step* names first, so no half-deleted folder can pass for a state.
    import diffunet.state as st
    from diffunet.output_files import open_folder

    root = tmp_path / "state"
    for step in (1, 2, 3):
        (root / st.state_name(step)).mkdir(parents=True)
        for name in STATE_FILES:
            (root / st.state_name(step) / name).write_text("x")
    folder = open_folder(root, label="state")
    tmp = st.begin_state(folder, 4)
    for name in STATE_FILES:
        (tmp.path / name).write_text("{}" if name == "trainer.json" else "x")

    def killed_half_way(path, *args, dir_fd=None, **kwargs):  # deletes one file, then dies
        assert dir_fd is not None  # removed relative to state/'s descriptor, never by path
        sorted((root / path).iterdir())[0].unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        st.commit_state(folder, tmp, keep_last=2)
    monkeypatch.undo()
    tmp.close()
    states = st.complete_states(root)
    assert [step for step, _ in states] == [2, 3, 4]
    for _, found in states:
        assert {p.name for p in found.iterdir()} == STATE_FILES
    st.clear_leftovers(folder)  # what the next run does first
    folder.close()
    assert sorted(p.name for p in root.iterdir()) == ["step0000002", "step0000003",
                                                      "step0000004"]


# ---------------------------------------------------------------------------------------------
# 2. SIGTERM / SIGINT in the middle of a save.


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_during_a_save_saves_and_resumes(tmp_path: Path, reference_run: Path,
                                                signame: str) -> None:
    out = tmp_path / "run"
    proc = _start(_train_cmd(out), tmp_path / "first.log")
    try:
        assert _wait_until(proc, lambda: _state(out, 3).is_dir())
        assert _wait_until(proc, lambda: _saving(out), poll=0.0005)
        rc = _kill(proc, getattr(signal, signame))
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "first.log").read_text()
    assert rc == 0, text
    assert "Traceback" not in text
    m = re.search(rf"stopped by {signame} at step (\d+); state saved in (\S+); "
                  r"continue with --resume", text)
    assert m, text
    n = int(m.group(1))
    assert Path(m.group(2)) == _state(out, n) and max(_complete_states(out)) == n
    assert _leftovers(out) == []

    r = subprocess.run(_train_cmd(out), env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {_state(out, n)} (step {n})" in r.stderr
    _assert_same_run(out, reference_run, STEPS)


# ---------------------------------------------------------------------------------------------
# 3. A full disk or a read-only run folder during a save.


SMALL = [a for a in TRAIN if not a.startswith(("train.save_every", "train.sample_every",
                                                "train.phema_every"))] + [
    "train.save_every=2", "train.sample_every=1000", "train.log_every=1000",
    "train.phema_sigma_rels=[]"]  # the state's writes fail first (snapshots: their own test)
SMALL_STATE_FILES = STATE_FILES - {"phema.safetensors"}
SMALL_COMPARED = tuple(n for n in COMPARED if n in SMALL_STATE_FILES)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every path under ``folder`` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"",
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _train_in_process(out: Path, steps: int, capsys, *extra: str) -> tuple[int, str]:
    reset_accelerate_state()
    rc = cli.main(["train", *SMALL, f"train.max_steps={steps}", *extra, "--out-dir", str(out),
                   "--resume", "--no-progress"])
    return rc, capsys.readouterr().err


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@pytest.mark.parametrize("fault", ["state-file", "model-file", "read-only"])
def test_full_disk_or_read_only_during_a_save(tmp_path: Path, capsys, cpu_accelerate,
                                              monkeypatch: pytest.MonkeyPatch,
                                              fault: str) -> None:
    out = tmp_path / "run"
    rc, err = _train_in_process(out, 2, capsys)
    assert rc == 0, err
    before = _snapshot(_state(out, 2))
    weights_before = sorted(p.name for p in (out / "weights").iterdir())

    if fault == "state-file":
        # a state's files are written at its folder's descriptor (OpenFolder.write_file); the
        # disk fills after part of the third file is on disk
        from diffunet.output_files import OpenFolder

        real_write, calls = OpenFolder.write_file, []

        def full_disk(self, name, data, *args, **kwargs):
            if not self.path.name.startswith(".tmp-step"):
                return real_write(self, name, data, *args, **kwargs)
            calls.append(name)
            if len(calls) == 3:
                with self.writer(name) as f:
                    f.write(data[:100])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(self, name, data, *args, **kwargs)

        monkeypatch.setattr(OpenFolder, "write_file", full_disk)
        problem, fix = "no space left on device", "free space or choose another --out-dir"
    elif fault == "model-file":
        # With delayed allocation a full disk often shows up only when the data is flushed.
        if not Path("/proc/self/fd").is_dir():
            pytest.skip("needs /proc to see which file an fsync flushes")
        real_fsync = os.fsync

        def full_on_flush(fd):
            if "/weights/" in _fd_path(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", full_on_flush)
        problem, fix = "no space left on device", "free space or choose another --out-dir"
    elif os.geteuid() != 0:
        for sub in ("state", "weights"):  # a real read-only folder
            (out / sub).chmod(0o555)
        problem, fix = "permission denied", "make it writable or choose another --out-dir"
    else:
        # root writes through any chmod, and mounting a read-only file system needs privileges
        # CI may not have: fail the first write under the run folder as a read-only mount would.
        real_mkdir, root = os.mkdir, str(out)

        def read_only(path, *args, dir_fd=None, **kwargs):
            # folders are made at their parent's descriptor: where that is, from /proc
            where = os.path.join(_fd_path(dir_fd), path) if dir_fd is not None else str(path)
            if where.startswith(root):
                if os.path.lexists(where):  # as a read-only mount answers for what is there
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), where)
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), where)
            return real_mkdir(path, *args, dir_fd=dir_fd, **kwargs)

        monkeypatch.setattr(os, "mkdir", read_only)
        problem, fix = "read-only file system", "make it writable or choose another --out-dir"

    rc, err = _train_in_process(out, 4, capsys)
    monkeypatch.undo()
    for sub in ("state", "weights"):
        (out / sub).chmod(0o755)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert lines[-1] == (f"diffunet train: error: {problem} while saving state step0000004 to "
                         f"{out}; {fix}; the previous checkpoint step0000002 is intact "
                         "(--resume continues from it)"), err
    assert "Traceback" not in err
    assert _snapshot(_state(out, 2)) == before  # untouched, byte for byte
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step0000002"]
    assert sorted(p.name for p in (out / "weights").iterdir()) == weights_before
    assert _leftovers(out) == []

    # Once there is room again, --resume goes on from the intact checkpoint, losing nothing.
    rc, err = _train_in_process(out, 4, capsys)
    assert rc == 0, err
    assert f"resuming from {_state(out, 2)} (step 2)" in err
    ref = tmp_path / "ref"
    rc, err = _train_in_process(ref, 4, capsys)
    assert rc == 0, err
    for name in SMALL_COMPARED:
        a, b = load_file(str(_state(out, 4) / name)), load_file(str(_state(ref, 4) / name))
        assert all(torch.equal(a[k], b[k]) for k in b), name


def test_a_full_disk_during_a_post_hoc_ema_snapshot(tmp_path: Path, capsys, cpu_accelerate,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # the disk fills while the second profile's snapshot of step 3 is flushed: one line, the
    # state of step 2 and the snapshots already written untouched, no half-written file left,
    # and --resume then writes the same snapshots an uninterrupted run does
    phema = ("train.phema_sigma_rels=[0.05,0.1]", "train.phema_every=1")
    out = tmp_path / "run"
    rc, err = _train_in_process(out, 2, capsys, *phema)
    assert rc == 0, err
    before = _snapshot(out / "phema")
    real_fsync, calls = os.fsync, []

    def full_on_flush(fd):
        if "/phema/" in _fd_path(fd) and _fd_path(fd).endswith(".tmp"):
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_on_flush)
    rc, err = _train_in_process(out, 4, capsys, *phema)
    monkeypatch.undo()
    assert rc == 2, err
    assert err.strip().splitlines()[-1] == (
        f"diffunet train: error: no space left on device while writing the post-hoc EMA "
        f"snapshots of step 3 to {out}; free space or choose another --out-dir; the previous "
        "checkpoint step0000002 is intact (--resume continues from it)"), err
    assert {k: v for k, v in _snapshot(out / "phema").items() if "step0000003" not in k} == before
    assert _leftovers(out) == []
    rc, err = _train_in_process(out, 4, capsys, *phema)
    assert rc == 0, err
    ref = tmp_path / "ref"
    rc, err = _train_in_process(ref, 4, capsys, *phema)
    assert rc == 0, err
    names = sorted(p.name for p in (ref / "phema").iterdir())
    assert sorted(p.name for p in (out / "phema").iterdir()) == names and len(names) == 8
    for name in names:
        a, b = load_file(str(out / "phema" / name)), load_file(str(ref / "phema" / name))
        assert all(torch.equal(a[k], b[k]) for k in b), name


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["file-size-limit", "read-only"])
def test_a_failed_write_in_a_real_process(tmp_path: Path, fault: str) -> None:
    # Real failed writes, no mocking, through `python -m diffunet`:
    # - `ulimit -f` (RLIMIT_FSIZE) below a state file's size makes the kernel refuse the write
    #   (EFBIG; Python ignores SIGXFSZ), as a FAT32 disk does past 4 GiB;
    # - read-only state/ and weights/ folders (chmod). root writes through any chmod, so as
    #   root the run goes through `setpriv` without the capabilities that allow that.
    out = tmp_path / "run"
    args = ["train", *SMALL, "--out-dir", str(out), "--no-progress"]
    cmd = [sys.executable, "-m", "diffunet", *args]
    r = subprocess.run([*cmd, "train.max_steps=2"], env=cpu_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    before = _snapshot(_state(out, 2))
    env = cpu_env(PYTHONDONTWRITEBYTECODE="1")
    if fault == "file-size-limit":
        limited = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
                   "(16384, 16384)); sys.argv[0] = 'diffunet'; "
                   "runpy.run_module('diffunet', run_name='__main__')")
        faulty = [sys.executable, "-c", limited, *args]
        problem = "file too large"
        fix = "choose another --out-dir (its file system or a ulimit -f caps file sizes)"
    else:
        faulty = cmd
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("root ignores a read-only chmod, and setpriv is not installed")
            faulty = [setpriv, "--inh-caps=-all",
                      "--bounding-set=-dac_override,-dac_read_search,-fowner", *cmd]
        for sub in ("state", "weights"):
            (out / sub).chmod(0o555)
        problem, fix = "permission denied", "make it writable or choose another --out-dir"
    try:
        r = subprocess.run([*faulty, "train.max_steps=4", "--resume"], env=env,
                           capture_output=True, text=True, timeout=300)
    finally:
        for sub in ("state", "weights"):
            (out / sub).chmod(0o755)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"diffunet train: error: {problem} while saving state step0000004 to {out}; {fix}; the "
        "previous checkpoint step0000002 is intact (--resume continues from it)"), r.stderr
    assert "Traceback" not in r.stderr
    assert _snapshot(_state(out, 2)) == before
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step0000002"]
    assert _leftovers(out) == []
    r = subprocess.run([*cmd, "train.max_steps=4", "--resume"], env=cpu_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(_complete_states(out, SMALL_STATE_FILES)) == [2, 4]


# ---------------------------------------------------------------------------------------------
# 4. Non-finite losses, injected into a real command-line run.

# The test's own driver (not a hook in diffunet): wrap the loss so that the calls listed in
# NAN_AT (1-based; "all" for every call) come out NaN, then run the command line.
NAN_DRIVER = r"""
import os, sys
from diffunet import cli, training
real, calls, spec = training.step_loss, [], os.environ["NAN_AT"]
def loss(*args, **kwargs):
    calls.append(1)
    value = real(*args, **kwargs)
    bad = spec == "all" or str(len(calls)) in spec.split(",")
    return value * float("nan") if bad else value
training.step_loss = loss
raise SystemExit(cli.main(sys.argv[1:]))
"""


def _nan_run(out: Path, nan_at: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", NAN_DRIVER, "train", *TRAIN, *extra, "train.keep_last=10",
           "--out-dir", str(out), "--no-progress"]
    return subprocess.run(cmd, env=cpu_env(NAN_AT=nan_at), capture_output=True, text=True,
                          timeout=300)


def test_nonfinite_losses_are_skipped_and_counted(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _nan_run(out, "2,5", "train.max_steps=6")
    assert r.returncode == 0, r.stderr
    assert "skipped 2 step(s) with a non-finite loss" in r.stderr
    log = _log_steps(out)
    assert [rec["nonfinite_skipped"] for rec in log] == [0, 1, 1, 1, 2, 2]
    assert [rec["loss"] is None for rec in log] == [False, True, False, False, True, False]
    assert json.loads((_state(out, 6) / "trainer.json").read_text())["nonfinite_total"] == 2
    for before, skipped in ((1, 2), (4, 5)):  # a skipped step leaves every weight as it was
        for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
            a = load_file(str(_state(out, before) / name))
            b = load_file(str(_state(out, skipped) / name))
            assert all(torch.equal(a[k], b[k]) for k in a), (skipped, name)


def test_only_nonfinite_losses_stop_with_a_message(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _nan_run(out, "all", "train.max_steps=50", "train.max_nonfinite=3",
                 "train.save_every=100")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith(RUN_HEADER)]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("diffunet train: error: the loss was non-finite for 3 steps in a "
                               "row (step 3); try a lower train.lr"), lines[0]
    assert list((out / "state").iterdir()) == [] and list((out / "weights").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 5. A sampling run of 1500 images killed again and again.


def _png_names(folder: Path) -> list[str]:
    try:
        return [n for n in os.listdir(folder) if re.fullmatch(r"\d{6}\.png", n)]
    except FileNotFoundError:
        return []


@pytest.mark.slow
def test_sampling_survives_repeated_sigkill(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                          attn_resolutions=(), dropout=0.0, num_groups=4))
    with torch.no_grad():  # a fresh UNet's zero output layer would make every image alike
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = tmp_path / "tiny.safetensors"
    diffunet.save_model(model, net, NoiseSchedule(ScheduleConfig(num_train_timesteps=50)))
    n = 1500

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "diffunet", "sample", str(model), "--num-samples", str(n),
                "--batch-size", "16", "--sampler", "ddpm", "--steps", "6", "--seed", "11",
                "--device", "cpu", "--out-dir", str(out), "--no-progress"]

    ref = tmp_path / "ref"
    r = subprocess.run(cmd(ref), env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    rng = random.Random(11)
    out = tmp_path / "out"
    seen: dict[str, tuple[int, int]] = {}  # image -> (inode, mtime) when first seen on disk
    kills = 0
    for attempt in range(8):
        before = len(_png_names(out))
        proc = _start(cmd(out), tmp_path / f"attempt{attempt}.log")
        if attempt in (0, 4):  # anywhere in start-up or just after
            time.sleep(rng.uniform(0.0, 1.5))
        else:  # once it has drawn a random number of new images
            target = before + rng.randint(1, 120)
            _wait_until(proc, lambda: len(_png_names(out)) >= target, poll=0.001)
        finished = _kill(proc) == 0  # a slow machine may finish before the kill: fine
        kills += not finished
        text = (tmp_path / f"attempt{attempt}.log").read_text()
        assert "Traceback" not in text, text
        for name in _png_names(out):
            st = (out / name).stat()
            seen.setdefault(name, (st.st_ino, st.st_mtime_ns))
        if finished:
            break
    assert kills >= 5

    r = subprocess.run(cmd(out), env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    if seen:
        assert f"resuming: {len(seen)} of {n} images are already in {out}" in r.stderr
    # Every image exactly once: the numbered files, the grid and the manifest, nothing else.
    assert sorted(os.listdir(out)) == sorted([image_name(i) for i in range(n)] + [GRID, MANIFEST])
    for name, (ino, mtime) in seen.items():  # no image was drawn twice
        st = (out / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime), name
    for i in range(n):  # the uninterrupted run's images, byte for byte
        assert (out / image_name(i)).read_bytes() == (ref / image_name(i)).read_bytes(), i
    assert (out / GRID).read_bytes() == (ref / GRID).read_bytes()
    manifest, ref_manifest = (json.loads((d / MANIFEST).read_text()) for d in (out, ref))
    assert manifest["complete"] is True
    for key in ("settings", "timesteps", "labels", "num_samples", "model"):
        assert manifest[key] == ref_manifest[key]
