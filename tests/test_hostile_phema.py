"""Hostile input to post-hoc EMA (issue 24): ``diffunet ema`` and ``diffunet eval ema`` on runs
without snapshots, on folders that are not runs, at steps no snapshot reaches, for lengths the
snapshots cannot rebuild, with damaged, swapped and hostile snapshot files and ``--out`` paths
that are not the command's to write; and a resume that finds a damaged or foreign snapshot.

The table :data:`CASES` is the test (:mod:`hostile`: each case in a folder of its own, run by
the forked runner under a time and memory bound; one line, exit 2, nothing written). The shared
input is one tiny 3-step run with snapshots of both profiles after steps 2 and 3 (every 2 and
at the last; ``{shared}/run``), trained once; a case that damages it copies it first.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_run
from hostile import Case, Result, check, run_cases
from processes import cpu_env

TINY = tiny_run("data.builtin_size=16", "train.batch_size=2", "train.max_steps=3",
                "train.save_every=3", "train.phema_every=2", "sample.num_images=2",
                image_size=8)
SNAP = "run/phema/step0000003-sr0.05.safetensors"
EMA = ["ema", "{c}/run", "--sigma-rel", "0.05", "--out", "{out}"]
SHARED_EMA = ["ema", "{shared}/run", "--sigma-rel", "0.05", "--out", "{out}"]
RESUME = ["train", *TINY, "train.max_steps=4", "train.save_every=4", "--out-dir", "{c}/run",
          "--resume", "--no-progress"]
DAMAGED = ("post-hoc EMA snapshot is damaged or not this run's", "move it out of")


def copy_run(c: Path, shared: Path) -> Path:
    shutil.copytree(shared / "run", c / "run", symlinks=True)
    return c / "run"


def snapshot(change: Callable[[Path], None], name: str = SNAP) -> Callable[[Path, Path], None]:
    """Copy the shared run, then ``change`` one of its snapshot files."""
    def build(c: Path, shared: Path) -> None:
        copy_run(c, shared)
        change(c / name)
    return build


def truncated(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


def bit_flipped(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-7] ^= 0x10
    p.write_bytes(bytes(data))


def huge_header(p: Path) -> None:
    p.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")


def fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p)


def _rewritten(p: Path, **change: object) -> bytes:
    """The snapshot ``p`` written again by diffunet's own writer (a valid digest) with its
    metadata fields or its tensors changed."""
    from diffunet.checkpoint import read_tensor_file_header
    from diffunet.config import UNetConfig, from_dict
    from diffunet.phema_files import snapshot_bytes

    meta = {k: json.loads(v) for k, v in read_tensor_file_header(p).metadata.items()
            if k in ("step", "sigma_rel", "gamma", "run_id", "unet_config")}
    tensors = change.pop("tensors", None) or load_file(str(p))
    fields = {**meta, **change}
    unet = from_dict(UNetConfig, fields.pop("unet_config"), "unet")
    return snapshot_bytes(tensors, unet=unet, **fields)


def another_runs(p: Path) -> None:
    p.write_bytes(_rewritten(p, run_id="0123456789abcdef"))


def other_shapes(p: Path) -> None:
    tensors = load_file(str(p))
    first = next(iter(tensors))
    tensors[first] = torch.zeros((tensors[first].shape[0] + 1, *tensors[first].shape[1:]))
    p.write_bytes(_rewritten(p, tensors=tensors))


def float16(p: Path) -> None:
    from diffunet.checkpoint import read_tensor_file_header, tensor_file_bytes

    meta = read_tensor_file_header(p).metadata
    p.write_bytes(tensor_file_bytes({k: v.half() for k, v in load_file(str(p)).items()}, meta))


def renamed(src: str, dst: str) -> Callable[[Path, Path], None]:
    """Copy the shared run, then move snapshot ``src`` over ``dst`` (names in phema/)."""
    def build(c: Path, shared: Path) -> None:
        run = copy_run(c, shared)
        (run / "phema" / src).replace(run / "phema" / dst)
    return build


def without_snapshots(old: bool) -> Callable[[Path, Path], None]:
    """Copy the shared run without its phema/: as trained with train.phema_sigma_rels = []
    (``old``: by a diffunet before post-hoc EMA, whose config has no such keys)."""
    def build(c: Path, shared: Path) -> None:
        run = copy_run(c, shared)
        shutil.rmtree(run / "phema")
        config = json.loads((run / "config.json").read_text())
        if old:
            del config["train"]["phema_sigma_rels"], config["train"]["phema_every"]
        else:
            config["train"]["phema_sigma_rels"] = []
        (run / "config.json").write_text(json.dumps(config))
    return build


def user_file(name: str) -> Callable[[Path, Path], None]:
    def build(c: Path, shared: Path) -> None:
        (c / name).write_text("the user's\n")
    return build


def link(name: str, target: str, make_target: bool) -> Callable[[Path, Path], None]:
    def build(c: Path, shared: Path) -> None:
        if make_target:
            (c / target).write_text("the user's\n")
        (c / name).symlink_to(target)
    return build


CASES: list[Case] = [
    # --- not a run with snapshots --------------------------------------------------------------
    Case("ema-run-trained-without-profiles", EMA,
         ("has no post-hoc EMA snapshots", "train.phema_sigma_rels = []"),
         without_snapshots(old=False)),
    Case("ema-run-of-an-older-diffunet", EMA,
         ("has no post-hoc EMA snapshots", "trained by a diffunet without post-hoc EMA"),
         without_snapshots(old=True)),
    Case("ema-an-empty-folder", ["ema", "{c}", "--sigma-rel", "0.05", "--out", "{out}"],
         ("is not a run folder", "no config.json")),
    Case("ema-a-model-file", ["ema", "{shared}/run/weights/model_step0000003.safetensors",
                              "--sigma-rel", "0.05", "--out", "{out}"],
         ("is a file, not a run folder",)),
    Case("ema-a-missing-folder", ["ema", "{c}/nothing", "--sigma-rel", "0.05", "--out", "{out}"],
         ("does not exist",)),
    Case("ema-a-config-that-is-not-a-runs", EMA, ("config.json is not a diffusion run's config",),
         lambda c, shared: (c / "run").mkdir() or (c / "run" / "config.json").write_text(
             '{"name": "my project"}')),
    # --- steps and lengths ---------------------------------------------------------------------
    Case("ema-step-before-every-snapshot", [*SHARED_EMA, "--step", "0"],
         ("argument --step", "a positive integer")),
    Case("ema-step-no-snapshot-reaches", [*SHARED_EMA, "--step", "1"],
         ("no post-hoc EMA snapshot of", "is at or before step 1", "the first is of step 2")),
    Case("ema-sigma-rel-the-snapshots-cannot-rebuild",
         ["ema", "{shared}/run", "--sigma-rel", "0.01", "--out", "{out}"],
         ("sigma_rel 0.01 cannot be rebuilt at step 3", "over the 5% limit",
          "these rebuild sigma_rel")),
    *[Case(f"ema-sigma-rel-{name}", ["ema", "{shared}/run", "--sigma-rel", value, "--out",
                                      "{out}"],
           ("argument --sigma-rel", "expected a number in (0, 0.2879]"))
      for name, value in (("not-a-number", "abc"), ("nan", "nan"), ("inf", "inf"), ("zero", "0"),
                          ("negative", "-0.05"), ("wider-than-any-power-function", "0.3"))],
    # --- damaged, swapped and hostile snapshots ------------------------------------------------
    Case("ema-snapshot-truncated", EMA, ("step0000003-sr0.05.safetensors", "truncated", *DAMAGED),
         snapshot(truncated)),
    Case("ema-snapshot-bit-flipped", EMA, ("step0000003-sr0.05.safetensors",
                                           "does not match the SHA-256 it records", *DAMAGED),
         snapshot(bit_flipped)),
    Case("ema-snapshot-of-another-run", EMA,
         ("step0000003-sr0.05.safetensors", "was written by another run",
          "run id 0123456789abcdef", "move it out of"), snapshot(another_runs)),
    Case("ema-snapshot-renamed-to-another-step", EMA,
         ("step0000002-sr0.05.safetensors", "its name does not say what its metadata does",
          "renamed?", *DAMAGED), renamed("step0000003-sr0.05.safetensors",
                                         "step0000002-sr0.05.safetensors")),
    Case("ema-snapshot-renamed-to-another-profile", EMA,
         ("step0000003-sr0.1.safetensors", "its name does not say what its metadata does",
          *DAMAGED), renamed("step0000003-sr0.05.safetensors", "step0000003-sr0.1.safetensors")),
    Case("ema-snapshot-header-of-4-exabytes", EMA,
         ("step0000003-sr0.05.safetensors", "header says 4611686018427387904 bytes", *DAMAGED),
         snapshot(huge_header)),
    Case("ema-snapshot-tensors-of-another-network", EMA,
         ("its tensors do not fit the run's network", "wrong shape 1", *DAMAGED),
         snapshot(other_shapes)),
    Case("ema-snapshot-float16", EMA,
         ("its tensors do not fit the run's network", "dtype float16 where snapshots are "
          "float32", *DAMAGED), snapshot(float16)),
    Case("ema-snapshot-a-fifo", EMA, ("step0000003-sr0.05.safetensors", "not a regular file",
                                      *DAMAGED), snapshot(fifo), timeout=30),
    Case("ema-snapshot-not-safetensors", EMA, ("step0000003-sr0.05.safetensors", *DAMAGED),
         snapshot(lambda p: p.write_bytes(b"\x80\x04K\x01."))),
    # --- --out is never the user's file or a link ----------------------------------------------
    Case("ema-out-exists", [*SHARED_EMA[:-1], "{c}/mine.safetensors"],
         ("--out", "mine.safetensors exists", "left as it is"), user_file("mine.safetensors")),
    Case("ema-out-a-link-to-a-users-file", [*SHARED_EMA[:-1], "{c}/link.safetensors"],
         ("--out", "is a symbolic link"), link("link.safetensors", "mine", True)),
    Case("ema-out-a-dangling-link", [*SHARED_EMA[:-1], "{c}/link.safetensors"],
         ("--out", "is a symbolic link"), link("link.safetensors", "nowhere", False)),
    Case("ema-out-into-the-runs-phema-folder",
         [*SHARED_EMA[:-1], "{shared}/run/phema/step0000009-sr0.05.safetensors"],
         ("phema/ folder", "holds its snapshots only")),
    # --- eval ema: every length checked before anything is sampled -----------------------------
    Case("eval-ema-a-length-the-snapshots-cannot-rebuild",
         ["eval", "ema", "{shared}/run", "--sigma-rel", "0.05,0.01", "--json", "{out}",
          "--no-progress"], ("sigma_rel 0.01 cannot be rebuilt",)),
    Case("eval-ema-not-a-run", ["eval", "ema", "{c}", "--sigma-rel", "0.05", "--no-progress"],
         ("is not a run folder",)),
    Case("eval-ema-sigma-rel-list-with-a-word",
         ["eval", "ema", "{shared}/run", "--sigma-rel", "0.05,big"],
         ("argument --sigma-rel", "expected a number")),
    # --- a resumed run checks the snapshots it keeps -------------------------------------------
    Case("resume-with-a-bit-flipped-snapshot", RESUME,
         ("step0000003-sr0.05.safetensors", "does not match the SHA-256 it records", *DAMAGED),
         snapshot(bit_flipped), timeout=180),
    Case("resume-with-a-snapshot-of-another-run", RESUME,
         ("was written by another run", "move it out of"), snapshot(another_runs),
         timeout=180),
]
BY_ID = {case.id: case for case in CASES}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Result]]:
    shared = tmp_path_factory.mktemp("shared")
    proc = subprocess.run([sys.executable, "-m", "diffunet", "train", *TINY, "--out-dir",
                           str(shared / "run"), "--no-progress"], env=cpu_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    yield run_cases(CASES, tmp_path_factory.mktemp("phema_cases") / "c", shared)


@pytest.mark.parametrize("cid", list(BY_ID))
def test_hostile_post_hoc_ema_input(results: dict[str, Result], cid: str) -> None:
    check(BY_ID[cid], results[cid])
