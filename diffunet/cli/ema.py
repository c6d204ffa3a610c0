"""``diffunet ema RUN --sigma-rel S [--step N] --out MODEL``: an EMA of any length, after
training, from the run's post-hoc EMA snapshots (:mod:`diffunet.phema_files`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .common import out

DESCRIPTION = ("Rebuild the EMA of the weights of any length (sigma_rel: the averaging "
               "profile's width relative to the training time; the run kept 0.05 and 0.10 by "
               "default) at a step, from the post-hoc EMA snapshots training wrote into "
               "RUN/phema/ (Karras et al. 2024, sec. 3.1: least squares over the stored "
               "power-function profiles), and write it as an ordinary model file. It says "
               "which snapshots it used and how far the fit is from the asked profile.")


def sigma_rel_arg(text: str) -> float:
    """A ``--sigma-rel`` value: a number in (0, 0.2879] (argparse's one-line error else)."""
    from ..phema import SIGMA_REL_MAX

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= SIGMA_REL_MAX):
        raise argparse.ArgumentTypeError(
            f"expected a number in (0, {SIGMA_REL_MAX:.4f}] (an EMA profile's width relative "
            f"to the training time, e.g. 0.05), got {text!r}")
    return value


def step_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a training step (a positive integer), got "
                                         f"{text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="the run folder (the --out-dir of train)")
    p.add_argument("--sigma-rel", type=sigma_rel_arg, required=True, metavar="S",
                   help="the EMA length as sigma_rel, e.g. 0.03 (the run header and `diffunet "
                        "eval ema` help choose it)")
    p.add_argument("--step", type=step_arg, metavar="N",
                   help="the EMA at the newest snapshot at or before step N (default: the "
                        "newest snapshot), e.g. an early one as a guide model")
    p.add_argument("--out", required=True, metavar="MODEL.safetensors",
                   help="the model file to write (never over an existing file)")
    p.set_defaults(func=run)


def describe(plan: object) -> str:
    """What a reconstruction used: the step, the fit's residual, each snapshot's weight (those
    under 1e-6 counted, not listed)."""
    from ..phema_files import Plan

    assert isinstance(plan, Plan)
    used = plan.used()
    shown = [u for u in used if abs(u["weight"]) >= 1e-6]
    lines = [f"sigma_rel {plan.sigma_rel:g} (gamma {plan.gamma:.3f}) at step {plan.step} from "
             f"{len(used)} snapshot(s) in {plan.run_dir / 'phema'}; the fit is "
             f"{plan.residual:.2%} off the asked profile (relative L2 residual)"]
    lines += [f"  step {u['step']:>9}  sigma_rel {u['sigma_rel']:<6g}  weight {u['weight']:+.6f}"
              for u in shown]
    if len(shown) < len(used):
        lines.append(f"  ({len(used) - len(shown)} more with |weight| < 1e-6)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..output_files import claim_file
    from ..phema_files import model_bytes, plan, read_run, rebuild, run_guide

    read_run(args.run_dir)  # "not a run folder" before the --out claim is looked at
    inside = Path(args.out).absolute().parent
    if inside.exists() and inside.resolve() == (Path(args.run_dir) / "phema").resolve():
        raise UsageError(f"--out {args.out} is in the run's phema/ folder, which holds its "
                         "snapshots only; write the model file elsewhere")
    with claim_file(args.out, flag="--out", example="model.safetensors") as claim:
        p = plan(args.run_dir, [args.sigma_rel], args.step)[0]
        carried = run_guide(p)  # a damaged guide is refused before the rebuild
        weights = rebuild(p)
        claim.write(model_bytes(p, weights, None if carried is None else carried[0]))
    guide_line = (f"it carries no guide (no model file of the run at or before step {p.step} "
                  "carries one)" if carried is None else
                  f"it carries the run's guide, the EMA of step {carried[0].step} (weight "
                  f"{carried[0].scale:g}), from {carried[1]}")
    out(describe(p) + f"\n{guide_line}\nwrote {args.out}")
    return 0
