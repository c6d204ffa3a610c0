"""Hostile ``log.jsonl`` files for ``diffunet plot`` (issue 23), as a table of cases.

Each case builds a run folder holding one hostile log and runs ``diffunet plot`` on it, forked
and bounded as the whole hostile suite is (``hostile.py``). A value no chart can hold (400
digits, +-1e308, NaN, a string) is left out with one note line and the rest is drawn; a log with
nothing to draw, or one that is damaged (a line that is no JSON object with a step, an integer
of thousands of digits, a line of megabytes, a file over 1 GiB, a FIFO), is one refusal line.
A log of tens of megabytes is streamed: it is drawn within an address-space cap smaller than
what reading it whole took (10-40 times its size; issue 23 measured 3.8 GB for 100 MB).
``train --resume`` reads the same logs; its cases are in ``test_hostile_runs.py``.

Before (main at 6273fb3): values of 400 digits and a log holding both +1e308 and -1e308 were
tracebacks inside matplotlib, and a 20 MB log needed more than 256 MiB to plot.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from hostile import Case, check, run_cases

pytest.importorskip("matplotlib")

PLOT = ["plot", "{c}/run"]
PNG = ("run/plot.png",)  # what a plot that succeeds writes
DAMAGED = "log.jsonl is damaged"


def line(step: int, loss: str = "0.5", lr: str = "0.001", rate: str = "100.0") -> str:
    """One log line, its values written as raw JSON text (so NaN and 400 digits go in as is)."""
    return (f'{{"step": {step}, "loss": {loss}, "lr": {lr}, "images_per_s": {rate}, '
            f'"nonfinite_skipped": 0}}\n')


def log(*lines: str | bytes) -> Callable[[Path, Path], None]:
    """A builder: ``run/log.jsonl`` holding ``lines`` (text or bytes), each as given."""
    def build(c: Path, shared: Path) -> None:
        (c / "run").mkdir()
        (c / "run" / "log.jsonl").write_bytes(b"".join(
            x.encode() if isinstance(x, str) else x for x in lines))
    return build


def good(n: int = 10, start: int = 1) -> list[str]:
    return [line(10 * i, loss=f"{0.3 / i:.4f}") for i in range(start, start + n)]


def big_log(megabytes: int) -> Callable[[Path, Path], None]:
    """A builder: a well-formed log of about ``megabytes`` MB (about 110 bytes a line)."""
    def build(c: Path, shared: Path) -> None:
        (c / "run").mkdir()
        n = megabytes * 1_000_000 // 110
        with open(c / "run" / "log.jsonl", "w") as f:
            f.write("".join(line(i, loss=f"{0.1 + (i % 97) / 1000:.6f}", rate=f"{100 + i % 13}.25")
                            for i in range(1, n + 1)))
    return build


def sparse_log(size: int) -> Callable[[Path, Path], None]:
    def build(c: Path, shared: Path) -> None:
        log(*good(3))(c, shared)
        with open(c / "run" / "log.jsonl", "ab") as f:
            f.truncate(size)
    return build


def fifo_log(c: Path, shared: Path) -> None:
    (c / "run").mkdir()
    os.mkfifo(c / "run" / "log.jsonl")


DIGITS_400 = "1" + "0" * 399
LEFT_OUT = "left out"

CASES = [
    # -- values no chart can hold: left out, said in one line, the rest drawn
    Case("value-of-400-digits", PLOT, [LEFT_OUT, "1 logged value(s) (1 loss)", "loss at step 30",
                                       "+-1e+100"],
         log(*good(2), line(30, loss=DIGITS_400), *good(3, start=4)), code=0, may_change=PNG),
    Case("values-plus-and-minus-1e308", PLOT, [LEFT_OUT, "(2 loss, 1 lr)", "loss at step 20"],
         log(line(10), line(20, loss="1e308"), line(30, loss="-1e308"), line(40, lr="-1e308"),
             *good(3, start=5)), code=0, may_change=PNG),
    Case("nan-and-infinity-literals", PLOT, [LEFT_OUT, "(1 loss, 1 lr, 1 images_per_s)"],
         log(*good(2), line(30, loss="NaN", lr="Infinity", rate="-Infinity"), *good(2, start=4)),
         code=0, may_change=PNG),
    Case("values-that-are-not-numbers", PLOT, [LEFT_OUT, "(1 loss, 1 lr)", "loss at step 30"],
         log(*good(2), line(30, loss='"low"', lr="[1]"), *good(2, start=4)), code=0,
         may_change=PNG),
    Case("negative-losses-over-decades", PLOT, [],  # a log axis would drop them: linear
         log(*[line(10 * i, loss=str(-(10.0 ** (i % 6)) if i % 2 else 10.0 ** -(i % 5)))
               for i in range(1, 30)]), code=0, may_change=PNG),
    Case("huge-but-plottable-values", PLOT, [],
         log(line(10, loss="1e99"), line(20, loss="1e-99"), line(30, loss="-1e99")), code=0,
         may_change=PNG),
    Case("step-near-2-to-the-63", PLOT, [], log(line(1), line(2**63 - 1)), code=0,
         may_change=PNG),
    Case("nothing-plottable", PLOT, ["holds no value that can be plotted", "6 logged value(s)",
                                     "nothing to draw"],
         log(line(1, loss="NaN", lr="1e999", rate=DIGITS_400),
             line(2, loss="-1e308", lr='"x"', rate="Infinity"))),
    Case("only-a-torn-line", PLOT, ["holds no logged steps yet"], log('{"step": 1, "loss": 0.')),
    # -- damaged logs: one line naming the file, the line and the fix
    Case("integer-of-5000-digits", PLOT, [DAMAGED, "line 3", "an integer of more than 4,300 "
                                                               "digits", "move it away"],
         log(*good(2), line(30, loss="9" * 5000))),
    Case("step-past-2-to-the-63", PLOT, [DAMAGED, "line 2", "integer step"],
         log(line(1), line(2**63))),
    Case("step-of-400-digits", PLOT, [DAMAGED, "line 1", "integer step"],
         log(line(int(DIGITS_400)))),
    Case("line-of-two-megabytes", PLOT, [DAMAGED, "line 2 is longer than 1,048,576 bytes"],
         log(line(1), '{"step": 2, "note": "' + "x" * (2 << 20) + '"}\n')),
    Case("unterminated-line-of-two-megabytes", PLOT, [DAMAGED, "line 2 is longer than"],
         log(line(1), "x" * (2 << 20))),
    Case("log-over-a-gibibyte", PLOT, [DAMAGED, "more than the 1,073,741,824"],
         sparse_log((1 << 30) + 1)),
    Case("log-a-fifo", PLOT, [DAMAGED, "not a regular file"], fifo_log, timeout=20),
    Case("log-not-utf8", PLOT, [DAMAGED, "line 2 is not UTF-8"],
         log(line(1), b'{"step": 2, "loss": "\xff"}\n')),
    # -- memory: a log of 20 MB streamed (about 180,000 lines) under a 256 MiB cap
    Case("log-of-20-megabytes-capped", PLOT, [], big_log(20), code=0, may_change=PNG,
         memory=256 << 20, timeout=40),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared")
    root = tmp_path_factory.mktemp("hostile_logs") / "cases"
    return run_cases(CASES, root, shared), root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_log(results, case: Case) -> None:
    check(case, results[0][case.id])
    if case.code == 0:
        with Image.open(results[1] / case.id / "run" / "plot.png") as img:
            assert img.format == "PNG"


def test_a_clean_log_plots_without_a_note(results) -> None:
    # The big log is all plottable: nothing on stderr, the PNG's path on stdout.
    r = results[0]["log-of-20-megabytes-capped"]
    assert r.stderr == "" and r.stdout.strip().endswith("run/plot.png"), r.stderr
