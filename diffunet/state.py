"""Resumable training state on disk: one folder per saved step, written atomically.

``state/step0001000/`` holds

- ``model.safetensors``, ``ema.safetensors``: the raw and EMA weights (fp32);
- ``optimizer.safetensors`` + the ``optimizer`` entry of ``trainer.json``: the optimizer's
  tensors and its plain values, so nothing is ever pickled;
- ``trainer.json``: step, LR schedule, grad scaler, counters, world size, the run config;
- ``rng.safetensors``: the step generator (noise, timesteps, flips, label dropout);
- ``rng_rank{r}.safetensors``: process r's torch RNG states (dropout), one file per process.

A state is written into ``state/.tmp-step0001000/`` and renamed to its final name only when
every file is on disk, so a folder named ``step*`` is always complete: a crash at any moment
leaves the previous states whole, and :func:`newest_state` never sees a partial one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FORMAT_VERSION = 1
_NAME = re.compile(r"^step(\d{7,})$")


def state_name(step: int) -> str:
    return f"step{step:07d}"


def complete_states(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete state under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "trainer.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def newest_state(root: Path) -> Path | None:
    states = complete_states(root)
    return states[-1][1] if states else None


def begin_state(root: Path, step: int) -> Path:
    """Create (afresh) the temporary folder a state for ``step`` is written into."""
    tmp = root / f".tmp-{state_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_state(tmp: Path, keep_last: int) -> Path:
    """Flush every file in ``tmp``, rename it to its final name, then prune old states."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    if final.exists():  # re-saving the same step (e.g. resumed then interrupted at once)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(tmp.parent)
    for _, old in complete_states(tmp.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer ``state_dict`` as (tensors, plain JSON values), so it needs no pickle."""
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        plain_state[str(idx)] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                plain_state[str(idx)][key] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_states() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU and, where present, every CUDA device)."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda{i}"] = s
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("torch_cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
