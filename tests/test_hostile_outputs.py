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
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import diffunet
from diffunet import NoiseSchedule, ScheduleConfig, UNet, UNetConfig
from diffunet.runs import FolderLock
from hostile import Case, check, run_cases

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


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_outputs")
    shared = root / "shared"
    shared.mkdir()
    torch.manual_seed(0)
    diffunet.save_model(shared / "model.safetensors", UNet(UNetConfig(**TINY)),
                        NoiseSchedule(ScheduleConfig(num_train_timesteps=10)))
    seg = UNet(UNetConfig(**TINY, time_conditioning=False, out_channels=1))
    diffunet.save_model(shared / "seg.safetensors", seg, None, extra={"segmentation": {
        "num_classes": 2, "mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 8,
        "channels": 3}})
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
