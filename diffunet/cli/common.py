"""What every command of the command line shares: printing for people, the one-line argument
errors, and ``[CONFIG.toml] [section.key=value ...]`` run arguments."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..config import RunConfig, UNetConfig, load_config, stored_config, to_toml
from ..errors import ConfigError, UsageError
from ..fileio import first_line, read_json, schema_problem

C = TypeVar("C")


def is_main_process() -> bool:
    """Under ``accelerate launch`` every process runs the command; only rank 0 talks to people."""
    return os.environ.get("RANK", "0") == "0"


def say(msg: str) -> None:
    """Print a one-line message for people on stderr, from the main process only."""
    if is_main_process():
        print(msg, file=sys.stderr, flush=True)


def out(text: str) -> None:
    """Print a command's result (tables, JSON) on stdout."""
    print(text)


def guidance_interval_arg(text: str) -> tuple[float, float]:
    """``--guidance-interval LO,HI`` as two numbers (their range is the library's check:
    :func:`diffunet.samplers.check_sampling`)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two noise levels LO,HI (guide only at sigma "
                                         f"in [LO, HI], e.g. 0.3,5), got {text!r}") from None
    return lo, hi


DIFFUSERS_FLAGS: dict[str, dict[str, str]] = {
    "--output_dir": {"*": "--out-dir DIR"},
    "--num_samples": {"sample": "--num-samples N", "*": "sample.num_images=N"},
    "--train_batch_size": {"*": "train.batch_size=N"},
    "--eval_batch_size": {"*": "--batch-size N"},
    "--num_epochs": {"segment": "train.epochs=N", "*": "train.max_steps=N"},
    "--max_train_steps": {"*": "train.max_steps=N"},
    "--resolution": {"*": "unet.image_size=N"},
    "--dataset_name": {"*": "data.source=hf data.name=NAME"},
    "--train_data_dir": {"*": "data.source=folder data.path=DIR"},
    "--mixed_precision": {"sample": "--precision P", "*": "train.mixed_precision=P"},
    "--learning_rate": {"*": "train.lr=N"},
    "--gradient_accumulation_steps": {"*": "train.grad_accum_steps=N"},
    "--checkpointing_steps": {"*": "train.save_every=N"},
    "--resume_from_checkpoint": {"*": "--resume"},
    "--num_inference_steps": {"*": "--steps N"},
}
"""diffusers' example-script flags -> what diffunet takes instead, per command (``*``: any);
the last upper-case word is the value's place."""


def did_you_mean(command: str | None, unknown: Sequence[str]) -> str:
    """``"; did you mean --out-dir DIR for --output_dir, train.batch_size=16 for
    --train_batch_size?"`` for the diffusers-style flags among ``unknown`` (``--flag`` or
    ``--flag=value``, whose value fills the hint) given to ``command``; "" when there are none
    (diffunet counts optimizer steps, so ``--num_epochs`` becomes ``train.max_steps``)."""
    hints = []
    for arg in unknown:
        flag, eq, value = arg.partition("=")
        table = DIFFUSERS_FLAGS.get(flag)
        if table is None:
            continue
        hint = table.get(command or "", table["*"])
        place = re.search(r"[A-Z]+$", hint)
        if eq and value and place:
            hint = hint[:place.start()] + value
        hints.append(f"{hint} for {flag}")
    return f"; did you mean {', '.join(dict.fromkeys(hints))}?" if hints else ""


SEED_HELP = "an integer from 0 to 2**63 - 1"


def seed_arg(text: str) -> int:
    """``--seed``: an integer in [0, 2**63) (what torch's generators take; a longer one is an
    argparse error, one line, not a traceback from inside torch)."""
    value = text.strip()
    if not re.fullmatch(r"[0-9]{1,19}", value) or int(value) >= 2**63:
        raise argparse.ArgumentTypeError(f"{text[:24]!r}{'...' if len(text) > 24 else ''} is "
                                         f"not a seed ({SEED_HELP})")
    return int(value)


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` and every sub-command parser below it report bad arguments as one line
    (no usage dump), exit code 2."""
    def error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                one_line_errors(child)


def add_run_arguments(p: argparse.ArgumentParser, *, resume_help: str,
                      out_dir_help: str = "run folder (default: runs/<config name>)") -> None:
    """The arguments of a training command: ``[CONFIG.toml] [section.key=value ...]``,
    ``--out-dir``, ``--resume``, ``--dry-run``, ``--no-progress``."""
    p.add_argument("items", nargs="*", metavar="[CONFIG.toml] [section.key=value ...]")
    p.add_argument("--out-dir", help=out_dir_help)
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and model size, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _data_folders(cfg: Any) -> list[tuple[str, str]]:
    """``(config key, folder)`` of every image folder ``cfg`` trains on (none for built-in and
    torchvision data): ``data.path`` (and a paired task's ``data.cond_path``), or
    segmentation's ``data.images`` and ``data.masks`` (and their ``val_`` pair)."""
    data = getattr(cfg, "data", None)
    if getattr(data, "source", None) != "folder":
        return []
    keys = ("path", "cond_path", "images", "masks", "val_images", "val_masks")
    return [(f"data.{k}", getattr(data, k)) for k in keys if getattr(data, k, None)]


def dry_run(cfg: Any, net: UNetConfig, out_dir: Path, note: str = "") -> int:
    """``--dry-run``: check what a start would check before building anything (the network,
    schedule and batch fit this machine's memory; each data folder exists and holds readable
    images, from their headers), then print the resolved config as TOML, the network's size
    (``note`` after it), the data folders and the run folder on stdout. Builds no network
    (its parameters are counted on the meta device) and writes nothing."""
    from ..config import RunConfig
    from ..data import class_folder_names, image_folder
    from ..runs import check_training_fits, cpu_requested, pick_device

    found = []
    for key, folder in _data_folders(cfg):
        files, skipped, _ = image_folder(folder, key, net.image_size)
        found.append(f"# {key}: {len(files):,} image(s) in {folder}"
                     + (f", {len(skipped):,} skipped (e.g. {skipped[0]})" if skipped else ""))
        if isinstance(cfg, RunConfig) and key == "data.path" and cfg.data.class_folders:
            from ..training import fit_classes_to_data  # what train() derives, shown here

            names = class_folder_names(files, folder)
            cfg = fit_classes_to_data(cfg, names)
            net = cfg.unet
            shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)"
                                            if len(names) > 8 else "")
            found.append(f"# classes (unet.num_classes): {len(names)} ({shown})")
    if isinstance(cfg, RunConfig) and cfg.sample.guide_model is not None:
        from ..training import preview_guide

        preview_guide(cfg)  # the previews' guide model: refused here as a start would
        found.append(f"# previews guided by {cfg.sample.guide_model} (autoguidance, weight "
                     f"{cfg.sample.guidance_scale})")
    elif isinstance(cfg, RunConfig) and cfg.train.guide_step is not None \
            and cfg.sample.guide_scale != 1.0:
        found.append(f"# carried guide: the EMA of step {cfg.train.guide_step}; model files "
                     f"after it carry it and the previews after it autoguide with it (weight "
                     f"{cfg.sample.guide_scale:g})")
    # a diffusion run's schedule tables (a segmentation run has no schedule)
    tables = cfg.schedule.table_timesteps if isinstance(cfg, RunConfig) else None
    batch = cfg.train.batch_size
    device = pick_device("cpu" if cpu_requested() else None)
    n = check_training_fits(net, tables, batch, batch,
                            net.in_channels, net.image_size, device)
    out(to_toml(cfg))
    out(f"# UNet parameters: {n:,} ({n / 1e6:.2f}M){note}")
    for line in found:
        out(line)
    out(f"# output folder: {out_dir}")
    return 0


def describe_config(items: Sequence[str], run_dir: Path, resume: bool) -> str:
    """The header's first line: where a run's settings come from, e.g. ``config:
    configs/mnist.toml with train.max_steps=500`` (or the built-in defaults, or, resuming without
    a CONFIG, the run folder's own config.json)."""
    path = next((item for item in items if "=" not in item), None)
    overrides = [item for item in items if "=" in item]
    if path is not None:
        source = path
    elif resume and (run_dir / "config.json").is_file():
        source = f"{run_dir / 'config.json'} (the run's own)"
    else:
        source = "the built-in defaults (no CONFIG.toml)"
    shown = " ".join(overrides[:8]) + (f" and {len(overrides) - 8} more overrides"
                                       if len(overrides) > 8 else "")
    return f"config: {source}" + (f" with {shown}" if overrides else "")


def resolve_run_config(items: Sequence[str], out_dir: str | None, resume: bool, *,
                       root: type[C], default_name: str) -> tuple[C, Path]:
    """``[CONFIG.toml] [section.key=value ...]`` -> (config of type ``root``, run folder).

    The run folder is ``out_dir``, else ``runs/<CONFIG name>`` (``runs/<default_name>``). With
    ``resume`` and no CONFIG, the run folder's own config.json is the starting point, so
    ``--resume train.max_steps=N`` extends a run.
    """
    config_path = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config_path is None:
            config_path = item
        else:
            raise UsageError(f"two config files given ({config_path}, {item}); give one, then "
                             "section.key=value overrides")
    sections = [f.name for f in dataclasses.fields(root)]
    if (config_path is not None and not Path(config_path).is_file()
            and not config_path.endswith(".toml")
            and config_path.partition(".")[0] in sections):  # "train.max_steps" without "=N"
        raise UsageError(f"{config_path}: not a config file, and an override needs a value; "
                         f"write {config_path}=VALUE (e.g. train.max_steps=500)")
    stem = Path(config_path).stem if config_path else default_name
    run_dir = Path(out_dir) if out_dir else Path("runs") / stem
    base = None
    saved = run_dir / "config.json"
    if resume and config_path is None and (saved.exists() or saved.is_symlink()):
        # read within bounds (size, nesting, UTF-8, a regular file): it may have been damaged
        try:
            base = read_json(saved)
            problem = schema_problem(base, {f"{section}?": dict for section in sections}
                                     if isinstance(base, dict) else dict)
            if problem is None:
                problem = next((f"{k}: not a section" for k in base if k not in sections), None)
        except (OSError, ValueError, RecursionError) as e:
            problem = first_line(e)
        if problem is not None:
            raise ConfigError(f"{saved} is damaged ({problem}); give the run's CONFIG.toml "
                              "and overrides along with --resume") from None
        stored_config(base)  # one from before formulations existed resumes as VP
    if root is RunConfig:  # a [vae] run's UNet follows the VAE's latents
        from ..data_space import load_run_config

        return load_run_config(config_path, overrides, base=base), run_dir  # type: ignore
    return load_config(config_path, overrides, base=base, root=root), run_dir
