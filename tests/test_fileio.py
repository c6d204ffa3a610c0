"""Reading JSON within bounds (diffunet.fileio): nesting, size, non-regular files, schemas."""

from __future__ import annotations

import json
import os
import threading

import pytest

from diffunet.fileio import (MAX_JSON_DEPTH, parse_json, read_json, read_regular_file,
                             schema_problem)


def test_parse_json_refuses_nesting_deeper_than_the_bound_without_recursing() -> None:
    deep = "[" * 100_000 + "]" * 100_000  # json.loads would raise RecursionError
    with pytest.raises(ValueError, match=f"nested more than {MAX_JSON_DEPTH} levels"):
        parse_json(deep)
    at_bound = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(at_bound) == json.loads(at_bound)
    with pytest.raises(ValueError, match="nested more than"):
        parse_json("{" + '"a": {' * MAX_JSON_DEPTH + "}" * (MAX_JSON_DEPTH + 1))


def test_parse_json_ignores_brackets_inside_strings() -> None:
    text = json.dumps({"a": "[" * 1000 + '\\"{{{', "b": ["]]]" * 50, {"c": "\\["}]})
    assert parse_json(text) == json.loads(text)


def test_parse_json_errors_are_value_errors_for_bad_utf8_and_bad_json() -> None:
    for bad in (b"\xff\xfe{}", b'{"a": 1', b"", "{'a': 1}"):
        with pytest.raises(ValueError):
            parse_json(bad)
    assert parse_json(b'{"loss": NaN}')["loss"] != 0  # Python writes NaN for a bad loss


def test_read_regular_file_refuses_fifos_devices_folders_and_oversized_files(tmp_path) -> None:
    fifo = tmp_path / "manifest.json"
    os.mkfifo(fifo)
    done = threading.Event()

    def read() -> None:
        with pytest.raises(ValueError, match="not a regular file"):
            read_regular_file(fifo, 1 << 20)  # with no writer, a plain open would block forever
        done.set()

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(10)
    assert done.is_set(), "reading a FIFO blocked"
    (tmp_path / "zero").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="not a regular file"):
        read_regular_file(tmp_path / "zero", 1 << 20)
    with pytest.raises(ValueError, match="not a regular file"):
        read_regular_file(tmp_path, 1 << 20)
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(10 << 20)  # sparse: costs no disk
    with pytest.raises(ValueError, match="10,485,760 bytes, more than the 1,048,576"):
        read_regular_file(big, 1 << 20)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")
    (tmp_path / "ok.json").write_text('{"step": 3}')
    assert read_json(tmp_path / "ok.json") == {"step": 3}


SCHEMA = {"step": int, "loss": float, "name?": str, "optimizer": {"lr": float},
          "files": [{"name": str, "size": int}]}
GOOD = {"step": 3, "loss": 1, "optimizer": {"lr": 1e-4},
        "files": [{"name": "a", "size": 1}], "extra": [1]}


@pytest.mark.parametrize("value, problem", [
    (GOOD, None),
    ({**GOOD, "name": "run"}, None),
    ([GOOD], "the top level: expected a JSON object, got a JSON array"),
    ({**GOOD, "step": "3"}, "step: expected int, got '3'"),
    ({**GOOD, "step": True}, "step: expected int, got True"),
    ({**GOOD, "step": 3.0}, "step: expected int, got 3.0"),
    ({k: v for k, v in GOOD.items() if k != "loss"}, "loss: missing"),
    ({**GOOD, "name": 5}, "name: expected str, got 5"),
    ({**GOOD, "optimizer": []}, "optimizer: expected a JSON object, got a JSON array"),
    ({**GOOD, "optimizer": {"lr": None}}, "optimizer.lr: expected float, got None"),
    ({**GOOD, "files": {}}, "files: expected a JSON array, got a JSON object"),
    ({**GOOD, "files": [{"name": "a", "size": 1}, {"name": "b"}]}, "files[1].size: missing"),
])
def test_schema_problem_names_the_first_offending_place(value, problem) -> None:
    assert schema_problem(value, SCHEMA) == problem


def test_schema_problem_tuples_and_null() -> None:
    assert schema_problem(None, (int, type(None))) is None
    assert schema_problem("x", (int, type(None)), "seed") == "seed: expected int or null, got 'x'"
    assert schema_problem("x" * 100, int, "k").endswith("...")
