"""The package's rooms: one concern per module, no import cycle, no library module importing an app,
cheap validation, and scripts whose lyra imports still resolve (a moved function breaks CI, not a user)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Front ends over the library: no library module may import one (lyra.cli is their shared entry point).
APPS = {"lyra.chat", "lyra.web", "lyra.serve", "lyra.evaluate", "lyra.export", "lyra.compare", "lyra.cli",
        "lyra.persona.__main__", "lyra.data.__main__"}
APP_ENTRYPOINTS = {"lyra.train"}  # the training entry point may use lyra.cli's helpers; nothing imports it


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module an `import` names (with `from X import y`, also X.y: y may be a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    modules = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules |= {f"{node.module}.{alias.name}" for alias in node.names}
    return modules


def lyra_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((REPO_ROOT / "lyra").rglob("*.py"))}


def test_no_library_module_imports_an_app():
    for module, path in lyra_modules().items():
        if module in APPS or module in APP_ENTRYPOINTS:
            continue
        assert not imported_modules(path) & APPS, f"{module} imports an app: {imported_modules(path) & APPS}"


def test_no_import_cycle_in_lyra():
    """Module-level imports form a DAG (imports inside functions run late and may point anywhere)."""
    modules = lyra_modules()
    graph = {module: {m for m in imported_modules(path, top_level_only=True) if m in modules and m != module}
             for module, path in modules.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dependency in sorted(graph[module]):
            if state.get(dependency) == 1:
                cycle = path[path.index(dependency):] + [dependency]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if dependency not in state:
                visit(dependency)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_trainer_holds_the_trainer_only():
    source = (REPO_ROOT / "lyra" / "trainer.py").read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 200
    tree = ast.parse(source)
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert defined == {"SupervisedLogitsTrainer", "build_trainer"}
    assert "cross_entropy" not in source and "class PrefixSharingCollator" not in source


def test_one_ignore_index_and_one_conf_dir():
    definitions = {"IGNORE_INDEX =": [], "CONF_DIR =": []}
    for module, path in lyra_modules().items():
        for line in path.read_text(encoding="utf-8").splitlines():
            for key, found in definitions.items():
                if line.startswith(key):
                    found.append(module)
    assert definitions == {"IGNORE_INDEX =": ["lyra.data.tokenization"], "CONF_DIR =": ["lyra.paths"]}


def test_validate_answers_a_bad_key_without_importing_transformers():
    """The cheapest check must stay cheap: a bad value (here an unknown language and a bad LoRA rank)
    answers before the training stack loads. A fresh interpreter, so no other test's imports count."""
    code = """
import sys
from lyra.config import validate
from lyra.errors import UserError
from lyra.paths import compose_config
for overrides in (["experiment=smoke", "lora.r=0"], ["experiment=smoke", "persona.language=fr"]):
    try:
        validate(compose_config("train", overrides))
    except UserError as error:
        print(error)
    else:
        raise SystemExit("validate accepted " + str(overrides))
print("transformers loaded:", "transformers" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "lora.r: must be an integer > 0" in result.stdout
    assert "persona.language: must be one of" in result.stdout
    assert "transformers loaded: False" in result.stdout


def script_imports() -> list[tuple[str, str, str]]:
    """(script, module, name) for every `from lyra... import name` in scripts/*.py, inside functions too."""
    found = []
    for path in sorted((REPO_ROOT / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lyra":
                found += [(path.name, node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(path.name, alias.name, "") for alias in node.names if alias.name.split(".")[0] == "lyra"]
    return found


def test_every_lyra_import_in_scripts_resolves():
    imports = script_imports()
    assert len(imports) > 20  # the benchmarks and corpus builders do import lyra
    missing = []
    for script, module, name in imports:
        try:
            imported = importlib.import_module(module)
        except ImportError as error:
            missing.append(f"{script}: {module} ({error})")
            continue
        if name and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script}: from {module} import {name}")
    assert not missing, "scripts import what lyra no longer has:\n" + "\n".join(missing)


def test_the_reader_does_not_import_the_converter():
    """formats (the one reader) and txt (the .txt -> JSONL converter) once imported each other."""
    assert not {m for m in imported_modules(REPO_ROOT / "lyra" / "data" / "formats.py") if m.startswith("lyra.data.txt")}
