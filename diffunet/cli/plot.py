"""``diffunet plot RUN``: a run's ``log.jsonl`` as one PNG (loss, learning rate, gradient norm,
images/s)."""

from __future__ import annotations

import argparse

from .common import out, say

DESCRIPTION = ("Draw a training run's log.jsonl into RUN/plot.png (or --out FILE): the loss, "
               "raw and smoothed (EMA), the learning rate, the gradient norm before clipping (and "
               "the share of clipped steps) and images/s against the step. "
               'Needs matplotlib: pip install "diffunet[plot]".')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="the run folder (the --out-dir of train)")
    p.add_argument("--out", metavar="FILE", help="the PNG to write (default RUN/plot.png)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out FILE, or a RUN/plot.png that diffunet did "
                        "not draw (its own RUN/plot.png is always refreshed)")
    p.add_argument("--smoothing", type=float, default=0.1, metavar="ALPHA",
                   help="weight of each new point in the loss EMA, in (0, 1] (default 0.1; "
                        "smaller is smoother)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..plots import plot_run

    if not 0 < args.smoothing <= 1:
        raise UsageError(f"--smoothing must be in (0, 1], got {args.smoothing}")
    path = plot_run(args.run_dir, args.out, smoothing=args.smoothing, overwrite=args.overwrite,
                    note=lambda line: say(f"diffunet plot: note: {line}"))
    out(str(path))
    return 0
