"""``diffunet stats [CONFIG.toml] [section.key=value ...]``: what the training images' values
are, for the settings that depend on them: the std over every value (EDM's
``schedule.sigma_data``) and each channel's mean and std."""

from __future__ import annotations

import argparse
import json

from ..config import RunConfig
from .common import out, resolve_run_config, say

DESCRIPTION = ("Measure the training images a config names (values in [-1, 1], as training "
               "sees them): the std over every value, printed as schedule.sigma_data (the data "
               "std of EDM's preconditioning), and each channel's mean and std. Deterministic: "
               "every image, or --max-images spread evenly over the data set.")
# (The root mean square is shown too: for data far from zero-mean, the scale c_skip is optimal
# for; see diffunet.data.ImageStats.)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="[CONFIG.toml] [section.key=value ...]")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="measure N images spread evenly over the data set (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import build_dataset, image_statistics, spread_indices
    from ..errors import UsageError

    if args.max_images is not None and args.max_images < 1:
        raise UsageError(f"--max-images must be a positive integer, got {args.max_images}")
    cfg, _ = resolve_run_config(args.items, None, False, root=RunConfig, default_name="default")
    dataset = build_dataset(cfg.data)
    total = len(dataset)
    stats = image_statistics(dataset, spread_indices(total, args.max_images))
    mean, std = [round(v, 4) for v in stats.mean], [round(v, 4) for v in stats.std]
    sigma_data, rms = round(stats.std_all, 4), round(stats.rms_all, 4)
    if args.json:
        out(json.dumps({"images": stats.images, "of": total, "sigma_data": sigma_data,
                        "rms": rms, "mean": mean, "std": std}))
        return 0
    which = "every image" if stats.images == total else "spread evenly"
    out(f"# {stats.images:,} of {total:,} images ({which}) of data.source = "
        f"{cfg.data.source!r}, values in [-1, 1]\n"
        f"# mean per channel: {json.dumps(mean)}\n"
        f"# std per channel:  {json.dumps(std)}\n"
        f"# root mean square of every value: {rms} (the std around 0, not the mean)\n"
        f"schedule.sigma_data = {sigma_data}")
    say(f"the std over every value is EDM's sigma_data (Karras et al. 2022, Table 1); train with "
        f"it: diffunet train schedule.formulation=edm schedule.sigma_data={sigma_data}")
    return 0
