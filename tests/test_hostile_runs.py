"""Hostile input to training: damaged run folders and states, out-of-range configs, hostile
data folders and images (issue 14: "run folders", "configs", "data folders").

The table :data:`ROWS` is the test: each row is a :class:`hostile.Case` (built in a folder of
its own, run by the forked runner under a time and memory bound, checked by
:func:`hostile.check`) plus, for the cases that must succeed, what else their output must say.
The shared input is one finished tiny 2-step run (``{shared}/run``), trained once; a case that
damages it copies it first.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save_file
import torch

from helpers import tiny_run
from hostile import Case, Result, check, run_cases
from processes import cpu_env

TINY = tiny_run("data.builtin_size=16", "train.batch_size=2", "train.max_steps=2",
                "train.save_every=2", "sample.num_images=2", image_size=8)
STATE = "run/state/step0000002"
RESUME = ["train", *TINY, "--out-dir", "{c}/run", "--resume", "--no-progress"]
RESUME3 = [*RESUME, "train.max_steps=3", "train.save_every=3"]  # resumes and trains a step
BARE_RESUME = ["train", "--out-dir", "{c}/run", "--resume", "--no-progress"]
FOLDER = ["train", *tiny_run("train.batch_size=2", "train.max_steps=2", "train.save_every=2",
                             "sample.num_images=2", "data.source=folder",
                             "data.path={c}/images", image_size=8)]
DRY_FOLDER = [*FOLDER, "--dry-run"]
MODEL = "{shared}/run/weights/model_step0000002.safetensors"
DAMAGED = ("delete", "to resume from the state before it")


@dataclass(frozen=True)
class Row:
    case: Case
    stderr: Sequence[str] = ()  # must appear somewhere on stderr (notes before the last line)
    stdout: Sequence[str] = ()
    after: Callable[[Path], None] | None = None  # more checks on the case folder afterwards


# ---------------------------------------------------------------------------------------------
# Builders


def copy_run(c: Path, shared: Path) -> Path:
    shutil.copytree(shared / "run", c / "run", symlinks=True)
    return c / "run"


def state(change: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    """Copy the shared run, then ``change`` its state folder."""
    def build(c: Path, shared: Path) -> None:
        copy_run(c, shared)
        change(c / STATE)
    return build


def trainer(change: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    """Copy the shared run, then edit its state's trainer.json as JSON."""
    def edit(folder: Path) -> None:
        data = json.loads((folder / "trainer.json").read_text())
        change(data)
        (folder / "trainer.json").write_text(json.dumps(data))
    return state(edit)


def in_run(name: str, content: bytes | str | None = None,
           change: Callable[[Path], None] | None = None) -> Callable[[Path, Path], None]:
    """Copy the shared run, then replace the run folder's file ``name``."""
    def build(c: Path, shared: Path) -> None:
        run = copy_run(c, shared)
        if content is not None:
            data = content.encode() if isinstance(content, str) else content
            (run / name).write_bytes(data)
        if change is not None:
            change(run / name)
    return build


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def no_files_entry(data: dict) -> None:
    data.pop("files")


def deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


def failed_start(extra: Sequence[str] = (), log: str = "") -> Callable[[Path, Path], None]:
    """What a start that failed before its first state left: config.json, a log, empty
    sub-folders (plus ``extra`` files)."""
    def build(c: Path, shared: Path) -> None:
        run = c / "run"
        for sub in ("samples", "weights", "state"):
            (run / sub).mkdir(parents=True)
        shutil.copy(shared / "run" / "config.json", run / "config.json")
        (run / "log.jsonl").write_text(log)
        for name in extra:
            (run / name).write_text("mine\n")
    return build


def foreign_config(c: Path, shared: Path) -> None:
    (c / "run").mkdir()
    (c / "run" / "config.json").write_text('{"name": "my project", "version": 3}\n')


def png(path: Path, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (200, 30, 30)).save(path)


def huge_png_bytes(w: int = 20000, h: int = 20000) -> bytes:
    """A PNG whose header claims w x h pixels (400 megapixels), a few bytes in all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def huge_png(path: Path) -> None:
    path.write_bytes(huge_png_bytes())


def images(*names: str, big: Sequence[str] = ()) -> Callable[[Path, Path], None]:
    def build(c: Path, shared: Path) -> None:
        (c / "images").mkdir()
        for name in names:
            png(c / "images" / name)
        for name in big:
            huge_png(c / "images" / name)
    return build


def nested(c: Path, shared: Path) -> None:
    here = str(c / "images")
    os.mkdir(here)
    for _ in range(1100):  # built iteratively: os.makedirs itself recurses
        here += "/d"
        os.mkdir(here)
    png(Path(here) / "a.png")


def links(c: Path, shared: Path) -> None:
    images("a.png", "sub/b.png")(c, shared)
    for name, target in (("up", ".."), ("self", "."), ("again", "sub"), ("root", "/")):
        (c / "images" / name).symlink_to(target)


def with_fifo(c: Path, shared: Path) -> None:
    images("a.png")(c, shared)
    os.mkfifo(c / "images" / "f.png")


def locked(c: Path, shared: Path) -> None:
    images("a.png", "locked/b.png")(c, shared)
    os.chmod(c / "images" / "locked", 0)


def linked(sub: str, fresh: bool = False) -> Callable[[Path, Path], None]:
    """The run folder's ``sub`` a link to a folder of the user's (``mine/``, holding a file
    under a name the run would write): the shared run copied (``fresh``: what a failed start
    left) with ``sub`` moved to ``mine`` and linked back."""
    def build(c: Path, shared: Path) -> None:
        if fresh:
            failed_start()(c, shared)
            run = c / "run"
        else:
            run = copy_run(c, shared)
        mine = c / "mine"
        if (run / sub).is_dir():
            (run / sub).rename(mine)
        else:
            mine.mkdir()
        for name in ("model_step0000003.safetensors", "step0000003.png", "step0000003"):
            (mine / name).write_text("the user's\n")
        (run / sub).symlink_to("../mine")
    return build


LINKED = ("is a symbolic link; diffunet never writes through a link it did not create",
          "remove the link (its target is kept), or choose another --out-dir")


def big_log(megabytes: int) -> Callable[[Path, Path], None]:
    """Copy the shared run, then give it a log of about ``megabytes`` MB: lines of steps 1 and
    2 (kept on resume), and one of step 3 (past the state: trimmed)."""
    def build(c: Path, shared: Path) -> None:
        run = copy_run(c, shared)
        text = "".join(f'{{"step": {1 + i % 2}, "loss": 0.{i:06d}, "lr": 0.0001, '
                       f'"images_per_s": 123.25, "nonfinite_skipped": 0}}\n'
                       for i in range(megabytes * 1_000_000 // 100))
        (run / "log.jsonl").write_text(text + '{"step": 3, "loss": 0.5}\n')
    return build


def big_log_trimmed(c: Path) -> None:
    """After :func:`big_log`'s resume to step 3: every line of steps 1 and 2 is kept, the stale
    one of step 3 is gone and the resumed run's own step 3 is there."""
    steps = [0, 0, 0, 0]
    with open(c / "run" / "log.jsonl", "rb") as f:
        for ln in f:
            steps[json.loads(ln)["step"]] += 1
    assert steps == [0, 100_000, 100_000, 1], steps


def with_device(c: Path, shared: Path) -> None:
    images("a.png")(c, shared)
    (c / "images" / "z.png").symlink_to("/dev/zero")  # a device named like an image


def fifo_file(name: str) -> Callable[[Path, Path], None]:
    def build(c: Path, shared: Path) -> None:
        os.mkfifo(c / name)
    return build


def png_bytes(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (30, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def hf_saved(columns: Callable[[], dict], features: Callable[[], object] | None = None
             ) -> Callable[[Path, Path], None]:
    """A Hugging Face data set written by ``save_to_disk`` into ``{c}/hf`` (``columns()`` and
    ``features()`` are made when the case is built: ``datasets`` is imported only then)."""
    def build(c: Path, shared: Path) -> None:
        import datasets
        ds = datasets.Dataset.from_dict(columns(), features=features() if features else None)
        ds.save_to_disk(str(c / "hf"))
    return build


def hf_paths_become_fifos(c: Path, shared: Path) -> None:
    """A parquet data set whose Image items name files (no bytes), which then become FIFOs."""
    import datasets
    (c / "files").mkdir()
    names = [c / "files" / f"{i}.png" for i in range(2)]
    for name in names:
        png(name)
    ds = datasets.Dataset.from_dict({"img": [{"bytes": None, "path": str(n)} for n in names]},
                                    features=datasets.Features({"img": datasets.Image()}))
    (c / "hf").mkdir()
    ds.to_parquet(str(c / "hf" / "data.parquet"))
    # converted into the cache now, as by an earlier run: the case's stderr is then only
    # diffunet's (datasets draws progress bars while it converts)
    datasets.load_dataset(str(c / "hf"), split="train", cache_dir=str(c / "cache"))
    for name in names:
        fifo(name)


def hf_file_swapped(pattern: str, how: str) -> Callable[[Path, Path], None]:
    """A saved data set whose file ``pattern`` becomes a FIFO (``how="fifo"``) or a link to
    /dev/zero: datasets would block (or never end) reading it."""
    def build(c: Path, shared: Path) -> None:
        hf_saved(lambda: {"img": [{"bytes": png_bytes(), "path": None}] * 2},
                 hf_image_feature)(c, shared)
        target = next((c / "hf").glob(pattern))
        if how == "fifo":
            fifo(target)
        else:
            target.unlink()
            target.symlink_to("/dev/zero")
    return build


def hf_image_feature() -> object:
    import datasets
    return datasets.Features({"img": datasets.Image()})


def hf_labelled_feature() -> object:
    import datasets
    return datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})


def log_of(*steps: int) -> Callable[[Path], None]:
    """An ``after`` check: the run's log holds exactly these steps."""
    def after(c: Path) -> None:
        lines = (c / "run" / "log.jsonl").read_text().splitlines()
        assert [json.loads(ln)["step"] for ln in lines] == list(steps), lines
    return after


# ---------------------------------------------------------------------------------------------
# The table


HF = ["train", *tiny_run("train.batch_size=2", "train.max_steps=2", "sample.num_images=2",
                         "data.source=hf", "data.name={c}/hf", "data.path={c}/cache",
                         image_size=8), "--out-dir", "{out}", "--no-progress"]
STREAMED = [*HF, "data.streaming=true"]
HF_CASE = {"may_change": ("cache",), "out_created": True}  # the run starts, the first batch fails


def hf_rows() -> list[Row]:
    """Hostile Hugging Face data sets (issue 23), indexed and streamed: each item is refused in
    one line naming the item, the column and the data set; nothing blocks or makes 4e9 names."""
    rows = []
    for mode, argv, where in (("indexed", HF, "of 'img' in the Hugging Face data set"),
                              ("streamed", STREAMED, "of 'img' in the stream of the Hugging "
                               "Face data set")):
        rows += [
            Row(Case(f"hf-{mode}-image-paths-become-fifos", argv,
                     ("data.image_column", where, "not a regular file", "files/"),
                     hf_paths_become_fifos, timeout=60, **HF_CASE)),
            Row(Case(f"hf-{mode}-400-megapixel-item", argv,
                     ("data.image_column", where, "20000x20000 = 400,000,000 pixels",
                      "DIFFUNET_MAX_IMAGE_PIXELS"),
                     hf_saved(lambda: {"img": [{"bytes": png_bytes(), "path": None},
                                               {"bytes": huge_png_bytes(), "path": None}]},
                              hf_image_feature), **HF_CASE)),
            Row(Case(f"hf-{mode}-item-none", argv, ("data.image_column", where, "is None",
                                                    "not an image"),
                     hf_saved(lambda: {"img": [None, None]}, hf_image_feature), **HF_CASE)),
        ]
        for kind, values in (("string", ["hello", "world"]), ("int", [3, 4]),
                             ("dict", [{"a": 1}, {"a": 2}])):
            rows.append(Row(Case(f"hf-{mode}-item-a-{kind}", [*argv, "data.image_column=img"],
                                 ("data.image_column", where, "not an image"),
                                 hf_saved(lambda values=values: {"img": values}), **HF_CASE)))
    for mode, argv in (("indexed", HF), ("streamed", STREAMED)):
        for pattern, how in (("*.arrow", "fifo"), ("state.json", "fifo"), ("*.arrow", "zero")):
            rows.append(Row(Case(f"hf-{mode}-{pattern.strip('*.')}-{how}", argv,
                                 ("data.name", pattern.strip("*"), "not a regular file",
                                  "in the data set folder"),
                                 hf_file_swapped(pattern, how), timeout=30, **HF_CASE)))
    labelled = hf_saved(lambda: {"img": [{"bytes": png_bytes(), "path": None}] * 2,
                                 "label": [0, 4_000_000_000]}, hf_labelled_feature)
    rows += [
        # refused before the run starts: the labels are read when the data set is built
        Row(Case("hf-indexed-label-four-billion", [*HF, "data.label_column=label"],
                 ("data.label_column", "item 1 of 'label' in the Hugging Face data set",
                  "4,000,000,001 classes", "renumber"), labelled, **HF_CASE)),
        Row(Case("hf-indexed-label-a-string", [*HF, "data.label_column=label"],
                 ("data.label_column", "item 0 of 'label'", "class indices"),
                 hf_saved(lambda: {"img": [{"bytes": png_bytes(), "path": None}] * 2,
                                   "label": ["cat", "dog"]}), **HF_CASE)),
        Row(Case("hf-streamed-label-four-billion", [*STREAMED, "data.label_column=label",
                                                    "unet.num_classes=3"],
                 ("data.label_column", "of 'label' in the stream of", "4000000000",
                  "not a class index in [0, 3)"), labelled, **HF_CASE)),
    ]
    return rows


HF_ROWS = hf_rows()

ROWS: list[Row] = [
    # --- states: every file recorded (size, SHA-256) and checked on resume ------------------
    Row(Case("state-file-removed", RESUME, ("rng_rank0.safetensors is missing", *DAMAGED),
             state(lambda s: (s / "rng_rank0.safetensors").unlink()))),
    Row(Case("state-file-other-tensors", RESUME, ("rng.safetensors has", "bytes", *DAMAGED),
             state(lambda s: save_file({"step_gen": torch.zeros(3, dtype=torch.uint8)},
                                       str(s / "rng.safetensors"))))),
    Row(Case("state-file-same-size-other-content", RESUME,
             ("model.safetensors is not the file the state recorded", *DAMAGED),
             state(lambda s: shutil.copy(s / "ema.safetensors", s / "model.safetensors")))),
    Row(Case("state-file-symlink", RESUME, ("not a regular file", *DAMAGED),
             state(lambda s: ((s / "model.safetensors").unlink(),
                              (s / "model.safetensors").symlink_to("ema.safetensors"))))),
    Row(Case("state-file-added", RESUME, ("rng_rank1.safetensors is not a file the state",
                                          *DAMAGED),
             state(lambda s: shutil.copy(s / "rng_rank0.safetensors",
                                         s / "rng_rank1.safetensors")))),
    Row(Case("state-trainer-json-removed", RESUME, ("trainer.json cannot be read", *DAMAGED),
             state(lambda s: (s / "trainer.json").unlink()))),
    Row(Case("state-without-digests-resumes-with-a-note", RESUME3, ("diffunet sample",),
             trainer(no_files_entry), code=0, may_change=("run",)),
        stderr=("did not record its files' digests", "unverified")),
    Row(Case("state-intact-resumes", RESUME3, ("diffunet sample",), copy_run, code=0,
             may_change=("run",)), after=log_of(2, 3)),
    # --- trainer.json: bounded, schema-checked ---------------------------------------------
    Row(Case("trainer-deep-nesting", RESUME, ("nested more than", *DAMAGED),
             state(lambda s: (s / "trainer.json").write_text(deep())))),
    Row(Case("trainer-not-utf8", RESUME, ("trainer.json cannot be read", *DAMAGED),
             state(lambda s: (s / "trainer.json").write_bytes(b'{"step": "\xff\xfe"}')))),
    Row(Case("trainer-a-list", RESUME, ("is not a JSON object", *DAMAGED),
             state(lambda s: (s / "trainer.json").write_text("[1, 2]")))),
    Row(Case("trainer-huge-step", RESUME, ("does not match the folder name", *DAMAGED),
             trainer(lambda d: d.update(step=10**30)))),
    Row(Case("trainer-5000-digit-step", RESUME, ("trainer.json cannot be read", *DAMAGED),
             state(lambda s: (s / "trainer.json").write_text(
                 '{"format_version": 1, "step": ' + "9" * 5000 + "}")))),
    Row(Case("trainer-wrong-type", RESUME, ("world_size: expected int", *DAMAGED),
             trainer(lambda d: d.update(world_size="1")))),
    Row(Case("trainer-missing-key", RESUME, ("optimizer: missing", *DAMAGED),
             trainer(lambda d: d.pop("optimizer")))),
    Row(Case("trainer-bad-param-groups", RESUME, ("optimizer.param_groups[0].params", *DAMAGED),
             trainer(lambda d: d["optimizer"]["param_groups"][0].update(params="all")))),
    Row(Case("trainer-file-name-escapes", RESUME, ("is not the name of a state file", *DAMAGED),
             trainer(lambda d: d["files"].update({"../../x.safetensors": d["files"].pop(
                 "rng.safetensors")})))),
    Row(Case("trainer-a-fifo", RESUME, ("not a regular file", *DAMAGED),
             state(lambda s: fifo(s / "trainer.json")), timeout=30)),
    # --- config.json (read by --resume without a CONFIG) -----------------------------------
    Row(Case("config-deep-nesting", BARE_RESUME, ("config.json is damaged", "nested"),
             in_run("config.json", deep()))),
    Row(Case("config-a-list", BARE_RESUME, ("config.json is damaged", "expected a JSON object"),
             in_run("config.json", "[1, 2, 3]"))),
    Row(Case("config-not-utf8", BARE_RESUME, ("config.json is damaged",),
             in_run("config.json", b'{"train": {"lr": "\xff"}}'))),
    Row(Case("config-section-not-a-table", BARE_RESUME, ("config.json is damaged", "train"),
             in_run("config.json", '{"train": 3}'))),
    Row(Case("config-wrong-type", BARE_RESUME, ("train.lr", "expected float"),
             in_run("config.json", '{"train": {"lr": "fast"}}'))),
    Row(Case("config-a-fifo", BARE_RESUME, ("config.json is damaged", "not a regular file"),
             in_run("config.json", change=fifo), timeout=30)),
    # --- log.jsonl: checked on resume; a torn last line is trimmed ---------------------------
    Row(Case("log-not-utf8", RESUME, ("log.jsonl is damaged", "line 1 is not UTF-8"),
             in_run("log.jsonl", b'{"step": 2, "loss": "\xff"}\n'))),
    Row(Case("log-arrays", RESUME, ("log.jsonl is damaged", "line 1: not a JSON object"),
             in_run("log.jsonl", "[1, 2]\n[3]\n"))),
    Row(Case("log-deep-nesting", RESUME, ("log.jsonl is damaged", "nested"),
             in_run("log.jsonl", '{"step": 1, "x": ' + deep() + "}\n"))),
    Row(Case("log-step-a-string", RESUME, ("log.jsonl is damaged", "integer step"),
             in_run("log.jsonl", '{"step": "2"}\n'))),
    Row(Case("log-a-fifo", RESUME, ("log.jsonl is damaged", "not a regular file"),
             in_run("log.jsonl", change=fifo), timeout=30)),
    Row(Case("log-torn-last-line-is-trimmed", RESUME3, ("diffunet sample",),
             in_run("log.jsonl", change=lambda p: p.write_text(p.read_text() + '{"step": 3, "lo')),
             code=0, may_change=("run",)), after=log_of(2, 3)),
    # --- round two (issue 23): the run folder's sub-folders are never written through a link -
    *[Row(Case(f"resume-with-{sub}-a-link-to-a-users-folder", RESUME3,
               (f"run/{sub} {LINKED[0]}", LINKED[1]), linked(sub)))
      for sub in ("weights", "samples", "state", "phema", "tensorboard")],
    Row(Case("fresh-start-with-weights-a-link-to-a-users-folder",
             ["train", *TINY, "--out-dir", "{c}/run", "--no-progress"],
             ("run/weights", LINKED[0]), linked("weights", fresh=True))),
    # issue 23: the log is streamed (it took 10-40x its size), lines and steps bounded; a
    # resume with a tiny log needs 256-384 MiB of address space here, reading 20 MB whole >512
    Row(Case("log-of-20-megabytes-resumes-capped", RESUME3, ("diffunet sample",), big_log(20),
             code=0, may_change=("run",), memory=512 << 20, timeout=60),
        after=big_log_trimmed),
    Row(Case("log-integer-of-5000-digits", RESUME, ("log.jsonl is damaged", "line 1",
                                                    "an integer of more than 4,300 digits"),
             in_run("log.jsonl", '{"step": 1, "loss": ' + "9" * 5000 + "}\n"))),
    Row(Case("log-step-past-2-to-the-63", RESUME, ("log.jsonl is damaged", "integer step"),
             in_run("log.jsonl", f'{{"step": 1}}\n{{"step": {2**63}}}\n'))),
    Row(Case("log-line-of-two-megabytes", RESUME, ("log.jsonl is damaged",
                                                   "line 1 is longer than 1,048,576 bytes"),
             in_run("log.jsonl", '{"step": 1, "x": "' + "x" * (2 << 20) + '"}\n'))),
    Row(Case("log-over-a-gibibyte", RESUME, ("log.jsonl is damaged", "more than the "
                                                                     "1,073,741,824"),
             in_run("log.jsonl", change=lambda p: os.truncate(p, (1 << 30) + 1)))),
    # --- runs that never saved a state -------------------------------------------------------
    Row(Case("killed-before-first-state-resume-trims-log", RESUME, ("diffunet sample",),
             failed_start(log='{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'), code=0,
             may_change=("run",)), stderr=("no saved state",), after=log_of(2)),
    Row(Case("failed-start-then-corrected-command", ["train", *TINY, "--out-dir", "{c}/run",
                                                     "--no-progress"], ("diffunet sample",),
             failed_start(log='{"step": 1}\n'), code=0, may_change=("run",)),
        stderr=("never saved a state",), after=log_of(2)),
    Row(Case("failed-start-plus-a-user-file-is-refused", ["train", *TINY, "--out-dir", "{c}/run"],
             ("is not empty", "--resume"), failed_start(extra=("notes.txt",)))),
    Row(Case("foreign-config-json-is-refused", ["train", *TINY, "--out-dir", "{c}/run"],
             ("is not empty",), foreign_config)),
    # --- configs: seeds, finite floats, preview size, devices, memory ----------------------
    *[Row(Case(f"seed-{name}", [*cmd, f"train.seed={seed}", "--dry-run"],
               ("train.seed", "0 <= seed < 2**32")))
      for name, seed in (("negative", -1), ("2-64", 2**64), ("2-32", 2**32))
      for cmd in (["train"],)],
    Row(Case("segment-seed-negative", ["segment", "train", "train.seed=-1", "--dry-run"],
             ("train.seed", "0 <= seed < 2**32"))),
    *[Row(Case(f"nonfinite-{key}-{value}", ["train", f"{key}={value}", "--dry-run"],
               (key, "must be a finite number")))
      for key, value in (("train.weight_decay", "nan"), ("train.lr", "inf"),
                         ("train.ema_decay", "nan"), ("unet.dropout", "nan"),
                         ("schedule.beta_end", "inf"), ("sample.eta", "nan"),
                         ("train.adam_betas", "[0.9, nan]"), ("train.min_snr_gamma", "inf"))],
    Row(Case("segment-nonfinite-std", ["segment", "train", "data.std=[inf, 1, 1]", "--dry-run"],
             ("data.std", "must be a finite number"))),
    Row(Case("preview-of-a-billion-images", ["train", *TINY, "sample.num_images=1000000000",
                                             "--out-dir", "{out}"],
             ("sample.num_images", "256", "diffunet sample"))),
    *[Row(Case(f"sample-device-{device}", ["sample", MODEL, "--device", device, "--out-dir",
                                           "{out}", "--num-samples", "1"],
               ("--device", "cpu, cuda or cuda:N")))
      for device in ("meta", "foo", "mps")],
    Row(Case("huge-network-dry-run", ["train", "unet.base_channels=100000", "unet.num_groups=4",
                                      "--dry-run"],
             ("parameters", "more than the", "lower unet.base_channels")), ),
    Row(Case("huge-network-train", ["train", "unet.base_channels=100000", "unet.num_groups=4",
                                    "--out-dir", "{out}"],
             ("parameters", "more than the", "lower unet.base_channels"))),
    Row(Case("huge-batch-train", ["train", *TINY, "train.batch_size=4000000000", "--out-dir",
                                  "{out}"], ("train.batch_size", "more than the"))),
    # --- round two (issue 23): numbers and nesting no setting can have ------------------------
    Row(Case("override-integer-of-5000-digits", ["train", "train.seed=" + "9" * 5000,
                                                 "--dry-run"],
             ("train.seed", "more than 4,300 digits"))),
    Row(Case("override-hex-integer-of-24000-digits", ["train", "train.seed=0x" + "f" * 20000,
                                                      "--dry-run"],
             ("train.seed", "an integer of about 24,083 digits", "out of range for any"))),
    Row(Case("override-hex-integer-for-a-float", ["train", "train.lr=0x" + "f" * 20000,
                                                  "--dry-run"],
             ("train.lr", "out of range for a number setting"))),
    Row(Case("override-hex-integer-for-a-string", ["train", "train.run_name=0x" + "f" * 20000,
                                                   "--dry-run"],
             ("train.run_name", "expected str", "24,083 digits"))),
    Row(Case("override-3000-nested-brackets", ["train", "train.trackers=" + "[" * 3000
                                               + "]" * 3000, "--dry-run"],
             ("train.trackers", "nested too deep"))),
    Row(Case("config-nested-100000-deep", ["train", "{c}/deep.toml", "--dry-run"],
             ("deep.toml", "nested too deep"),
             lambda c, shared: (c / "deep.toml").write_text(
                 "a = " + "[" * 100_000 + "]" * 100_000 + "\n"))),
    Row(Case("config-hex-integer-in-the-file", ["train", "{c}/hex.toml", "--dry-run"],
             ("train.seed", "out of range"),
             lambda c, shared: (c / "hex.toml").write_text("[train]\nseed = 0x" + "f" * 20000
                                                          + "\n"))),
    Row(Case("config-file-of-5-mb", ["train", "{c}/big.toml", "--dry-run"],
             ("big.toml", "cannot be read as a config", "bytes"),
             lambda c, shared: (c / "big.toml").write_text("# " + "x" * (5 << 20) + "\n"))),
    Row(Case("builtin-size-two-billion", ["train", "data.builtin_size=2000000000", "--dry-run"],
             ("data.builtin_size", "at most 10,000,000"))),
    *[Row(Case(f"{f}-preview-of-a-billion-steps", ["train", f"schedule.formulation={f}",
                                                    "sample.num_steps=1000000000", "--dry-run"],
               ("sample.num_steps", "more than 100,000 steps")))
      for f in ("edm", "flow")],
    # --- round two (issue 23): reads that never block, one line per hostile item -------------
    Row(Case("inspect-image-a-fifo", ["inspect", MODEL, "--image", "{c}/f.png", "--out-dir",
                                      "{out}"], ("f.png", "not a regular file"),
             fifo_file("f.png"), timeout=30)),
    Row(Case("inspect-image-a-device", ["inspect", MODEL, "--image", "/dev/zero", "--out-dir",
                                        "{out}"], ("/dev/zero", "not a regular file"),
             timeout=30)),
    Row(Case("inspect-image-a-folder", ["inspect", MODEL, "--image", "{c}", "--out-dir",
                                        "{out}"], ("is a folder", "give an image file"))),
    Row(Case("sample-init-image-a-fifo", ["sample", MODEL, "--init-image", "{c}/f.png",
                                          "--out-dir", "{out}"],
             ("--init-image", "f.png", "not a regular file"), fifo_file("f.png"), timeout=30)),
    Row(Case("sample-mask-a-device", ["sample", MODEL, "--init-image", "{c}/a.png", "--mask",
                                      "/dev/zero", "--out-dir", "{out}"],
             ("--mask", "/dev/zero", "not a regular file"),
             lambda c, shared: png(c / "a.png"), timeout=30)),
    Row(Case("tensorboard-out-dir-not-utf8", ["train", *TINY, "train.trackers=[tensorboard]",
                                              "--out-dir", "{c}/run\udcff", "--no-progress"],
             ("--out-dir", "run\\xff", "not UTF-8", "train.trackers", "UTF-8"))),
    Row(Case("data-folder-device-png", DRY_FOLDER, (), with_device, code=0, timeout=30),
        stdout=("data.path: 1 image(s)", "1 skipped", "z.png")),
    *([] if importlib.util.find_spec("datasets") is None else HF_ROWS),
    # --- data folders ------------------------------------------------------------------------
    Row(Case("dry-run-missing-data-folder", DRY_FOLDER, ("data.path", "does not exist"))),
    Row(Case("dry-run-empty-data-folder", DRY_FOLDER, ("data.path", "no image files"),
             lambda c, shared: (c / "images").mkdir())),
    Row(Case("dry-run-data-folder", DRY_FOLDER, (), images("a.png", "b.png"), code=0),
        stdout=("data.path: 2 image(s)",)),
    Row(Case("data-folder-1100-levels-deep", DRY_FOLDER, (), nested, code=0),
        stdout=("data.path: 1 image(s)",)),
    Row(Case("data-folder-symlink-loops", DRY_FOLDER, (), links, code=0),
        stdout=("data.path: 2 image(s)",)),
    Row(Case("data-path-proc", [*DRY_FOLDER[:-1], "data.path=/proc", "--dry-run"],
             ("data.path", "/proc"), timeout=30)),
    Row(Case("data-folder-fifo-png", DRY_FOLDER, (), with_fifo, code=0, timeout=30),
        stdout=("data.path: 1 image(s)", "1 skipped", "f.png")),
    Row(Case("data-folder-over-pixel-limit-is-skipped", [*FOLDER, "--out-dir", "{out}",
                                                         "--no-progress"],
             ("diffunet sample",), images("a.png", big=("huge.png",)), code=0,
             out_created=True),
        stderr=("skipped 1 file(s)", "DIFFUNET_MAX_IMAGE_PIXELS", "huge.png")),
    Row(Case("data-folder-only-over-limit", DRY_FOLDER, ("no readable image", "1 file(s)",
                                                         "DIFFUNET_MAX_IMAGE_PIXELS"),
             images(big=("huge.png",)))),
]
if os.geteuid() != 0:  # root reads a chmod-0 folder anyway
    ROWS.append(Row(Case("data-folder-unreadable-subfolder", DRY_FOLDER, (), locked, code=0),
                    stdout=("data.path: 1 image(s)", "1 skipped", "locked")))

BY_ID = {row.case.id: row for row in ROWS}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Result]]:
    shared = tmp_path_factory.mktemp("shared")
    proc = subprocess.run([sys.executable, "-m", "diffunet", "train", *TINY, "--out-dir",
                           str(shared / "run"), "--no-progress"], env=cpu_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # mktemp numbers its folders per session (another module's "cases" may be cases0): the
    # checks after a case read the folder this module's cases ran in
    cases = tmp_path_factory.mktemp("run_cases") / "c"
    out = run_cases([row.case for row in ROWS], cases, shared)
    CASES_FOLDER["c"] = cases
    for folder in cases.glob("*/images/locked"):
        folder.chmod(0o755)  # so pytest can clean up
    yield out
    unnest(cases / "data-folder-1100-levels-deep" / "images")  # rmtree recurses per level


CASES_FOLDER: dict[str, Path] = {}
"""Where :func:`results` ran this module's cases (for the checks after a case)."""


def unnest(folder: Path) -> None:
    """Remove a deeply nested folder chain without recursion (deepest first)."""
    chain = [str(folder)]
    while os.path.isdir(chain[-1] + "/d"):
        chain.append(chain[-1] + "/d")
    for here in reversed(chain):
        for entry in os.scandir(here):
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
        os.rmdir(here)


@pytest.mark.parametrize("cid", list(BY_ID))
def test_hostile_run_input(results: dict[str, Result], cid: str) -> None:
    row = BY_ID[cid]
    result = results[cid]
    check(row.case, result)
    for part in row.stderr:
        assert part in result.stderr, (part, result.stderr)
    for part in row.stdout:
        assert part in result.stdout, (part, result.stdout)
    if row.after is not None:
        row.after(CASES_FOLDER["c"] / cid)


def test_run_subfolders_swapped_for_links_mid_run_are_never_written_through(
        tmp_path: Path, capsys: pytest.CaptureFixture, cpu_accelerate: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # samples/ and weights/ are opened once: a neighbour who swaps them for links to a user's
    # folders after the first save gets nothing written there (the run writes on into the
    # folders it opened, wherever they now are)
    from diffunet import cli
    from diffunet.runs import Run

    out, mine = tmp_path / "run", tmp_path / "mine"
    for sub in ("samples", "weights"):
        (mine / sub).mkdir(parents=True)
        for name in ("step0000004.png", "model_step0000004.safetensors"):
            (mine / sub / name).write_text("the user's\n")
    real, saves = Run.save_state, []

    def swap_after_the_first_save(self, *args, **kwargs):
        path = real(self, *args, **kwargs)
        if not saves:
            for sub in ("samples", "weights"):
                (out / sub).rename(tmp_path / f"moved-{sub}")
                (out / sub).symlink_to(mine / sub)
        saves.append(path)
        return path

    monkeypatch.setattr(Run, "save_state", swap_after_the_first_save)
    args = [a.replace("train.max_steps=2", "train.max_steps=4") for a in TINY]
    assert cli.main(["train", *args, "train.sample_every=2", "--out-dir", str(out),
                     "--no-progress"]) == 0, capsys.readouterr().err
    assert len(saves) == 2
    for sub in ("samples", "weights"):
        assert {p.name: p.read_bytes() for p in (mine / sub).iterdir()} == {
            "step0000004.png": b"the user's\n", "model_step0000004.safetensors": b"the user's\n"}
    assert sorted(p.name for p in (tmp_path / "moved-weights").iterdir()) == [
        "model_step0000002.safetensors", "model_step0000004.safetensors"]
    assert sorted(p.name for p in (tmp_path / "moved-samples").iterdir()) == [
        "step0000002.png", "step0000004.png"]


def test_a_state_folder_swapped_for_a_link_mid_run_stops_the_next_save(
        tmp_path: Path, capsys: pytest.CaptureFixture, cpu_accelerate: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the save checks first that state/ is still the folder the run opened (a state written on
    # into the moved folder would not be where --resume looks), and stops in one line if not
    from diffunet import cli
    from diffunet.runs import Run

    out, mine = tmp_path / "run", tmp_path / "mine"
    (mine / "step0000004").mkdir(parents=True)
    (mine / "step0000004" / "notes.txt").write_text("the user's\n")
    real, saves = Run.save_state, []

    def swap_after_the_first_save(self, *args, **kwargs):
        path = real(self, *args, **kwargs)
        if not saves:
            (out / "state").rename(tmp_path / "moved-state")
            (out / "state").symlink_to(mine)
        saves.append(path)
        return path

    monkeypatch.setattr(Run, "save_state", swap_after_the_first_save)
    args = [a.replace("train.max_steps=2", "train.max_steps=4") for a in TINY]
    assert cli.main(["train", *args, "--out-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("state is no longer the folder this run opened (a link or another "
                            "folder was put there while it ran); diffunet never writes through "
                            "it: put the run's state/ back, then --resume"), err
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == [
        "step0000004", "step0000004/notes.txt"]
    assert (tmp_path / "moved-state" / "step0000002" / "trainer.json").is_file()


def test_a_state_folder_swapped_after_the_check_is_never_written_through(
        tmp_path: Path, capsys: pytest.CaptureFixture, cpu_accelerate: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the swap lands between the save's check and its writes: every write of the state is
    # relative to the state/ folder the run opened, so the user's folder behind the link gets
    # nothing (no temporary folder, no state, nothing pruned) and the state goes on into the
    # folder the run opened, wherever it now is
    from diffunet import cli
    from diffunet.runs import Run

    out, mine = tmp_path / "run", tmp_path / "mine"
    for name in ("step0000002", "step0000004", ".tmp-step0000004"):
        (mine / name).mkdir(parents=True)
        (mine / name / "notes.txt").write_text("the user's\n")
    real, checks = Run._check_still_opened, []

    def swap_after_the_second_check(self, sub):
        real(self, sub)
        checks.append(sub)
        if len(checks) == 2:
            (out / "state").rename(tmp_path / "moved-state")
            (out / "state").symlink_to(mine)

    monkeypatch.setattr(Run, "_check_still_opened", swap_after_the_second_check)
    args = [a.replace("train.max_steps=2", "train.max_steps=4") for a in TINY]
    assert cli.main(["train", *args, "train.keep_last=1", "--out-dir", str(out),
                     "--no-progress"]) == 0, capsys.readouterr().err
    assert checks == ["state", "state"]
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*")) == [
        ".tmp-step0000004", ".tmp-step0000004/notes.txt", "step0000002",
        "step0000002/notes.txt", "step0000004", "step0000004/notes.txt"]
    assert all((mine / n / "notes.txt").read_text() == "the user's\n"
               for n in ("step0000002", "step0000004", ".tmp-step0000004"))
    moved = tmp_path / "moved-state"
    assert sorted(p.name for p in moved.iterdir()) == ["step0000004"]  # step 2 pruned there
    assert {p.name for p in (moved / "step0000004").iterdir()} >= {
        "model.safetensors", "ema.safetensors", "optimizer.safetensors", "trainer.json",
        "rng_rank0.safetensors"}
