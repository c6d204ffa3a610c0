"""Helpers for tests that run diffunet in other processes (imported by the test modules).

Child processes get a clean environment (no launcher variables inherited from the test run),
one intra-op thread each, and unbuffered output; ``accelerate launch`` tests start two CPU
processes joined with gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher/Accelerate variables, one thread per
    process, unbuffered output, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def cpu_env(**extra: str) -> dict[str, str]:
    """:func:`clean_env` for diffunet on the CPU: ``ACCELERATE_USE_CPU=1`` (Accelerate uses the
    CPU even where a GPU is, and several launched processes join with gloo)."""
    return clean_env(ACCELERATE_USE_CPU="1", **extra)


def free_port() -> int:
    """A TCP port nothing listens on now (for a launch's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(args: list[str], env: dict[str, str], timeout: float = 300,
               script: str | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch`` two processes of ``python -m diffunet ARGS`` (or of the Python
    file ``script`` with ARGS).

    `accelerate launch --cpu --num_processes 2` starts ONE process (Accelerate's multi-CPU
    launch goes through mpirun); --multi_gpu starts torchrun, and ACCELERATE_USE_CPU=1 in
    ``env`` makes Accelerate join the processes with gloo on the CPU.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           *([script] if script else ["-m", "diffunet"]), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state (it pins e.g. mixed_precision), so the next
    in-process run starts as a fresh process would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
