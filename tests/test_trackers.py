"""Experiment tracking and ``diffunet plot``: TensorBoard event files in ``RUN/tensorboard/``
(the logged numbers, the preview grids; a resumed run hides what it redoes), W&B offline in
``RUN/wandb/`` (when wandb is installed), nothing in the working directory, the bare-word
``train.trackers`` forms, a missing package refused in one line before the run folder exists,
and ``diffunet plot`` drawing ``log.jsonl`` (and refusing a missing or damaged one).

Every run is the tiny UNet of ``helpers.py`` for 2-4 steps, in this process on the CPU.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffunet import cli
from diffunet.config import TrainConfig, load_config, may_change_on_resume
from diffunet.errors import ConfigError, FolderError, MissingDependencyError
from helpers import tiny_run

pytestmark = pytest.mark.usefixtures("cpu_accelerate")

STEPS = ["train.max_steps=4", "train.log_every=1", "train.sample_every=2",
         "train.save_every=2"]


def _train(out: Path, *extra: str, resume: bool = False) -> int:
    return cli.main(["train", *tiny_run(*STEPS, *extra), "--out-dir", str(out), "--no-progress",
                     *(["--resume"] if resume else [])])


def _logged(out: Path) -> dict[int, float]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _events(folder: Path) -> object:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


# -- TensorBoard -------------------------------------------------------------------------------


def test_tensorboard_events_in_the_run_folder(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "run"
    assert _train(out, "train.trackers=[tensorboard]") == 0
    assert list(cwd.iterdir()) == []  # nothing in the working directory
    assert (out / "tensorboard").is_dir() and not (out / out.name).exists()
    assert all(p.is_file() and p.name.startswith("events.out.tfevents.")
               for p in (out / "tensorboard").iterdir())  # no sub-folder, no doubled folder
    acc = _events(out / "tensorboard")
    assert {"loss", "lr", "images_per_s"} <= set(acc.Tags()["scalars"])
    logged = _logged(out)
    assert [e.step for e in acc.Scalars("loss")] == sorted(logged) == [1, 2, 3, 4]
    for e in acc.Scalars("loss"):
        assert e.value == pytest.approx(logged[e.step], rel=1e-6)
    previews = acc.Images("preview")
    assert [e.step for e in previews] == [2, 4]
    with Image.open(out / "samples" / "step0000004.png") as grid:
        assert (previews[-1].width, previews[-1].height) == grid.size


def test_resumed_run_hides_the_redone_steps(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert _train(out, "train.trackers=tensorboard") == 0
    shutil.rmtree(out / "state" / "step0000004")  # as if killed after logging step 4
    assert _train(out, "train.trackers=tensorboard", resume=True) == 0  # redoes steps 3, 4
    logged = _logged(out)
    loss = _events(out / "tensorboard").Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]  # steps 3, 4 once: the resumed run's
    for e in loss:
        assert e.value == pytest.approx(logged[e.step], rel=1e-6)


# -- Weights & Biases, offline (only where wandb is installed) ---------------------------------


def test_wandb_offline_in_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "run"
    args = ("train.trackers=wandb", "train.tracker_project=study", "train.run_name=first")
    assert _train(out, "train.max_steps=2", *args) == 0
    assert list(cwd.iterdir()) == []
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert list(runs[0].glob("files/media/images/preview_2_*.png"))
    assert _train(out, *args, resume=True) == 0  # on to step 4: the same W&B run
    assert (out / "wandb_run_id.txt").read_text().strip() == run_id
    assert all(p.name.endswith(run_id) for p in (out / "wandb").glob("offline-run-*"))


# -- train.trackers and the tracker keys -------------------------------------------------------


@pytest.mark.parametrize("value, want", [
    ("[tensorboard]", ("tensorboard",)),
    ("[tensorboard, wandb]", ("tensorboard", "wandb")),
    ("tensorboard,wandb", ("tensorboard", "wandb")),
    ("tensorboard", ("tensorboard",)),
    ('["wandb"]', ("wandb",)),
    ("[]", ()),
])
def test_trackers_bare_words(value: str, want: tuple[str, ...]) -> None:
    assert load_config(None, [f"train.trackers={value}"]).train.trackers == want


def test_trackers_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[train]\ntrackers = ["tensorboard", "wandb"]\ntracker_project = "study"\n')
    t = load_config(path).train
    assert t.trackers == ("tensorboard", "wandb") and t.tracker_project == "study"
    assert t.run_name is None


@pytest.mark.parametrize("override, words", [
    ("train.trackers=tensorbord", "did you mean 'tensorboard'"),
    ("train.trackers=[mlflow]", "use tensorboard, wandb"),
    ("train.trackers=tensorboard,tensorboard", "twice"),
    ("train.tracker_project=a/b", "may not hold"),
    ("train.run_name=", "1 to 128 printable"),
])
def test_bad_tracker_settings(override: str, words: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0]) as e:
        load_config(None, [override])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_tracker_keys_may_change_on_resume() -> None:
    for name in ("trackers", "tracker_project", "run_name"):
        assert may_change_on_resume(TrainConfig, name)


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_missing_package_is_one_line_before_the_folder(
        package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # `import tensorboard` now fails
    out = tmp_path / "run"
    assert _train(out, f"train.trackers={package}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f'pip install "diffunet[{package}]"' in err, err
    assert not out.exists()


# -- diffunet plot -----------------------------------------------------------------------------


def _write_log(folder: Path, n: int = 30) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.jsonl", "w") as f:
        for i in range(1, n + 1):
            loss = None if i == 7 else 0.3 * math.exp(-i / 10) + 0.05 * (i % 3)
            f.write(json.dumps({"step": 10 * i, "loss": loss, "lr": 1e-3 * min(1, i / 5),
                                "images_per_s": 100 + i, "nonfinite_skipped": 0,
                                "grad_norm": 3.0 / i, "grad_clipped": float(i < 4)}) + "\n")


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    from diffunet.plots import PLOT_SIZE

    run = tmp_path / "run"
    _write_log(run)
    assert cli.main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "plot.png")
    with Image.open(run / "plot.png") as img:
        assert img.format == "PNG" and img.size == PLOT_SIZE
    other = tmp_path / "elsewhere.png"
    assert cli.main(["plot", str(run), "--out", str(other), "--smoothing", "0.5"]) == 0
    with Image.open(other) as img:
        assert img.size == PLOT_SIZE
    assert cli.main(["plot", str(run)]) == 0  # its own RUN/plot.png is refreshed


def test_plot_never_replaces_an_existing_out_file_unless_asked(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    _write_log(run)
    mine = tmp_path / "holiday.png"
    mine.write_bytes(b"someone's photo")
    assert cli.main(["plot", str(run), "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"diffunet plot: error: --out {mine} exists; give a new file name, or "
                   "--overwrite to replace it"]
    assert mine.read_bytes() == b"someone's photo"
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")  # a dangling link counts too
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "link.png")]) == 2
    assert cli.main(["plot", str(run), "--out", str(mine), "--overwrite"]) == 0
    with Image.open(mine) as img:
        assert img.format == "PNG"


def test_ema_smooth() -> None:
    from diffunet.plots import ema_smooth

    assert ema_smooth([2.0, 2.0, None, 2.0]) == [pytest.approx(2.0), pytest.approx(2.0), None,
                                                 pytest.approx(2.0)]  # debiased: no pull to 0
    y = ema_smooth([0.0, 1.0], alpha=0.5)
    assert y[1] == pytest.approx(0.5 * 1.0 / (1 - 0.25))


def test_read_curves_merges_neighbours_into_means_past_max_points(tmp_path: Path) -> None:
    # The log is streamed into at most 2 x max_points points, each the mean of a run of
    # consecutive records ending at its step; a short log's points are its records.
    from diffunet.plots import read_curves

    run = tmp_path / "run"
    run.mkdir()
    with open(run / "log.jsonl", "w") as f:
        for i in range(1, 101):
            f.write(json.dumps({"step": i, "loss": float(i), "lr": 2.0}) + "\n")
    assert read_curves(run)["loss"] == [(i, float(i)) for i in range(1, 101)]
    curves = read_curves(run, max_points=8)
    loss = curves["loss"]
    stride = loss[1][0] - loss[0][0]
    assert 8 <= len(loss) <= 16 and stride == 8 and loss[-1][0] == 100
    for step, mean in loss[:-1]:
        assert mean == step - (stride - 1) / 2  # the mean of steps step - stride + 1 .. step
    assert loss[-1][1] == (97 + 100) / 2  # the last run is partial: 97..100
    assert {v for _, v in curves["lr"]} == {2.0}
    assert {v for _, v in curves["images_per_s"]} == {None}  # never logged
    assert {v for _, v in curves["grad_norm"]} == {None}  # a log from before the norm was


def test_read_curves_reads_the_gradient_norm_and_the_clipped_share(tmp_path: Path) -> None:
    from diffunet.plots import read_curves

    _write_log(tmp_path / "run", n=5)
    curves = read_curves(tmp_path / "run")
    assert curves["grad_norm"] == [(10 * i, 3.0 / i) for i in range(1, 6)]
    assert curves["grad_clipped"] == [(10 * i, float(i < 4)) for i in range(1, 6)]


@pytest.mark.parametrize("make, words", [
    (lambda run: run.mkdir(), "log.jsonl not found"),
    (lambda run: None, "is not a folder"),
    (lambda run: (run.mkdir(), (run / "log.jsonl").write_text('{"loss": 1}\n')), "damaged"),
    (lambda run: (run.mkdir(), (run / "log.jsonl").write_bytes(b"\xff\xfe\n")), "damaged"),
    (lambda run: (run.mkdir(), (run / "log.jsonl").write_text("")), "no logged steps"),
])
def test_plot_refuses_a_missing_or_damaged_log(make: object, words: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    make(run)  # type: ignore[operator]
    assert cli.main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffunet plot: error:") and words in err, err
    assert not (run / "plot.png").exists()


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffunet.plots import plot_run

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _write_log(tmp_path / "run")
    with pytest.raises(MissingDependencyError, match=r'pip install "diffunet\[plot\]"'):
        plot_run(tmp_path / "run")
    with pytest.raises(FolderError):  # the log is checked first either way
        plot_run(tmp_path / "missing")


def _failed_start(run: Path, trackers: list[str]) -> None:
    """What a start with ``trackers`` that failed before its first state left behind."""
    for sub in ("samples", "weights", "state"):
        (run / sub).mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"trackers": trackers}}))
    (run / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    if "tensorboard" in trackers:
        (run / "tensorboard").mkdir()
        (run / "tensorboard" / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"\0")
    if "wandb" in trackers:
        (run / "wandb" / "offline-run-x").mkdir(parents=True)
        (run / "wandb_run_id.txt").write_text("0123abcd\n")


@pytest.mark.parametrize("trackers", [["tensorboard"], ["wandb"], ["tensorboard", "wandb"]])
def test_tracker_files_of_a_failed_start_do_not_block_a_plain_restart(
        trackers: list[str], tmp_path: Path) -> None:
    from diffunet.config import RunConfig
    from diffunet.runs import not_a_run_yet

    _failed_start(tmp_path / "run", trackers)
    assert not_a_run_yet(tmp_path / "run", RunConfig)


@pytest.mark.parametrize("change", ["user-file-in-tensorboard", "tracker-not-in-config",
                                    "bad-wandb-id", "tensorboard-subfolder"])
def test_tracker_leftovers_that_are_not_ours_still_make_it_a_run(change: str,
                                                                 tmp_path: Path) -> None:
    from diffunet.config import RunConfig
    from diffunet.runs import not_a_run_yet

    run = tmp_path / "run"
    _failed_start(run, ["tensorboard", "wandb"])
    if change == "user-file-in-tensorboard":
        (run / "tensorboard" / "notes.txt").write_text("mine")
    elif change == "tracker-not-in-config":
        (run / "config.json").write_text(json.dumps({"train": {"trackers": ["wandb"]}}))
    elif change == "bad-wandb-id":
        (run / "wandb_run_id.txt").write_text("../../etc\n")
    else:
        (run / "tensorboard" / "events.out.tfevents.sub").mkdir()
        (run / "tensorboard" / "events.out.tfevents.1700000000.host.1.0").unlink()
    assert not not_a_run_yet(run, RunConfig)


def test_plain_restart_after_a_failed_tensorboard_start_trains(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture
                                                               ) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert _train(out, "train.trackers=[tensorboard]", "train.max_steps=1") == 0
    for sub in ("samples", "weights", "state", "phema"):  # as if it failed before its first state
        shutil.rmtree(out / sub)
        (out / sub).mkdir()
    capsys.readouterr()
    assert _train(out, "train.trackers=[tensorboard]") == 0
    assert "never saved a state" in capsys.readouterr().err
    assert len(list((out / "tensorboard").iterdir())) == 2
