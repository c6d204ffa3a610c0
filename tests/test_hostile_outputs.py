"""Output folders that hold someone else's files, or a planted manifest: ``diffunet sample``,
``inspect`` and ``segment predict`` never lose or overwrite a file they did not write.

The rule (diffunet/outputs.py): each command lists the exact files it writes in a manifest of its
own (sample ``manifest.json``, inspect ``stats.json``, predict ``masks.json``), written before
them; it refuses a folder holding anything else unless ``--overwrite`` (then it writes beside
those files and keeps them), never writes over an input or over a file its manifest does not
list, removes only listed files (a planted link is unlinked, its target kept), checks its output
names against each other first, reads any manifest within bounds (one line for a damaged one)
and locks the folder while it runs. Each case is data (tests/hostile.py); a case that succeeds
lists what it may change, and everything else under its folder (the photos, the victim files)
must be byte-for-byte as before.

Single output files (diffunet/output_files.py): ``bench --json`` (default ``bench.json`` in the
working folder) and ``--profile``, ``eval ... --json``, ``eval train-judge --out``, ``plot``
(``--out`` or ``RUN/plot.png``), ``import DIR OUT`` and ``export``'s pipeline files are claimed
before any work: an empty path, ``.``/``..``, a trailing separator, a folder, a missing parent
folder, a link (dangling, to a user's file, to the command's own file), a FIFO, an input of the
command and an existing file the command did not write (unless ``--overwrite``) are each one
line, exit 2, nothing changed; the command's own earlier output (recognised by its content) is
replaced; stale temporary files of an interrupted write are removed, live ones and look-alikes
kept; ``export`` never writes through a linked ``unet/`` or ``scheduler/``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import diffunet
from diffunet import NoiseSchedule, ScheduleConfig, UNet, UNetConfig
from diffunet.runs import FolderLock
from hostile import Case, check, run_cases, tree

TINY = dict(image_size=8, base_channels=8, channel_mults=(1,), num_res_blocks=1,
            attn_resolutions=(), dropout=0.0, num_groups=4)
SAMPLE = ["sample", "{shared}/model.safetensors", "--steps", "2", "--no-progress"]
INSPECT = ["inspect", "{shared}/model.safetensors", "--device", "cpu"]
PREDICT = ["segment", "predict", "{shared}/seg.safetensors", "--device", "cpu", "--no-progress"]
HOLDER = str(os.getpid())  # the test process holds the lock on {shared}/locked


# ---------------------------------------------------------------------------------------------
# Builders: each makes a case's inputs in its own folder c


def _png(path: Path, value: int = 90, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, 40)).save(path)


def photos_in(folder: str, *names: str):
    """A folder of the user's own photos and notes."""
    names = names or ("2023_holiday.png", "01_beach.png")

    def build(c: Path, shared: Path) -> None:
        for i, name in enumerate(names):
            if name.endswith((".png", ".jpg")):
                _png(c / folder / name, 20 * i)
            else:
                (c / folder).mkdir(parents=True, exist_ok=True)
                (c / folder / name).write_text(f"the user's {name}\n")
    return build


def both(*builders):
    def build(c: Path, shared: Path) -> None:
        for b in builders:
            b(c, shared)
    return build


def victim(c: Path, shared: Path) -> None:
    (c / "victim.png").write_bytes(b"someone else's file")


def manifest(folder: str, name: str, doc=None, raw: bytes | None = None):
    """A planted manifest (a JSON document, or raw bytes) beside a victim file."""
    def build(c: Path, shared: Path) -> None:
        victim(c, shared)
        (c / folder).mkdir(parents=True, exist_ok=True)
        data = raw if raw is not None else json.dumps(doc).encode()
        (c / folder / name).write_bytes(data.replace(b"{c}", str(c).encode()))
    return build


def fifo(folder: str, name: str):
    def build(c: Path, shared: Path) -> None:
        (c / folder).mkdir(parents=True)
        os.mkfifo(c / folder / name)
    return build


def link(at: str, to: str):
    """A symlink ``at`` -> ``to`` (``{c}`` expands to the case folder)."""
    def build(c: Path, shared: Path) -> None:
        (c / at).parent.mkdir(parents=True, exist_ok=True)
        (c / at).unlink(missing_ok=True)
        (c / at).symlink_to(to.replace("{c}", str(c)))
    return build


def hard_link(at: str, to: str):
    def build(c: Path, shared: Path) -> None:
        (c / at).parent.mkdir(parents=True, exist_ok=True)
        os.link(c / to, c / at)
    return build


def sampled(folder: str, n: int = 2, drop_files: bool = False, **change):
    """A real ``diffunet sample`` output (2 steps), its manifest then changed."""
    def build(c: Path, shared: Path) -> None:
        from diffunet.sampling import SampleOptions, generate

        generate(shared / "model.safetensors", c / folder,
                 SampleOptions(num_samples=n, num_steps=2, device="cpu"))
        path = c / folder / "manifest.json"
        doc = json.loads(path.read_text())
        if drop_files:  # as diffunet wrote it before manifests listed their files
            del doc["files"]
        doc.update(change)
        path.write_text(json.dumps(doc))
    return build


SAMPLE_DOC = {"format": "diffunet.samples", "format_version": 1, "model": {"sha256": "x"},
              "settings": {}, "num_samples": 2}
INSPECT_DOC = {"format": "diffunet.inspect", "format_version": 1}
MASKS_DOC = {"format": "diffunet.masks", "format_version": 1}
DEEP = b"[" * 100_000 + b"]" * 100_000

# ---------------------------------------------------------------------------------------------
# The cases

NOT_OURS = "holds files diffunet did not write"
NEVER = "even if you pass --overwrite"
UNREADABLE = "is not a readable diffunet"

CASES = [
    # -- inspect ---------------------------------------------------------------------------------
    Case("inspect-into-a-folder-of-photos", [*INSPECT, "--out-dir", "{c}/pics"],
         [NOT_OURS, "01_beach.png", "pass --overwrite to write beside them"],
         build=photos_in("pics")),
    Case("inspect-overwrite-beside-photos", [*INSPECT, "--out-dir", "{c}/pics", "--overwrite"],
         build=photos_in("pics"), code=0,
         may_change=["pics/input.png", "pics/noised.png", "pics/stats.json", "pics/stats.txt",
                     *(f"pics/{i:02d}_{b}.png" for i, b in enumerate(
                         ["conv_in", "down.0.res.0", "mid.res1", "mid.attn", "mid.res2",
                          "up.0.res.0", "up.0.res.1", "norm_out", "conv_out"]))]),
    Case("inspect-a-users-stats-txt", [*INSPECT, "--out-dir", "{c}/pics"],
         ["stats.txt", "which this run would write", NEVER],
         build=photos_in("pics", "01_beach.png", "stats.txt")),
    Case("inspect-overwrite-a-users-stats-txt", [*INSPECT, "--out-dir", "{c}/pics",
                                                 "--overwrite"],
         ["stats.txt", NEVER], build=photos_in("pics", "01_beach.png", "stats.txt")),
    Case("inspect-image-inside-out-dir-under-an-output-name",
         [*INSPECT, "--image", "{c}/pics/input.png", "--out-dir", "{c}/pics", "--overwrite"],
         ["writing input.png there would replace the input", "pics/input.png"],
         build=photos_in("pics", "input.png")),
    Case("inspect-symlinked-out-dir-onto-photos", [*INSPECT, "--out-dir", "{c}/link"],
         [NOT_OURS], build=both(photos_in("pics"), link("link", "{c}/pics"))),
    Case("inspect-out-dir-a-dangling-link", [*INSPECT, "--out-dir", "{c}/link"],
         ["is a link to a missing folder"], build=link("link", "{c}/nowhere")),
    Case("inspect-manifest-lists-a-parent-path", [*INSPECT, "--out-dir", "{c}/out",
                                                  "--overwrite"],
         [UNREADABLE, "inspect manifest", "files[0]", "is not a file name in the folder"],
         build=manifest("out", "stats.json", {**INSPECT_DOC, "files": ["../victim.png"]})),
    Case("inspect-manifest-lists-an-absolute-path", [*INSPECT, "--out-dir", "{c}/out",
                                                     "--overwrite"],
         [UNREADABLE, "is not a file name in the folder"],
         build=manifest("out", "stats.json", {**INSPECT_DOC, "files": ["{c}/victim.png"]})),
    Case("inspect-manifest-nested-100000-deep", [*INSPECT, "--out-dir", "{c}/out"],
         [UNREADABLE, "nested more than 32 levels deep"],
         build=manifest("out", "stats.json", raw=DEEP)),
    Case("inspect-manifest-is-a-fifo", [*INSPECT, "--out-dir", "{c}/out", "--overwrite"],
         [UNREADABLE, "not a regular file"], build=fifo("out", "stats.json"), timeout=30),
    Case("inspect-manifest-wrong-types", [*INSPECT, "--out-dir", "{c}/out"],
         [UNREADABLE, "files: expected a JSON array, got 'input.png'"],
         build=manifest("out", "stats.json", {**INSPECT_DOC, "files": "input.png"})),
    Case("inspect-manifest-from-a-newer-diffunet", [*INSPECT, "--out-dir", "{c}/out"],
         ["written by a newer diffunet (format version 99"],
         build=manifest("out", "stats.json", {**INSPECT_DOC, "format_version": 99,
                                              "files": []})),
    Case("inspect-a-users-own-stats-json", [*INSPECT, "--out-dir", "{c}/out", "--overwrite"],
         [UNREADABLE, "format: missing"],
         build=manifest("out", "stats.json", {"my": "numbers"})),
    Case("inspect-manifest-lists-planted-links",  # unlinked or replaced, targets kept
         [*INSPECT, "--out-dir", "{c}/out"],
         build=both(manifest("out", "stats.json",
                             {**INSPECT_DOC, "files": ["00_conv_in.png", "99_old.png"]}),
                    link("out/00_conv_in.png", "{c}/victim.png"),
                    link("out/99_old.png", "{c}/victim.png")),
         code=0, may_change=["out"]),
    Case("inspect-into-a-folder-another-process-holds",
         [*INSPECT, "--out-dir", "{shared}/locked"], [f"in use by another diffunet run "
                                                      f"(process {HOLDER})"]),
    # -- segment predict -------------------------------------------------------------------------
    Case("predict-into-its-input-folder-with-overwrite",
         [*PREDICT, "{c}/photos", "--out-dir", "{c}/photos", "--overwrite"],
         ["would replace the input", "photos/a.png"], build=photos_in("photos", "a.png", "b.png")),
    Case("predict-into-its-input-folder", [*PREDICT, "{c}/photos", "--out-dir", "{c}/photos"],
         ["would replace the input"], build=photos_in("photos", "a.png", "b.png")),
    Case("predict-hard-linked-input-in-out-dir",
         [*PREDICT, "{c}/in/a.png", "--out-dir", "{c}/out", "--overwrite"],
         ["would replace the input", "in/a.png"],
         build=both(photos_in("in", "a.png"), hard_link("out/a.png", "in/a.png"))),
    Case("predict-two-inputs-write-one-overlay",
         [*PREDICT, "{c}/in/a.png", "{c}/in/a_overlay.jpg", "--out-dir", "{out}"],
         ["in/a.png and", "in/a_overlay.jpg would both write a_overlay.png"],
         build=photos_in("in", "a.png", "a_overlay.jpg")),
    Case("predict-two-inputs-with-one-stem",
         [*PREDICT, "{c}/in", "--out-dir", "{out}"], ["would both write a.png"],
         build=both(photos_in("in/x", "a.png"), photos_in("in/y", "a.jpg"))),
    Case("predict-over-a-users-file", [*PREDICT, "{c}/in/a.png", "--out-dir", "{c}/out",
                                       "--overwrite"],
         ["already holds masks but no masks.json", "a.png", NEVER],
         build=both(photos_in("in", "a.png"), photos_in("out", "a.png"))),
    Case("predict-into-a-folder-of-photos", [*PREDICT, "{c}/in/a.png", "--out-dir", "{c}/out"],
         [NOT_OURS, "pass --overwrite"],
         build=both(photos_in("in", "a.png"), photos_in("out", "holiday.jpg", "notes.txt"))),
    Case("predict-overwrite-beside-photos", [*PREDICT, "{c}/in/a.png", "--out-dir", "{c}/out",
                                             "--overwrite"],
         ["wrote 1 mask(s) and overlay(s)"], code=0,
         build=both(photos_in("in", "a.png"), photos_in("out", "holiday.jpg", "notes.txt")),
         may_change=["out/a.png", "out/a_overlay.png", "out/masks.json"]),
    Case("predict-manifest-lists-an-input", [*PREDICT, "{c}/in/a.png", "--out-dir", "{c}/out",
                                             "--overwrite"],
         [UNREADABLE, "segment predict manifest", "is not a file name in the folder"],
         build=both(photos_in("in", "a.png"),
                    manifest("out", "masks.json", {**MASKS_DOC, "files": ["../in/a.png"]}))),
    Case("predict-manifest-nested-100000-deep", [*PREDICT, "{c}/in/a.png", "--out-dir",
                                                 "{c}/out", "--overwrite"],
         [UNREADABLE, "nested more than 32"],
         build=both(photos_in("in", "a.png"), manifest("out", "masks.json", raw=DEEP))),
    Case("predict-manifest-a-link-to-dev-zero", [*PREDICT, "{c}/in/a.png", "--out-dir",
                                                 "{c}/out"],
         [UNREADABLE, "not a regular file"],
         build=both(photos_in("in", "a.png"), link("out/masks.json", "/dev/zero")),
         timeout=30),
    Case("predict-into-a-folder-another-process-holds",
         [*PREDICT, "{c}/in/a.png", "--out-dir", "{shared}/locked"],
         [f"(process {HOLDER})"], build=photos_in("in", "a.png")),
    # -- sample ----------------------------------------------------------------------------------
    Case("sample-overwrite-a-users-000005-png",
         [*SAMPLE, "--num-samples", "8", "--out-dir", "{c}/d", "--overwrite"],
         ["already holds sample images but no manifest.json", "000005.png", NEVER],
         build=photos_in("d", "000005.png")),
    Case("sample-overwrite-beside-a-users-000005-png",
         [*SAMPLE, "--num-samples", "2", "--out-dir", "{c}/d", "--overwrite"],
         ["wrote 2 image(s)"], build=photos_in("d", "000005.png"), code=0,
         may_change=["d/000000.png", "d/000001.png", "d/grid.png", "d/manifest.json"]),
    Case("sample-into-a-folder-of-photos", [*SAMPLE, "--num-samples", "2", "--out-dir", "{c}/d"],
         [NOT_OURS], build=photos_in("d")),
    Case("sample-manifest-nested-100000-deep",
         [*SAMPLE, "--num-samples", "2", "--out-dir", "{c}/d", "--overwrite"],
         [UNREADABLE, "sample manifest", "nested more than 32 levels deep"],
         build=manifest("d", "manifest.json", raw=DEEP)),
    Case("sample-manifest-wrong-types", [*SAMPLE, "--num-samples", "2", "--out-dir", "{c}/d"],
         [UNREADABLE, "model: expected a JSON object, got a JSON array"],
         build=manifest("d", "manifest.json", {**SAMPLE_DOC, "model": [], "files": []})),
    Case("sample-manifest-settings-a-string",
         [*SAMPLE, "--num-samples", "2", "--out-dir", "{c}/d"],
         [UNREADABLE, "settings: expected a JSON object"],
         build=manifest("d", "manifest.json", {**SAMPLE_DOC, "settings": "x", "files": []})),
    Case("sample-manifest-lists-a-parent-path",
         [*SAMPLE, "--num-samples", "2", "--out-dir", "{c}/d", "--overwrite"],
         [UNREADABLE, "files[1]", "is not a file name in the folder"],
         build=manifest("d", "manifest.json", {**SAMPLE_DOC,
                                               "files": ["000000.png", "../victim.png"]})),
    Case("sample-old-manifest-claims-10-12-images",
         [*SAMPLE, "--num-samples", "2", "--out-dir", "{c}/d", "--overwrite"],
         [UNREADABLE, "num_samples: expected an integer from 0 to 10,000,000"],
         build=manifest("d", "manifest.json", {**SAMPLE_DOC, "num_samples": 10**12})),
    Case("sample-manifest-is-a-folder",
         [*SAMPLE, "--num-samples", "2", "--out-dir", "{c}/d", "--overwrite"],
         [UNREADABLE, "not a regular file"],
         build=photos_in("d/manifest.json", "x.txt")),
    Case("sample-manifest-of-another-command",
         [*SAMPLE, "--num-samples", "2", "--out-dir", "{c}/d", "--overwrite"],
         [UNREADABLE, "its format is 'diffunet.inspect'"],
         build=manifest("d", "manifest.json", {**INSPECT_DOC, "files": []})),
    Case("sample-resume-an-old-manifest-without-files",
         [*SAMPLE, "--num-samples", "3", "--out-dir", "{c}/d"],
         ["wrote 1 image(s)", "(2 were already there)"], code=0,
         build=sampled("d", drop_files=True),
         may_change=["d/000002.png", "d/grid.png", "d/manifest.json"]),
    Case("sample-overwrite-a-planted-link-it-lists",  # unlinked, never followed
         [*SAMPLE, "--num-samples", "2", "--steps", "3", "--out-dir", "{c}/d", "--overwrite"],
         ["wrote 2 image(s)"], code=0, build=both(sampled("d"), link("d/000001.png",
                                                                    "{c}/victim.png"), victim),
         may_change=["d"]),
    Case("sample-into-a-folder-another-process-holds",
         [*SAMPLE, "--num-samples", "2", "--out-dir", "{shared}/locked"],
         [f"in use by another diffunet run (process {HOLDER})", "wait for it to finish"]),
]


# ---------------------------------------------------------------------------------------------
# Single output files: builders

DEAD = 999_999_999  # a process number no system hands out (pid_max is at most 2**22)
LIVE = 1  # init: always running
BENCH = ["bench", "--config", "tiny", "--repeats", "1", "--warmup", "0", "--batch-size", "2",
         "--sample-batch-size", "2", "--sample-steps", "1", "--threads", "1", "--no-memory",
         "--only", "train", "--device", "cpu"]
FID = ["eval", "fid", "{c}/gen", "--features", "builtin", "--no-progress", "--device", "cpu"]
JUDGE = ["eval", "train-judge", "--steps", "1"]
EXPORT = ["export", "{shared}/model.safetensors"]
IMPORT = ["import", "{shared}/pipe"]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
NOT_OURS_FILE = "exists and is not"
A_LINK = "is a symbolic link; diffunet never writes through a link"
NAMES_A_FOLDER = "names a folder, not a file"


def files(contents: dict[str, str]):
    """Files under the case folder, by relative path, with text contents."""
    def build(c: Path, shared: Path) -> None:
        for rel, text in contents.items():
            path = c / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return build


def folder(rel: str):
    def build(c: Path, shared: Path) -> None:
        (c / rel).mkdir(parents=True, exist_ok=True)
    return build


def fifo_at(rel: str):
    def build(c: Path, shared: Path) -> None:
        (c / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(c / rel)
    return build


BENCH_RESULT = json.dumps({"written_by": "diffunet bench", "diffunet_version": "0", "unet": {},
                           "flops": {}, "results": []})
OLD_BENCH_RESULT = json.dumps({"diffunet_version": "0.1", "unet": {"base_channels": 16},
                               "flops": {"nominal": 1.0}, "results": [
                                   {"model": "diffunet", "what": "train"}]})
EVAL_RESULT = json.dumps({"written_by": "diffunet eval", "fid": 1.0})


def temporary(rel: str, pid: int = DEAD, legacy: bool = False, as_link_to: str = "",
              tag: str = "0123abcd"):
    """A temporary file of an interrupted write of ``rel`` by process ``pid``: this writer's
    ``.diffunet-<name>.<pid>.<hex>.tmp`` or (``legacy``) fileio's ``.<name>.<pid>.<hex>.tmp``;
    ``as_link_to``: a link with that name instead (``{c}`` expands)."""
    def build(c: Path, shared: Path) -> None:
        target = c / rel
        name = (f".{target.name}.{pid}.{tag}.tmp" if legacy
                else f".diffunet-{target.name}.{pid}.{tag}.tmp")
        target.parent.mkdir(parents=True, exist_ok=True)
        if as_link_to:
            (target.parent / name).symlink_to(as_link_to.replace("{c}", str(c)))
        else:
            (target.parent / name).write_bytes(b"half of a file")
    return build


def run_log(rel: str = "run"):
    """A run folder with a short log.jsonl."""
    def build(c: Path, shared: Path) -> None:
        (c / rel).mkdir(parents=True, exist_ok=True)
        (c / rel / "log.jsonl").write_text("".join(
            json.dumps({"step": 10 * i, "loss": 1.0 / i, "lr": 1e-3, "images_per_s": 100.0})
            + "\n" for i in range(1, 6)))
    return build


def drawn_plot(rel: str = "run", legacy: bool = False):
    """``rel/plot.png`` as ``diffunet plot`` draws it now, or (``legacy``) as it drew it before
    it marked its PNGs (matplotlib's own Software text, at PLOT_SIZE)."""
    def build(c: Path, shared: Path) -> None:
        from diffunet.plots import PLOT_SIZE, plot_run

        if not legacy:
            plot_run(c / rel)
            return
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        fig = plt.figure(figsize=(PLOT_SIZE[0] / 100, PLOT_SIZE[1] / 100), dpi=100)
        fig.savefig(c / rel / "plot.png", format="png", dpi=100)
        plt.close(fig)
    return build


def exported(rel: str = "pipe"):
    """A complete pipeline folder (a copy of the shared export)."""
    def build(c: Path, shared: Path) -> None:
        shutil.copytree(shared / "pipe", c / rel)
    return build


def interrupted_export(rel: str = "pipe"):
    """What an export killed while writing its weights left: ``unet/`` holding only fileio's
    temporary file of the weights, an empty ``scheduler/``."""
    return both(folder(f"{rel}/scheduler"), temporary(
        f"{rel}/unet/diffusion_pytorch_model.safetensors", legacy=True))


PIPE = ["pipe/model_index.json", "pipe/unet/config.json",
        "pipe/unet/diffusion_pytorch_model.safetensors", "pipe/scheduler/scheduler_config.json"]

FILE_CASES = [
    # -- bench --json (default bench.json in the working folder) and --profile ------------------
    Case("bench-default-json-over-a-users-bench-json", BENCH,
         ["--json bench.json exists and is not a diffunet bench result", "--json '' for none"],
         build=files({"bench.json": '{"my": "numbers"}\n'})),
    Case("bench-json-dot", [*BENCH, "--json", "."], ["--json . " + NAMES_A_FOLDER]),
    Case("bench-json-dotdot", [*BENCH, "--json", ".."], ["--json .. " + NAMES_A_FOLDER]),
    Case("bench-json-trailing-separator", [*BENCH, "--json", "{c}/d/"], [NAMES_A_FOLDER],
         build=folder("d")),
    Case("bench-json-an-existing-folder", [*BENCH, "--json", "{c}/d"],
         ["d is a folder; give a file path such as", "d/bench.json"], build=folder("d")),
    Case("bench-json-in-a-missing-folder", [*BENCH, "--json", "{c}/nope/b.json"],
         ["the folder", "nope does not exist"]),
    Case("bench-json-under-a-file", [*BENCH, "--json", "{c}/victim.png/b.json"],
         ["victim.png is not a folder"], build=victim),
    Case("bench-json-a-fifo", [*BENCH, "--json", "{c}/b.json"], ["is a FIFO, not a regular file"],
         build=fifo_at("b.json"), timeout=30),
    Case("bench-json-a-dangling-link", [*BENCH, "--json", "{c}/b.json"], [A_LINK],
         build=link("b.json", "{c}/nowhere.json")),
    Case("bench-json-a-link-to-a-users-file", [*BENCH, "--json", "{c}/b.json"], [A_LINK],
         build=both(victim, link("b.json", "{c}/victim.png"))),
    Case("bench-json-a-link-to-its-own-result", [*BENCH, "--json", "{c}/b.json"], [A_LINK],
         build=both(files({"old.json": BENCH_RESULT}), link("b.json", "{c}/old.json"))),
    Case("bench-json-replaces-its-own-result", BENCH, code=0,
         build=files({"bench.json": BENCH_RESULT}), may_change=["bench.json"]),
    Case("bench-json-replaces-an-older-diffunet-bench-result", BENCH, code=0,
         build=files({"bench.json": OLD_BENCH_RESULT}), may_change=["bench.json"]),
    Case("bench-json-removes-its-stale-temporary-keeps-live-ones", BENCH, code=0,
         build=both(temporary("bench.json"), temporary("bench.json", pid=LIVE),
                    temporary("bench.json", as_link_to="{c}/victim.png", tag="0badf00d"),
                    victim),
         may_change=["bench.json", f".diffunet-bench.json.{DEAD}.0123abcd.tmp"]),
    Case("bench-json-and-a-users-temporary-look-alike", BENCH, code=0,
         build=files({".diffunet-notes.txt.999999999.0123abcd.tmp": "mine",
                        f".bench.json.{DEAD}.0123abcd.tmp": "fileio's, not this writer's"}),
         may_change=["bench.json"]),
    Case("bench-profile-over-a-users-trace", [*BENCH, "--json", "", "--profile", "{c}/p"],
         ["--profile", "p.train.json exists and is not a diffunet bench trace",
          "give another --profile PREFIX"], build=files({"p.train.json": '{"traceEvents": []}'})),
    Case("bench-profile-trace-a-link", [*BENCH, "--json", "", "--profile", "{c}/p"], [A_LINK],
         build=both(victim, link("p.train.json", "{c}/victim.png"))),
    Case("bench-json-is-a-profile-trace", [*BENCH, "--json", "{c}/p.train.json",
                                           "--profile", "{c}/p"], ["name the same file"]),
    # -- eval --json, eval train-judge --out ----------------------------------------------------
    Case("eval-json-empty", [*FID, "--json", ""], ["--json is empty; give a file path"]),
    Case("eval-json-dot", [*FID, "--json", "."], ["--json . " + NAMES_A_FOLDER]),
    Case("eval-json-a-users-notes", [*FID, "--json", "{c}/notes.json"],
         ["is not a diffunet eval result; give a new file name (it is left as it is)"],
         build=files({"notes.json": '{"my": "notes"}'})),
    Case("eval-json-a-link-to-its-own-result", [*FID, "--json", "{c}/r.json"], [A_LINK],
         build=both(files({"old.json": EVAL_RESULT}), link("r.json", "{c}/old.json"))),
    Case("eval-json-a-fifo", [*FID, "--json", "{c}/r.json"], ["a FIFO"],
         build=fifo_at("r.json"), timeout=30),
    Case("eval-bpd-json-in-a-missing-folder",
         ["eval", "bpd", "{shared}/model.safetensors", "--json", "{c}/no/r.json"],
         ["no does not exist"]),
    Case("eval-nfe-json-a-folder", ["eval", "nfe", "{shared}/model.safetensors", "--json",
                                    "{c}/d"], ["is a folder"], build=folder("d")),
    Case("train-judge-out-dot", [*JUDGE, "--out", "."], ["--out . " + NAMES_A_FOLDER]),
    Case("train-judge-out-a-users-file", [*JUDGE, "--out", "{c}/victim.png"],
         ["--out", "victim.png exists; give a new file name, or --overwrite to replace it"],
         build=victim),
    Case("train-judge-overwrite-a-link", [*JUDGE, "--out", "{c}/j.safetensors", "--overwrite"],
         [A_LINK], build=both(victim, link("j.safetensors", "{c}/victim.png"))),
    Case("train-judge-overwrite-a-folder", [*JUDGE, "--out", "{c}/d", "--overwrite"],
         ["is a folder"], build=folder("d")),
    Case("train-judge-out-and-json-one-file", [*JUDGE, "--out", "{c}/j", "--json", "{c}/j"],
         ["--out", "and --json", "name the same file"]),
    # -- plot ------------------------------------------------------------------------------------
    Case("plot-out-empty", ["plot", "{c}/run", "--out", ""], ["--out is empty"],
         build=run_log()),
    Case("plot-out-dot", ["plot", "{c}/run", "--out", "."], ["--out . " + NAMES_A_FOLDER],
         build=run_log()),
    Case("plot-default-over-a-users-plot-png", ["plot", "{c}/run"],
         ["run/plot.png exists and is not a diffunet plot", "give --out FILE, or --overwrite"],
         build=both(run_log(), photos_in("run", "plot.png"))),
    Case("plot-default-plot-png-a-link", ["plot", "{c}/run", "--overwrite"], [A_LINK],
         build=both(run_log(), victim, link("run/plot.png", "{c}/victim.png"))),
    Case("plot-default-plot-png-a-folder", ["plot", "{c}/run"], ["plot.png is a folder"],
         build=both(run_log(), folder("run/plot.png"))),
    Case("plot-out-the-log-itself", ["plot", "{c}/run", "--out", "{c}/run/log.jsonl",
                                     "--overwrite"], ["is the input", "even with --overwrite"],
         build=run_log()),
    Case("plot-out-a-hard-link-to-the-log", ["plot", "{c}/run", "--out", "{c}/l.png",
                                             "--overwrite"], ["is the input"],
         build=both(run_log(), hard_link("l.png", "run/log.jsonl"))),
    Case("plot-out-a-link-to-a-users-file", ["plot", "{c}/run", "--out", "{c}/p.png",
                                             "--overwrite"], [A_LINK],
         build=both(run_log(), victim, link("p.png", "{c}/victim.png"))),
    Case("plot-out-a-fifo", ["plot", "{c}/run", "--out", "{c}/p.png", "--overwrite"],
         ["a FIFO"], build=both(run_log(), fifo_at("p.png")), timeout=30),
    Case("plot-out-in-a-missing-folder", ["plot", "{c}/run", "--out", "{c}/no/p.png"],
         ["no does not exist"], build=run_log()),
    # -- import DIR OUT --------------------------------------------------------------------------
    Case("import-out-dot", [*IMPORT, "."], ["OUT . " + NAMES_A_FOLDER]),
    Case("import-out-dotdot-with-overwrite", [*IMPORT, "..", "--overwrite"],
         ["OUT .. " + NAMES_A_FOLDER]),
    Case("import-out-a-users-file", [*IMPORT, "{c}/victim.png"],
         ["exists; give a new file name, or --overwrite to replace it"], build=victim),
    Case("import-out-a-link-with-overwrite", [*IMPORT, "{c}/m.safetensors", "--overwrite"],
         [A_LINK], build=both(victim, link("m.safetensors", "{c}/victim.png"))),
    Case("import-out-a-dangling-link", [*IMPORT, "{c}/m.safetensors"], [A_LINK],
         build=link("m.safetensors", "{c}/nowhere")),
    Case("import-out-a-fifo-with-overwrite", [*IMPORT, "{c}/m.safetensors", "--overwrite"],
         ["a FIFO"], build=fifo_at("m.safetensors"), timeout=30),
    Case("import-out-its-own-input-with-overwrite",
         ["import", "{c}/pipe", "{c}/pipe/unet/diffusion_pytorch_model.safetensors",
          "--overwrite"], ["is the input", "diffusion_pytorch_model.safetensors"],
         build=exported()),
    Case("import-out-in-a-missing-folder", [*IMPORT, "{c}/no/m.safetensors"],
         ["no does not exist"]),
    Case("import-overwrite-replaces-a-file", [*IMPORT, "{c}/m.safetensors", "--overwrite"],
         code=0, build=files({"m.safetensors": "an older model"}),
         may_change=["m.safetensors"]),
    # -- export MODEL DIR ------------------------------------------------------------------------
    Case("export-overwrite-unet-a-link-to-a-users-folder",
         [*EXPORT, "{c}/pipe", "--overwrite"], ["pipe/unet", A_LINK],
         build=both(files({"mine/config.json": "{}", "pipe/keep.txt": "x"}),
                    link("pipe/unet", "{c}/mine"))),
    Case("export-scheduler-a-link-to-a-users-empty-folder", [*EXPORT, "{c}/pipe"],
         ["pipe/scheduler", A_LINK],
         build=both(folder("mine"), link("pipe/scheduler", "{c}/mine"))),
    Case("export-overwrite-unet-a-file", [*EXPORT, "{c}/pipe", "--overwrite"],
         ["pipe/unet is not a folder"], build=files({"pipe/unet": "a file"})),
    Case("export-overwrite-model-index-a-link", [*EXPORT, "{c}/pipe", "--overwrite"],
         ["model_index.json", A_LINK],
         build=both(exported(), victim, link("pipe/model_index.json", "{c}/victim.png"))),
    Case("export-overwrite-unet-config-a-fifo", [*EXPORT, "{c}/pipe", "--overwrite"],
         ["unet/config.json exists and is a FIFO"],
         build=both(folder("pipe/scheduler"), fifo_at("pipe/unet/config.json")), timeout=30),
    Case("export-rerun-after-an-interrupted-export", [*EXPORT, "{c}/pipe"], code=0,
         build=interrupted_export(), may_change=["pipe"]),
    Case("export-overwrite-rerun-after-an-interrupted-export", [*EXPORT, "{c}/pipe",
                                                                "--overwrite"], code=0,
         build=interrupted_export(), may_change=["pipe"]),
    Case("export-overwrite-removes-its-leftovers", [*EXPORT, "{c}/pipe", "--overwrite"], code=0,
         build=both(exported(), temporary("pipe/unet/config.json"),
                    temporary("pipe/model_index.json", legacy=True)),
         may_change=PIPE + [f"pipe/unet/.diffunet-config.json.{DEAD}.0123abcd.tmp",
                            f"pipe/.model_index.json.{DEAD}.0123abcd.tmp"]),
    Case("export-keeps-a-live-writers-temporary", [*EXPORT, "{c}/pipe"], ["is not empty"],
         build=temporary("pipe/unet/config.json", pid=LIVE)),
    Case("export-a-users-look-alike-is-not-a-leftover", [*EXPORT, "{c}/pipe"], ["is not empty"],
         build=temporary("pipe/unet/notes.txt", legacy=True)),
    Case("export-overwrite-keeps-a-planted-leftover-link", [*EXPORT, "{c}/pipe", "--overwrite"],
         code=0, build=both(victim, temporary("pipe/unet/config.json",
                                              as_link_to="{c}/victim.png")),
         may_change=PIPE + ["pipe/scheduler"]),
]
if HAS_MATPLOTLIB:
    FILE_CASES += [
        Case("plot-default-refreshes-its-own-plot-png", ["plot", "{c}/run"], code=0,
             build=both(run_log(), drawn_plot()), may_change=["run/plot.png"]),
        Case("plot-default-refreshes-an-older-diffunet-plot-png", ["plot", "{c}/run"], code=0,
             build=both(run_log(), drawn_plot(legacy=True)), may_change=["run/plot.png"]),
        Case("plot-out-never-replaces-its-own-earlier-png-unasked",
             ["plot", "{c}/run", "--out", "{c}/run/plot.png"],
             ["--out", "exists; give a new file name, or --overwrite"],
             build=both(run_log(), drawn_plot())),
    ]
if os.geteuid() != 0:  # root writes in a read-only folder: test_unwritable_folder covers it
    FILE_CASES += [
        Case("bench-json-in-a-read-only-folder", [*BENCH, "--json", "{c}/ro/b.json"],
             ["cannot write in", "permission denied"],
             build=lambda c, shared: ((c / "ro").mkdir(), (c / "ro").chmod(0o555))),
    ]
CASES += FILE_CASES


def _save_models(folder: Path) -> None:
    """The tiny diffusion model (``model.safetensors``) and segmentation model
    (``seg.safetensors``) the output cases run, seeded."""
    torch.manual_seed(0)
    diffunet.save_model(folder / "model.safetensors", UNet(UNetConfig(**TINY)),
                        NoiseSchedule(ScheduleConfig(num_train_timesteps=10)))
    seg = UNet(UNetConfig(**TINY, time_conditioning=False, out_channels=1))
    diffunet.save_model(folder / "seg.safetensors", seg, None, extra={"segmentation": {
        "num_classes": 2, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 8,
        "channels": 3}})


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_outputs")
    shared = root / "shared"
    shared.mkdir()
    _save_models(shared)
    from diffunet.interop import export_diffusers

    export_diffusers(shared / "model.safetensors", shared / "pipe")
    (shared / "locked").mkdir()
    lock = FolderLock(shared / "locked")  # another diffunet run, as far as the cases can tell
    try:
        yield root / "cases", run_cases(CASES, root / "cases", shared)
    finally:
        lock.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_output_folder_is_refused_or_handled_safely(results, case: Case) -> None:
    check(case, results[1][case.id])


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_overwrite_writes_beside_the_users_photos_and_lists_only_its_own(results) -> None:
    cases = results[0]
    pics = cases / "inspect-overwrite-beside-photos" / "pics"
    doc = json.loads((pics / "stats.json").read_text())
    names = {p.name for p in pics.iterdir()}
    assert {"2023_holiday.png", "01_beach.png"} <= names
    assert names - set(doc["files"]) == {"2023_holiday.png", "01_beach.png"}
    assert doc["complete"] is True
    out = cases / "predict-overwrite-beside-photos" / "out"
    assert sorted(json.loads((out / "masks.json").read_text())["files"]) == [
        "a.png", "a_overlay.png"]
    assert (out / "notes.txt").read_text() == "the user's notes.txt\n"
    d = cases / "sample-overwrite-beside-a-users-000005-png" / "d"
    assert json.loads((d / "manifest.json").read_text())["files"] == [
        "000000.png", "000001.png", "grid.png"]


def test_planted_links_are_removed_and_their_targets_kept(results) -> None:
    cases = results[0]
    for cid in ("inspect-manifest-lists-planted-links", "sample-overwrite-a-planted-link-it-lists"):
        c = cases / cid
        assert (c / "victim.png").read_bytes() == b"someone else's file", cid
        assert not any(p.is_symlink() for p in c.rglob("*")), cid
    assert not (cases / "inspect-manifest-lists-planted-links" / "out" / "99_old.png").exists()


def test_a_refused_run_leaves_the_photos_byte_identical(results, tmp_path) -> None:
    # the tree check compares sizes and mtimes; here the bytes of one refused and one kept case
    cases = results[0]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    photos_in("pics")(fresh, fresh)
    for cid in ("inspect-into-a-folder-of-photos", "inspect-overwrite-beside-photos"):
        kept = _bytes(cases / cid / "pics")
        assert {k: kept[k] for k in ("2023_holiday.png", "01_beach.png")} == _bytes(
            fresh / "pics"), cid


def test_the_lock_is_released_when_the_command_ends(tmp_path) -> None:
    from diffunet.cli import main

    out = tmp_path / "d"
    shared_model = tmp_path / "m.safetensors"
    torch.manual_seed(0)
    diffunet.save_model(shared_model, UNet(UNetConfig(**TINY)),
                        NoiseSchedule(ScheduleConfig(num_train_timesteps=10)))
    assert main(["sample", str(shared_model), "--num-samples", "1", "--steps", "2",
                 "--out-dir", str(out), "--no-progress", "--device", "cpu"]) == 0
    FolderLock(out).close()  # free again: the command let go of it


# ---------------------------------------------------------------------------------------------
# Single output files: what the cases left


def test_no_temporary_file_of_a_claim_is_left_behind(results) -> None:
    # refused or done, a command removes its own temporary file; only planted ones remain
    for case in FILE_CASES:
        r = results[1][case.id]
        left = {k for k in r.after if ".diffunet-" in k} - set(r.before)
        assert left == set(), (case.id, left)


def test_stale_temporaries_are_removed_live_ones_and_look_alikes_kept(results) -> None:
    cases = results[0]
    c = cases / "bench-json-removes-its-stale-temporary-keeps-live-ones"
    assert not (c / f".diffunet-bench.json.{DEAD}.0123abcd.tmp").exists()
    assert (c / f".diffunet-bench.json.{LIVE}.0123abcd.tmp").read_bytes() == b"half of a file"
    assert (c / f".diffunet-bench.json.{DEAD}.0badf00d.tmp").is_symlink()  # never followed
    assert (c / "victim.png").read_bytes() == b"someone else's file"


def test_export_removes_its_own_leftovers_and_keeps_planted_links(results) -> None:
    # what an interrupted export left in unet/ is removed by the rerun, plain or --overwrite
    cases = results[0]
    for cid in ("export-rerun-after-an-interrupted-export",
                "export-overwrite-rerun-after-an-interrupted-export"):
        pipe = cases / cid / "pipe"
        assert sorted(p.name for p in (pipe / "unet").iterdir()) == [
            "config.json", "diffusion_pytorch_model.safetensors"], cid
    pipe = cases / "export-overwrite-removes-its-leftovers" / "pipe"
    assert not [p for p in pipe.rglob("*.tmp")]
    pipe = cases / "export-overwrite-keeps-a-planted-leftover-link" / "pipe"
    assert (pipe / "unet" / f".diffunet-config.json.{DEAD}.0123abcd.tmp").is_symlink()
    assert json.loads((pipe / "unet" / "config.json").read_text())["_class_name"] == "UNet2DModel"


def test_its_own_earlier_output_was_replaced_with_a_marked_one(results) -> None:
    cases = results[0]
    for cid in ("bench-json-replaces-its-own-result",
                "bench-json-replaces-an-older-diffunet-bench-result",
                "bench-json-removes-its-stale-temporary-keeps-live-ones"):
        doc = json.loads((cases / cid / "bench.json").read_text())
        assert doc["written_by"] == "diffunet bench" and doc["results"], cid
    m = cases / "import-overwrite-replaces-a-file" / "m.safetensors"
    assert diffunet.load_model(m)[0].config.image_size == TINY["image_size"]
    if HAS_MATPLOTLIB:
        from diffunet.plots import is_own_plot

        for cid in ("plot-default-refreshes-its-own-plot-png",
                    "plot-default-refreshes-an-older-diffunet-plot-png"):
            png = cases / cid / "run" / "plot.png"
            with open(png, "rb") as f:
                head = f.read(4096)
            assert b"diffunet plot" in head, cid  # redrawn now (marked), not the old one kept
            with open(png, "rb") as f:
                assert is_own_plot(f, png.stat().st_size), cid


def test_a_folder_it_cannot_write_in_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    # root writes in a chmod 555 folder, so the refusal of the temporary file is simulated
    from diffunet import output_files
    from diffunet.cli import main

    real_open = output_files.OpenFolder.open

    def read_only(self, name, flags, mode=0o666):
        if flags & os.O_CREAT:
            raise OSError(30, "Read-only file system", name)
        return real_open(self, name, flags, mode)

    monkeypatch.setattr(output_files.OpenFolder, "open", read_only)
    monkeypatch.chdir(tmp_path)
    assert main([*BENCH, "--json", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write in" in err and "read-only file system" in err
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    from diffunet.output_files import claim_file

    (tmp_path / "r.json").write_text("old")
    with pytest.raises(RuntimeError):
        with claim_file(tmp_path / "r.json", overwrite=True) as out, out.open() as f:
            f.write(b"half")
            raise RuntimeError("the disk filled up")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert (tmp_path / "r.json").read_text() == "old"


def test_a_file_that_appears_while_it_runs_is_kept(tmp_path) -> None:
    from diffunet.errors import UsageError
    from diffunet.output_files import claim_file

    with claim_file(tmp_path / "r.json", flag="--json") as out:
        (tmp_path / "r.json").write_text("the user's, written meanwhile")
        with pytest.raises(UsageError, match="appeared while diffunet ran"):
            out.write(b"{}")
    assert (tmp_path / "r.json").read_text() == "the user's, written meanwhile"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ---------------------------------------------------------------------------------------------
# Output folders swapped for a link to another folder while the command runs: every file is
# written relative to the descriptor the command opened (diffunet/outputs.py), so the other
# folder (here a user's, holding a file under an output's name) is never written through.


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("swap_models")
    _save_models(folder)
    return folder


def _users_folder(tmp_path: Path, *names: str) -> Path:
    """A folder of the user's holding files under the names a command writes."""
    victim = tmp_path / "users"
    victim.mkdir()
    for name in names:
        if name.endswith(".png"):
            _png(victim / name, 7)
        else:
            (victim / name).write_text(f"the user's {name}\n")
    return victim


def _swap(out: Path, victim: Path) -> None:
    """What a hostile neighbour does mid-run: the output folder moved away, a link to the
    user's folder put in its place."""
    out.rename(out.with_name("moved"))
    out.symlink_to(victim)


def test_sample_never_writes_through_an_out_dir_swapped_for_a_link(models, tmp_path,
                                                                  monkeypatch) -> None:
    import diffunet.sampling as sampling
    from diffunet.sampling import SampleOptions, generate

    victim = _users_folder(tmp_path, "000004.png", "grid.png", "manifest.json")
    before = tree(victim)
    out = tmp_path / "out"
    real, batches = sampling._draw_batch, []

    def swap_after_the_first_batch(*args, **kwargs):
        real(*args, **kwargs)
        if not batches:
            _swap(out, victim)
        batches.append(1)

    monkeypatch.setattr(sampling, "_draw_batch", swap_after_the_first_batch)
    generate(models / "model.safetensors", out,
             SampleOptions(num_samples=6, batch_size=2, num_steps=2, device="cpu"))
    assert len(batches) == 3
    assert tree(victim) == before  # the user's 000004.png, grid.png, manifest.json untouched
    moved = tmp_path / "moved"  # every file went into the folder the command claimed
    assert sorted(p.name for p in moved.iterdir()) == [
        "000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "000005.png",
        "grid.png", "manifest.json"]
    assert json.loads((moved / "manifest.json").read_text())["complete"] is True


def test_inspect_never_writes_through_an_out_dir_swapped_for_a_link(models, tmp_path,
                                                                   monkeypatch) -> None:
    import diffunet.inspection as inspection

    victim = _users_folder(tmp_path, "input.png", "stats.json", "00_conv_in.png")
    (victim / "stats.txt").write_text("the user's notes\n")
    before = tree(victim)
    out = tmp_path / "out"
    real = inspection.claim_folder

    def swap_once_claimed(*args, **kwargs):
        claim = real(*args, **kwargs)
        _swap(out, victim)
        return claim

    monkeypatch.setattr(inspection, "claim_folder", swap_once_claimed)
    inspection.inspect_model(models / "model.safetensors", out, device="cpu")
    assert tree(victim) == before
    moved = tmp_path / "moved"
    doc = json.loads((moved / "stats.json").read_text())
    assert doc["complete"] is True and set(doc["files"]) == {p.name for p in moved.iterdir()}


def test_segment_predict_never_writes_through_an_out_dir_swapped_for_a_link(
        models, tmp_path, monkeypatch) -> None:
    import diffunet.segmentation.predict as predict

    _png(tmp_path / "in" / "a.png", 30)
    _png(tmp_path / "in" / "b.png", 60)
    victim = _users_folder(tmp_path, "b.png", "b_overlay.png", "masks.json")
    before = tree(victim)
    out = tmp_path / "out"
    real, done = predict.predict_image, []

    def swap_after_the_first_image(*args, **kwargs):
        if len(done) == 1:
            _swap(out, victim)
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(predict, "predict_image", swap_after_the_first_image)
    predict.predict_masks(models / "seg.safetensors", [str(tmp_path / "in")], out,
                          device="cpu")
    assert len(done) == 2
    assert tree(victim) == before
    assert sorted(p.name for p in (tmp_path / "moved").iterdir()) == [
        "a.png", "a_overlay.png", "b.png", "b_overlay.png", "masks.json"]


def test_another_process_joins_only_the_folder_the_main_process_claimed(tmp_path) -> None:
    # under accelerate launch the other processes open --out-dir themselves: a path that names
    # another folder by then is one line, never a write there
    from diffunet.errors import FolderError
    from diffunet.outputs import claim_folder, join_folder

    out = tmp_path / "out"
    with claim_folder(out, command="sample", manifest="manifest.json", format="diffunet.x",
                      planned=["a.png"]) as claim:
        claim.write_manifest({"format": "diffunet.x", "format_version": 1}, ["a.png"])
        with join_folder(out, claim.identity, ["a.png"]) as same:
            same.write_file("a.png", b"drawn by process 1")
        with pytest.raises(ValueError, match="not a file this command listed"):
            claim.write_file("b.png", b"x")
        victim = _users_folder(tmp_path, "a.png")
        _swap(out, victim)
        with pytest.raises(FolderError, match="is not the folder the main process claimed"):
            join_folder(out, claim.identity, ["a.png"])
        claim.write_file("a.png", b"drawn by process 0")
    assert (tmp_path / "moved" / "a.png").read_bytes() == b"drawn by process 0"
    assert (victim / "a.png").read_bytes() != b"drawn by process 0"
