"""``data.source = "hf"``: a Hugging Face ``datasets`` data set saved to disk in the test (a few
8x8 images with labels), read by index like every other source, and its one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")

from helpers import tiny_run

from diffunet import cli
from diffunet.config import DataConfig
from diffunet.data import build_dataset
from diffunet.errors import ConfigError, DataError, MissingDependencyError

N = 6


def _tiny_set(folder: Path) -> Path:
    """Six 8x8 RGB images (one solid colour each, plus a pixel) with ClassLabel labels 0..2."""
    from PIL import Image
    images = []
    for i in range(N):
        img = Image.new("RGB", (8, 8), (40 * i, 255 - 40 * i, 17 * i))
        img.putpixel((i, i), (255, 255, 255))
        images.append(img)
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"]),
                                  "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(N)],
                                     "caption": [f"c{i}" for i in range(N)]}, features=features)
    path = folder / "tiny"
    ds.save_to_disk(str(path))
    return path


def _cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(**{"source": "hf", "name": str(path), "image_size": 8, "channels": 3, **kw})


def test_items_shapes_labels_and_repeatable(tmp_path: Path) -> None:
    path = _tiny_set(tmp_path)
    for cache in (False, True):
        ds = build_dataset(_cfg(path, label_column="label", cache=cache))
        assert len(ds) == N and ds.num_classes == 3 and ds.class_names == ["a", "b", "c"]
        for i in range(N):
            x, y = ds[i]
            assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == i % 3
            assert -1.0 <= x.min() and x.max() <= 1.0
            x2, y2 = ds[i]
            assert torch.equal(x, x2) and y2 == y
        assert not torch.equal(ds[0][0], ds[1][0])
    unlabelled = build_dataset(_cfg(path, channels=1))  # the Image column is found by its type
    x, y = unlabelled[2]
    assert x.shape == (1, 8, 8) and y == -1 and unlabelled.num_classes is None


def test_two_step_training_run(tmp_path: Path, capsys, cpu_accelerate) -> None:
    path = _tiny_set(tmp_path)
    out = tmp_path / "run"
    rc = cli.main(["train", *tiny_run("data.source=hf", f"data.name={path}",
                                      "data.label_column=label", "unet.num_classes=3",
                                      "train.max_steps=2", "train.save_every=2",
                                      "train.sample_every=1000", image_size=8),
                   "--out-dir", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert list((out / "weights").glob("*.safetensors"))
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["source"] == "hf" and data["label_column"] == "label"


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_unknown_column_lists_the_columns(tmp_path: Path) -> None:
    path = _tiny_set(tmp_path)
    with pytest.raises(DataError) as e:
        build_dataset(_cfg(path, label_column="labels"))
    msg = _one_line(e)
    assert "data.label_column" in msg and "'labels'" in msg and "img, label, caption" in msg
    with pytest.raises(DataError) as e:
        build_dataset(_cfg(path, image_column="picture"))
    assert "data.image_column" in _one_line(e)


def test_missing_path_and_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        build_dataset(_cfg(tmp_path / "nowhere"))
    msg = _one_line(e)
    assert "data.name" in msg and str(tmp_path / "nowhere") in msg
    path = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.load_from_disk(str(_tiny_set(tmp_path)))}
                         ).save_to_disk(str(path))
    assert len(build_dataset(_cfg(path))) == N
    with pytest.raises(DataError) as e:
        build_dataset(_cfg(path, split="test"))
    assert "data.split" in _one_line(e) and "train" in str(e.value)


def test_offline_hub_name_says_what_was_tried(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset",  # no network in tests: the Hub says no
                        lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(DataError) as e:
        build_dataset(_cfg("no-such-dataset-xyz"))
    msg = _one_line(e)
    assert "not a local folder" in msg and "HF_DATASETS_OFFLINE=1" in msg


def test_package_missing_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _tiny_set(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` -> ImportError
    with pytest.raises(MissingDependencyError) as e:
        build_dataset(_cfg(path))
    assert 'pip install "diffunet[hf]"' in _one_line(e)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="data.name"):
        DataConfig(source="hf")
    with pytest.raises(ConfigError, match="data.streaming: is for data.source = 'hf'") as e:
        DataConfig(source="folder", path="x", streaming=True)
    assert "\n" not in str(e.value)
    DataConfig(source="hf", name="cifar10", streaming=True)


# --- data.streaming = true --------------------------------------------------------------------


def _stream(path: Path, **kw):
    from diffunet.data import HFStream
    return HFStream(_cfg(path, streaming=True, **kw), shuffle_buffer=4)


def test_stream_batches_are_deterministic_seamless_and_split_across_processes(
        tmp_path: Path) -> None:
    path = _tiny_set(tmp_path)
    stream = _stream(path, label_column="label")
    assert stream.class_names == ["a", "b", "c"]
    whole = stream.batches(4, seed=3)
    first = [next(whole) for _ in range(6)]  # 24 examples: four epochs of 6, no seam
    again = stream.batches(4, seed=3)
    for images, labels in first:
        x, y = next(again)
        assert torch.equal(x, images) and torch.equal(y, labels)
        assert images.shape == (4, 3, 8, 8) and set(labels.tolist()) <= {0, 1, 2}
    labels_seen = torch.cat([y for _, y in first]).tolist()
    for k in range(3):  # every epoch holds each image once: two of each class per epoch
        assert labels_seen.count(k) == 8
    # resuming at step 2 gives steps 2.. of the uninterrupted stream
    resumed = stream.batches(4, seed=3, start_step=2)
    for images, _ in first[2:]:
        assert torch.equal(next(resumed)[0], images)
    # two processes: rank r decodes the r-th half of each global batch
    halves = [stream.batches(4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for images, _ in first:
        assert torch.equal(torch.cat([next(h)[0] for h in halves]), images)
    other = next(stream.batches(4, seed=4))[0]
    assert not torch.equal(other, first[0][0])  # another seed, another order


def test_streamed_training_resumes_like_an_uninterrupted_run(tmp_path: Path, capsys,
                                                             cpu_accelerate) -> None:
    path = _tiny_set(tmp_path)
    args = tiny_run("data.source=hf", f"data.name={path}", "data.streaming=true",
                    "train.sample_every=1000", "train.save_every=2", "train.log_every=1",
                    image_size=8)

    def train(out: Path, steps: int, *flags: str) -> dict[int, float]:
        assert cli.main(["train", *args, f"train.max_steps={steps}", "--out-dir", str(out),
                         "--no-progress", *flags]) == 0, capsys.readouterr().err
        return {r["step"]: r["loss"] for r in map(json.loads,
                                                  (out / "log.jsonl").read_text().splitlines())}

    straight = train(tmp_path / "a", 4)
    train(tmp_path / "b", 2)
    assert "streamed, images of 8x8 RGB" in capsys.readouterr().err
    resumed = train(tmp_path / "b", 4, "--resume")
    assert resumed == straight


def test_stream_errors_are_one_line(tmp_path: Path) -> None:
    path = _tiny_set(tmp_path)
    with pytest.raises(DataError, match="data.label_column: no column 'nope'") as e:
        _stream(path, label_column="nope")
    _one_line(e)
    with pytest.raises(DataError, match="streams a data set for training only") as e:
        build_dataset(_cfg(path, streaming=True))
    _one_line(e)


def test_eval_bpd_finds_a_relative_local_data_set_from_another_folder(
        tmp_path: Path, capsys, cpu_accelerate, monkeypatch: pytest.MonkeyPatch) -> None:
    _tiny_set(tmp_path)  # tmp_path/tiny, named relative to where training runs
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *tiny_run("schedule.formulation=vp", "data.source=hf",
                                        "data.name=tiny", "train.max_steps=1",
                                        "train.sample_every=1000", image_size=8),
                     "--out-dir", "runs/r", "--no-progress"]) == 0
    model = next((tmp_path / "runs" / "r" / "weights").glob("*.safetensors"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli.main(["eval", "bpd", str(model), "--max-images", "2", "--timesteps", "2",
                     "--no-progress"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert f"Hugging Face data set {tmp_path / 'tiny'} (split train)" in captured.out + captured.err
