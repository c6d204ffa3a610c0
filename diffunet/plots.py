"""``diffunet plot RUN``: a training run's ``log.jsonl`` as one PNG of line charts.

Three panels against the step: the loss (each logged interval's mean, faint, and an EMA of it),
the learning rate and the throughput (images/s). Drawn with matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, BinaryIO

from .errors import FolderError, MissingDependencyError
from .output_files import claim_file
from .runs import read_log
from .version import __version__

__all__ = ["PLOT_SIZE", "SOFTWARE", "ema_smooth", "is_own_plot", "plot_run", "read_curves"]

PLOT_SIZE = (1200, 1000)
"""Width and height of the PNG, in pixels."""

SOFTWARE = "diffunet plot"
"""How the PNG's ``Software`` text begins: ``RUN/plot.png`` is refreshed only when it does
(:func:`is_own_plot`)."""

_KEYS = ("loss", "lr", "images_per_s")


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


def read_curves(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float | None]]]:
    """``{"loss": [(step, value), ...], "lr": ..., "images_per_s": ...}`` from
    ``run_dir/log.jsonl`` (read and checked by :func:`diffunet.runs.read_log`); a value that is
    missing or not a finite number is None. A missing or empty log is a one-line
    :class:`FolderError`."""
    folder = Path(run_dir)
    log = folder / "log.jsonl"
    _check_run_folder(folder)
    records = read_log(log)
    if records is None:
        raise FolderError(f"{log} not found; give a run folder of `diffunet train` (it writes "
                          "log.jsonl every train.log_every steps)")
    curves: dict[str, list[tuple[int, float | None]]] = {k: [] for k in _KEYS}
    for step, line in records:
        record = json.loads(line)
        for key in _KEYS:
            v = record.get(key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            curves[key].append((step, float(v) if ok else None))
    if not any(v is not None for points in curves.values() for _, v in points):
        raise FolderError(f"{log} holds no logged steps yet; plot it after the first "
                          "train.log_every steps")
    return curves


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
             smoothing: float = 0.1, overwrite: bool = False) -> Path:
    """Draw ``run_dir/log.jsonl`` into ``out`` (default ``run_dir/plot.png``, which each call
    refreshes when it is one this function drew, :func:`is_own_plot`), a PNG of
    :data:`PLOT_SIZE`: loss (raw and EMA-smoothed with ``smoothing`` as alpha), learning rate
    and images/s against the step. The PNG is claimed before the log is read
    (diffunet/output_files.py): an ``out`` that exists (it may be anyone's file) is refused
    unless ``overwrite``, a link or a folder always, and so is the log itself. Returns the
    PNG's path."""
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
        png = _draw(read_curves(run_dir), run_dir, smoothing)
        claim.write(png)
    return claim.path


def _draw(curves: dict[str, list[tuple[int, float | None]]], run_dir: str | os.PathLike,
          smoothing: float) -> bytes:
    """The PNG of ``curves``, marked as diffunet's (:data:`SOFTWARE`)."""
    plt = _matplotlib()

    dpi = 100
    fig, axes = plt.subplots(3, 1, figsize=(PLOT_SIZE[0] / dpi, PLOT_SIZE[1] / dpi), dpi=dpi,
                             sharex=True, height_ratios=(2, 1, 1))
    try:
        loss = curves["loss"]
        steps = [s for s, _ in loss]
        raw = [math.nan if v is None else v for _, v in loss]
        smooth = [math.nan if v is None else v for v in ema_smooth([v for _, v in loss],
                                                                    smoothing)]
        ax = axes[0]
        ax.plot(steps, raw, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        ax.plot(steps, smooth, color="tab:blue", linewidth=2,
                label=f"loss, smoothed (EMA {smoothing:g})")
        positive = [v for v in raw if v > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right")
        ax.set_title(f"{Path(run_dir).resolve().name}: {steps[-1] if steps else 0} steps")
        for ax, key, label, colour in ((axes[1], "lr", "learning rate", "tab:orange"),
                                       (axes[2], "images_per_s", "images/s", "tab:green")):
            pts = curves[key]
            ax.plot([s for s, _ in pts], [math.nan if v is None else v for _, v in pts],
                    color=colour, linewidth=1.5)
            ax.set_ylabel(label)
        axes[2].set_xlabel("step")
        for ax in axes:
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi,
                    metadata={"Software": f"{SOFTWARE} {__version__} (matplotlib)"})
    finally:
        plt.close(fig)
    return buf.getvalue()
