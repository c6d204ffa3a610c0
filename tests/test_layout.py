"""docs/design.md's layout and house rules, enforced: who may import whom, one home per heavy
dependency, no private names across modules, printing and argument parsing only in the command
line, lazy commands, one home per formulation (nothing outside ``diffunet/formulations/`` asks
which formulation a model is; no formulation module imports another's), one output rule (no
module writes a file but as ``WRITERS`` allows, with its reason), and the README's library
example running as written.

The import graph is read from the source (every ``import`` statement, at module level or inside
a function), so a lazy import counts like any other.

``python tests/test_layout.py [PACKAGE_DIR]`` prints the formulation decisions the rule counts
in a package (default: this one), e.g. in an older checkout of diffunet.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import diffunet
from processes import clean_env

PACKAGE = Path(diffunet.__file__).parent
ROOT = PACKAGE.parent

# design.md's layout table, top to bottom: a module imports only from its own row or below.
LAYERS: list[tuple[str, ...]] = [
    ("__main__",),
    ("cli",),
    ("gpu_check",),  # runs the trainer and the bench: above both
    ("segmentation",),
    ("training",),
    ("sampling", "editing"),  # editing: sampling's init images and masks
    ("evaluation", "judge", "plots", "phema_eval", "latent_cache", "shapes_vae",
     "paired_eval"),  # paired_eval: `eval paired`, a task model on held-out pairs; judge: the
    # shapes classifier; uses evaluation's FID; phema_eval: `eval ema`, post-hoc EMA lengths
    # judged; shapes_vae: the shipped VAE of the shapes and its training
    ("bench", "inspection", "interop"),
    ("runs", "outputs", "output_files"),  # output folders; single output files
    ("state", "checkpoint", "phema_files"),  # phema_files: post-hoc EMA snapshot files
    ("data", "data_space", "tasks"),  # data_space: pixels or a VAE's latents (the diffusion
    # state); tasks: an image's condition image (superres, colorize, inpaint, paired)
    ("images",),
    ("likelihood", "resources"),
    ("unet", "nn"),
    ("config",),  # asks the samplers and the formulations for their rules
    # schedulers, diffusion, edm: the deprecated names of samplers and formulations' modules
    ("samplers", "guidance", "schedulers", "diffusion", "edm"),  # guidance: samplers' wrapper
    ("formulations",),
    ("errors", "fileio", "version", "randomness", "checks", "stopping",
     "phema",  # phema: post-hoc EMA's math (config checks sigma_rel with it)
     "conditioning"),  # the one condition mapping: its null, dropout, doubling (all use it)
]
# The one module (or package) that may import each heavy dependency.
HOMES: dict[str, set[str]] = {
    "accelerate": {"runs", "sampling"},  # sampling: its process split (PartialState)
    "safetensors": {"checkpoint", "state"},
    "tomllib": {"config"},
    "tomli": {"config"},
    "argparse": {"cli"},
    "datasets": {"data"},  # Hugging Face datasets (data.source = "hf")
    "lpips": {"paired_eval"},  # LPIPS of `eval paired`, where it is installed
}


def _unit(module: str) -> str:
    """The layout unit of a dotted module name: ``diffunet.cli.train`` -> ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<package root>"


def _layer(unit: str) -> int:
    for i, row in enumerate(LAYERS):
        if unit in row:
            return i
    raise AssertionError(f"{unit} is not in the layout table; add it to LAYERS (and design.md)")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import statement in ``path``;
    relative imports resolved against ``module``."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _from_target(node, here)
            for a in node.names:
                out.append((target, a.name, node.lineno))
    return out


def _from_target(node: ast.ImportFrom, here: list[str]) -> str:
    """The dotted module a ``from ... import`` names, a relative one resolved against the
    importing package ``here``."""
    if not node.level:
        return node.module or ""
    base = here[:len(here) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _edges() -> list[tuple[str, str, str, int]]:
    """(importer, imported diffunet module, name, line) over the package."""
    modules = _modules()
    edges = []
    for module, path in modules.items():
        for target, name, line in _imports(module, path):
            if not (target == "diffunet" or target.startswith("diffunet.")):
                continue
            if name and f"{target}.{name}" in modules:  # `from . import state`: a module
                target, name = f"{target}.{name}", ""
            edges.append((module, target, name, line))
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (module -> modules it imports), each once."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_layout_table_names_every_module() -> None:
    units = {_unit(m) for m in _modules() if m != "diffunet"}
    for unit in units:
        _layer(unit)  # raises for a module the table does not place
    assert {"cli", "segmentation", "runs", "images", "samplers", "likelihood"} <= units


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for importer, target, _, _ in _edges():
        graph.setdefault(importer, set()).add(target)
    assert _cycles(graph) == []
    # The check has teeth.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_imports_from_a_layer_above_it() -> None:
    upward = []
    for importer, target, name, line in _edges():
        if importer == "diffunet":  # the package root is the public face: it re-exports
            continue
        a, b = _unit(importer), _unit(target)
        if b == "<package root>":
            upward.append(f"{importer}:{line} imports the package root ({name or target}); "
                          "import from the module that defines it")
        elif a != b and _layer(b) < _layer(a):
            upward.append(f"{importer}:{line} imports {target} (a layer above it)")
    assert upward == []


def test_no_private_name_is_imported_from_another_module() -> None:
    private = [f"{importer}:{line} imports {name} from {target}"
               for importer, target, name, line in _edges()
               if name.startswith("_") and not name.startswith("__") and target != importer]
    assert private == []


def test_each_heavy_dependency_has_one_home() -> None:
    strays = []
    for module, path in _modules().items():
        unit = _unit(module)
        for target, _, line in _imports(module, path):
            top = target.split(".")[0]
            if top in HOMES and unit not in HOMES[top]:
                strays.append(f"{module}:{line} imports {top} (its home: "
                              f"{', '.join(sorted(HOMES[top]))})")
    assert strays == []


def test_only_the_command_line_prints() -> None:
    prints = []
    for module, path in _modules().items():
        if _unit(module) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id == "print":
                prints.append(f"{module}:{node.lineno}")
    assert prints == []


def test_error_types_live_in_errors() -> None:
    defined = []
    for module, path in _modules().items():
        if module == "diffunet.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception"))
                    for b in node.bases):
                defined.append(f"{module}:{node.lineno} defines {node.name}")
    assert defined == []


def test_info_loads_neither_evaluation_nor_segmentation(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    diffunet.save_model(model, diffunet.UNet(diffunet.UNetConfig(
        image_size=8, base_channels=8, channel_mults=(1,), num_res_blocks=1,
        attn_resolutions=(), num_groups=4)), diffunet.NoiseSchedule())
    code = ("import sys\nfrom diffunet.cli import main\n"
            f"assert main(['info', {str(model)!r}]) == 0\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('diffunet', "
            "'accelerate')))))\n")
    r = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.strip().splitlines()[-1].split())
    assert "diffunet.cli.info" in loaded and "diffunet.checkpoint" in loaded
    heavy = {m for m in loaded if m.startswith(("diffunet.evaluation", "diffunet.segmentation",
                                                "diffunet.training", "diffunet.sampling",
                                                "diffunet.bench", "diffunet.inspection",
                                                "diffunet.cli.segment", "diffunet.cli.sample"))}
    assert heavy == set()
    assert "accelerate" not in loaded


def test_the_deprecated_schedulers_module_warns_and_gives_the_samplers() -> None:
    sys.modules.pop("diffunet.schedulers", None)
    with pytest.warns(DeprecationWarning, match="diffunet.samplers"):
        import diffunet.schedulers as old
    import diffunet.samplers as new

    assert old.sample is new.sample and old.ddim_step is new.ddim_step
    assert set(old.__all__) == set(new.__all__)


def _readme_blocks(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_use_the_unet_in_your_own_loop_code_runs(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    blocks = _readme_blocks("Use the UNet in your own loop")
    assert len(blocks) == 2  # the training loop, then stepping by hand
    monkeypatch.chdir(tmp_path)
    env: dict[str, object] = {}
    exec(compile(blocks[0], "README.md", "exec"), env)  # noqa: S102 - our own README
    assert env["images"].shape == (4, 3, 32, 32)  # type: ignore[attr-defined]
    assert (tmp_path / "model.safetensors").is_file()
    exec(compile(blocks[1], "README.md", "exec"), env)  # noqa: S102
    x = env["x"]
    assert x.shape == (4, 3, 32, 32) and bool(x.isfinite().all())  # type: ignore[attr-defined]
    assert env["ts"][0] == 999 and len(env["ts"]) == 50  # type: ignore[index]


def test_scripts_are_three_line_shims() -> None:
    for script in sorted((ROOT / "scripts").glob("*.py")):
        lines = [ln for ln in script.read_text().splitlines() if ln.strip()]
        assert len(lines) <= 4, script.name  # docstring + up to three lines
        assert "from diffunet.cli import main" in lines, script.name
    assert os.access(ROOT / "scripts" / "train.py", os.R_OK)


# ---------------------------------------------------------------------------------------------
# One home per formulation (docs/design.md, house rule 2 and "The formulation contract")

def _formulation_classes() -> tuple[str, ...]:
    """The registered formulations' own classes: each formulation, denoiser and sampling path
    a formulation module defines (the base classes of the contract are not among them)."""
    import importlib
    import inspect

    from diffunet.formulations import Denoiser, Formulation, SamplingPath

    found = set()
    for name in diffunet.FORMULATIONS:
        module = importlib.import_module(f"diffunet.formulations.{name}")
        found |= {c.__name__ for _, c in inspect.getmembers(module, inspect.isclass)
                  if issubclass(c, (Formulation, Denoiser, SamplingPath))
                  and c not in (Formulation, Denoiser, SamplingPath)}
    return tuple(sorted(found))


FORMULATION_NAMES = tuple(diffunet.FORMULATIONS)
FORMULATION_CLASSES = _formulation_classes()


def _names_a_formulation(node: ast.AST) -> bool:
    """A string naming a formulation, a collection of them, or a ``.formulation`` attribute."""
    if isinstance(node, ast.Constant):
        return node.value in FORMULATION_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_formulation(e) for e in node.elts)
    return isinstance(node, ast.Attribute) and node.attr == "formulation"


def formulation_decisions(package: Path) -> list[str]:
    """Where a module outside ``formulations/`` decides which formulation it has: a comparison
    with a formulation's name (or of a ``.formulation`` attribute), a dict keyed by the names,
    an ``isinstance`` (or ``issubclass``/``type(...) is``) check against a formulation's class,
    a ``getattr``/``hasattr`` of ``formulation``. (The deprecated shims only re-export.)"""
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel.startswith("formulations/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Compare) and any(
                    _names_a_formulation(n) for n in (node.left, *node.comparators)):
                found.append(f"{where} compares a formulation name")
            elif isinstance(node, ast.Dict) and any(
                    k is not None and _names_a_formulation(k) for k in node.keys):
                found.append(f"{where} keys a dict by formulation names")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                args = node.args
                if node.func.id in ("isinstance", "issubclass") and len(args) == 2 and any(
                        isinstance(n, ast.Name) and n.id in FORMULATION_CLASSES
                        for n in ast.walk(args[1])):
                    found.append(f"{where} checks a formulation's class")
                elif node.func.id in ("getattr", "hasattr") and len(args) >= 2 and \
                        isinstance(args[1], ast.Constant) and args[1].value == "formulation":
                    found.append(f"{where} looks up a formulation attribute")
    return found


def test_nothing_outside_formulations_asks_which_formulation_it_has() -> None:
    assert formulation_decisions(PACKAGE) == []
    # The check has teeth: each idiom it looks for, in a module outside formulations/.
    probe = PACKAGE.parent / "tests" / "_probe_pkg"
    try:
        probe.mkdir(exist_ok=True)
        (probe / "m.py").write_text(
            "a = cfg.formulation == 'edm'\nb = name in ('vp', 'flow')\n"
            "c = isinstance(s, NoiseSchedule)\nd = {'vp': 1}\n"
            "e = getattr(c, 'formulation', 'vp')\nf = s.name != other\n")
        assert len(formulation_decisions(probe)) == 5
    finally:
        for p in probe.glob("*"):
            p.unlink()
        probe.rmdir()


def test_no_formulation_module_imports_another_formulations_module() -> None:
    own = {name: f"diffunet.formulations.{name}" for name in FORMULATION_NAMES}
    crossings = []
    for importer, target, name, line in _edges():
        a = next((f for f, m in own.items() if importer == m), None)
        b = next((f for f, m in own.items() if target == m or target.startswith(m + ".")), None)
        if a is not None and b is not None and a != b:
            crossings.append(f"{importer}:{line} imports {target}")
    assert crossings == []
    assert {"vp", "edm", "flow"} <= set(FORMULATION_NAMES)
    assert {"NoiseSchedule", "EDMDenoiser", "FlowPath", "TimestepPath"} <= set(FORMULATION_CLASSES)


@pytest.mark.parametrize("old, new, names", [
    ("diffunet.diffusion", "diffunet.formulations.vp", ("NoiseSchedule", "diffusion_loss")),
    ("diffunet.edm", "diffunet.formulations", ("EDMSchedule", "make_schedule")),
])
def test_the_deprecated_formulation_modules_warn_and_give_the_same_objects(
        old: str, new: str, names: tuple[str, ...]) -> None:
    import importlib

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="diffunet.formulations"):
        module = importlib.import_module(old)
    target = importlib.import_module(new)
    assert all(getattr(module, n) is getattr(target, n) for n in names)


# ---------------------------------------------------------------------------------------------
# One output rule (issue 23): a command writes its files through diffunet/output_files.py
# (single files, and the files export writes into a pipeline folder) or diffunet/outputs.py
# (output folders), or inside the run folder the harness holds. The scan finds every way
# Python and the libraries diffunet uses create, fill, replace, link or remove a file, and every
# call from a command module (a layer above ``state``) of a low-level path writer (a top-level
# function of ``state`` or a layer below it that writes, directly or through another); each is
# accepted only where WRITERS lists the module and the kind, with the reason.

WRITERS: dict[str, dict[str, str]] = {
    # -- the rule itself ------------------------------------------------------------------------
    "output_files": {
        "os.open O_CREAT/O_WRONLY": "the rule: OpenFolder.open, at the folder's descriptor",
        ".open O_CREAT/O_WRONLY": "the rule: each temporary is created O_EXCL|O_NOFOLLOW at the "
                                  "claimed folder's descriptor",
        "os.fdopen 'w'": "the rule: fills the temporary it created",
        "os.unlink": "the rule: OpenFolder.unlink, at the folder's descriptor",
        ".unlink": "the rule: removes its own temporaries (stale ones only when their writer is "
                   "gone and their lock free)",
        "os.link": "the rule: a new file appears by a hard link that fails if the name was "
                   "taken meanwhile",
        "os.replace": "the rule: its own earlier file is replaced by a rename at the folder's "
                      "descriptor, after checking it is still the claimed file",
        "os.mkdir": "the rule: a sub-folder is made at its parent's descriptor, then opened "
                    "without following a link",
        "shutil.rmtree": "the rule: OpenFolder.remove, a folder removed at its parent's "
                         "descriptor (rmtree's dir_fd form never follows a link inside it)",
        ".mkdir": "open_folder(create=True): the folder the user named (bench --gpu-check DIR), "
                  "made before it is opened and checked",
    },
    "outputs": {
        ".unlink": "output folders: removes only the files its manifest lists (a link "
                   "unlinked, never followed), at the folder's descriptor",
    },
    # -- low-level writers: each writes where its caller says, and the callers are checked ------
    "fileio": {
        "open 'w'": "atomic_writer: a new temporary ('x': never over anything) beside the path "
                    "the caller checked",
        "os.replace": "atomic_writer: the temporary renamed over the caller's path",
        ".unlink": "atomic_writer: its own temporary, after a failure",
        ".mkdir": "atomic_save_image: the image's folder, inside an output the caller holds",
    },
    "data": {
        "download=": "torchvision fetches a named data set into data.path when data.download "
                     "asks (its own files, checked by torchvision)",
    },
    "data_space": {
        "huggingface_hub.snapshot_download": "a VAE by Hub id: Hugging Face's own cache, its "
                                             "config.json and safetensors weights only",
    },
    "latent_cache": {
        "uses data_space.vae_identity": "the VAE whose files it hashes, by Hub id: Hugging "
                                        "Face's own cache (data_space's download); its shards "
                                        "go through outputs.claim_folder",
    },
    "judge": {
        "uses data_space.model_space": "a latent model's VAE by Hub id (eval nfe decodes "
                                       "through it): Hugging Face's own cache (data_space's "
                                       "download)",
    },
    "sampling": {
        "uses data_space.model_space": "a latent model's VAE by Hub id (sample decodes through "
                                       "it): Hugging Face's own cache (data_space's download)",
    },

    "cli.common": {
        "uses data_space.load_run_config": "a [vae] run's VAE config.json by Hub id, into "
                                           "Hugging Face's own cache (data_space's download)",
    },
    # -- commands: caches, temporary folders, the run folder ------------------------------------
    "bench": {
        "tempfile.TemporaryDirectory": "torch writes a profiler trace only by path: into a "
                                       "private temporary folder, then copied through the "
                                       "claimed --profile file",
        "prof.export_chrome_trace": "into that private temporary folder",
    },
    "interop": {
        "hub.snapshot_download": "import of a Hub model id: Hugging Face's own cache, JSON "
                                 "and safetensors files only",
        "tempfile.TemporaryDirectory": "load_model of a diffusers folder converts it in a "
                                       "private temporary folder",
        "uses data_space.vae_files": "export of a latent model reads its VAE, by Hub id into "
                                     "Hugging Face's own cache (data_space's download); the "
                                     "pipeline's files go through output_files.claim_file",
        "uses data_space.folder_record": "import of a pipeline with a VAE: hashes the VAE's files "
                                         "in the folder given (vae_identity with its folder: "
                                         "nothing is fetched or written)",
    },
    "evaluation": {
        ".mkdir": "the feature and weights cache (~/.cache/diffunet or --cache-dir)",
        "uses fileio.atomic_writer": "the Inception weights downloaded into that cache, "
                                      "atomically",
        "uses checkpoint.write_tensor_file": "reference features cached under a name of "
                                              "their fingerprint in that cache",
        "download=": "load_inception's download flag: fetches the weights into that cache",
    },
    "runs": {
        ".touch": "a .shared-<random> marker, to check that every node sees the run folder",
        ".unlink": "that marker, after the check",
        ".rmdir": "a run folder this run created and never wrote to, if still empty",
        ".open O_CREAT/O_WRONLY": "log.jsonl appended (O_APPEND|O_NOFOLLOW) at the run "
                                  "folder's descriptor",
        "os.fdopen 'w'": "the log.jsonl just opened there",
        "uses fileio.atomic_write_bytes": "the W&B id file inside the locked run folder, and "
                                           "trim_log called without the open folder",
        "SummaryWriter": "TensorBoard event files in the run folder's tensorboard/ (opened "
                         "first without following a link: TensorBoard writes by path)",
        "wandb.init": "W&B's files in the run folder's wandb/ (dir=)",
    },
}
"""module (dotted, inside the package) -> {kind: why it may write that way}. A kind is a
primitive (``open 'w'``, ``os.replace``, ``.mkdir``, ``.save``, ...: a method by its name,
whatever the receiver) or ``uses M.f``
for a low-level path writer ``f`` of module ``M``. An entry nothing uses fails a test too."""

_READ_FLAGS = {"O_RDONLY", "O_DIRECTORY", "O_NONBLOCK", "O_NOFOLLOW", "O_CLOEXEC", "O_NOCTTY",
               "O_BINARY", "O_NOINHERIT", "O_NOATIME", "O_PATH", "_DIRECTORY", "_NONBLOCK",
               "_NOFOLLOW", "_CLOEXEC", "os", "getattr"}
_OS_WRITES = {"replace", "rename", "renames", "link", "symlink", "mkdir", "makedirs", "remove",
              "unlink", "rmdir", "removedirs", "truncate", "mkfifo", "mknod", "chmod", "chown",
              "lchown"}
_SHUTIL_WRITES = {"copy", "copy2", "copyfile", "copytree", "move", "rmtree", "copymode",
                  "copystat", "make_archive", "unpack_archive"}
_PATH_WRITES = {"write_text", "write_bytes", "touch", "mkdir", "symlink_to", "hardlink_to",
                "link_to", "unlink", "rmdir"}
_TEMPFILES = {"NamedTemporaryFile", "TemporaryFile", "mkstemp", "mkdtemp", "TemporaryDirectory"}
_LIBRARY_WRITERS = {"save_file", "save_pretrained", "export_chrome_trace", "export_stacks",
                    "to_json_file", "SummaryWriter", "snapshot_download", "hf_hub_download",
                    "urlretrieve", "FileHandler", "tofile", "savetxt", "savez",
                    "savez_compressed"}


def _mode_writes(node: ast.AST | None) -> bool:
    """Whether an ``open`` mode may write (absent: it reads; not a literal: it may)."""
    if node is None:
        return False
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return any(c in node.value for c in "wax+")
    return True


def _flags_write(node: ast.AST | None, values: dict[str, list[ast.AST]],
                 seen: frozenset[str] = frozenset()) -> bool:
    """Whether ``os.open``-style flags may write: anything but known read-only flags may. A
    variable (``flags = os.O_RDONLY | ...``) stands for every value the module assigns it
    (``values``); one it never assigns may write."""
    if node is None:
        return False
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _mode_writes(node)  # tarfile.open(name, "w") and the like
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
    names |= {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
              and isinstance(n.value, str)}
    for name in names - _READ_FLAGS:
        if name in seen or not values.get(name) or any(
                _flags_write(v, values, seen | {name}) for v in values[name]):
            return True
    return False


def _assigned(tree: ast.AST) -> dict[str, list[ast.AST]]:
    """Every value a module assigns to each plain name (``x = v``, ``x |= v``, ``x: T = v``);
    a condition's test names are no values (``x if follow else y`` counts x and y)."""
    found: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.value is not None:
            targets, value = [node.target], node.value
        for t in targets:
            if isinstance(t, ast.Name):
                found.setdefault(t.id, []).extend(
                    [value.body, value.orelse] if isinstance(value, ast.IfExp) else [value])
    return found


def _arg(call: ast.Call, index: int, keyword: str) -> ast.AST | None:
    if len(call.args) > index:
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


def _in_memory(tree: ast.AST) -> set[str]:
    """Names a module binds to an in-memory buffer (``buf = io.BytesIO()``): an image or a
    figure saved into one is no file."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            f = node.value.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("BytesIO", "StringIO"):
                found |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return found


def _primitive(call: ast.Call, buffers: set[str], values: dict[str, list[ast.AST]]
               ) -> str | None:
    """The kind of file write ``call`` is (see :data:`WRITERS`), or None (``buffers``: the
    module's in-memory buffers; ``values``: what it assigns to each name)."""
    f = call.func
    if isinstance(f, ast.Name):
        name, owner = f.id, None
    elif isinstance(f, ast.Attribute):
        name, owner = f.attr, (f.value.id if isinstance(f.value, ast.Name) else "")
    else:
        return None
    if name in ("open", "FileIO") and owner in (None, "io", "builtins"):
        target = _arg(call, 0, "file")
        if isinstance(target, ast.Attribute) and target.attr == "devnull":
            return None  # os.devnull is no file
        return "open 'w'" if _mode_writes(_arg(call, 1, "mode")) else None
    if name == "open" and owner == "os":
        return ("os.open O_CREAT/O_WRONLY" if _flags_write(_arg(call, 1, "flags"), values)
                else None)
    if name == "fdopen":
        return "os.fdopen 'w'" if _mode_writes(_arg(call, 1, "mode")) else None
    if name == "open":  # a method: OpenFolder.open(name, flags), Path.open(mode), Image.open
        if len(call.args) >= 2:
            return ".open O_CREAT/O_WRONLY" if _flags_write(call.args[1], values) else None
        mode = call.args[0] if call.args else _arg(call, 99, "mode")
        if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
            return ".open 'w'" if _mode_writes(mode) else None
        return None  # Image.open(path); OutputFile.open() (the rule's own writer)
    if owner == "os" and name in _OS_WRITES:
        return f"os.{name}"
    if owner == "shutil" and name in _SHUTIL_WRITES:
        return f"shutil.{name}"
    if owner is None and name in _SHUTIL_WRITES - {"copy", "move"}:  # from shutil import ...
        return f"shutil.{name}"
    if owner == "torch" and name == "save":
        return "torch.save"
    if owner in ("np", "numpy") and name == "save":
        return "numpy.save"
    if owner is not None and name in _PATH_WRITES:  # Path's methods (any receiver's)
        return f".{name}"
    if owner is not None and name in ("rename", "replace") and owner != "dataclasses" \
            and len(call.args) == 1 and not call.keywords:
        return f".{name}"  # Path.rename/replace; str.replace takes two arguments
    if owner is not None and name in ("save", "savefig"):
        target = _arg(call, 0, "fp" if name == "save" else "fname")
        if isinstance(target, ast.Name) and target.id in buffers:
            return None
        return f".{name}"
    if name in _TEMPFILES:
        return f"tempfile.{name}"
    if name in _LIBRARY_WRITERS or (owner == "wandb" and name == "init"):
        return f"{owner + '.' if owner else ''}{name}"
    download = next((k.value for k in call.keywords if k.arg == "download"), None)
    if download is not None and not (isinstance(download, ast.Constant)
                                     and not download.value):
        return "download="  # torchvision and the like fetch into a folder
    return None


def _aliases(module: str, tree: ast.AST, is_package: bool) -> dict[str, str]:
    """Local name -> dotted target of every ``from ... import`` in a module (relative imports
    resolved)."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _from_target(node, here)
            for a in node.names:
                out[a.asname or a.name] = f"{target}.{a.name}"
    return out


def file_writes(package: Path, extra: dict[str, str] | None = None
                ) -> list[tuple[str, int, str]]:
    """(module inside ``package``, line, kind) of every file write in it: each primitive, and
    each call from a module above ``state`` of a low-level path writer. ``extra``: more
    modules (dotted name inside the package -> source), as if they were there."""
    root = package.name
    sources = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        sources[".".join(parts[:-1] if is_package else parts)] = (
            path.read_text(encoding="utf-8"), is_package)
    for name, text in (extra or {}).items():
        sources[name] = (text, False)
    trees = {m: ast.parse(text) for m, (text, _) in sources.items()}
    aliases = {m: _aliases(f"{root}.{m}" if m else root, trees[m], sources[m][1])
               for m in trees}
    low = _layer("state")  # state and the layers below it: helpers, not commands

    def is_low(m: str) -> bool:
        return bool(m) and _layer(m.split(".")[0]) >= low

    def resolve(name: str) -> str:
        for _ in range(5):  # follow re-exports
            mod, _, attr = name.rpartition(".")
            target = aliases.get(mod[len(root) + 1:] if mod != root else "", {}).get(attr)
            if target is None or target == name:
                break
            name = target
        return name

    def uses(m: str, node: ast.AST) -> list[tuple[int, str]]:
        """Each package function ``node`` calls or hands on (``pool.submit(save_image, ...)``),
        resolved."""
        found = []
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                target = aliases[m].get(n.id, f"{root}.{m}.{n.id}")
            elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) \
                    and n.value.id in aliases[m]:
                target = f"{aliases[m][n.value.id]}.{n.attr}"
            else:
                continue
            found.append((n.lineno, resolve(target)))
        return found

    direct = {}
    for m, tree in trees.items():
        buffers, values = _in_memory(tree), _assigned(tree)
        direct[m] = [(n.lineno, kind) for n in ast.walk(tree) if isinstance(n, ast.Call)
                     and (kind := _primitive(n, buffers, values)) is not None]
    functions = {f"{root}.{m}.{node.name}": (m, node) for m, tree in trees.items() if is_low(m)
                 for node in tree.body
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    writers = {f for f, (m, node) in functions.items()
               if any(line in range(node.lineno, node.end_lineno + 1) for line, _ in direct[m])}
    used = {f: {t for _, t in uses(m, node)} for f, (m, node) in functions.items()}
    while True:  # the closure: a low-level function that uses a path writer is one
        more = {f for f in functions if f not in writers and used[f] & writers}
        if not more:
            break
        writers |= more
    found = []
    for m, tree in trees.items():
        found += [(m, line, kind) for line, kind in direct[m]]
        if not is_low(m):
            found += [(m, line, f"uses {t[len(root) + 1:]}") for line, t in uses(m, tree)
                      if t in writers]
    return sorted(set(found))


def stray_writes(package: Path, extra: dict[str, str] | None = None) -> list[str]:
    """The file writes :data:`WRITERS` does not allow, one line each."""
    return [f"{m}:{line} {kind}: write through diffunet.output_files (claim_file, open_folder) "
            "or diffunet.outputs (OutputFolder), or add the module and kind to WRITERS with "
            "the reason it is safe"
            for m, line, kind in file_writes(package, extra) if kind not in WRITERS.get(m, {})]


def test_every_file_a_command_writes_goes_through_the_output_rule() -> None:
    assert stray_writes(PACKAGE) == []


def test_the_output_rule_scan_has_teeth() -> None:
    # each idiom, in a command module that is not there
    probe = {
        "cli.probe": "from pathlib import Path\nPath('x').write_text('y')\n",
        "cli.probe2": (
            "import os, shutil, torch, tempfile\nfrom PIL import Image\n"
            "from ..images import save_grid\nfrom .. import checkpoint\n"
            "open(p, 'wb')\nopen(p, mode)\nos.open(p, os.O_WRONLY | os.O_CREAT)\n"
            "os.open(p, flags)\np.open('a')\nfolder.open(n, os.O_CREAT)\nos.replace(a, b)\n"
            "p.rename(q)\nshutil.copyfile(a, b)\ntorch.save(x, p)\nimg.save(p)\n"
            "save_grid(x, p)\ncheckpoint.save_model(p, net, s)\np.unlink()\n"
            "tempfile.mkstemp()\nds(root, download=True)\nsave_file(t, p)\n"
            "from ..images import save_image\npool.submit(save_image, x, p)\n"),
        "cli.probe3": (  # reads, buffers and string methods are no writes
            "import io, os, dataclasses\nopen(p)\nopen(p, 'rb')\nopen(os.devnull, 'w')\n"
            "os.open(p, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))\n"
            "s.replace('a', 'b')\ndataclasses.replace(c)\nbuf = io.BytesIO()\n"
            "img.save(buf, format='PNG')\nImage.open(p)\nclaim.open()\nf.write(b'x')\n"),
    }
    found = {}
    for m, line, kind in file_writes(PACKAGE, probe):
        found.setdefault(m, []).append((line, kind))
    assert found["cli.probe"] == [(2, ".write_text")]
    assert [kind for _, kind in found["cli.probe2"]] == [
        "open 'w'", "open 'w'", "os.open O_CREAT/O_WRONLY", "os.open O_CREAT/O_WRONLY",
        ".open 'w'", ".open O_CREAT/O_WRONLY", "os.replace", ".rename", "shutil.copyfile",
        "torch.save", ".save", "uses images.save_grid", "uses checkpoint.save_model",
        ".unlink", "tempfile.mkstemp", "download=", "save_file", "uses images.save_image"]
    assert "cli.probe3" not in found
    stray = [s for s in stray_writes(PACKAGE, probe) if s.startswith("cli.probe")]
    assert len(stray) == 1 + len(found["cli.probe2"]) and stray[0].startswith(
        "cli.probe:2 .write_text: write through diffunet.output_files")


def test_every_allowed_writer_is_used_and_says_why() -> None:
    used = {(m, kind) for m, _, kind in file_writes(PACKAGE)}
    for m, kinds in WRITERS.items():
        for kind, why in kinds.items():
            assert (m, kind) in used, f"WRITERS[{m!r}][{kind!r}] is not used: remove it"
            assert len(why.split()) >= 4, f"WRITERS[{m!r}][{kind!r}]: say why it is safe"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE
    lines = formulation_decisions(target)
    print("\n".join(lines))
    print(f"{len(lines)} formulation decision(s) outside formulations/ in {target}")
