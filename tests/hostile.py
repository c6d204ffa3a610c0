"""The hostile-input suite's machinery (imported by the ``test_hostile_*.py`` modules).

A case is data: a builder that makes its inputs in a folder of its own, the ``diffunet`` command
line to run there, and what must come out: the exit code (2 for a refusal), parts of the one
line on stderr, and which paths under its folder the command may change (none by default). All
cases of a module run in one go, each in a process forked from one interpreter that imported
diffunet once (starting Python and torch costs over a second per process on the CI machine),
under a wall-clock bound (a hang fails the case) and an address-space cap (an allocation of
terabytes fails the case instead of the machine).

Placeholders in ``argv``: ``{c}`` the case's own folder, ``{shared}`` the module's shared inputs
(model files, runs), ``{out}`` a path inside ``{c}`` that the command must not create unless the
case says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from helpers import RUN_HEADER
from processes import cpu_env

# Reads a JSON list of jobs on stdin ({argv, cwd, stdout, stderr[, timeout][, memory]}), runs each
# in a forked child exactly as ``python -m diffunet`` would, prints the exit codes as JSON.
RUNNER = r"""
import json, os, resource, signal, sys, traceback
import accelerate, diffunet.cli, diffunet.training, diffunet.sampling  # the slow imports, once
def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
results = []
for case in json.loads(sys.stdin.read()):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(case["cwd"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            if case.get("memory"):
                cap = vm_size() + case["memory"]
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            if case.get("timeout"):  # SIGALRM ends the child even inside a blocking read
                signal.alarm(case["timeout"])
            try:
                code = diffunet.cli.main(case["argv"])
            except SystemExit as e:  # what the interpreter does with SystemExit
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    results.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(results))
"""


@dataclass(frozen=True)
class Case:
    """One hostile input and what diffunet must do with it."""

    id: str
    argv: Sequence[str]
    parts: Sequence[str] = ()  # each must be in the one stderr line (the last line if code 0)
    build: Callable[[Path, Path], None] | None = None  # build(case_folder, shared_folder)
    code: int = 2
    may_change: Sequence[str] = ()  # paths under the case folder the command may write/remove
    out_created: bool = False  # True: {out} may exist afterwards
    timeout: int = 60  # seconds; the child is killed (SIGALRM) past it
    memory: int = 3 << 30  # bytes of address space the child may add to what it has


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    before: dict[str, tuple[int, int]] = field(default_factory=dict)
    after: dict[str, tuple[int, int]] = field(default_factory=dict)


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime (files; (0, 0) for a folder, -1 for
    a link, whose target may be anything), walked without following links."""
    found: dict[str, tuple[int, int]] = {}
    todo = [folder]
    while todo:
        here = todo.pop()
        try:
            entries = sorted(here.iterdir())
        except OSError:
            continue
        for p in entries:
            st = p.lstat()
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                found[rel] = (-1, -1)
            elif p.is_dir():
                found[rel] = (0, 0)
                todo.append(p)
            else:
                found[rel] = (st.st_size, st.st_mtime_ns)
    return found


def fill(argv: Sequence[str], c: Path, shared: Path) -> list[str]:
    return [a.replace("{c}", str(c)).replace("{shared}", str(shared)).replace("{out}",
                                                                            str(c / "out"))
            for a in argv]


def run_cases(cases: Sequence[Case], root: Path, shared: Path) -> dict[str, Result]:
    """Build every case under ``root/<id>``, run them all (forked, bounded), and return each
    case's result with its folder's tree before and after."""
    ids = [case.id for case in cases]
    assert len(set(ids)) == len(ids), "case ids must be unique"
    folders = {}
    for case in cases:
        c = root / case.id
        c.mkdir(parents=True)
        if case.build is not None:
            case.build(c, shared)
        folders[case.id] = c
    logs = root.parent / f"{root.name}-logs"
    logs.mkdir()
    jobs = [{"argv": fill(case.argv, folders[case.id], shared), "cwd": str(folders[case.id]),
             "stdout": str(logs / f"{case.id}.out"), "stderr": str(logs / f"{case.id}.err"),
             "timeout": case.timeout, "memory": case.memory} for case in cases]
    before = {case.id: tree(folders[case.id]) for case in cases}
    shared_before = tree(shared)
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(jobs), env=cpu_env(),
                          capture_output=True, text=True, timeout=60 + sum(j["timeout"]
                                                                           for j in jobs))
    assert proc.returncode == 0, proc.stderr
    assert tree(shared) == shared_before, "a case changed the shared inputs"
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {case.id: Result(code, Path(job["stdout"]).read_text(errors="replace"),
                            Path(job["stderr"]).read_text(errors="replace"),
                            before[case.id], tree(folders[case.id]))
            for case, job, code in zip(cases, jobs, codes)}


def check(case: Case, result: Result) -> None:
    """Assert what every hostile case promises: the expected exit code (a kill by the time
    bound shows as -14), no traceback, for a refusal exactly one line on stderr naming the
    problem (every part of ``case.parts``) and nothing on stdout; and no path under the case
    folder changed, appeared or vanished unless the case lists it in ``may_change``."""
    assert result.code != -14, f"{case.id}: still running after {case.timeout} s (a hang)"
    assert "Traceback" not in result.stderr, result.stderr
    assert result.code == case.code, result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith(RUN_HEADER)]
    if case.code == 2:
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("diffunet "), lines[0]
        assert ": error: " in lines[0], lines[0]
        assert result.stdout == "", result.stdout
    line = lines[-1] if lines else ""
    for part in case.parts:
        assert part in line, (part, line)
    allowed = tuple(case.may_change) + (("out",) if case.out_created else ())
    changed = {k for k in result.before.keys() | result.after.keys()
               if result.before.get(k) != result.after.get(k)}
    unexpected = sorted(k for k in changed
                        if not any(k == a or k.startswith(a.rstrip("/") + "/") for a in allowed))
    assert unexpected == [], f"{case.id} changed {unexpected}"
