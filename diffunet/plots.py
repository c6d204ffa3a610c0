"""``diffunet plot RUN``: a training run's ``log.jsonl`` as one PNG of line charts.

Four panels against the step: the loss (each logged interval's mean, faint, and an EMA of it),
the learning rate, the gradient's global norm before clipping (with the share of clipped steps
on a second axis, when the run clips) and the throughput (images/s). Drawn with matplotlib (the
``plot`` extra). A log written before the gradient norm was logged leaves its panel empty.

The log is streamed (:func:`diffunet.runs.read_log`, one line at a time) into at most
:data:`MAX_POINTS` points per curve: past that, neighbouring records are merged into the mean
of their values, so memory is a small multiple of the points kept, never of the log (a log may
hold millions of lines; the PNG is 1,200 pixels wide). A logged value that cannot be drawn (not
a number, not finite, or beyond :data:`PLOT_LIMIT` in size, which matplotlib's axis arithmetic
overflows on) is left out and counted, and the command says so in one line.
"""

from __future__ import annotations

import io
import math
import os
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .errors import FolderError, MissingDependencyError
from .output_files import claim_file
from .runs import read_log
from .version import __version__

__all__ = ["MAX_POINTS", "PLOT_LIMIT", "PLOT_SIZE", "SOFTWARE", "ema_smooth", "is_own_plot",
           "plot_run", "read_curves"]

PLOT_SIZE = (1200, 1000)
"""Width and height of the PNG, in pixels."""

SOFTWARE = "diffunet plot"
"""How the PNG's ``Software`` text begins: ``RUN/plot.png`` is refreshed only when it does
(:func:`is_own_plot`)."""

MAX_POINTS = 4000
"""Most points kept per curve (over three per pixel of the PNG's width)."""

PLOT_LIMIT = 1e100
"""Largest magnitude drawn; the axis ticks of +-1e308 overflow inside matplotlib, and no loss,
learning rate or throughput comes near it (a log axis then spans at most 1e-100..1e100)."""

_KEYS = ("loss", "lr", "grad_norm", "grad_clipped", "images_per_s")


def ema_smooth(values: list[float | None], alpha: float = 0.1) -> list[float | None]:
    """An exponential moving average, y_i = (1 - alpha) y_{i-1} + alpha x_i, debiased as Adam
    and TensorBoard do (divided by 1 - (1 - alpha)^n, so the first points are not pulled to 0);
    a missing value (None, NaN) keeps the average and is None in the result."""
    out: list[float | None] = []
    avg, weight = 0.0, 0.0
    for x in values:
        if x is None or not math.isfinite(x):
            out.append(None)
            continue
        avg = (1 - alpha) * avg + alpha * x
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _plottable(value: Any) -> float | None:
    """``value`` as a float that can be drawn, else None (see :data:`PLOT_LIMIT`)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return x if abs(x) <= PLOT_LIMIT else None  # NaN compares False: left out too


class _Points:
    """The curves of one log, downsampled as the records stream in.

    Record i goes to bucket i // stride; a bucket keeps the step of its last record, and per
    key the sum and count of its plottable values (its point is their mean) and, for the loss,
    the EMA after its last plottable value (the EMA itself runs over every record). When
    ``2 * max_points`` buckets are full, neighbours merge and ``stride`` doubles, so at most
    that many are ever held: with ``stride`` 1 (a log of at most that many records) the points
    are the records themselves."""

    def __init__(self, smoothing: float, max_points: int) -> None:
        self.alpha, self.max_points, self.stride = smoothing, max_points, 1
        self.steps = array("q")  # read_log bounds steps below 2**63
        self.sums = {k: array("d") for k in _KEYS}
        self.counts = {k: array("q") for k in _KEYS}
        self.ema = array("d")
        self.filled = 0  # records in the newest bucket
        self.avg = self.weight = 0.0
        self.skipped: dict[str, int] = {}
        self.first_skipped: tuple[str, int] | None = None
        self.positive = (math.inf, 0.0)  # smallest and largest positive loss
        self.nonpositive_loss = False

    def add(self, step: int, record: dict[str, Any]) -> None:
        """Take in one log record (a JSON object) of ``step``."""
        if self.filled == self.stride or not self.steps:  # the newest bucket is full
            if len(self.steps) == 2 * self.max_points:
                self._merge()  # every bucket full: pairs make full buckets of twice the stride
            self.steps.append(0)
            self.ema.append(math.nan)
            for k in _KEYS:
                self.sums[k].append(0.0)
                self.counts[k].append(0)
            self.filled = 0
        self.filled += 1
        self.steps[-1] = step
        for key in _KEYS:
            if key not in record or record[key] is None:
                continue  # not logged this time (a loss of an interval of skipped steps)
            x = _plottable(record[key])
            if x is None:
                self.skipped[key] = self.skipped.get(key, 0) + 1
                self.first_skipped = self.first_skipped or (key, step)
                continue
            self.sums[key][-1] += x
            self.counts[key][-1] += 1
            if key == "loss":
                if x > 0:
                    self.positive = (min(self.positive[0], x), max(self.positive[1], x))
                else:
                    self.nonpositive_loss = True
                self.avg = (1 - self.alpha) * self.avg + self.alpha * x
                self.weight = (1 - self.alpha) * self.weight + self.alpha
                self.ema[-1] = self.avg / self.weight

    def _merge(self) -> None:
        """Halve the buckets, all full here: each pair becomes one."""
        def pairs(a: array, combine: Callable[[Any, Any], Any]) -> array:
            return array(a.typecode, (combine(a[i], a[i + 1]) for i in range(0, len(a), 2)))

        self.steps = pairs(self.steps, lambda a, b: b)
        self.ema = pairs(self.ema, lambda a, b: a if math.isnan(b) else b)
        for k in _KEYS:
            self.sums[k] = pairs(self.sums[k], lambda a, b: a + b)
            self.counts[k] = pairs(self.counts[k], lambda a, b: a + b)
        self.stride *= 2

    def curve(self, key: str) -> list[tuple[int, float | None]]:
        """``key``'s points as (step, mean value or None)."""
        return [(s, t / n if n else None)
                for s, t, n in zip(self.steps, self.sums[key], self.counts[key])]

    def plotted(self) -> int:
        """How many points hold a value (of any curve)."""
        return sum(sum(1 for n in self.counts[k] if n) for k in _KEYS)

    def skipped_note(self, log: Path) -> str | None:
        """One line on the logged values left out, or None."""
        if not self.skipped:
            return None
        key, step = self.first_skipped or ("", 0)
        return (f"{log}: left out {self.skipped_counts()} that are not numbers within "
                f"+-{PLOT_LIMIT:.0e} (the first: {key} at step {step})")

    def skipped_counts(self) -> str:
        """E.g. ``"3 logged value(s) (2 loss, 1 lr)"``."""
        total = sum(self.skipped.values())
        each = ", ".join(f"{n:,} {k}" for k, n in self.skipped.items())
        return f"{total:,} logged value(s) ({each})"


def _read_points(run_dir: str | os.PathLike, smoothing: float, max_points: int) -> _Points:
    folder = Path(run_dir)
    log = folder / "log.jsonl"
    _check_run_folder(folder)
    records = read_log(log)
    if records is None:
        raise FolderError(f"{log} not found; give a run folder of `diffunet train` (it writes "
                          "log.jsonl every train.log_every steps)")
    points = _Points(smoothing, max_points)
    for r in records:
        points.add(r.step, r.record)
    if not points.plotted():
        if points.skipped:
            raise FolderError(f"{log} holds no value that can be plotted: its "
                              f"{points.skipped_counts()} are not numbers within "
                              f"+-{PLOT_LIMIT:.0e}; nothing to draw")
        raise FolderError(f"{log} holds no logged steps yet; plot it after the first "
                          "train.log_every steps")
    return points


def read_curves(run_dir: str | os.PathLike, max_points: int = MAX_POINTS
                ) -> dict[str, list[tuple[int, float | None]]]:
    """``{"loss": [(step, value), ...], "lr": ..., "grad_norm": ..., "grad_clipped": ...,
    "images_per_s": ...}`` from
    ``run_dir/log.jsonl`` (streamed by :func:`diffunet.runs.read_log`): one point per record, or,
    past ``max_points`` records, the mean of neighbouring records' values; a value that is
    missing or cannot be plotted (not a finite number of at most :data:`PLOT_LIMIT`) is None. A
    missing log, or one with nothing to plot, is a one-line :class:`FolderError`."""
    points = _read_points(run_dir, 0.1, max_points)
    return {key: points.curve(key) for key in _KEYS}


def _check_run_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FolderError(f"{folder} is not a folder; give a run folder (the --out-dir of "
                          "`diffunet train`)")


_PNG = b"\x89PNG\r\n\x1a\n"


def is_own_plot(f: BinaryIO, size: int) -> bool:
    """Whether the open file ``f`` is a PNG that ``diffunet plot`` drew: its ``Software`` text
    begins with :data:`SOFTWARE`, or (drawn before that text was written) it is matplotlib's, at
    :data:`PLOT_SIZE`. Reads the chunks before the pixel data only (at most 64 KiB)."""
    head = f.read(1 << 16)
    if not head.startswith(_PNG):
        return False
    pos, dims, software = len(_PNG), None, None
    while pos + 8 <= len(head):
        length = int.from_bytes(head[pos:pos + 4], "big")
        kind, data = head[pos + 4:pos + 8], head[pos + 8:pos + 8 + length]
        if kind == b"IHDR" and len(data) >= 8:
            dims = (int.from_bytes(data[:4], "big"), int.from_bytes(data[4:8], "big"))
        elif kind == b"tEXt" and data.partition(b"\0")[0] == b"Software":
            software = data.partition(b"\0")[2]
        elif kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    if software is None:
        return False
    return software.startswith(SOFTWARE.encode()) or (
        software.startswith(b"Matplotlib") and dims == PLOT_SIZE)


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError('diffunet plot needs matplotlib; pip install '
                                     '"diffunet[plot]"') from None
    matplotlib.use("Agg")  # files only, never a window
    from matplotlib import pyplot as plt

    return plt


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
             smoothing: float = 0.1, overwrite: bool = False,
             note: Callable[[str], None] | None = None) -> Path:
    """Draw ``run_dir/log.jsonl`` into ``out`` (default ``run_dir/plot.png``, which each call
    refreshes when it is one this function drew, :func:`is_own_plot`), a PNG of
    :data:`PLOT_SIZE`: loss (raw and EMA-smoothed with ``smoothing`` as alpha), learning rate,
    gradient norm (and the share of clipped steps) and images/s against the step. The PNG is claimed before the log is read
    (diffunet/output_files.py): an ``out`` that exists (it may be anyone's file) is refused
    unless ``overwrite``, a link or a folder always, and so is the log itself. ``note`` gets
    one line when logged values were left out (see :data:`PLOT_LIMIT`). Returns the PNG's
    path."""
    if not 0 < smoothing <= 1:
        raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
    folder = Path(run_dir)
    inputs = [folder / "log.jsonl"]
    if out is not None:
        claim = claim_file(out, flag="--out", example="plot.png", overwrite=overwrite,
                           inputs=inputs)
    else:
        _check_run_folder(folder)  # named as the run folder, before its plot.png is claimed
        claim = claim_file(folder / "plot.png", example="plot.png", ours=is_own_plot,
                           noun="a diffunet plot", overwrite=overwrite, inputs=inputs,
                           fix="give --out FILE, or --overwrite to replace it")
    with claim:
        points = _read_points(run_dir, smoothing, MAX_POINTS)
        claim.write(_draw(points, run_dir, smoothing))
    skipped = points.skipped_note(folder / "log.jsonl")
    if skipped and note is not None:
        note(skipped)
    return claim.path


def _xy(curve: list[tuple[int, float | None]]) -> tuple[list[int], list[float]]:
    """A curve's steps and values, a missing value as NaN (a gap in the line)."""
    return [s for s, _ in curve], [math.nan if v is None else v for _, v in curve]


def _draw(points: "_Points", run_dir: str | os.PathLike, smoothing: float) -> bytes:
    """The PNG of ``points``, marked as diffunet's (:data:`SOFTWARE`)."""
    plt = _matplotlib()

    dpi = 100
    fig, axes = plt.subplots(4, 1, figsize=(PLOT_SIZE[0] / dpi, PLOT_SIZE[1] / dpi), dpi=dpi,
                             sharex=True, height_ratios=(2, 1, 1, 1))
    try:
        loss = points.curve("loss")
        steps = [s for s, _ in loss]
        raw = [math.nan if v is None else v for _, v in loss]
        ax = axes[0]
        ax.plot(steps, raw, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        ax.plot(steps, list(points.ema), color="tab:blue", linewidth=2,
                label=f"loss, smoothed (EMA {smoothing:g})")
        low, high = points.positive
        if not points.nonpositive_loss and high / low > 30:  # a log axis drops what is <= 0
            ax.set_yscale("log")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right")
        ax.set_title(f"{Path(run_dir).resolve().name}: {steps[-1] if steps else 0} steps")
        for ax, key, label, colour in ((axes[1], "lr", "learning rate", "tab:orange"),
                                       (axes[2], "grad_norm", "gradient norm", "tab:red"),
                                       (axes[3], "images_per_s", "images/s", "tab:green")):
            ax.plot(*_xy(points.curve(key)), color=colour, linewidth=1.5)
            ax.set_ylabel(label)
        clipped = points.curve("grad_clipped")
        if any(v is not None for _, v in clipped):  # the run clips: the share of clipped steps
            twin = axes[2].twinx()
            twin.plot(*_xy(clipped), color="tab:purple", alpha=0.5, linewidth=1)
            twin.set_ylim(-0.05, 1.05)
            twin.set_ylabel("clipped", color="tab:purple")
        axes[3].set_xlabel("step")
        for ax in axes:
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi,
                    metadata={"Software": f"{SOFTWARE} {__version__} (matplotlib)"})
    finally:
        plt.close(fig)
    return buf.getvalue()
