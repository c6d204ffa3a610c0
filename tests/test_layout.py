"""docs/design.md's layout and house rules, enforced: who may import whom, one home per heavy
dependency, no private names across modules, printing and argument parsing only in the command
line, lazy commands, one home per formulation (nothing outside ``diffunet/formulations/`` asks
which formulation a model is; no formulation module imports another's), and the README's library
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
    ("evaluation", "judge", "plots"),  # judge: the shapes classifier; uses evaluation's FID
    ("bench", "inspection", "interop"),
    ("runs", "outputs"),
    ("state", "checkpoint"),
    ("data",),
    ("images",),
    ("likelihood", "resources"),
    ("unet", "nn"),
    ("config",),  # asks the samplers and the formulations for their rules
    # schedulers, diffusion, edm: the deprecated names of samplers and formulations' modules
    ("samplers", "schedulers", "diffusion", "edm"),
    ("formulations",),
    ("errors", "fileio", "version", "randomness", "checks", "stopping"),
]
# The one module (or package) that may import each heavy dependency.
HOMES: dict[str, set[str]] = {
    "accelerate": {"runs", "sampling"},  # sampling: its process split (PartialState)
    "safetensors": {"checkpoint", "state"},
    "tomllib": {"config"},
    "tomli": {"config"},
    "argparse": {"cli"},
    "datasets": {"data"},  # Hugging Face datasets (data.source = "hf")
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
            if node.level:
                base = here[:len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                out.append((target, a.name, node.lineno))
    return out


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


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE
    lines = formulation_decisions(target)
    print("\n".join(lines))
    print(f"{len(lines)} formulation decision(s) outside formulations/ in {target}")
